"""Data layer: MNIST (IDX files), scikit-learn's embedded digits and user arrays, held in memory as tensors.

Every loader returns DataSplits(train, val, test) of TensorData; splits and static binarization are
reproducible from the seed. Bad or missing data raises one DataError saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from elbolab.data.arrays import ARRAY_SUFFIXES, load_array_file, load_digits
from elbolab.data.core import BINARIZE_MODES, TEST_FRACTION, DataSplits, TensorData, ValSize
from elbolab.data.idx import read_idx
from elbolab.data.mnist import find_mnist_dir, load_mnist
from elbolab.errors import DataError

__all__ = [
    "ARRAY_SUFFIXES",
    "BINARIZE_MODES",
    "TEST_FRACTION",
    "DataSplits",
    "TensorData",
    "find_mnist_dir",
    "load_array_file",
    "load_data",
    "load_digits",
    "load_mnist",
    "read_idx",
]

NAMED_SOURCES = ("digits", "mnist")


def load_data(
    source: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    binarize: str = "none",
    seed: int = 0,
    val_size: ValSize | None = None,
) -> DataSplits:
    """Load "digits" (embedded, offline), "mnist" (IDX files, see find_mnist_dir) or a .npy/.npz/.csv file.

    val_size None means each source's default: 10000 images for MNIST, 15% of the rows otherwise.
    data_dir is only used for MNIST.
    """
    defaults = {} if val_size is None else {"val_size": val_size}
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"data source must be 'digits', 'mnist' or a file path; got {source!r}")
    name = source.strip().lower() if isinstance(source, str) else None
    if name == "digits":
        return load_digits(binarize=binarize, seed=seed, **defaults)
    if name == "mnist":
        return load_mnist(data_dir, binarize=binarize, seed=seed, **defaults)
    path = Path(source).expanduser()
    if path.suffix.lower() in ARRAY_SUFFIXES or path.exists():
        return load_array_file(path, binarize=binarize, seed=seed, **defaults)
    raise DataError(
        f"unknown data source {str(source)!r}: expected 'digits', 'mnist' or a path to a "
        f"{', '.join(ARRAY_SUFFIXES)} file (no such file exists)"
    )
