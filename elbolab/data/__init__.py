"""Data layer: MNIST (IDX files), scikit-learn's embedded digits and user arrays, held in memory as tensors.

Every loader returns DataSplits(train, val, test) of TensorData; splits and static binarization are
reproducible from the seed. Bad or missing data raises one DataError saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from elbolab.data.arrays import ARRAY_SUFFIXES, load_array_file, load_digits
from elbolab.data.bow import is_bow_path, load_bow_path
from elbolab.data.core import BINARIZE_MODES, TEST_FRACTION, Batch, DataSplits, TensorData, ValSize, as_batch
from elbolab.data.idx import read_idx
from elbolab.data.memory import IN_MEMORY, in_memory_source, load_arrays, load_in_memory
from elbolab.data.mmap import HEADER, load_mmap
from elbolab.data.mnist import find_mnist_dir, load_mnist
from elbolab.data.registry import SOURCES, register_source
from elbolab.errors import DataError

__all__ = [
    "ARRAY_SUFFIXES",
    "BINARIZE_MODES",
    "Batch",
    "as_batch",
    "available_sources",
    "register_source",
    "TEST_FRACTION",
    "DataSplits",
    "TensorData",
    "find_mnist_dir",
    "load_array_file",
    "load_arrays",
    "load_data",
    "load_digits",
    "load_in_memory",
    "load_mnist",
    "read_idx",
]

def _discover_sources() -> None:
    """Import every module of this package once, so each registers its sources."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available_sources() -> list[str]:
    _discover_sources()
    return sorted(SOURCES)


@register_source("digits")
def _digits(*, data_dir=None, **options) -> DataSplits:
    return load_digits(**options)


@register_source("mnist")
def _mnist(*, data_dir=None, **options) -> DataSplits:
    return load_mnist(data_dir, **options)


# Arrays passed from Python (pipeline.train("vae", x, ...)); a run naming this source says how to evaluate it.
register_source(IN_MEMORY)(in_memory_source)


def load_data(
    source: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    binarize: str = "none",
    seed: int = 0,
    val_size: ValSize | None = None,
) -> DataSplits:
    """Load a registered source ("digits": embedded, offline; "mnist": IDX files, see find_mnist_dir; ...) or a
    path: a .npy/.npz/.csv array file, a sparse document-term .npz or a folder of text files (bag of words, see
    elbolab.data.bow), or a folder written by elbolab.data.mmap.write_mmap (memory-mapped).

    val_size None means each source's default: 10000 images for MNIST, 15% of the rows otherwise.
    data_dir is passed to the named sources (MNIST looks there first).
    """
    options = {"binarize": binarize, "seed": seed}
    if val_size is not None:
        options["val_size"] = val_size
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"data source must be one of {', '.join(available_sources())} or a file path; "
                        f"got {source!r}")
    name = source.strip().lower() if isinstance(source, str) else None
    _discover_sources()
    if name in SOURCES:
        return SOURCES[name](data_dir=data_dir, **options)
    path = Path(source).expanduser()
    if path.is_dir() and (path / HEADER).is_file():  # a folder written by write_mmap
        return load_mmap(path, **options)
    if is_bow_path(path):  # a 20news-style folder, a folder of text files, or a sparse document-term .npz
        return load_bow_path(path, **options)
    if path.suffix.lower() in ARRAY_SUFFIXES or path.exists():
        return load_array_file(path, **options)
    raise DataError(
        f"unknown data source {str(source)!r}: expected one of {', '.join(available_sources())} or a path to a "
        f"{', '.join(ARRAY_SUFFIXES)} file (no such file exists)"
    )
