"""MNIST from the four standard IDX files: lookup, optional verified download, loading and splitting."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import torch

from elbolab.data.core import (
    DataSplits,
    TensorData,
    ValSize,
    check_binarize,
    check_seed,
    resolve_val_count,
    rows_to_split,
    seeded_generator,
)
from elbolab.data.idx import read_idx
from elbolab.errors import DataError

log = logging.getLogger(__name__)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# MD5 of the canonical .gz files the mirrors serve.
MNIST_GZ_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
# MD5 of the decompressed content: accepts a mirror that serves the same data re-compressed.
MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK = 1 << 16


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "elbolab" / "mnist"


def is_offline() -> bool:
    return os.environ.get("ELBOLAB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _locate(folder: Path) -> dict[str, Path | None]:
    """Each standard file in folder, raw preferred over .gz; also the dotted names of some distributions."""
    found: dict[str, Path | None] = {}
    for base in MNIST_FILES:
        dotted = base.replace("-idx", ".idx")
        names = (base, f"{base}.gz", dotted, f"{dotted}.gz")
        found[base] = next((folder / n for n in names if (folder / n).is_file()), None)
    return found


def _where_to_put(cache: Path) -> str:
    return (
        f"put the 4 MNIST files {', '.join(MNIST_FILES)} (each gzipped as .gz or not) into {cache}, "
        "or into DIR/mnist/ and pass --data-dir DIR (data_dir=DIR) or set ELBOLAB_DATA=DIR"
    )


def find_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four MNIST IDX files.

    Lookup order: data_dir (the folder itself, then data_dir/mnist), $ELBOLAB_DATA/mnist, then
    ~/.cache/elbolab/mnist. When none holds them, downloads into the cache folder (checksums verified)
    unless ELBOLAB_OFFLINE=1; otherwise raises one DataError listing the folders searched.
    """
    cache = default_cache_dir()
    candidates: list[tuple[Path, str]] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data_dir {root} is not an existing folder; {_where_to_put(cache)}")
        candidates += [(root, "data_dir"), (root / "mnist", "data_dir")]
    env = os.environ.get("ELBOLAB_DATA", "").strip()
    if env:
        candidates.append((Path(env).expanduser() / "mnist", "ELBOLAB_DATA"))
    candidates.append((cache, "cache"))

    for folder, origin in candidates:
        found = _locate(folder)
        missing = [base for base, path in found.items() if path is None]
        if not missing:
            return folder
        # A half-filled folder named by the user is a mistake to report; a half-filled cache gets completed.
        if len(missing) < len(MNIST_FILES) and origin != "cache":
            raise DataError(
                f"MNIST folder {folder} (from {origin}) lacks {', '.join(missing)} (gzipped or not); "
                "add the missing files or re-download all four"
            )

    searched = "; ".join(f"{folder} (from {origin})" for folder, origin in candidates)
    if is_offline():
        reason = "no download was tried because ELBOLAB_OFFLINE=1"
    else:
        try:
            _download_missing(cache)
            return cache
        except _DownloadFailed as failure:
            reason = f"the download into {cache} failed: {failure}"
    raise DataError(f"MNIST not found. Searched: {searched}; {reason}. To fix: {_where_to_put(cache)}")


class _DownloadFailed(Exception):
    pass


def _download_missing(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _DownloadFailed(f"cannot create {folder} ({error.strerror or error})") from None
    for base, path in _locate(folder).items():
        if path is None:
            _download_one(base, folder)


def _download_one(base: str, folder: Path) -> None:
    # Stops at the first file no mirror serves: the network is then most likely unreachable.
    failures = []
    for mirror in MNIST_MIRRORS:
        url = f"{mirror}{base}.gz"
        log.info("downloading %s into %s", url, folder)
        try:
            _fetch_verified(url, folder / f"{base}.gz", base)
            return
        except _DownloadFailed as failure:
            failures.append(f"{url}: {failure}")
    raise _DownloadFailed("; ".join(failures))


def _md5_of_gzip_content(path: Path) -> str | None:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def _fetch_verified(url: str, target: Path, base: str) -> None:
    """Stream url into a temporary file beside target, check its MD5, then rename it into place."""
    try:
        handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as error:
        raise _DownloadFailed(f"cannot write into {target.parent} ({error.strerror or error})") from None
    temp = Path(temp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != MNIST_GZ_MD5[base] and _md5_of_gzip_content(temp) != MNIST_RAW_MD5[base]:
            raise _DownloadFailed(
                f"checksum mismatch (MD5 {digest.hexdigest()}, expected {MNIST_GZ_MD5[base]} for the .gz "
                f"or {MNIST_RAW_MD5[base]} for its content)"
            )
        os.replace(temp, target)
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise _DownloadFailed(str(error) or type(error).__name__) from None
    finally:
        temp.unlink(missing_ok=True)


def _images_to_rows(images, labels, images_path: Path, labels_path: Path):
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels: "
            "expected the same count; one of them is from another dataset or damaged, re-download both"
        )
    x = torch.from_numpy(images).reshape(images.shape[0], -1)  # [N, H*W] uint8: densified (/ 255) per batch
    y = torch.from_numpy(labels).to(torch.int64)  # [N]
    return x, y


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    binarize: str = "none",
    seed: int = 0,
    val_size: ValSize = 10000,
) -> DataSplits:
    """MNIST as train/val/test TensorData: values in [0, 1] (stored as uint8 or bits), rows of 784 features,
    image_shape (1, 28, 28).

    The 60000 training images are split by seed into train and validation (val_size: an int count or a
    float fraction of 60000); test is the 10000 t10k images. binarize="static" draws one Bernoulli
    sample per image before splitting, so each image keeps its draw whatever val_size is.
    """
    check_binarize(binarize)
    seed = check_seed(seed)
    folder = find_mnist_dir(data_dir)
    paths = _locate(folder)
    if any(path is None for path in paths.values()):  # removed between lookup and reading
        raise DataError(f"MNIST files disappeared from {folder}; {_where_to_put(default_cache_dir())}")
    train_images = read_idx(paths["train-images-idx3-ubyte"], ndim=3)
    test_images = read_idx(paths["t10k-images-idx3-ubyte"], ndim=3)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"MNIST training images are {train_images.shape[1:]} pixels but test images "
            f"{test_images.shape[1:]}: expected the same size; the files come from different datasets"
        )
    image_shape = (1, int(train_images.shape[1]), int(train_images.shape[2]))
    x_train, y_train = _images_to_rows(
        train_images,
        read_idx(paths["train-labels-idx1-ubyte"], ndim=1),
        paths["train-images-idx3-ubyte"],
        paths["train-labels-idx1-ubyte"],
    )
    del train_images
    x_test, y_test = _images_to_rows(
        test_images,
        read_idx(paths["t10k-labels-idx1-ubyte"], ndim=1),
        paths["t10k-images-idx3-ubyte"],
        paths["t10k-labels-idx1-ubyte"],
    )
    n = x_train.shape[0]
    n_val = resolve_val_count(val_size, n, n - 1, f"MNIST ({n} training images)")
    if binarize == "static":
        # One generator drawing over the training file then the test file, in file order; stored as bits.
        generator = seeded_generator(seed, "static-binarize")
        x_train = torch.bernoulli(x_train.to(torch.float32).div_(255.0), generator=generator).bool()
        x_test = torch.bernoulli(x_test.to(torch.float32).div_(255.0), generator=generator).bool()
    order = torch.randperm(n, generator=seeded_generator(seed, "split"))
    val_index, train_index = order[:n_val].sort().values, order[n_val:].sort().values
    meta = {"class_names": [str(d) for d in range(10)]}
    test = TensorData(
        x=x_test.contiguous(), y=y_test, image_shape=image_shape, binarize=binarize, name="mnist/test",
        source_index=torch.arange(x_test.shape[0]), meta=meta,
    )
    return DataSplits(
        train=rows_to_split("mnist/train", x_train, y_train, train_index, image_shape, binarize, meta=meta),
        val=rows_to_split("mnist/val", x_train, y_train, val_index, image_shape, binarize, meta=meta),
        test=test,
    )
