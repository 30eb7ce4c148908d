"""In-memory splits, binarization and seeded train/validation/test splitting shared by every source."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from elbolab.errors import DataError, ElbolabError

BINARIZE_MODES = ("none", "dynamic", "static")

# Validation split size: an int is a row count, a float a fraction of the rows.
ValSize = int | float

# Array sources (digits, user files) hold out this fraction as the test split; val_size sets the validation split.
TEST_FRACTION = 0.15


@dataclass
class Batch:
    """One mini-batch as it flows data -> trainer -> model -> evaluator. Dense, binarised, on one device.

    ``x`` [B, D] float features; ``y`` [B] class ids or [B, F] factor values; ``index`` [B] row numbers in the
    split (per-datapoint variational parameters); ``observed`` [B, D] bool mask of the entries a model may
    condition on (inpainting). Only ``x`` is required.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    index: torch.Tensor | None = None
    observed: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, like: torch.Tensor) -> Batch:
        """The batch on ``like``'s device, x (and a float y) in ``like``'s dtype."""
        def move(t, cast):
            if t is None:
                return None
            return t.to(device=like.device, dtype=like.dtype) if cast else t.to(device=like.device)
        y_float = self.y is not None and self.y.is_floating_point()
        return Batch(move(self.x, True), move(self.y, y_float), move(self.index, False), move(self.observed, False))

    def __getitem__(self, rows) -> Batch:
        """Rows of the batch (a slice or an index tensor)."""
        def pick(t):
            return None if t is None else t[rows]

        return Batch(self.x[rows], pick(self.y), pick(self.index), pick(self.observed))


def as_batch(data) -> Batch:
    """A Batch as is; a tensor [B, D] as Batch(x)."""
    if isinstance(data, Batch):
        return data
    if isinstance(data, torch.Tensor):
        return Batch(data)
    raise ElbolabError(f"expected a Batch or a tensor [B, D], got {type(data).__name__}")


def _is_sparse(x) -> bool:
    return hasattr(x, "tocsr") and hasattr(x, "nnz")  # a scipy.sparse matrix or array


@dataclass
class TensorData:
    """One split held in memory, compactly, densified per batch (fast batching on CPU; no DataLoader needed).

    ``x`` may be float [N, D]; uint8 [N, D] holding ``value * levels`` (8-bit images: 4x smaller than float32);
    bool [N, D] (binary images: dSprites is 12 GB as float32, 0.4 GB as bits); or a scipy.sparse CSR matrix
    (bags of words). ``source_index`` holds each row's number in the source it came from (file order). ``meta``
    carries what a model or a figure needs to know of the data: class names, vocabulary, factor names and sizes.
    """

    x: object  # see above
    y: torch.Tensor | None  # [N] int64 labels, [N, F] factors, or None
    image_shape: tuple[int, ...] | None  # (C, H, W) for image data ((H, W) is read as one channel), None otherwise
    binarize: str  # "none" | "dynamic" | "static" (static already applied to x)
    name: str  # e.g. "mnist/train"
    source_index: torch.Tensor | None = None  # [N] int64 row numbers in the source
    levels: float = 255.0  # a uint8 x means x / levels
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_binarize(self.binarize)
        if _is_sparse(self.x):
            self.x = self.x.tocsr()
        elif not isinstance(self.x, torch.Tensor) or self.x.dim() != 2 or not (
                self.x.is_floating_point() or self.x.dtype in (torch.uint8, torch.bool)):
            got = (f"{self.x.dtype} {tuple(self.x.shape)}" if isinstance(self.x, torch.Tensor)
                   else type(self.x).__name__)
            raise ElbolabError(f"TensorData {self.name!r}: expected x as a 2-D float32 tensor [N, D] (or uint8, bool, "
                               f"scipy sparse CSR); got {got}")
        for name, values in (("y", self.y), ("source_index", self.source_index)):
            if values is not None and (values.dim() not in (1, 2) or len(values) != self.x.shape[0]
                                       or (name == "source_index" and values.dim() != 1)):
                raise ElbolabError(
                    f"TensorData {self.name!r}: expected {name} of shape [{self.x.shape[0]}]"
                    f"{' or [N, F]' if name == 'y' else ''}; got {tuple(values.shape)}"
                )
        if self.image_shape is not None:
            self.image_shape = image_chw(self.image_shape)
            if math.prod(self.image_shape) != self.x.shape[1]:
                raise ElbolabError(
                    f"TensorData {self.name!r}: image_shape {self.image_shape} does not match "
                    f"{self.x.shape[1]} features per row"
                )

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """x[index] densified to float32 [B, D] (a copy: callers may modify it freely)."""
        if _is_sparse(self.x):
            return torch.from_numpy(self.x[index.numpy()].toarray()).to(torch.float32)
        rows = self.x[index]
        if rows.dtype == torch.uint8:
            return rows.to(torch.float32).div_(self.levels)
        return rows.to(torch.float32)

    def value_range(self) -> tuple[float, float]:
        """(min, max) of the values x stands for."""
        values = self.x.data if _is_sparse(self.x) else self.x
        if values.size == 0 if _is_sparse(self.x) else values.numel() == 0:
            return 0.0, 0.0
        levels = self.levels if getattr(values, "dtype", None) == torch.uint8 else 1.0
        low, high = float(values.min()) / levels, float(values.max()) / levels
        if _is_sparse(self.x):  # the implicit zeros count too
            low, high = min(low, 0.0), max(high, 0.0)
        return low, high

    def head(self, n: int) -> TensorData:
        """The first ``n`` rows (a view, not a copy)."""
        return dataclasses.replace(
            self, x=self.x[:n], y=None if self.y is None else self.y[:n],
            source_index=None if self.source_index is None else self.source_index[:n],
        )

    def batch(self, index: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        """Batch(x[index], y[index], index) with x float32 [B, D].

        With binarize == "dynamic", every call draws a fresh Bernoulli sample with the grey levels as
        probabilities, as in the IWAE paper (Burda et al. 2016), from the given generator.
        """
        rows = self.rows(index)  # [B, D]
        if self.binarize == "dynamic":
            # u < x is a Bernoulli(x) draw, faster on CPU than torch.bernoulli (timing in BENCHMARKS.md)
            rows = (torch.rand(rows.shape, generator=generator) < rows).to(rows.dtype)
        return Batch(rows, None if self.y is None else self.y[index], index)


def image_chw(shape) -> tuple[int, int, int]:
    """(H, W) -> (1, H, W); (C, H, W) as is."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ElbolabError(f"expected an image shape (C, H, W) or (H, W), got {shape}")
    return shape


@dataclass
class DataSplits:
    train: TensorData
    val: TensorData
    test: TensorData

    def with_train_size(self, n: int | None) -> DataSplits:
        """These splits with only the first ``n`` training rows (after the seeded split; val and test unchanged):
        a quick run on a large source. ``None`` keeps every row."""
        if n is None:
            return self
        total = len(self.train)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
            raise ElbolabError(f"expected --train-size between 1 and {total} (the training rows of "
                               f"{self.train.name}), got {n!r}")
        head = self.train.head(n)
        return DataSplits(head, self.val, self.test)


def check_binarize(binarize: object) -> str:
    if binarize not in BINARIZE_MODES:
        raise ElbolabError(
            f"unknown binarize mode {binarize!r}: expected one of {', '.join(BINARIZE_MODES)} "
            "(none keeps grey levels, dynamic draws a fresh binary image each batch, static draws one per image)"
        )
    return binarize  # type: ignore[return-value]


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ElbolabError(f"seed must be an integer; got {seed!r}")
    return int(seed)


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A torch generator for one purpose ("split", "static-binarize"), so the streams stay independent."""
    digest = hashlib.sha256(f"elbolab:{purpose}:{int(seed)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def check_unit_interval(x: torch.Tensor, binarize: str, source: str) -> None:
    """Binarization reads values as Bernoulli probabilities, so they must lie in [0, 1]."""
    if binarize == "none" or x.numel() == 0:
        return
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise DataError(
            f"binarize={binarize!r} needs values in [0, 1] (they are used as Bernoulli probabilities); "
            f"{source} has values from {low:g} to {high:g}. Scale the data into [0, 1] first "
            "(e.g. divide 8-bit images by 255) or use binarize='none'"
        )


def binarize_static(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli draw per value; the same rows in the same order always get the same draw."""
    return torch.bernoulli(x, generator=seeded_generator(seed, "static-binarize"))


def resolve_val_count(val_size: object, n_total: int, n_available: int, source: str) -> int:
    """Number of validation rows: an int count, or a float fraction of n_total; at least 1 and at most
    n_available (so the training split keeps at least one row)."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise ElbolabError(f"val_size must be an int count or a float fraction in (0, 1); got {val_size!r}")
    if isinstance(val_size, (float, np.floating)):
        if not 0.0 < float(val_size) < 1.0:
            raise ElbolabError(
                f"val_size as a fraction must lie strictly between 0 and 1; got {val_size!r} "
                "(pass an int for a row count)"
            )
        count = max(1, round(float(val_size) * n_total))  # a positive fraction keeps at least one row
        described = f"val_size={float(val_size):g} of {n_total} rows gives {count} validation rows"
    else:
        count = int(val_size)
        described = f"val_size={count}"
    if count < 1 or count > n_available:
        raise ElbolabError(
            f"{described} for {source}: expected between 1 and {n_available} validation rows "
            "(the validation split needs at least one row and the training split must keep one)"
        )
    return count


def rows_to_split(
    name: str,
    x: torch.Tensor,  # [N, D] float32, already statically binarized if asked
    y: torch.Tensor | None,  # [N] int64
    index: torch.Tensor,  # [M] int64 rows to take
    image_shape: tuple[int, ...] | None,
    binarize: str,
    **extra,  # levels, meta
) -> TensorData:
    rows = x[index.numpy()] if _is_sparse(x) else x[index].contiguous()
    return TensorData(
        x=rows,
        y=None if y is None else y[index].contiguous(),
        image_shape=image_shape,
        binarize=binarize,
        name=name,
        source_index=index,
        **extra,
    )


def split_three_ways(
    prefix: str,
    x: torch.Tensor,  # [N, D] float32
    y: torch.Tensor | None,  # [N] int64
    image_shape: tuple[int, int] | None,
    *,
    binarize: str,
    seed: int,
    val_size: ValSize,
    **extra,  # levels, meta: passed to every split
) -> DataSplits:
    """Seeded train/validation/test split of one array.

    The test split takes round(TEST_FRACTION * N) rows (at least 1), the validation split val_size rows
    (int) or val_size * N rows (float), the training split the rest. Test rows are drawn first from one
    permutation, so for a given seed and N the test split does not depend on val_size.
    """
    n = x.shape[0]
    if n < 3:
        raise DataError(
            f"{prefix} has {n} row(s): expected at least 3 (one each for the train, validation and test splits)"
        )
    n_test = max(1, round(TEST_FRACTION * n))
    n_val = resolve_val_count(val_size, n, n - n_test - 1, prefix)
    if binarize == "static":
        x = binarize_static(x, seed)
    order = torch.randperm(n, generator=seeded_generator(seed, "split"))
    test_index = order[:n_test].sort().values
    val_index = order[n_test : n_test + n_val].sort().values
    train_index = order[n_test + n_val :].sort().values
    return DataSplits(
        train=rows_to_split(f"{prefix}/train", x, y, train_index, image_shape, binarize, **extra),
        val=rows_to_split(f"{prefix}/val", x, y, val_index, image_shape, binarize, **extra),
        test=rows_to_split(f"{prefix}/test", x, y, test_index, image_shape, binarize, **extra),
    )
