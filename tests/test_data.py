"""Data layer: IDX reading and validation, MNIST lookup/download, splits, binarization, digits, user files.

Synthetic IDX files are built here with struct (independently of the reader); nothing touches the network.
Tests on the real MNIST files need ELBOLAB_DATA (a folder with mnist/ inside) and skip without it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits

import elbolab.data.mnist as mnist_module
from elbolab.data import (
    BINARIZE_MODES,
    DataSplits,
    TensorData,
    find_mnist_dir,
    load_array_file,
    load_data,
    load_digits,
    load_mnist,
    read_idx,
)
from elbolab.errors import DataError, ElbolabError

NAMES = mnist_module.MNIST_FILES  # train images, train labels, test images, test labels


def dense(split):
    """All rows of a split as float32 (splits store uint8 / bits and densify per batch)."""
    return split.rows(torch.arange(len(split)))


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fake_mnist(folder: Path, n_train=30, n_test=8, side=4, gz=True, seed=0, n_train_labels=None):
    """Four IDX files of random images; returns (train_images, train_labels, test_images, test_labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, size=(n_train, side, side), dtype=np.uint8),
        rng.integers(0, 10, size=n_train if n_train_labels is None else n_train_labels, dtype=np.uint8),
        rng.integers(0, 256, size=(n_test, side, side), dtype=np.uint8),
        rng.integers(0, 10, size=n_test, dtype=np.uint8),
    )
    for name, array in zip(NAMES, arrays):
        write_idx(folder / (f"{name}.gz" if gz else name), array, gz)
    return arrays


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """Empty HOME, no ELBOLAB_DATA, offline, and any network access fails the test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ELBOLAB_DATA", raising=False)
    monkeypatch.setenv("ELBOLAB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to open a URL")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return home


def cache_dir(home: Path) -> Path:
    return home / ".cache" / "elbolab" / "mnist"


def reassemble(splits: DataSplits, n: int) -> torch.Tensor:
    """The full source array rebuilt from the three splits through source_index (asserts they tile it)."""
    index = torch.cat([part.source_index for part in (splits.train, splits.val, splits.test)])
    assert torch.equal(index.sort().values, torch.arange(n))
    full = torch.empty(n, splits.train.dim)
    for part in (splits.train, splits.val, splits.test):
        full[part.source_index] = part.rows(torch.arange(len(part)))
    return full


# ---------------------------------------------------------------- IDX reading


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("shape", [(5, 3, 4), (7,)])
def test_read_idx_round_trip(tmp_path, gz, shape):
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path / "file", array, gz)
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable, and a copy


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_names_file_and_byte_counts(tmp_path, gz):
    data = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))[:-5]  # 48 data bytes declared, 43 present
    path = tmp_path / ("cut.gz" if gz else "cut")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as caught:
        read_idx(path, ndim=3)
    message = str(caught.value)
    assert str(path) in message and "truncated" in message
    assert "48" in message and "43" in message and "re-download it" in message


def test_extra_bytes_are_reported(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x01\x02")
    with pytest.raises(DataError, match=r"6 bytes of data but its header declares 4"):
        read_idx(path)


def test_bad_magic_number(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DataError) as caught:
        read_idx(path, ndim=3)
    message = str(caught.value)
    assert "0x12340803" in message and "0x00000803" in message and str(path) in message


def test_unsupported_type_byte_and_wrong_dimension_count(tmp_path):
    floats = tmp_path / "floats"
    floats.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + bytes(8))
    with pytest.raises(DataError, match="type byte 0x0d"):
        read_idx(floats)
    labels = write_idx(tmp_path / "labels", np.zeros(6, dtype=np.uint8), gz=False)
    with pytest.raises(DataError, match=r"declares 1 dimension.*expected 0x00000803"):
        read_idx(labels, ndim=3)


def test_corrupt_and_cut_gzip(tmp_path):
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00" + bytes(6) + b"definitely not deflate data")
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))[:40])
    for path in (garbage, cut):
        with pytest.raises(DataError) as caught:
            read_idx(path)
        assert "corrupt or truncated gzip" in str(caught.value) and str(path) in str(caught.value)


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "absent")


def test_image_label_count_mismatch(tmp_path, isolated_env):
    write_fake_mnist(tmp_path / "m", n_train=20, n_train_labels=19)
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path / "m", val_size=5)
    message = str(caught.value)
    assert "20 images" in message and "19 labels" in message and "train-labels-idx1-ubyte" in message


# ---------------------------------------------------------------- MNIST lookup and download


def test_lookup_order(tmp_path, isolated_env, monkeypatch):
    explicit, env_root = tmp_path / "explicit", tmp_path / "env"
    write_fake_mnist(explicit, n_train=11)
    write_fake_mnist(env_root / "mnist", n_train=12, gz=False)
    write_fake_mnist(cache_dir(isolated_env), n_train=13)
    monkeypatch.setenv("ELBOLAB_DATA", str(env_root))

    assert find_mnist_dir(explicit) == explicit  # the folder holding the files
    assert find_mnist_dir(env_root) == env_root / "mnist"  # or its parent holding mnist/
    assert find_mnist_dir() == env_root / "mnist"
    assert len(load_mnist(explicit, val_size=1).train) == 10  # data_dir beats ELBOLAB_DATA
    assert len(load_mnist(val_size=1).train) == 11  # ELBOLAB_DATA (raw files) beats the cache
    monkeypatch.delenv("ELBOLAB_DATA")
    assert find_mnist_dir() == cache_dir(isolated_env)
    assert len(load_mnist(val_size=1).train) == 12


def test_half_filled_folder_and_missing_data_dir(tmp_path, isolated_env):
    write_fake_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte"):
        find_mnist_dir(tmp_path / "m")
    with pytest.raises(DataError, match="not an existing folder"):
        find_mnist_dir(tmp_path / "typo")


def test_missing_mnist_offline_gives_one_helpful_error(tmp_path, isolated_env, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("ELBOLAB_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError) as caught:
        load_data("mnist", data_dir=empty)
    message = str(caught.value)
    for folder in (empty, empty / "mnist", tmp_path / "data" / "mnist", cache_dir(isolated_env)):
        assert str(folder) in message
    for name in NAMES:
        assert name in message
    assert "--data-dir" in message and "ELBOLAB_DATA" in message and "ELBOLAB_OFFLINE=1" in message


@pytest.fixture
def file_mirror(tmp_path, monkeypatch):
    """A mirror served from a local folder through file:// URLs (no network), with downloads allowed."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ELBOLAB_DATA", raising=False)
    monkeypatch.delenv("ELBOLAB_OFFLINE", raising=False)
    mirror = tmp_path / "mirror"
    arrays = write_fake_mnist(mirror, n_train=9, n_test=3)
    checksums = {name: hashlib.md5((mirror / f"{name}.gz").read_bytes()).hexdigest() for name in NAMES}
    absent = (tmp_path / "no-such-mirror").as_uri() + "/"
    monkeypatch.setattr(mnist_module, "MNIST_MIRRORS", (absent, mirror.as_uri() + "/"))
    monkeypatch.setattr(mnist_module, "MNIST_GZ_MD5", checksums)
    monkeypatch.setattr(mnist_module, "MNIST_RAW_MD5", dict.fromkeys(NAMES, "0" * 32))
    return mirror, arrays, cache_dir(home)


def test_download_verifies_and_writes_into_cache(file_mirror):
    mirror, arrays, cache = file_mirror
    splits = load_mnist(val_size=2)  # first mirror fails, the second serves the files
    for name in NAMES:
        assert (cache / f"{name}.gz").read_bytes() == (mirror / f"{name}.gz").read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{name}.gz" for name in NAMES)
    np.testing.assert_array_equal(dense(splits.test).numpy(), arrays[2].reshape(3, -1) / np.float32(255))


def test_download_with_wrong_checksum_fails_and_leaves_nothing(file_mirror, monkeypatch):
    _, _, cache = file_mirror
    monkeypatch.setattr(mnist_module, "MNIST_GZ_MD5", dict.fromkeys(NAMES, "f" * 32))
    with pytest.raises(DataError) as caught:
        find_mnist_dir()
    assert "checksum mismatch" in str(caught.value) and "--data-dir" in str(caught.value)
    assert list(cache.iterdir()) == []


def test_download_accepts_recompressed_content_by_its_checksum(file_mirror, monkeypatch):
    mirror, _, cache = file_mirror
    content = {n: hashlib.md5(gzip.decompress((mirror / f"{n}.gz").read_bytes())).hexdigest() for n in NAMES}
    monkeypatch.setattr(mnist_module, "MNIST_GZ_MD5", dict.fromkeys(NAMES, "f" * 32))
    monkeypatch.setattr(mnist_module, "MNIST_RAW_MD5", content)
    assert find_mnist_dir() == cache


# ---------------------------------------------------------------- MNIST splitting and binarization


def test_mnist_split_sizes_content_and_reproducibility(tmp_path, isolated_env):
    train_images, train_labels, test_images, test_labels = write_fake_mnist(tmp_path / "m", n_train=30)
    splits = load_mnist(tmp_path / "m", val_size=6, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 8)
    assert splits.train.image_shape == (1, 4, 4) and splits.train.dim == 16
    assert [s.name for s in (splits.train, splits.val, splits.test)] == ["mnist/train", "mnist/val", "mnist/test"]
    train_index, val_index = splits.train.source_index, splits.val.source_index
    assert torch.equal(torch.cat([train_index, val_index]).sort().values, torch.arange(30))  # disjoint, complete
    expected = train_images.reshape(30, 16).astype(np.float32) / 255
    for part in (splits.train, splits.val):
        np.testing.assert_array_equal(dense(part).numpy(), expected[part.source_index.numpy()])
        np.testing.assert_array_equal(part.y.numpy(), train_labels[part.source_index.numpy()])
    np.testing.assert_array_equal(dense(splits.test).numpy(), test_images.reshape(8, 16) / np.float32(255))
    np.testing.assert_array_equal(splits.test.y.numpy(), test_labels)
    assert torch.equal(load_mnist(tmp_path / "m", val_size=6, seed=3).val.source_index, val_index)
    assert not torch.equal(load_mnist(tmp_path / "m", val_size=6, seed=4).val.source_index, val_index)
    assert len(load_mnist(tmp_path / "m", val_size=0.5).val) == 15  # a fraction of the 30 images


@pytest.mark.parametrize("bad", [0, 30, 0.0, 1.0, -3, True, "100"])
def test_bad_val_size(tmp_path, isolated_env, bad):
    write_fake_mnist(tmp_path / "m", n_train=30)
    with pytest.raises(ElbolabError, match="val_size"):
        load_mnist(tmp_path / "m", val_size=bad)


def test_mnist_static_binarization_is_per_image(tmp_path, isolated_env):
    write_fake_mnist(tmp_path / "m", n_train=40, n_test=10, side=6)
    grey = load_mnist(tmp_path / "m", val_size=5)
    small = load_mnist(tmp_path / "m", val_size=5, binarize="static", seed=7)
    large = load_mnist(tmp_path / "m", val_size=20, binarize="static", seed=7)
    for splits in (small, large):
        assert set(dense(splits.train).unique().tolist()) <= {0.0, 1.0}
        assert splits.train.x.dtype == torch.bool  # binary images are stored as bits
        assert torch.equal(splits.test.x, small.test.x)

    def full_train(splits):
        full = torch.empty(40, 36)
        for part in (splits.train, splits.val):
            full[part.source_index] = part.rows(torch.arange(len(part)))
        return full

    assert torch.equal(full_train(small), full_train(large))  # each image keeps its draw whatever the split
    other = load_mnist(tmp_path / "m", val_size=5, binarize="static", seed=8)
    assert not torch.equal(full_train(other), full_train(small))
    assert ((full_train(small) == 1) <= (full_train(grey) > 0)).all()  # a black pixel is never drawn as 1


# ---------------------------------------------------------------- binarization on digits


def test_unknown_binarize_mode_lists_the_valid_ones():
    with pytest.raises(ElbolabError) as caught:
        load_digits(binarize="threshold")
    assert all(mode in str(caught.value) for mode in BINARIZE_MODES)


def test_static_binarization_reproducible_and_unbiased():
    grey = reassemble(load_digits(), 1797)
    first = reassemble(load_digits(binarize="static", seed=11), 1797)
    again = reassemble(load_digits(binarize="static", seed=11, val_size=0.3), 1797)
    other = reassemble(load_digits(binarize="static", seed=12), 1797)
    assert torch.equal(first, again)  # same seed: same draw per image, whatever the split
    assert not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert (first[grey == 0] == 0).all() and (first[grey == 1] == 1).all()
    # Bernoulli(p) draws average to p: compare the mean against the grey mean, with 5 standard errors.
    tolerance = 5 * torch.sqrt((grey * (1 - grey)).sum()) / grey.numel()
    assert abs(first.mean() - grey.mean()) < tolerance


def test_dynamic_binarization_draws_fresh_samples_with_the_right_mean():
    dynamic, grey = load_digits(binarize="dynamic", seed=2), load_digits(seed=2)
    assert torch.equal(dynamic.train.x, grey.train.x)  # grey levels kept in x
    index = torch.arange(20)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([dynamic.train.batch(index, generator).x for _ in range(4000)])  # [4000, 20, 64]
    assert draws.dtype == torch.float32 and set(draws.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(draws[0], draws[1])
    p = dynamic.train.x[index]
    standard_error = torch.sqrt(p * (1 - p) / 4000)
    assert ((draws.mean(0) - p).abs() <= 5 * standard_error + 1e-6).all()
    repeat = dynamic.train.batch(index, torch.Generator().manual_seed(0)).x
    assert torch.equal(repeat, draws[0])  # the generator makes draws reproducible


def test_batch_returns_a_copy_and_basic_properties():
    split = load_digits().train
    batch = split.batch(torch.tensor([3, 1]))
    rows = batch.x
    assert torch.equal(batch.index, torch.tensor([3, 1])) and torch.equal(batch.y, split.y[[3, 1]])
    assert rows.shape == (2, 64) and len(split) == 1257 and split.dim == 64
    rows.fill_(5.0)
    assert split.x.max() <= 1.0
    with pytest.raises(ElbolabError, match="2-D float32"):
        TensorData(x=torch.zeros(3), y=None, image_shape=None, binarize="none", name="bad")
    with pytest.raises(ElbolabError, match="2-D float32"):
        TensorData(x=torch.zeros(3, 2, dtype=torch.int64), y=None, image_shape=None, binarize="none", name="bad")


# ---------------------------------------------------------------- digits


def test_digits_shapes_values_labels_and_split():
    splits = load_digits(seed=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1257, 270, 270)
    assert splits.train.image_shape == (1, 8, 8) and splits.train.x.dtype == torch.float32
    full = reassemble(splits, 1797)
    reference = sklearn_digits()
    np.testing.assert_allclose(full.numpy(), reference.data / 16.0, rtol=0, atol=1e-7)
    for part in (splits.train, splits.val, splits.test):
        np.testing.assert_array_equal(part.y.numpy(), reference.target[part.source_index.numpy()])
    assert sorted(splits.train.y.unique().tolist()) == list(range(10))
    assert 0.0 <= float(full.min()) and float(full.max()) <= 1.0
    same, other = load_digits(seed=5), load_digits(seed=6)
    assert torch.equal(same.val.source_index, splits.val.source_index)
    assert not torch.equal(other.val.source_index, splits.val.source_index)
    assert torch.equal(load_digits(seed=5, val_size=100).test.source_index, splits.test.source_index)
    assert len(load_digits(val_size=100).val) == 100


def test_load_data_dispatch(tmp_path, isolated_env):
    assert torch.equal(load_data(" Digits ", seed=1).val.x, load_digits(seed=1).val.x)
    write_fake_mnist(tmp_path / "m", n_train=30)
    assert len(load_data("mnist", data_dir=tmp_path / "m", val_size=4).val) == 4
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((20, 3)))
    assert load_data(str(tmp_path / "a.npy")).train.name == "a/train"
    with pytest.raises(DataError, match="unknown data source 'cifar'"):
        load_data("cifar")


# ---------------------------------------------------------------- user files


def test_npy_matrix_and_images(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.random((40, 5))
    np.save(tmp_path / "m.npy", matrix)
    splits = load_array_file(tmp_path / "m.npy", seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (28, 6, 6)
    assert splits.train.y is None and splits.train.image_shape is None
    np.testing.assert_allclose(reassemble(splits, 40).numpy(), matrix, rtol=1e-6)
    for shape in [(20, 3, 2), (20, 1, 3, 2)]:
        images = rng.random(shape)
        np.save(tmp_path / "i.npy", images)
        splits = load_array_file(tmp_path / "i.npy", binarize="static")
        assert splits.train.image_shape == (1, 3, 2) and splits.train.dim == 6


def test_npz_keys_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 4)), rng.integers(0, 3, 30)
    np.savez(tmp_path / "a.npz", images=x, labels=y.astype(np.float64))
    splits = load_array_file(tmp_path / "a.npz")
    for part in (splits.train, splits.val, splits.test):
        np.testing.assert_array_equal(part.y.numpy(), y[part.source_index.numpy()])
        assert part.y.dtype == torch.int64
    np.savez(tmp_path / "only.npz", x)  # a single unnamed array (arr_0) is the features
    np.testing.assert_allclose(reassemble(load_array_file(tmp_path / "only.npz"), 30).numpy(), x, rtol=1e-6)
    np.savez(tmp_path / "keys.npz", a=x, b=y)
    with pytest.raises(DataError, match=r"arrays \['a', 'b'\].*x, X, data, images"):
        load_array_file(tmp_path / "keys.npz")


def test_csv_with_header_label_column_and_without_header(tmp_path):
    rows = np.random.default_rng(0).integers(0, 9, size=(12, 3))
    labels = np.arange(12) % 4
    text = "f1,Label,f2,f3\n" + "".join(f"{a},{c},{b},{d}\n" for (a, b, d), c in zip(rows, labels))
    (tmp_path / "h.csv").write_text(text)
    splits = load_array_file(tmp_path / "h.csv")
    np.testing.assert_array_equal(reassemble(splits, 12).numpy(), rows)
    for part in (splits.train, splits.val, splits.test):
        np.testing.assert_array_equal(part.y.numpy(), labels[part.source_index.numpy()])
    (tmp_path / "n.csv").write_text("".join(f"{a},{b},{d}\n" for a, b, d in rows))
    plain = load_array_file(tmp_path / "n.csv")
    assert plain.train.y is None
    np.testing.assert_array_equal(reassemble(plain, 12).numpy(), rows)


def test_three_rows_are_enough_for_three_splits(tmp_path):
    (tmp_path / "tiny.csv").write_text(' 1 , 2\n3,4\n"5","6"\n')
    splits = load_array_file(tmp_path / "tiny.csv")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1, 1, 1)
    np.testing.assert_array_equal(reassemble(splits, 3).numpy(), [[1, 2], [3, 4], [5, 6]])


def _save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _bad_inputs(tmp_path: Path):
    """(file, binarize, fragments the error message must contain)."""
    ok = np.random.default_rng(0).random((10, 3))
    with_nan = ok.copy()
    with_nan[3, 1] = with_nan[7, 0] = np.nan
    with_inf = ok.copy()
    with_inf[5, 2] = -np.inf
    np.save(tmp_path / "nan.npy", with_nan)
    np.save(tmp_path / "inf.npy", with_inf)
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    np.save(tmp_path / "text.npy", np.array([["a", "b"]] * 5))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    np.save(tmp_path / "two.npy", ok[:2])
    np.save(tmp_path / "big.npy", ok * 3)
    (tmp_path / "cell.csv").write_text("a,b\n1,2\n3,abc\n")
    (tmp_path / "ragged.csv").write_text("1,2\n3,4\n5\n")
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n5,6\n")
    (tmp_path / "data.txt").write_text("1,2\n")
    (tmp_path / "header.csv").write_text("a,b\n")
    (tmp_path / "garbage.npy").write_text("not numpy\n")
    np.save(tmp_path / "renamed.npz", ok)  # np.save appends .npy: renamed below
    (tmp_path / "renamed.npz.npy").rename(tmp_path / "renamed.npz")
    return [
        (tmp_path / "nan.npy", "none", ["2 NaN", "row 3"]),
        (tmp_path / "inf.npy", "none", ["1 infinite", "row 5"]),
        (tmp_path / "flat.npy", "none", ["shape (10,)", "[N, 1]"]),
        (tmp_path / "text.npy", "none", ["numeric", "<U1"]),
        (tmp_path / "objects.npy", "none", ["Python objects"]),
        (tmp_path / "two.npy", "none", ["2 row(s)", "at least 3"]),
        (tmp_path / "big.npy", "static", ["[0, 1]", "binarize='static'"]),
        (tmp_path / "cell.csv", "none", ["line 3, column 2", "'abc' is not a number"]),
        (tmp_path / "ragged.csv", "none", ["line 3 has 1 columns", "expected 2"]),
        (tmp_path / "nan.csv", "none", ["1 NaN", "row 1"]),
        (_save_npz(tmp_path / "short.npz", x=ok, y=np.arange(9)), "none", ["expected 10 labels", "(9,)"]),
        (_save_npz(tmp_path / "half.npz", x=ok, y=np.arange(10) / 2), "none", ["integer labels", "row 1"]),
        (tmp_path / "data.txt", "none", ["unknown extension '.txt'", ".npy, .npz, .csv"]),
        (tmp_path / "absent.npy", "none", ["not found"]),
        (tmp_path / "header.csv", "none", ["no data rows"]),
        (tmp_path / "garbage.npy", "none", ["not a NumPy .npy file", "numpy.save"]),
        (tmp_path / "renamed.npz", "none", ["holds a NumPy .npy file", "rename it to .npy"]),
    ]


def test_bad_user_files_each_give_one_clear_error(tmp_path):
    for path, binarize, fragments in _bad_inputs(tmp_path):
        with pytest.raises(DataError) as caught:
            load_array_file(path, binarize=binarize)
        for fragment in fragments:
            assert fragment in str(caught.value), (path.name, str(caught.value))


# ---------------------------------------------------------------- real MNIST (needs ELBOLAB_DATA)


def real_mnist_dir() -> Path:
    root = os.environ.get("ELBOLAB_DATA")
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip("real MNIST needs ELBOLAB_DATA pointing at a folder with mnist/ inside")
    return Path(root) / "mnist"


@pytest.mark.data
def test_real_mnist():
    real_mnist_dir()
    splits = load_data("mnist")  # found through ELBOLAB_DATA
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50000, 10000, 10000)
    assert splits.train.image_shape == (1, 28, 28) and splits.train.dim == 784
    for part in (splits.train, splits.val, splits.test):
        assert part.value_range() == (0.0, 1.0)
        assert part.y.min() == 0 and part.y.max() == 9
        frequencies = torch.bincount(part.y, minlength=10) / len(part)
        assert (frequencies > 0.08).all() and (frequencies < 0.13).all()  # MNIST classes hold 9%-11.3%
    assert torch.equal(torch.cat([splits.train.source_index, splits.val.source_index]).sort().values,
                       torch.arange(60000))


@pytest.mark.data
def test_real_mnist_files_pass_the_download_checksums(tmp_path, monkeypatch):
    """Serving the real files as a mirror checks our MD5 constants against them (no network)."""
    source = real_mnist_dir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("ELBOLAB_DATA", raising=False)
    monkeypatch.delenv("ELBOLAB_OFFLINE", raising=False)
    monkeypatch.setattr(mnist_module, "MNIST_MIRRORS", (source.as_uri() + "/",))
    assert find_mnist_dir() == cache_dir(tmp_path)
    for name in NAMES:
        assert (cache_dir(tmp_path) / f"{name}.gz").read_bytes() == (source / f"{name}.gz").read_bytes()
