"""Memory-mapped folders (elbolab.data.mmap): what is written is what is read, the splits and batches are those of
the same data held in memory, training on them equals training in memory, and bad folders fail by name."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from elbolab import pipeline
from elbolab.data import load_data
from elbolab.data.core import split_three_ways
from elbolab.data.mmap import MmapRows, MmapStore, MmapWriter, load_mmap, write_mmap
from elbolab.errors import DataError


@pytest.fixture
def grey(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 6, 4), dtype=np.uint8)  # images [N, H, W]
    y = rng.integers(0, 10, 300)
    return write_mmap(tmp_path / "grey.mmap", x, y), x.reshape(300, 24), y


def _in_memory(x, y, image_shape, seed, **options):
    """The reference: the same rows held in memory by TensorData, split by split_three_ways."""
    y = None if y is None else torch.from_numpy(y.astype(np.int64))
    x = x if sp.issparse(x) else torch.from_numpy(x)
    return split_three_ways("ref", x, y, image_shape, seed=seed, val_size=0.15, **options)


def _assert_same_batches(mapped, reference, binarize="none"):
    for split in ("train", "val", "test"):
        a, b = getattr(mapped, split), getattr(reference, split)
        assert len(a) == len(b) and a.dim == b.dim and a.image_shape == b.image_shape
        assert torch.equal(a.source_index, b.source_index)  # the same rows in each split
        index = torch.randperm(len(a), generator=torch.Generator().manual_seed(1))[:40]  # unsorted, as in training
        ba = a.batch(index, torch.Generator().manual_seed(7))
        bb = b.batch(index, torch.Generator().manual_seed(7))
        assert ba.x.dtype == torch.float32 and torch.equal(ba.x, bb.x)
        assert (ba.y is None and bb.y is None) or torch.equal(ba.y, bb.y)
        assert torch.equal(ba.index, bb.index)
        if binarize == "dynamic":
            assert set(ba.x.unique().tolist()) <= {0.0, 1.0}


def test_uint8_round_trip_and_batches_equal_in_memory(grey):
    folder, x, y = grey
    store = MmapStore(folder)
    assert torch.equal(store.gather(np.arange(300)), torch.from_numpy(x))
    assert torch.equal(store.y, torch.from_numpy(y))
    assert not store.x.flags.owndata and not store.x.flags.writeable  # a read-only view of the mapping
    for seed, binarize in ((0, "none"), (5, "dynamic")):
        mapped = load_mmap(folder, seed=seed, binarize=binarize)
        assert isinstance(mapped.train.x, MmapRows)
        reference = _in_memory(x, y, (6, 4), seed, binarize=binarize, levels=255.0)
        _assert_same_batches(mapped, reference, binarize)
    train = load_mmap(folder).train
    index = torch.tensor([9, 3, 200])
    train.prefetch(index)  # a read-ahead request changes nothing in what the batch holds
    assert torch.equal(train.rows(index), torch.from_numpy(x[train.source_index[index].numpy()]).float() / 255)
    low, high = load_mmap(folder).train.value_range()
    assert (low, high) == (x.min() / 255, x.max() / 255)


def test_packed_bits_round_trip_with_a_width_not_a_multiple_of_8(tmp_path):
    x = np.random.default_rng(1).random((200, 13)) < 0.3  # 13 bits: two bytes a row, 3 bits of padding
    folder = write_mmap(tmp_path / "bits.mmap", x)
    assert (folder / "x.bin").stat().st_size == 200 * 2
    rows = np.array([5, 0, 199])
    for prefetch in (True, False):
        assert torch.equal(MmapStore(folder, prefetch=prefetch).gather(rows), torch.from_numpy(x[rows]).to(torch.uint8))
    _assert_same_batches(load_mmap(folder, seed=2), _in_memory(x, None, None, 2, binarize="none"))


def test_sparse_rows_equal_scipy_dense_rows(tmp_path):
    rng = np.random.default_rng(2)
    x = sp.random(250, 30, density=0.1, format="csr", random_state=3, dtype=np.float32)
    x.data[x.indptr[7]:x.indptr[8]] = 0  # an empty row
    x.eliminate_zeros()
    assert x[7].nnz == 0 and x.nnz > 0
    folder = write_mmap(tmp_path / "bow.mmap", x, rng.integers(0, 3, 250))
    rows = np.array([7, 249, 0, 7, 100])
    for prefetch in (True, False):
        assert np.array_equal(MmapStore(folder, prefetch=prefetch).gather(rows).numpy(), x[rows].toarray())
    # chunks written separately give the same file as one write
    with MmapWriter(tmp_path / "chunks.mmap", 30, "sparse") as writer:
        writer.append(x[:100])
        writer.append(x[100:])
    assert np.array_equal(MmapStore(tmp_path / "chunks.mmap").gather(np.arange(250)).numpy(), x.toarray())
    reference = _in_memory(x, rng.integers(0, 3, 250), None, 0, binarize="none")
    mapped = load_mmap(folder)
    for split in ("train", "test"):
        a, b = getattr(mapped, split), getattr(reference, split)
        assert torch.equal(a.rows(torch.arange(len(a))), b.rows(torch.arange(len(b))))


def test_training_on_the_mapped_folder_equals_training_in_memory(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (160, 16), dtype=np.uint8)
    folder = write_mmap(tmp_path / "small.mmap", x)
    npy = tmp_path / "small.npy"
    np.save(npy, x.astype(np.float32) / np.float32(255))  # the values the uint8 rows stand for, bit for bit
    options = dict(epochs=2, batch_size=16, hidden=(8,), latent_dim=2, progress=False, tensorboard=False,
                   figures=False, train_size=96)
    mapped = pipeline.train("vae", "mmap", out=tmp_path / "mapped", data_dir=folder, **options)
    memory = pipeline.train("vae", str(npy), out=tmp_path / "memory", **options)
    a, b = load_file(str(mapped / "model.safetensors")), load_file(str(memory / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert json.loads((mapped / "config.json").read_text())["data"]["data_dir"] == str(folder.resolve())
    assert len(load_data("mmap", data_dir=folder).with_train_size(96).train) == 96


def _corrupt(folder, name, edit):
    path = folder / name
    edit(path)
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "header.json").unlink(), "has no header.json"),
    (lambda f: (f / "header.json").write_text("{not json"), "as JSON"),
    (lambda f: (f / "header.json").write_text(json.dumps({"format": "other"})), "not an elbolab memory-mapped"),
    (lambda f: (f / "x.bin").write_bytes(b"\0" * 100), "truncated"),
    (lambda f: (f / "x.bin").unlink(), "is missing"),
    (lambda f: np.save(f / "y.npy", np.zeros(3, np.int64)), "expected integer labels of shape [300]"),
])
def test_bad_folders_are_refused_by_name(grey, damage, message):
    folder = grey[0]
    damage(folder)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_mmap(folder)


def test_bad_arguments_are_refused_with_a_hint(grey, tmp_path):
    folder = grey[0]
    with pytest.raises(DataError, match="static"):
        load_mmap(folder, binarize="static")
    with pytest.raises(DataError, match="--data-dir"):
        load_data("mmap")
    with pytest.raises(DataError, match="is not a folder"):
        load_mmap(tmp_path / "nowhere")
    with pytest.raises(DataError, match="uint8"):
        write_mmap(tmp_path / "float.mmap", np.zeros((5, 3), np.float32))
    with pytest.raises(DataError, match="not empty"):
        write_mmap(folder, np.zeros((5, 3), np.uint8))
    levels = write_mmap(tmp_path / "levels.mmap", np.full((5, 3), 200, np.uint8), levels=100.0)
    with pytest.raises(DataError, match="values in \\[0, 1\\]"):
        load_mmap(levels, binarize="dynamic")


def test_corrupt_sparse_indices_fail_when_read(tmp_path):
    folder = write_mmap(tmp_path / "bow.mmap", sp.csr_matrix(np.eye(4, 5, dtype=np.float32)))
    (folder / "indices.bin").write_bytes(np.array([0, 1, 2, 99], np.int32).tobytes())
    with pytest.raises(DataError, match="outside 0..4"):
        MmapStore(folder).gather(np.arange(4))
