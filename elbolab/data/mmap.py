"""Data sets larger than memory: a folder on disk, memory-mapped, densified one batch at a time.

Format (a folder, by convention named ``NAME.mmap``)::

    header.json   {"format": "elbolab-mmap", "version": 1, "storage": "uint8" | "bits" | "sparse", "n": N, "dim": D,
                   "levels", "image_shape", "value_min", "value_max", "nnz" (sparse), "labels": bool, "meta": {...}}
    x.bin         uint8: N x D bytes (value = byte / levels); bits: N x ceil(D/8) bytes (numpy.packbits per row,
                  big-endian bit order); absent for sparse
    indptr.bin, indices.bin, values.bin   sparse only: CSR as raw int64 [N+1], int32 [nnz], float32 [nnz]
    y.npy         optional integer labels [N] or factors [N, F] (loaded into memory: 8 bytes a row)

The header is written last, so an interrupted write leaves a folder that ``load_mmap`` refuses by name. Nothing is
read when the folder is opened except the header, the labels and (sparse) the row pointers; ``rows(index)`` reads
the requested rows through the page cache (shared by every torchrun process on the machine) and densifies them to
float32, as ``TensorData`` does for in-memory uint8 / bits / CSR. The train/validation/test split is the one
``split_three_ways`` gives an in-memory array of the same rows and seed, held as row-number arrays (no copy).

Use: ``write_mmap(folder, x, y, image_shape)`` (or ``MmapWriter`` for data written chunk by chunk), then
``elbolab train vae --data mmap --data-dir folder.mmap`` or ``load_mmap(folder)``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elbolab.data.core import (
    TEST_FRACTION,
    DataSplits,
    TensorData,
    ValSize,
    check_binarize,
    check_seed,
    image_chw,
    resolve_val_count,
    seeded_generator,
)
from elbolab.data.registry import register_source
from elbolab.errors import DataError

FORMAT, VERSION = "elbolab-mmap", 1
STORAGES = ("uint8", "bits", "sparse")
HEADER = "header.json"
LABELS = "y.npy"
SPARSE_FILES = {"indptr.bin": np.int64, "indices.bin": np.int32, "values.bin": np.float32}


# ----- writing -----
class MmapWriter:
    """Write rows chunk by chunk (for data that does not fit in memory): ``with MmapWriter(folder, dim, "uint8")
    as w: w.append(x_chunk, y_chunk)``. x chunks are uint8 [B, D] (storage uint8), bool [B, D] (bits) or
    scipy.sparse [B, D] (sparse); labels integer [B] or [B, F], given with every chunk or with none."""

    def __init__(self, folder, dim: int, storage: str, *, image_shape=None, levels: float = 255.0,
                 meta: dict | None = None):
        if storage not in STORAGES:
            raise DataError(f"expected storage one of {', '.join(STORAGES)}, got {storage!r}")
        if int(dim) < 1:
            raise DataError(f"expected dim >= 1 features per row, got {dim!r}")
        self.folder, self.dim, self.storage = Path(folder), int(dim), storage
        self.image_shape = None if image_shape is None else list(image_chw(image_shape))
        if self.image_shape is not None and math.prod(self.image_shape) != self.dim:
            raise DataError(f"image_shape {tuple(self.image_shape)} does not match {self.dim} features per row")
        self.levels = 1.0 if storage != "uint8" else float(levels)
        self.meta = dict(meta or {})
        if self.folder.exists() and any(self.folder.iterdir()):
            raise DataError(f"{self.folder} exists and is not empty: choose a new folder for write_mmap")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / HEADER).unlink(missing_ok=True)
        names = list(SPARSE_FILES) if storage == "sparse" else ["x.bin"]
        self._files = {name: open(self.folder / name, "wb") for name in names}
        self.n, self.nnz, self.low, self.high = 0, 0, math.inf, -math.inf
        self._labels: list[np.ndarray] | None = None
        if storage == "sparse":
            self._files["indptr.bin"].write(np.zeros(1, np.int64).tobytes())

    def append(self, x, y=None) -> None:
        rows = self._write_x(x)
        if (y is None) != (self._labels is None) and self.n:
            raise DataError("give labels with every chunk or with none")
        if y is not None:
            labels = np.asarray(y)
            if labels.shape[:1] != (rows,) or labels.ndim not in (1, 2) or not (
                    np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
                raise DataError(f"expected integer labels of shape [{rows}] or [{rows}, F], got {labels.dtype} "
                                f"{labels.shape}")
            self._labels = (self._labels or []) + [labels.astype(np.int64)]
        self.n += rows

    def _write_x(self, x) -> int:
        if self.storage == "sparse":
            if not (hasattr(x, "tocsr") and hasattr(x, "nnz")):
                raise DataError(f"storage 'sparse' expects scipy.sparse chunks, got {type(x).__name__}")
            csr = x.tocsr().astype(np.float32)
            csr.sum_duplicates()  # canonical: sorted, unique column indices
            self._check_width(csr.shape)
            self._files["indptr.bin"].write((csr.indptr[1:].astype(np.int64) + self.nnz).tobytes())
            self._files["indices.bin"].write(csr.indices.astype(np.int32).tobytes())
            self._files["values.bin"].write(csr.data.tobytes())
            self.nnz += int(csr.nnz)
            if not np.isfinite(csr.data).all():
                raise DataError("sparse values must be finite")
            full = csr.nnz == csr.shape[0] * csr.shape[1]
            values = csr.data if full else np.concatenate([csr.data, [0.0]])
            self._track(values, 1.0)
            return csr.shape[0]
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        self._check_width(x.shape)
        wanted = np.uint8 if self.storage == "uint8" else np.bool_
        if x.dtype != wanted:
            raise DataError(f"storage {self.storage!r} expects {np.dtype(wanted).name} rows, got {x.dtype}; "
                            + ("scale values to 0..255 and cast to uint8" if self.storage == "uint8"
                               else "threshold or binarise to bool first"))
        raw = x if self.storage == "uint8" else np.packbits(x, axis=1)
        self._files["x.bin"].write(np.ascontiguousarray(raw).tobytes())
        self._track(x, self.levels)
        return x.shape[0]

    def _check_width(self, shape) -> None:
        if len(shape) != 2 or shape[1] != self.dim:
            raise DataError(f"expected chunks of shape [B, {self.dim}], got {tuple(shape)}")

    def _track(self, values: np.ndarray, levels: float) -> None:
        if values.size:
            self.low = min(self.low, float(values.min()) / levels)
            self.high = max(self.high, float(values.max()) / levels)

    def close(self) -> Path:
        for f in self._files.values():
            f.close()
        if self.n == 0:
            raise DataError(f"no rows were written to {self.folder}")
        if self._labels is not None:
            np.save(self.folder / LABELS, np.concatenate(self._labels), allow_pickle=False)
        header = {"format": FORMAT, "version": VERSION, "storage": self.storage, "n": self.n, "dim": self.dim,
                  "levels": self.levels, "image_shape": self.image_shape, "value_min": self.low,
                  "value_max": self.high, "labels": self._labels is not None, "meta": self.meta}
        if self.storage == "sparse":
            header["nnz"] = self.nnz
        temporary = self.folder / (HEADER + ".tmp")
        temporary.write_text(json.dumps(header, indent=1))
        temporary.replace(self.folder / HEADER)  # last: a folder with a header is complete
        return self.folder

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            for f in self._files.values():
                f.close()


def write_mmap(folder, x, y=None, image_shape=None, *, levels: float = 255.0, meta: dict | None = None) -> Path:
    """Write x (uint8 [N, D] -> storage uint8, value = byte / levels; bool [N, D] -> packed bits; scipy.sparse
    [N, D] -> CSR) and optional integer labels y [N] into a new folder; returns the folder. Images [N, H, W] or
    [N, C, H, W] are flattened and keep their shape unless image_shape is given."""
    if hasattr(x, "tocsr") and hasattr(x, "nnz"):
        storage, shape = "sparse", x.shape
    else:
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.ndim in (3, 4) and image_shape is None:
            image_shape = x.shape[1:]
        if x.ndim < 2:
            raise DataError(f"expected x as [N, D] or images [N, H, W]; got shape {x.shape}")
        x = x.reshape(x.shape[0], -1)
        storage, shape = {np.dtype(np.uint8): "uint8", np.dtype(np.bool_): "bits"}.get(x.dtype), x.shape
        if storage is None:
            raise DataError(f"expected x as uint8 (grey levels), bool (binary) or scipy.sparse, got {x.dtype}; "
                            "e.g. np.round(x * 255).astype(np.uint8) for values in [0, 1]")
    with MmapWriter(folder, shape[1], storage, image_shape=image_shape, levels=levels, meta=meta) as writer:
        writer.append(x, y)
    return Path(folder)


# ----- reading -----
class MmapStore:
    """The rows of one folder, memory-mapped read-only; ``gather(rows)`` returns them dense.

    ``prefetch``: before copying a batch's rows, ask the kernel to read all of them at once (madvise WILLNEED per
    row), so that rows not in the page cache are read from disk in parallel instead of one page fault at a time
    (2.5 ms instead of 11 ms per cold batch of 128 MNIST-sized rows here). It costs a system call per row when the
    rows are cached (+0.5 ms a batch), so the default (None) turns it on only for folders larger than half the
    memory available when they are opened: those that cannot stay in the page cache (benchmarks/bench_mmap.py)."""

    def __init__(self, folder, *, prefetch: bool | None = None):
        self.folder = Path(folder).expanduser()
        self.prefetch = prefetch
        self.header = _read_header(self.folder)
        h = self.header
        self.n, self.dim, self.storage, self.levels = h["n"], h["dim"], h["storage"], float(h["levels"])
        self._maps: dict[str, mmap.mmap] = {}
        if self.storage == "sparse":
            nnz = h["nnz"]
            sizes = {"indptr.bin": self.n + 1, "indices.bin": nnz, "values.bin": nnz}
            arrays = {name: self._map(name, dtype, sizes[name]) for name, dtype in SPARSE_FILES.items()}
            self.indptr = np.array(arrays["indptr.bin"])  # [N + 1] in memory: 8 bytes a row
            self.indices, self.values = arrays["indices.bin"], arrays["values.bin"]
            if self.indptr[0] != 0 or self.indptr[-1] != nnz or (np.diff(self.indptr) < 0).any():
                raise DataError(f"{self.folder}/indptr.bin is not a valid CSR row pointer (expected 0 first, {nnz} "
                                "last, never decreasing); write the folder again with write_mmap")
        else:
            self.row_bytes = self.dim if self.storage == "uint8" else (self.dim + 7) // 8
            self.x = self._map("x.bin", np.uint8, self.n * self.row_bytes).reshape(self.n, self.row_bytes)
        self.y = self._labels() if h["labels"] else None
        if self.prefetch is None:
            size = sum(m.size() for m in self._maps.values())
            available = _available_memory()
            self.prefetch = available is None or size > available // 2

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        path = self.folder / name
        expected = count * np.dtype(dtype).itemsize
        if not path.is_file():
            raise DataError(f"{path} is missing: the folder is incomplete; write it again with write_mmap")
        size = path.stat().st_size
        if size != expected:
            raise DataError(f"{path} has {size} bytes, expected {expected} for the header's {self.n} rows x "
                            f"{self.dim} features ({self.storage}); the file is truncated or from another data set")
        if size == 0:
            return np.zeros(0, dtype)
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mapped, "madvise"):  # random rows: no read-around of neighbouring pages
            mapped.madvise(mmap.MADV_RANDOM)
        self._maps[name] = mapped
        return np.frombuffer(mapped, dtype=dtype)

    def _labels(self) -> torch.Tensor:
        path = self.folder / LABELS
        try:
            y = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"could not read the labels {path} ({error}); write the folder again") from None
        if y.ndim not in (1, 2) or y.shape[0] != self.n or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: expected integer labels of shape [{self.n}] or [{self.n}, F], got {y.dtype} "
                            f"{y.shape}")
        return torch.from_numpy(y.astype(np.int64))

    def will_need(self, rows: np.ndarray) -> None:
        """Start reading these rows (global row numbers) from disk in the background; returns at once."""
        if self.storage == "sparse":
            starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
            if "values.bin" in self._maps:  # (not mapped when there are no nonzeros)
                for name in ("indices.bin", "values.bin"):  # 4 bytes a nonzero in both
                    _will_need(self._maps[name], starts * 4, lengths * 4)
        else:
            _will_need(self._maps["x.bin"], rows * self.row_bytes, self.row_bytes)

    def gather(self, rows: np.ndarray, prefetch: bool | None = None) -> torch.Tensor:
        """Rows (global row numbers [B]) dense: uint8 [B, D] for uint8 and bits storage, float32 for sparse.
        ``prefetch`` (default: the store's) first asks for all of them at once (see the class)."""
        if self.prefetch if prefetch is None else prefetch:
            self.will_need(rows)
        if self.storage == "sparse":
            return torch.from_numpy(self._gather_sparse(rows))
        raw = self.x[rows]  # [B, row_bytes], a copy: page faults read only these rows
        if self.storage == "bits":
            raw = np.unpackbits(raw, axis=1, count=self.dim)
        return torch.from_numpy(raw)

    def _gather_sparse(self, rows: np.ndarray) -> np.ndarray:
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts  # [B]
        offsets = np.cumsum(lengths) - lengths
        positions = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))  # [nnz of the batch]
        out = np.zeros((len(rows), self.dim), np.float32)
        columns = self.indices[positions]
        if columns.size and (columns.min() < 0 or columns.max() >= self.dim):
            raise DataError(f"{self.folder}/indices.bin holds column numbers outside 0..{self.dim - 1}; the file is "
                            "corrupt: write the folder again")
        out[np.repeat(np.arange(len(rows)), lengths), columns] = self.values[positions]
        return out


_PAGE = mmap.PAGESIZE


def _available_memory() -> int | None:
    """MemAvailable in bytes (Linux), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _will_need(mapped: mmap.mmap, offsets: np.ndarray, lengths) -> None:
    """Start reading these byte ranges of a mapping (asynchronously; pages already cached cost one system call)."""
    if not hasattr(mapped, "madvise"):
        return
    lengths = np.broadcast_to(lengths, offsets.shape)
    first = offsets // _PAGE * _PAGE
    for start, length in zip(first.tolist(), (offsets + lengths - first).tolist()):
        if length > 0:
            mapped.madvise(mmap.MADV_WILLNEED, start, length)


def _read_header(folder: Path) -> dict:
    path = folder / HEADER
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected a folder written by elbolab.data.mmap.write_mmap")
    if not path.is_file():
        raise DataError(f"{folder} has no {HEADER}: not a folder written by write_mmap, or its write was "
                        "interrupted; write it again")
    try:
        header = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"could not read {path} as JSON ({error}); write the folder again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path} is not an elbolab memory-mapped data header (expected format {FORMAT!r})")
    if header.get("version") != VERSION:
        raise DataError(f"{path} has format version {header.get('version')!r}; this elbolab reads version {VERSION}")
    kinds = {"storage": str, "n": int, "dim": int, "levels": (int, float), "value_min": (int, float),
             "value_max": (int, float), "labels": bool, "meta": dict}
    for key, kind in kinds.items():
        if not isinstance(header.get(key), kind) or (key in ("n", "dim") and header[key] < 1):
            raise DataError(f"{path}: expected a field {key!r} of type {kind}, got {header.get(key)!r}")
    if header["storage"] not in STORAGES:
        raise DataError(f"{path}: unknown storage {header['storage']!r}; expected one of {', '.join(STORAGES)}")
    if header["storage"] == "sparse" and not (isinstance(header.get("nnz"), int) and header["nnz"] >= 0):
        raise DataError(f"{path}: sparse storage needs a field 'nnz' >= 0, got {header.get('nnz')!r}")
    shape = header.get("image_shape")
    if shape is not None and (not isinstance(shape, list) or math.prod(image_chw(shape)) != header["dim"]):
        raise DataError(f"{path}: image_shape {shape!r} does not match {header['dim']} features per row")
    return header


class MmapRows:
    """Rows ``index`` [M] of a store, as the ``x`` of a TensorData split: shape, row slices (``head``) and dense
    gathers; nothing is copied until a batch asks for its rows."""

    def __init__(self, store: MmapStore, index: torch.Tensor):
        self.store, self.index = store, index

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.index), self.store.dim)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows) -> MmapRows:
        if not isinstance(rows, slice):
            raise TypeError("MmapRows takes row slices; use dense(index) for the values")
        return MmapRows(self.store, self.index[rows])

    def dense(self, index: torch.Tensor, prefetch: bool | None = None) -> torch.Tensor:
        """The rows at positions ``index`` [B], dense (uint8 or float32 [B, D])."""
        return self.store.gather(self.index[index].numpy(), prefetch)


@dataclass
class MmapData(TensorData):
    """A TensorData split whose x is an ``MmapRows`` (rows of a memory-mapped folder): batches are densified from
    the page cache exactly as in-memory uint8 / bits / CSR rows are.

    ``prefetch(index)`` starts reading a later batch's rows in the background: a loop that calls it with the next
    batch before computing the current one hides the disk behind the step (benchmarks/bench_mmap.py)."""

    def __post_init__(self) -> None:
        self._ahead: list[torch.Tensor] = []  # the indices given to prefetch and not yet read (a few)
        check_binarize(self.binarize)
        if not isinstance(self.x, MmapRows):
            raise DataError(f"MmapData {self.name!r}: expected x as MmapRows, got {type(self.x).__name__}")
        n = self.x.shape[0]
        for name, values in (("y", self.y), ("source_index", self.source_index)):
            if values is not None and len(values) != n:
                raise DataError(f"MmapData {self.name!r}: expected {name} with {n} rows, got {len(values)}")
        if self.image_shape is not None:
            self.image_shape = image_chw(self.image_shape)

    def prefetch(self, index: torch.Tensor) -> None:
        """Start reading the rows at ``index`` [B] from disk; returns at once."""
        self.x.store.will_need(self.x.index[index].numpy())
        self._ahead = [*self._ahead[-7:], index]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """x[index] densified to float32 [B, D] (a copy)."""
        ahead = any(index is a for a in self._ahead)
        if ahead:
            self._ahead = [a for a in self._ahead if a is not index]
        rows = self.x.dense(index, prefetch=False if ahead else None)  # already asked for: no second request
        if rows.dtype == torch.uint8:
            return rows.to(torch.float32).div_(self.levels)
        return rows.to(torch.float32)

    def value_range(self) -> tuple[float, float]:
        """The range over all rows of the folder (from its header, without a pass over the data): it bounds every
        split's values."""
        if len(self) == 0:
            return 0.0, 0.0
        header = self.x.store.header
        return float(header["value_min"]), float(header["value_max"])


def load_mmap(folder, *, binarize: str = "none", seed: int = 0, val_size: ValSize = 0.15) -> DataSplits:
    """Train/validation/test splits of a folder written by ``write_mmap``, memory-mapped.

    The same rows go to each split as ``split_three_ways`` gives the same data held in memory (test 15%, then
    ``val_size``, the rest for training; from the seed). binarize "dynamic" draws per batch; "static" (one draw
    per value of the whole data set up front) is refused: write the data binarised (bits storage) instead.
    """
    check_binarize(binarize)
    seed = check_seed(seed)
    store = MmapStore(folder)
    if binarize == "static":
        raise DataError("binarize='static' draws every value of the data set up front, which a memory-mapped folder "
                        "avoids; write the folder binarised (bool x, bits storage) or use binarize='dynamic'")
    low, high = float(store.header["value_min"]), float(store.header["value_max"])
    if binarize != "none" and (low < 0.0 or high > 1.0):
        raise DataError(f"binarize={binarize!r} needs values in [0, 1]; {store.folder} has values from {low:g} to "
                        f"{high:g}. Write it with levels so that byte / levels <= 1, or use binarize='none'")
    n = store.n
    if n < 3:
        raise DataError(f"{store.folder} has {n} row(s): expected at least 3 (one each for train, validation, test)")
    n_test = max(1, round(TEST_FRACTION * n))
    n_val = resolve_val_count(val_size, n, n - n_test - 1, str(store.folder))
    order = torch.randperm(n, generator=seeded_generator(seed, "split"))  # as split_three_ways
    header, prefix = store.header, store.folder.name.removesuffix(".mmap")
    extra = {"levels": store.levels, "meta": dict(header["meta"])}
    shape = tuple(header["image_shape"]) if header["image_shape"] else None

    def split(name: str, index: torch.Tensor) -> MmapData:
        return MmapData(x=MmapRows(store, index), y=None if store.y is None else store.y[index].contiguous(),
                        image_shape=shape, binarize=binarize, name=f"{prefix}/{name}", source_index=index, **extra)

    return DataSplits(train=split("train", order[n_test + n_val:].sort().values),
                      val=split("val", order[n_test:n_test + n_val].sort().values),
                      test=split("test", order[:n_test].sort().values))


@register_source("mmap")
def _mmap_source(*, data_dir=None, binarize: str = "none", seed: int = 0, val_size: ValSize | None = None):
    """``--data mmap --data-dir FOLDER``: a folder written by write_mmap."""
    if data_dir is None:
        raise DataError("--data mmap reads the folder given by --data-dir (a folder written by "
                        "elbolab.data.mmap.write_mmap); got no --data-dir")
    return load_mmap(os.fspath(data_dir), binarize=binarize, seed=seed, val_size=0.15 if val_size is None else val_size)


__all__ = ["MmapData", "MmapRows", "MmapStore", "MmapWriter", "load_mmap", "write_mmap"]
