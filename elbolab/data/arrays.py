"""Array sources: scikit-learn's embedded digits and user files (.npy, .npz, .csv), validated and split."""

from __future__ import annotations

import csv
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from elbolab.data.core import (
    DataSplits,
    ValSize,
    check_binarize,
    check_seed,
    check_unit_interval,
    split_three_ways,
)
from elbolab.errors import DataError

ARRAY_SUFFIXES = (".npy", ".npz", ".csv")
NPZ_X_KEYS = ("x", "X", "data", "images")
NPZ_Y_KEYS = ("y", "Y", "labels", "targets")
CSV_LABEL_COLUMNS = ("label", "labels", "y", "target", "targets")


def load_digits(*, binarize: str = "none", seed: int = 0, val_size: ValSize = 0.15) -> DataSplits:
    """scikit-learn's embedded 8x8 digits (1797 images, grey levels 0..16 scaled to [0, 1]), no download.

    Split by seed: test 15% (270 images), validation val_size (default 15%, 270), train the rest (1257).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    check_binarize(binarize)
    seed = check_seed(seed)
    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)  # [1797, 64]
    y = torch.from_numpy(bunch.target.astype(np.int64))  # [1797]
    return split_three_ways("digits", x, y, (1, 8, 8), binarize=binarize, seed=seed, val_size=val_size,
                            meta={"class_names": [str(d) for d in range(10)]})


def load_array_file(
    path: str | os.PathLike,
    *,
    binarize: str = "none",
    seed: int = 0,
    val_size: ValSize = 0.15,
) -> DataSplits:
    """Features from a .npy, .npz or .csv file, split by seed into train/val/test like load_digits.

    Arrays are [N, D] or images [N, H, W] / [N, 1, H, W] (flattened; image_shape kept). A .npz holds the
    features under x/X/data/images (or as its only array) and optional labels under y/Y/labels/targets.
    A .csv holds numbers separated by commas, with an optional header row; a column named
    label/labels/y/target/targets holds the labels. Values are checked (numeric, finite, labels integer);
    binarize other than "none" needs values in [0, 1].
    """
    check_binarize(binarize)
    seed = check_seed(seed)
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise DataError(
            f"data file {path} {what}: expected a .npy, .npz or .csv file (or the sources 'digits' / 'mnist')"
        )
    readers = {".npy": _read_npy, ".npz": _read_npz, ".csv": _read_csv}
    if suffix not in readers:
        raise DataError(
            f"cannot read {path}: unknown extension {suffix or '(none)'!r}; "
            f"expected one of {', '.join(ARRAY_SUFFIXES)}"
        )
    raw_x, raw_y = readers[suffix](path)
    x_tensor, y, image_shape = validate_arrays(raw_x, raw_y, path, binarize)
    return split_three_ways(
        path.stem, x_tensor, y, image_shape, binarize=binarize, seed=seed, val_size=val_size
    )


def validate_arrays(
    raw_x: np.ndarray, raw_y: np.ndarray | None, where, binarize: str
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
    """Checked features as float32 [N, D], labels as int64 [N] (or None) and the image shape (or None).

    ``where`` names the data in messages (a file path, "in-memory array"). See ``_features`` and ``_labels``;
    binarize other than "none" also needs values in [0, 1].
    """
    x, image_shape = _features(raw_x, where)
    y = None if raw_y is None else _labels(raw_y, x.shape[0], where)
    x_tensor = torch.from_numpy(x.astype(np.float32))  # [N, D]
    check_unit_interval(x_tensor, binarize, str(where))
    return x_tensor, y, image_shape


def _check_numpy_format(path: Path, wanted: str, hint: str) -> None:
    """Tell .npy from .npz from anything else by the first bytes, before numpy guesses (it falls back
    to pickle, whose error would blame Python objects)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(6)
    except OSError as error:
        raise DataError(f"could not read {path} ({error.strerror or error})") from None
    actual = "npy" if head == b"\x93NUMPY" else "npz" if head.startswith(b"PK\x03\x04") else None
    if actual is None:
        raise DataError(f"{path} is not a NumPy .{wanted} file (it does not start like one); {hint}")
    if actual != wanted:
        raise DataError(f"{path} holds a NumPy .{actual} file, not .{wanted}: rename it to .{actual}")


def _read_npy(path: Path) -> tuple[np.ndarray, None]:
    hint = "save it with numpy.save(path, features)"
    _check_numpy_format(path, "npy", hint)
    try:
        return np.load(path, allow_pickle=False), None
    except ValueError as error:
        if "pickle" in str(error):
            raise DataError(
                f"{path} holds Python objects, which elbolab never unpickles: expected a numeric array; {hint}"
            ) from None
        raise DataError(f"could not read {path} as a .npy array ({error}); {hint}") from None
    except (OSError, EOFError) as error:
        raise DataError(f"could not read {path} as a .npy array ({error}); {hint}") from None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    hint = "save it with numpy.savez(path, x=features, y=labels)"
    _check_numpy_format(path, "npz", hint)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            x_key = next((k for k in NPZ_X_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if x_key is None:
                raise DataError(
                    f"{path} has arrays {keys or '(none)'}: expected the features under one of "
                    f"{', '.join(NPZ_X_KEYS)}; {hint}"
                )
            y_key = next((k for k in NPZ_Y_KEYS if k in keys and k != x_key), None)
            x = archive[x_key]
            y = None if y_key is None else archive[y_key]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        if "pickle" in str(error):
            raise DataError(
                f"{path} holds Python objects, which elbolab never unpickles: expected numeric arrays; {hint}"
            ) from None
        raise DataError(f"could not read {path} as a .npz archive ({error}); {hint}") from None
    return x, y


def is_number_cell(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            first = next((row for row in csv.reader(stream) if row), None)
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"could not read {path} as a text CSV file ({error})") from None
    if first is None:
        raise DataError(f"{path} is empty: expected rows of comma-separated numbers")
    has_header = not all(is_number_cell(cell) for cell in first)
    names = [cell.strip() for cell in first] if has_header else None
    try:
        # numpy's C parser is fast; on failure the slow scan below finds and names the bad cell.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(
                path, delimiter=",", skiprows=int(has_header), dtype=np.float64, ndmin=2,
                comments=None, quotechar='"', encoding="utf-8-sig",
            )
    except ValueError as error:
        _explain_csv_failure(path, len(first), has_header)
        raise DataError(f"could not parse {path} as comma-separated numbers ({error})") from None
    if table.size == 0:
        raise DataError(f"{path} has a header but no data rows: expected rows of comma-separated numbers")
    if names is None:
        return table, None
    label_column = next((i for i, name in enumerate(names) if name.lower() in CSV_LABEL_COLUMNS), None)
    if label_column is None:
        return table, None
    return np.delete(table, label_column, axis=1), table[:, label_column]


def _explain_csv_failure(path: Path, n_columns: int, has_header: bool) -> None:
    """Raise a DataError naming the first ragged row or non-numeric cell (lines counted from 1)."""
    with open(path, newline="", encoding="utf-8-sig") as stream:
        for line, row in enumerate(csv.reader(stream), start=1):
            if not row or (has_header and line == 1):
                continue
            if len(row) != n_columns:
                raise DataError(
                    f"{path} line {line} has {len(row)} columns: expected {n_columns} like the first row"
                )
            for column, cell in enumerate(row, start=1):
                if not is_number_cell(cell.strip()):
                    shown = repr(cell) if cell.strip() else "an empty cell"
                    raise DataError(
                        f"{path} line {line}, column {column}: {shown} is not a number; "
                        "expected only numbers after the optional header row"
                    )


def _features(array: np.ndarray, path: Path) -> tuple[np.ndarray, tuple[int, int] | None]:
    """[N, D] float64 rows and the image shape, checking dtype, shape and finiteness."""
    if array.dtype == np.bool_:
        array = array.astype(np.float64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: expected numeric (integer or float) features; got dtype {array.dtype}")
    shape = array.shape
    if array.ndim == 2:
        image_shape = None
    elif array.ndim == 3:
        image_shape = (int(shape[1]), int(shape[2]))
    elif array.ndim == 4 and shape[1] == 1:
        image_shape = (int(shape[2]), int(shape[3]))
    else:
        hint = " (one feature per row? reshape it to [N, 1])" if array.ndim == 1 else ""
        raise DataError(
            f"{path}: expected features as [N, D], images [N, H, W] or [N, 1, H, W]; got shape {shape}{hint}"
        )
    n, width = int(shape[0]), math.prod(shape[1:])
    if width == 0:
        raise DataError(f"{path}: expected at least one feature per row; got shape {shape}")
    x = array.reshape(n, width).astype(np.float64)
    for label, bad in (("NaN", np.isnan(x)), ("infinite", np.isinf(x))):
        if bad.any():
            first_row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise DataError(
                f"{path} contains {int(bad.sum())} {label} value(s) (first in row {first_row}, counting from "
                f"0{' without the header' if str(path).lower().endswith('.csv') else ''}): remove or impute them"
            )
    if np.abs(x).max(initial=0.0) > np.finfo(np.float32).max:
        raise DataError(f"{path} has values beyond the float32 range: rescale the data")
    return x, image_shape


def _labels(array: np.ndarray, n: int, path: Path) -> torch.Tensor:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or array.shape[0] != n:
        raise DataError(f"{path}: expected {n} labels (one per row of features); got shape {array.shape}")
    if array.dtype != np.bool_ and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(f"{path}: expected integer labels; got dtype {array.dtype}")
    values = array.astype(np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: expected integer labels; {int(bad.sum())} are not (first in row {row}: {values[row]!r})"
        )
    return torch.from_numpy(values.astype(np.int64))
