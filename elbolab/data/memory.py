"""In-memory arrays as a data source: ``pipeline.train("vae", x, out=...)`` with x (or ``(x, y)``) a NumPy array or
a torch tensor, validated like a .npy file and split like one.

The arrays are not stored in the run folder (they may be large); config.json records what they were instead:
``{"source": "in-memory", "shape": [...], "labels": bool, "sha256": ...}``. Evaluating such a run therefore needs
the same arrays, from Python: ``load_arrays(x, binarize=..., seed=...)`` rebuilds the same splits.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from elbolab.data.arrays import validate_arrays
from elbolab.data.core import DataSplits, ValSize, check_binarize, check_seed, split_three_ways
from elbolab.errors import DataError

IN_MEMORY = "in-memory"  # the source name recorded in a run's config.json
DEFAULT_VAL_SIZE = 0.15  # as for .npy files
_WHERE = "in-memory array"  # how messages name the data


def is_in_memory(data) -> bool:
    """True unless ``data`` names a source or a file (a string or a path): arrays, tensors, tuples, anything else
    goes to ``load_in_memory``, which says what it expected."""
    return not isinstance(data, (str, os.PathLike))


def _as_numpy(value, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16
            tensor = tensor.float()
        return tensor.resolve_conj().resolve_neg().numpy()
    raise DataError(
        f"expected {what} as a NumPy array or a torch tensor, got {type(value).__name__}; pass data as a source name "
        "('digits', 'mnist'), a .npy/.npz/.csv path, an array x [N, D] / [N, H, W], or a tuple (x, y) with labels y [N]"
    )


def _unpack(data) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(data, tuple):
        if len(data) not in (1, 2):
            raise DataError(
                f"expected in-memory data as x or a tuple (x, y) of features and labels, got a tuple of {len(data)} "
                "items"
            )
        x, y = data[0], (data[1] if len(data) == 2 else None)
        return _as_numpy(x, "the features x"), None if y is None else _as_numpy(y, "the labels y")
    return _as_numpy(data, "data"), None


def load_in_memory(data, *, binarize: str = "none", seed: int = 0,
                   val_size: ValSize | None = None) -> tuple[DataSplits, dict]:
    """Train/validation/test splits of in-memory arrays, and the JSON description a run records for them.

    ``data`` is x or ``(x, y)``: x a NumPy array or torch tensor [N, D], [N, H, W] or [N, 1, H, W] (images keep
    their shape), y optional integer labels [N]. Checked and split by seed exactly as a .npy file (15% test,
    ``val_size`` validation, default 15%). The description holds the source ``"in-memory"``, x's shape, whether
    there are labels and a SHA-256 of the checked values (identical for the same numbers as an array or a tensor),
    with the binarize / seed / val_size settings.
    """
    check_binarize(binarize)
    seed = check_seed(seed)
    raw_x, raw_y = _unpack(data)
    x, y, image_shape = validate_arrays(raw_x, raw_y, _WHERE, binarize)
    digest = hashlib.sha256(x.numpy().tobytes())
    if y is not None:
        digest.update(y.numpy().tobytes())
    splits = split_three_ways(IN_MEMORY, x, y, image_shape, binarize=binarize, seed=seed,
                              val_size=DEFAULT_VAL_SIZE if val_size is None else val_size)
    info = {"source": IN_MEMORY, "shape": [int(s) for s in raw_x.shape], "labels": y is not None,
            "sha256": digest.hexdigest(), "binarize": binarize, "seed": seed, "val_size": val_size, "data_dir": None}
    return splits, info


def load_arrays(data, *, binarize: str = "none", seed: int = 0, val_size: ValSize | None = None) -> DataSplits:
    """The splits of ``load_in_memory``: with a run's ``config["data"]`` settings, the splits it was trained on."""
    return load_in_memory(data, binarize=binarize, seed=seed, val_size=val_size)[0]


def in_memory_source(*, data_dir=None, binarize: str = "none", seed: int = 0, val_size: ValSize | None = None):
    """The registered source ``"in-memory"``: a run trained on arrays from Python names it, and it cannot be
    reloaded from the run folder, so this says how to evaluate such a run instead."""
    settings = f"binarize={binarize!r}, seed={seed!r}" + ("" if val_size is None else f", val_size={val_size!r}")
    raise DataError(
        "this run was trained on an in-memory array passed from Python, which elbolab does not store in the run "
        "folder (config.json keeps its shape and SHA-256 only), so 'elbolab eval', 'elbolab report' and --resume "
        "cannot reload its data. Evaluate it "
        "from Python with the same array x (or (x, y)): model, config = elbolab.load_run(RUN); splits = "
        f"elbolab.data.load_arrays(x, {settings}); elbolab.evaluate.evaluate_model(model, splits.test)"
    )
