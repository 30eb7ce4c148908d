"""2-D sprites with known generative factors: a procedural stand-in for dSprites, and a loader for the real file.

``sprites`` (no download) draws 64x64 binary images of one white shape on black from six independent factors laid
out as in dSprites (Matthey et al. 2017, the data of Higgins et al. 2017 and Kim & Mnih 2018):

    colour (1: white) x shape (3: square, ellipse, heart) x scale (6: 0.5 .. 1) x orientation (40: 2 pi k / 40)
    x position x (32) x position y (32)  =  737,280 images,

every combination exactly once. Row ``i`` holds the factor indices of ``i`` written in that mixed radix
(``row_of`` / ``factors_of``), the order of dSprites' ``latents_classes``, so a metric can ask for the images with
one factor fixed. A pixel is on when its centre lies inside the shape: the square max(|u|, |v|) <= 0.66, the
ellipse u^2 + (v / 0.48)^2 <= 1 and the heart (x^2 + y^2 - 1)^3 <= x^2 y^3, the implicit curve rescaled so that its
centroid is the origin and it fits the unit disk; (u, v) are pixel offsets from the sprite's centre rotated by
-orientation and divided by scale * 10 px. Every sprite turns about its centre. Centres run over 32 positions
4/3 px apart (11.33 .. 52.67 px), so the largest sprite touches neither edge. Unlike dSprites, orientation 2 pi is
not repeated as 0 (dSprites' 40 values include both ends).

Rendering is exact and vectorised: the 720 (shape, scale, orientation) sprites at the 3 x 3 sub-pixel offsets that
the 4/3 px grid produces are drawn once into 23 x 23 windows (``Sprites.windows``, 3.7 MB), and any set of rows is
those windows pasted at their integer offsets. A split stores no image at all: its rows (``RenderedRows``) are
drawn when a batch asks for them (about 1 ms for 128 images), so the whole set costs a few MB of memory, and any
image is reproduced bit for bit (``render(np.arange(len(sprites)))`` draws all 737,280 as 3.0 GB of bool).

``dsprites`` reads the real ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (keys ``imgs``, ``latents_classes``,
``latents_values``) from data_dir or $ELBOLAB_DATA, without unpickling, and checks its keys, shapes and row order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elbolab.data.core import (
    DataSplits,
    TensorData,
    ValSize,
    check_binarize,
    check_seed,
    resolve_val_count,
    seeded_generator,
)
from elbolab.data.registry import register_source
from elbolab.errors import DataError, ElbolabError

FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (1, 3, 6, 40, 32, 32)
SHAPE_NAMES = ("square", "ellipse", "heart")
IMAGE_SIZE = 64
RADIUS_PX = 10.0  # a sprite of scale 1 fits a disk of this radius about its centre
WINDOW = 23  # pixels drawn around each centre: covers the radius at every sub-pixel offset
STEP_THIRDS, FIRST_THIRDS = 4, 34  # centre k lies at (34 + 4 k) / 3 px: 11.33 .. 52.67
HEART_CENTROID_Y, HEART_RADIUS = 0.2935, 1.2935  # of (x^2 + y^2 - 1)^3 <= x^2 y^3 (numerical; the tip at y = -1)
# Sizes chosen so that no pixel centre falls exactly on an outline (pixel offsets are multiples of 1/6 px, radii
# 5..10 px): the images do not depend on the last bit of a float.
SQUARE_HALF_SIDE, ELLIPSE_MINOR = 0.66, 0.48
HEART_SIZE = 0.9  # the heart's farthest point from its centroid, in units of the sprite radius
DEFAULT_SPLIT = 10_000  # rows in the test split, and in the validation split unless val_size says otherwise
DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"


def factor_values() -> dict[str, np.ndarray]:
    """The value each factor index stands for (dSprites' ``latents_values`` convention, positions in [0, 1])."""
    return {"color": np.ones(1), "shape": np.arange(1.0, 4.0), "scale": np.linspace(0.5, 1.0, 6),
            "orientation": 2 * np.pi * np.arange(40) / 40, "posX": np.linspace(0, 1, 32),
            "posY": np.linspace(0, 1, 32)}


def _bases(sizes) -> np.ndarray:
    """Mixed-radix place values: row = sum_f index_f * base_f (the last factor varies fastest)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)


def row_of(factors, sizes=FACTOR_SIZES) -> np.ndarray:
    """Factor indices [n, F] -> row numbers [n]; refuses indices out of range."""
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(sizes))
    if (factors < 0).any() or (factors >= np.asarray(sizes)).any():
        raise ElbolabError(f"expected factor indices in [0, size) for sizes {tuple(sizes)}, got values from "
                           f"{factors.min(0).tolist()} to {factors.max(0).tolist()}")
    return factors @ _bases(sizes)


def factors_of(rows, sizes=FACTOR_SIZES) -> np.ndarray:
    """Row numbers [n] -> factor indices [n, F]."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    total = int(np.prod(sizes))
    if rows.size and (rows.min() < 0 or rows.max() >= total):
        raise ElbolabError(f"expected row numbers in [0, {total}), got {rows.min()} .. {rows.max()}")
    return (rows[:, None] // _bases(sizes)) % np.asarray(sizes, dtype=np.int64)


def inside_shape(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the points (u, v) (unrotated sprite coordinates, the unit disk = radius at scale 1) are inside."""
    if shape == 0:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= SQUARE_HALF_SIDE
    if shape == 1:  # ellipse, semi-axes 1 and ELLIPSE_MINOR
        return u**2 + (v / ELLIPSE_MINOR) ** 2 <= 1.0
    x = u * HEART_RADIUS / HEART_SIZE  # heart: back to the curve's own coordinates, centroid at the origin
    y = v * HEART_RADIUS / HEART_SIZE + HEART_CENTROID_Y
    return (x**2 + y**2 - 1) ** 3 <= x**2 * y**3


def centre_px(position) -> np.ndarray:
    """Pixel coordinate of the sprite centre for position indices 0..31 (pixel j covers [j, j + 1))."""
    return (FIRST_THIRDS + STEP_THIRDS * np.asarray(position, dtype=np.float64)) / 3.0


def draw_direct(factors) -> np.ndarray:
    """Reference renderer: every pixel centre of the 64 x 64 image tested against the shape. [n, 4096] bool.

    Slow (4096 tests per image); ``Sprites.render`` is the fast path and must agree with this exactly."""
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(FACTOR_SIZES))
    values = factor_values()
    grid = np.arange(IMAGE_SIZE) + 0.5
    out = np.zeros((len(factors), IMAGE_SIZE * IMAGE_SIZE), dtype=bool)
    for i, (_, shape, scale, orient, px, py) in enumerate(factors):
        dx = grid[None, :] - centre_px(px)  # [1, W]: right
        dy = centre_px(py) - grid[:, None]  # [H, 1]: up
        out[i] = _inside_rotated(shape, dx, dy, values["orientation"][orient],
                                 values["scale"][scale] * RADIUS_PX).reshape(-1)
    return out


def _inside_rotated(shape, dx, dy, theta, radius_px) -> np.ndarray:
    cos, sin = np.cos(theta), np.sin(theta)
    u = (cos * dx + sin * dy) / radius_px  # rotate by -theta: the sprite turns counter-clockwise by theta
    v = (-sin * dx + cos * dy) / radius_px
    return inside_shape(int(shape), u, v)


class Sprites:
    """The procedural data set: factor-addressable, deterministic, rendered on demand.

    Implements the protocol of ``elbolab.disentanglement`` (``factor_names``, ``factor_sizes``, ``sample_factors``,
    ``images``) and renders any rows (``render``), or all of them (``render(np.arange(len(sprites)))``)."""

    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES
    image_shape = (1, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(self):
        values = factor_values()
        offsets = np.arange(WINDOW)[None, :]  # pixels of a window, relative to its first pixel
        phase = np.arange(3) / 3.0  # fractional part of a centre
        # centre at c = origin + 11 + phase: pixel j of the window has its centre at j + 0.5 - 11 - phase from it
        rel = offsets + 0.5 - 11.0 - phase[:, None]  # [3 phases, WINDOW]
        windows = np.zeros((3, 6, 40, 3, 3, WINDOW, WINDOW), dtype=bool)  # shape, scale, orientation, y/x phase
        for s in range(3):
            for k, scale in enumerate(values["scale"]):
                for o, theta in enumerate(values["orientation"]):
                    for py in range(3):
                        for px in range(3):
                            dx = rel[px][None, :]  # [1, W]
                            dy = -rel[py][:, None]  # [H, 1]: rows go down, v goes up
                            windows[s, k, o, py, px] = _inside_rotated(s, dx, dy, theta, scale * RADIUS_PX)
        self.windows = torch.from_numpy(windows.reshape(-1, WINDOW * WINDOW))  # [720 * 9, 529]
        thirds = FIRST_THIRDS + STEP_THIRDS * torch.arange(32)
        self._origin = thirds // 3 - 11  # [32] first pixel of the window, per position index
        self._phase = thirds % 3  # [32]
        local = torch.arange(WINDOW)
        self._local = (local[:, None] * IMAGE_SIZE + local[None, :]).reshape(-1)  # [529] offsets in a flat image

    def __len__(self) -> int:
        return int(np.prod(FACTOR_SIZES))

    def render(self, rows, out: torch.Tensor | None = None, chunk: int = 32768) -> torch.Tensor:
        """Images of row numbers [n] as bool [n, 4096] (written into ``out`` when given)."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64).reshape(-1))
        if out is None:
            out = torch.zeros(len(rows), IMAGE_SIZE * IMAGE_SIZE, dtype=torch.bool)
        for start in range(0, len(rows), chunk):
            f = torch.from_numpy(factors_of(rows[start:start + chunk].numpy()))  # [c, 6]
            _, shape, scale, orient, px, py = f.unbind(1)
            window = (((shape * 6 + scale) * 40 + orient) * 3 + self._phase[py]) * 3 + self._phase[px]  # [c]
            corner = self._origin[py] * IMAGE_SIZE + self._origin[px]  # [c] flat index of the window's first pixel
            block = out[start:start + len(f)]
            block.zero_()
            block.scatter_(1, corner[:, None] + self._local[None, :], self.windows[window])  # [c, 529] pixels
        return out

    def sample_factors(self, n: int, generator: np.random.Generator) -> np.ndarray:
        """n factor-index rows [n, 6], each factor uniform and independent."""
        return np.stack([generator.integers(0, size, n) for size in FACTOR_SIZES], axis=1)

    def images(self, factors) -> torch.Tensor:
        """float32 [n, 4096] images of factor indices [n, 6]."""
        return self.render(row_of(factors)).to(torch.float32)


@dataclass
class DSprites:
    """The real dSprites arrays, addressable by factor index like ``Sprites``."""

    imgs: torch.Tensor  # [N, 4096] bool
    factor_sizes: tuple[int, ...]
    factor_names: tuple[str, ...] = FACTOR_NAMES
    image_shape: tuple[int, int, int] = (1, IMAGE_SIZE, IMAGE_SIZE)

    def __len__(self) -> int:
        return len(self.imgs)

    def render(self, rows) -> torch.Tensor:
        return self.imgs[torch.as_tensor(np.asarray(rows, dtype=np.int64))]

    def sample_factors(self, n: int, generator: np.random.Generator) -> np.ndarray:
        return np.stack([generator.integers(0, size, n) for size in self.factor_sizes], axis=1)

    def images(self, factors) -> torch.Tensor:
        return self.render(row_of(factors, self.factor_sizes)).to(torch.float32)


def read_dsprites(path: str | os.PathLike) -> DSprites:
    """Read and check a dSprites .npz: ``imgs`` [N, 64, 64] of 0/1, ``latents_classes`` [N, 6] integer factor indices
    with every combination once, in mixed-radix order (the factor sizes are read from it: 1, 3, 6, 40, 32, 32 for
    the real file), ``latents_values`` (not used) of the same shape when present. The file's pickled ``metadata``
    entry is never read."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a dSprites .npz ({exc}); download it again") from None
    with archive:
        missing = [key for key in ("imgs", "latents_classes") if key not in archive.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}: expected the dSprites keys imgs, latents_classes, "
                            f"latents_values; got {', '.join(archive.files) or 'no arrays'}")
        imgs, classes = archive["imgs"], archive["latents_classes"]
        values_shape = archive["latents_values"].shape if "latents_values" in archive.files else None
    if imgs.ndim != 3 or imgs.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: expected imgs of shape [N, 64, 64], got {list(imgs.shape)}")
    if classes.shape != (len(imgs), len(FACTOR_SIZES)) or not np.issubdtype(classes.dtype, np.integer):
        raise DataError(f"{path}: expected integer latents_classes of shape [{len(imgs)}, 6] (color, shape, scale, "
                        f"orientation, posX, posY), got {classes.dtype} {list(classes.shape)}")
    if values_shape is not None and values_shape != classes.shape:
        raise DataError(f"{path}: expected latents_values of the shape of latents_classes {list(classes.shape)}, got "
                        f"{list(values_shape)}")
    if imgs.dtype != np.uint8 and imgs.dtype != bool or (imgs.dtype == np.uint8 and imgs.max(initial=0) > 1):
        raise DataError(f"{path}: expected binary imgs (uint8 0/1), got {imgs.dtype} with maximum {imgs.max()}")
    sizes = tuple(int(s) for s in classes.max(0) + 1)
    if classes.min() < 0 or int(np.prod(sizes)) != len(imgs) or not np.array_equal(
            classes, factors_of(np.arange(len(imgs)), sizes)):
        raise DataError(f"{path}: expected latents_classes to list every factor combination once, in order (the "
                        f"last factor fastest), with sizes {sizes}; the rows are in another order or incomplete")
    flat = torch.from_numpy(imgs.reshape(len(imgs), -1))
    return DSprites(flat.view(torch.bool) if flat.dtype == torch.uint8 else flat, sizes)


def find_dsprites(data_dir=None) -> Path:
    """The dSprites .npz: data_dir (the file itself, or a folder holding it, or its dsprites/ subfolder), then
    $ELBOLAB_DATA (or its dsprites/)."""
    candidates = []
    for origin, root in (("data_dir", data_dir), ("ELBOLAB_DATA", os.environ.get("ELBOLAB_DATA", "").strip())):
        if root:
            root = Path(root).expanduser()
            candidates += [(root, origin)] if root.suffix == ".npz" else [
                (root / DSPRITES_FILE, origin), (root / "dsprites" / DSPRITES_FILE, origin)]
    for path, _ in candidates:
        if path.is_file():
            return path
    searched = "; ".join(f"{p} (from {o})" for p, o in candidates) or "nothing (no data_dir, ELBOLAB_DATA unset)"
    raise DataError(f"dSprites not found: searched {searched}. Put {DSPRITES_FILE} (github.com/deepmind/dsprites-"
                    "dataset) in a folder and pass --data-dir FOLDER or set ELBOLAB_DATA=FOLDER; or use --data "
                    "sprites, the procedural stand-in that needs no file")


def split_rows(n: int, *, seed: int, val_size: ValSize, n_test: int, source: str) -> tuple[torch.Tensor, ...]:
    """(train, val, test) row numbers: test first from one seeded permutation, then validation, then training,
    each in the permutation's order. Rows are listed factor by factor, so a sorted split would make its first N rows
    (``--train-size N``, ``eval --limit N``, the first images of the figures) one corner of the grid (squares of the
    smallest scale); shuffled, they are a uniform sample of it."""
    n_val = resolve_val_count(val_size, n, n - n_test - 1, source)
    order = torch.randperm(n, generator=seeded_generator(seed, "split"))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


class RenderedRows:
    """Rows ``index`` [M] of a factor data set (``Sprites`` or ``DSprites``) as the ``x`` of a split: shape, row
    slices (``head``) and dense draws; an image is rendered (or, for dSprites, copied) when a batch asks for it."""

    def __init__(self, source, index: torch.Tensor):
        self.source, self.index = source, index

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.index), IMAGE_SIZE * IMAGE_SIZE)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bool

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            return RenderedRows(self.source, self.index[rows])
        return self.dense(torch.as_tensor(rows))

    def dense(self, index: torch.Tensor) -> torch.Tensor:
        """The images at positions ``index`` [B] as bool [B, 4096]."""
        return self.source.render(self.index[index].reshape(-1).numpy())


@dataclass
class RenderedData(TensorData):
    """A split whose x is ``RenderedRows``: batches are drawn on demand, nothing is held but row numbers."""

    def __post_init__(self) -> None:
        check_binarize(self.binarize)
        if not isinstance(self.x, RenderedRows):
            raise DataError(f"RenderedData {self.name!r}: expected x as RenderedRows, got {type(self.x).__name__}")
        for name, values in (("y", self.y), ("source_index", self.source_index)):
            if values is not None and len(values) != len(self.x):
                raise DataError(f"RenderedData {self.name!r}: expected {name} with {len(self.x)} rows, got "
                                f"{len(values)}")

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.x.dense(index).to(torch.float32)  # [B, 4096]

    def value_range(self) -> tuple[float, float]:
        return (0.0, 1.0) if len(self) else (0.0, 0.0)  # binary images


def _splits(name: str, data, *, binarize: str, seed: int, val_size: ValSize | None) -> DataSplits:
    """Split rows by seed; each split draws its images per batch; y = the factor indices [n, 6]."""
    check_binarize(binarize)  # the images are already binary: every mode leaves them as they are
    seed = check_seed(seed)
    n = len(data)
    n_test = min(DEFAULT_SPLIT, max(1, round(0.15 * n)))  # 10,000 of the full grid, 15% of a smaller file
    val_size = n_test if val_size is None else val_size
    meta = {"factor_names": list(data.factor_names), "factor_sizes": list(data.factor_sizes),
            "shape_names": list(SHAPE_NAMES)}
    parts = {}
    for part, rows in zip(("train", "val", "test"),
                          split_rows(n, seed=seed, val_size=val_size, n_test=n_test, source=name)):
        parts[part] = RenderedData(x=RenderedRows(data, rows), y=torch.from_numpy(factors_of(rows, data.factor_sizes)),
                                   image_shape=data.image_shape, binarize=binarize, name=f"{name}/{part}",
                                   source_index=rows, meta=meta)
    return DataSplits(**parts)


@register_source("sprites")
def load_sprites(*, data_dir=None, binarize: str = "none", seed: int = 0,
                 val_size: ValSize | None = None) -> DataSplits:
    """All 737,280 procedural sprites, split by seed: test 10,000, validation val_size (default 10,000), train the
    rest, each split in a seeded random order (so ``--train-size N`` takes a uniform sample). y holds the factor
    indices [N, 6]; meta the factor names and sizes. No file is read."""
    return _splits("sprites", Sprites(), binarize=binarize, seed=seed, val_size=val_size)


@register_source("dsprites")
def load_dsprites(*, data_dir=None, binarize: str = "none", seed: int = 0,
                  val_size: ValSize | None = None) -> DataSplits:
    """The real dSprites file (see ``find_dsprites``), split as ``sprites`` (a smaller file of the same layout: 15%
    test, 15% validation by default)."""
    return _splits("dsprites", read_dsprites(find_dsprites(data_dir)), binarize=binarize, seed=seed,
                   val_size=val_size)
