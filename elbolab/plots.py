"""Figures for VAE runs: sample grids, reconstructions, training curves, latent manifold and scatter.

Every function takes plain arrays/tensors (or a decoder callable), so it works for every model. Each one
writes a PNG, creates the parent folders, closes its figure and returns the path.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers / CI

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from elbolab.errors import ElbolabError

__all__ = [
    "epoch_means",
    "grid_shape",
    "latent_grid",
    "latent_scatter_figure",
    "plot_image_grid",
    "plot_kl_per_dim",
    "plot_latent_manifold",
    "plot_latent_scatter",
    "plot_reconstructions",
    "plot_training_curves",
    "project_2d",
]

_DPI = 100
_PAD_VALUE = 0.5  # mid-grey gutters separate white-on-black and black-on-white digits alike
# Panels of the training-curve figure, in order: (metric key, panel title).
_CURVE_PANELS = (
    ("elbo", "ELBO (higher is better)"),
    ("kl", "KL(q(z|x) || p(z))"),
    ("recon", "Reconstruction term E_q log p(x|z)"),
)


# ----------------------------------------------------------------------------------------------- helpers
def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ElbolabError(
            f"{name}: expected a numeric array or tensor, got {type(x).__name__} ({exc}); "
            "pass a torch.Tensor or numpy array."
        ) from None
    return arr


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    """(H, W) or (C, H, W) with C = 1 (grey) or 3 (RGB) -> (C, H, W); (H, W) is one grey channel."""
    try:
        shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ElbolabError(
            f"image_shape: expected (height, width) or (channels, height, width) with positive sizes, got "
            f"{image_shape!r}; for MNIST pass (28, 28) or (1, 28, 28), for colour images e.g. (3, 32, 32)."
        )
    if shape[0] not in (1, 3):
        raise ElbolabError(
            f"image_shape: expected 1 (grey) or 3 (RGB) channels, got {shape[0]} in {shape}; "
            "pass (1, H, W) or (3, H, W)."
        )
    return shape


def as_images(x, image_shape, name: str) -> np.ndarray:
    """Rows in [0, 1] -> images, clipped (decoders may overshoot slightly).

    Rows are [N, C*H*W] flattened channel-first (or already [N, C, H, W] / [N, H, W]). Returns [N, H, W] for one
    channel and [N, H, W, 3] (channel-last, as imshow wants) for RGB.
    """
    c, h, w = _check_image_shape(image_shape)
    d = c * h * w
    arr = _to_numpy(x, name)
    if arr.ndim > 2 and math.prod(arr.shape[1:]) == d:  # [N, H, W] or [N, C, H, W] (conv decoders)
        arr = arr.reshape(arr.shape[0], d)
    if arr.ndim != 2 or arr.shape[1] != d:
        what = f"{h}x{w}" if c == 1 else f"{c}x{h}x{w}, channel-first"
        raise ElbolabError(
            f"{name}: expected shape [N, {d}] (flattened {what} images), got {list(arr.shape)}; "
            "reshape to [N, channels*height*width] or pass the matching image_shape."
        )
    if arr.shape[0] == 0:
        raise ElbolabError(f"{name}: expected at least one image, got none; pass a non-empty batch.")
    if not np.all(np.isfinite(arr)):
        raise ElbolabError(
            f"{name}: expected finite pixel values in [0, 1], got NaN or inf; "
            "check the model output (did training diverge?)."
        )
    arr = np.clip(arr, 0.0, 1.0)
    if c == 1:
        return arr.reshape(-1, h, w)
    return arr.reshape(-1, c, h, w).transpose(0, 2, 3, 1)  # [N, H, W, 3]


def tile(rows: Sequence[np.ndarray], ncols: int) -> np.ndarray:
    """Rows of [n_i, H, W] (grey) or [n_i, H, W, 3] (RGB) images, n_i <= ncols -> one mosaic ([H', W'] or
    [H', W', 3]) with 1-pixel gutters."""
    h, w = rows[0].shape[1:3]
    extra = rows[0].shape[3:]  # () for grey, (3,) for RGB
    mosaic = np.full((len(rows) * (h + 1) + 1, ncols * (w + 1) + 1, *extra), _PAD_VALUE)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            top, left = 1 + r * (h + 1), 1 + c * (w + 1)
            mosaic[top : top + h, left : left + w] = img
    return mosaic


def mosaic_figure(mosaic: np.ndarray, title: str | None, cell_inches: float, ncols: int, nrows: int):
    width = min(max(ncols * cell_inches, 3.0), 16.0)
    height = min(max(nrows * cell_inches, 1.5), 16.0) + (0.4 if title else 0.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=_DPI)
    if mosaic.ndim == 2:  # grey
        ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:  # RGB in [0, 1]: colours as they are
        ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return fig, ax


def save_figure(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def figure_png_bytes(fig) -> bytes:
    """Render a figure to PNG bytes (for embedding) and close it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------- images
_MAX_GRID_ASPECT = 2.5  # a grid that divides n is kept while it is at most 2.5 times as wide as tall


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``n`` images: the most square layout whose cells are all filled (16 -> 4 x 4,
    12 -> 3 x 4, 10 -> 2 x 5; never taller than wide) as long as it is at most 2.5 times as wide as tall; otherwise
    (a prime such as 7 or 13, or 14 -> 2 x 7) the near-square layout with the fewest empty cells in its last row
    (7 -> 2 x 4, 13 -> 3 x 5). Up to 3 images sit in one row."""
    n = int(n)
    if n < 1:
        raise ElbolabError(f"n: expected at least one image, got {n}.")
    if n <= 3:
        return 1, n
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)  # the largest divisor <= sqrt(n)
    if n // rows <= _MAX_GRID_ASPECT * rows:
        return rows, n // rows
    layouts = [(math.ceil(n / cols), cols) for cols in range(math.isqrt(n), n + 1)]
    fitting = [(r, c) for r, c in layouts if r <= c <= _MAX_GRID_ASPECT * r]
    return min(fitting, key=lambda rc: (rc[0] * rc[1] - n, rc[1] - rc[0]))


def plot_image_grid(images, image_shape, path, *, ncols: int | None = None, title: str | None = None) -> Path:
    """Grid of images ([N, C*H*W] in [0, 1], channel-first; ``image_shape`` (H, W) or (C, H, W) with C = 1 or 3),
    ``ncols`` per row (by default the layout of :func:`grid_shape`: 16 images in 4 x 4, 100 in 10 x 10); e.g.
    samples from the prior. Grey for one channel, colour for three."""
    if ncols is not None and int(ncols) < 1:
        raise ElbolabError(f"ncols: expected a positive integer, got {ncols}; try ncols=10.")
    imgs = as_images(images, image_shape, "images")  # [N, H, W] or [N, H, W, 3]
    ncols = grid_shape(imgs.shape[0])[1] if ncols is None else min(int(ncols), imgs.shape[0])
    rows = [imgs[i : i + ncols] for i in range(0, imgs.shape[0], ncols)]
    fig, _ = mosaic_figure(tile(rows, ncols), title, 0.6, ncols, len(rows))
    return save_figure(fig, path)


def plot_reconstructions(inputs, reconstructions, image_shape, path, *, n: int = 10) -> Path:
    """First ``n`` inputs with their reconstructions beneath; row pairs of at most 10 columns.

    ``image_shape`` is (H, W) or (C, H, W) as in :func:`plot_image_grid`."""
    x = as_images(inputs, image_shape, "inputs")  # [N, H, W] or [N, H, W, 3]
    x_hat = as_images(reconstructions, image_shape, "reconstructions")
    if x.shape[0] != x_hat.shape[0]:
        raise ElbolabError(
            f"reconstructions: expected one per input ({x.shape[0]}), got {x_hat.shape[0]}; "
            "pass the reconstructions of exactly these inputs."
        )
    if int(n) < 1:
        raise ElbolabError(f"n: expected a positive integer, got {n}; try n=10.")
    n = min(int(n), x.shape[0])
    ncols = min(n, 10)
    rows, labels = [], []
    for start in range(0, n, ncols):
        rows += [x[start : min(start + ncols, n)], x_hat[start : min(start + ncols, n)]]
        labels += ["input", "recon."]
    fig, ax = mosaic_figure(tile(rows, ncols), "Inputs (top) and reconstructions (beneath)", 0.6,
                             ncols, len(rows))
    h = x.shape[1]
    ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(len(rows))], labels, fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------ training curves
def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def epoch_means(metrics: Iterable[dict], x_key: str = "epoch") -> dict[str, dict[int, dict[str, float]]]:
    """Average numeric fields per (split, epoch): {split: {epoch: {key: mean}}}.

    Trainers may log one record per step or per epoch; the per-epoch mean covers both. Records without
    ``x_key`` or split are skipped; non-finite values are kept as NaN (they show up as gaps).
    """
    sums: dict[str, dict[int, dict[str, list[float]]]] = {}
    for record in metrics:
        if not isinstance(record, dict) or not _is_number(record.get(x_key)):
            continue
        split = str(record.get("split", "train"))
        per_epoch = sums.setdefault(split, {}).setdefault(int(record[x_key]), {})
        for key, value in record.items():
            if key not in (x_key, "split") and _is_number(value):
                per_epoch.setdefault(key, []).append(float(value))
    return {
        split: {ep: {k: float(np.mean(v)) for k, v in fields.items()} for ep, fields in sorted(epochs.items())}
        for split, epochs in sums.items()
    }


def _split_order(splits: Iterable[str]) -> list[str]:
    preferred = [s for s in ("train", "val", "test") if s in splits]
    return preferred + sorted(s for s in splits if s not in preferred)


def plot_training_curves(metrics: list[dict], path) -> Path:
    """ELBO, KL and reconstruction term by epoch, train vs val; plots only the keys that exist.

    Models without a KL (the plain autoencoder) get their ``loss`` instead of the missing ELBO panel.
    """
    records = list(metrics)
    x_key = "epoch" if any(isinstance(r, dict) and _is_number(r.get("epoch")) for r in records) else "step"
    table = epoch_means(records, x_key)
    present = {k for epochs in table.values() for fields in epochs.values() for k in fields}
    panels = [(k, t) for k, t in _CURVE_PANELS if k in present]
    if "elbo" not in present and "loss" in present:
        panels.insert(0, ("loss", "Loss (lower is better)"))
    if not panels:
        raise ElbolabError(
            f"metrics: expected records with '{x_key}', 'split' and at least one of elbo/kl/recon/loss, "
            f"got {len(records)} records with keys {sorted(present) or 'none'}; check metrics.jsonl."
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=_DPI, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for split in _split_order(table):
            points = [(ep, f[key]) for ep, f in table[split].items() if key in f]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=split)
        _clip_first_epoch_outlier(ax, [f[key] for split in table for f in table[split].values() if key in f])
        ax.set_title(title, fontsize=10)
        if x_key == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, no 0.5 ticks
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _clip_first_epoch_outlier(ax, values: list[float]) -> None:
    """When one value (typically the first epoch's) lies far outside the rest, set the y-range to the rest so the
    curve stays readable, and say so on the axis (the value itself stays in metrics.jsonl)."""
    finite = np.array([v for v in values if np.isfinite(v)], dtype=float)
    if len(finite) < 4:
        return
    median = np.median(finite)
    deviation = max(np.median(np.abs(finite - median)), 1e-12)  # robust to the outlier itself
    inliers = finite[np.abs(finite - median) <= 50 * deviation]
    if len(inliers) < len(finite):
        margin = max(0.1 * (inliers.max() - inliers.min()), deviation)
        ax.set_ylim(inliers.min() - margin, inliers.max() + margin)
        ax.annotate("an outlier (epoch 1?) is off the scale", xy=(0.02, 0.02), xycoords="axes fraction",
                    fontsize=7, color="#666666")


# ----------------------------------------------------------------------------------------- latent space
def latent_grid(n: int, latent_dim: int = 2, dims: tuple[int, int] = (0, 1),
                quantile_range: tuple[float, float] = (0.05, 0.95)) -> torch.Tensor:
    """Latent points of the manifold figure, [n*n, latent_dim], in row-major display order.

    Kingma & Welling (2014, Fig. 4): equally spaced probabilities pushed through the standard normal
    inverse CDF, so each tile covers equal prior mass. Row r has z[dims[1]] = q[n-1-r] (largest at the
    top); column c has z[dims[0]] = q[c]; the other coordinates are 0 (the prior mean).
    """
    n, latent_dim = int(n), int(latent_dim)
    if n < 1:
        raise ElbolabError(f"n: expected a positive grid size, got {n}; try n=20.")
    if latent_dim < 2:
        raise ElbolabError(
            f"latent_dim: expected at least 2 for a 2-D manifold, got {latent_dim}; "
            "for a 1-D latent, decode a line of normal quantiles with plot_image_grid."
        )
    d0, d1 = (int(d) for d in dims)
    if d0 == d1 or not (0 <= d0 < latent_dim and 0 <= d1 < latent_dim):
        raise ElbolabError(
            f"dims: expected two different indices in [0, {latent_dim}), got {tuple(dims)}; try dims=(0, 1)."
        )
    lo, hi = (float(q) for q in quantile_range)
    if not 0.0 < lo < hi < 1.0:
        raise ElbolabError(
            f"quantile_range: expected 0 < low < high < 1, got {tuple(quantile_range)}; try (0.05, 0.95)."
        )
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(lo, hi, n))  # [n]
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    z = torch.zeros(n * n, latent_dim)  # [n*n, latent_dim]
    z[:, d0] = q[cols.reshape(-1)]
    z[:, d1] = q.flip(0)[rows.reshape(-1)]
    return z


def plot_latent_manifold(decode_mean: Callable[[torch.Tensor], torch.Tensor], image_shape, path, *,
                         n: int = 20, latent_dim: int = 2, dims: tuple[int, int] = (0, 1),
                         quantile_range: tuple[float, float] = (0.05, 0.95), note: str | None = None) -> Path:
    """Decoder means over a grid of normal quantiles (one call with all n*n points), tiled as images.

    ``image_shape`` is (H, W) or (C, H, W) as in :func:`plot_image_grid`."""
    _, h, w = _check_image_shape(image_shape)
    z = latent_grid(n, latent_dim, dims, quantile_range)  # [n*n, latent_dim]
    with torch.no_grad():
        decoded = decode_mean(z)
    imgs = as_images(decoded, image_shape, "decode_mean(z)")  # [n*n, H, W] or [n*n, H, W, 3]
    if imgs.shape[0] != z.shape[0]:
        raise ElbolabError(
            f"decode_mean(z): expected {z.shape[0]} images (one per latent point), got {imgs.shape[0]}; "
            "the decoder must map [M, latent_dim] to [M, channels*height*width]."
        )
    rows = [imgs[r * n : (r + 1) * n] for r in range(n)]
    d0, d1 = dims
    title = f"Decoder mean over the latent grid (z{d0}, z{d1})" + (f"\n{note}" if note else "")
    fig, ax = mosaic_figure(tile(rows, n), title, 0.4, n, n)
    q = z[:n, d0].numpy()  # the column values, ascending
    step = max(1, math.ceil(n / 7))  # about 7 tick labels per axis stays legible
    idx = list(range(0, n, step))
    centres_x = [1 + c * (w + 1) + w / 2 for c in idx]
    centres_y = [1 + r * (h + 1) + h / 2 for r in idx]
    ax.set_xticks(centres_x, [f"{q[c]:.2f}" for c in idx], fontsize=11)
    ax.set_yticks(centres_y, [f"{q[n - 1 - r]:.2f}" for r in idx], fontsize=11)
    ax.set_xlabel(f"z{d0}")
    ax.set_ylabel(f"z{d1}")
    return save_figure(fig, path)


def project_2d(z, method: str = "auto") -> tuple[np.ndarray, str]:
    """[N, d] -> ([N, 2] coordinates, description). d == 2 as is; d > 2: PCA ("auto") or "first2"."""
    arr = _to_numpy(z, "z")
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ElbolabError(f"z: expected a [N, d] array of latent codes, got shape {list(arr.shape)}; "
                           "pass one row per data point.")
    if not np.all(np.isfinite(arr)):
        raise ElbolabError("z: expected finite latent codes, got NaN or inf; check the encoder output.")
    d = arr.shape[1]
    if d < 2:
        raise ElbolabError(f"z: expected at least 2 latent dimensions for a scatter, got {d}; "
                           "for a 1-D latent, plot a histogram of z.")
    if method not in ("auto", "pca", "first2"):
        raise ElbolabError(f"method: expected 'auto', 'pca' or 'first2', got {method!r}.")
    if d == 2:
        return arr.copy(), "latent z (2-D, no projection)"
    if method == "first2":
        return arr[:, :2].copy(), f"first 2 of {d} latent dimensions"
    if arr.shape[0] < 2:
        raise ElbolabError(f"z: PCA needs at least 2 points, got {arr.shape[0]}; pass more codes "
                           "or use method='first2'.")
    from sklearn.decomposition import PCA  # heavy import, only needed here

    pca = PCA(n_components=2, svd_solver="full").fit(arr)
    ratio = pca.explained_variance_ratio_
    return pca.transform(arr), f"PCA of {d}-D latent (explained variance {ratio[0]:.0%} + {ratio[1]:.0%})"


def label_vector(labels, n: int, label_name: str | None) -> tuple[np.ndarray, str]:
    """Labels [N] (class ids) or [N, F] (factors: the first that varies is used; a constant factor, such as the
    sprites' colour, would paint every point one colour) -> ([N] values, legend title)."""
    lab = _to_numpy(labels, "labels")
    if lab.ndim == 2 and lab.shape[1] >= 1:
        column = next((j for j in range(lab.shape[1]) if len(np.unique(lab[:, j])) > 1), 0)
        title = label_name or ("label" if lab.shape[1] == 1 else f"factor {column} (of {lab.shape[1]})")
        lab = lab[:, column]
    elif lab.ndim <= 1:
        lab, title = lab.reshape(-1), label_name or "label"
    else:
        raise ElbolabError(f"labels: expected shape [N] (class ids) or [N, F] (factors), got {list(lab.shape)}; "
                           "pass one row per latent code or None.")
    if lab.shape[0] != n:
        raise ElbolabError(f"labels: expected one label per latent code ({n}), got "
                           f"{lab.shape[0]}; pass labels of the same examples or None.")
    if not np.all(np.isfinite(lab)):
        raise ElbolabError("labels: expected finite label values, got NaN or inf; pass class ids or factor values.")
    return lab, title


def _class_name(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _latent_histogram(z1: np.ndarray, lab: np.ndarray | None, label_title: str, class_names=None):
    """One latent dimension: a histogram of z, stacked per label when there are few distinct labels."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=_DPI)
    bins = np.histogram_bin_edges(z1, bins=min(60, max(10, int(np.sqrt(z1.size)))))
    title = "Latent codes: histogram of the 1-D latent z"
    if lab is None:
        ax.hist(z1, bins=bins, color="#4c72b0", alpha=0.85)
    else:
        classes = np.unique(lab)
        if len(classes) <= 20:  # stacked bars per label, with a legend
            ax.hist([z1[lab == cls] for cls in classes], bins=bins, stacked=True, alpha=0.85,
                    color=_class_colours(classes, class_names), label=_class_names(classes, class_names))
            ax.legend(title=label_title, fontsize=8, loc="best", framealpha=0.8,
                      ncol=1 if len(classes) <= 10 else 2)
            title += f", stacked by {label_title}"
        else:  # too many values for a legend: overlay the histogram of each label-quartile group
            edges = np.unique(np.quantile(lab, [0.0, 0.25, 0.5, 0.75, 1.0]))
            groups = np.clip(np.searchsorted(edges, lab, side="right") - 1, 0, max(len(edges) - 2, 0))
            cmap = plt.get_cmap("viridis")
            for g in np.unique(groups):
                lo, hi = edges[g], edges[min(g + 1, len(edges) - 1)]
                ax.hist(z1[groups == g], bins=bins, histtype="step", linewidth=1.6,
                        color=cmap(g / max(len(edges) - 2, 1)), label=f"{lo:g} to {hi:g}")
            ax.legend(title=f"{label_title} (quartile groups)", fontsize=8, loc="best", framealpha=0.8)
            title += f", by {label_title} quartile"
    ax.set_xlabel("z (the only latent dimension)")
    ax.set_ylabel("number of codes")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def class_colours(n_classes: int) -> list:
    """One colour per class: tab10 up to 10 classes; for 11 to 20, tab20's dark shade of each of its 10 hues for
    the first 10 classes and the light shades for the rest, so neighbouring classes (which are often related, such
    as the comp.* newsgroups) get different hues rather than two shades of one."""
    if n_classes <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i) for i in range(n_classes)]
    cmap = plt.get_cmap("tab20")
    return [cmap((2 * i) % 20 + (1 if i >= 10 else 0)) for i in range(n_classes)]


def _names_cover(classes: np.ndarray, class_names) -> bool:
    return class_names is not None and len(class_names) > 0 and all(
        float(c).is_integer() and 0 <= int(c) < len(class_names) for c in classes)


def _class_names(classes: np.ndarray, class_names) -> list[str]:
    """Legend entries: ``class_names[c]`` for class id c when names are given (and cover every id), else the id."""
    if _names_cover(classes, class_names):
        return [str(class_names[int(c)]) for c in classes]
    return [_class_name(c) for c in classes]


def _class_colours(classes: np.ndarray, class_names) -> list:
    """The colour of each class present: with names, by class id among all the named classes (a newsgroup keeps its
    colour when another is missing from the codes shown); else by rank among the classes present."""
    if _names_cover(classes, class_names) and len(class_names) <= 20:
        palette = class_colours(len(class_names))
        return [palette[int(c)] for c in classes]
    return class_colours(len(classes))


def latent_scatter_figure(z, labels, *, method: str = "auto", label_name: str | None = None, class_names=None,
                          note: str | None = None):
    """The figure of :func:`plot_latent_scatter` (not saved; the caller saves or inspects it)."""
    arr = _to_numpy(z, "z")
    if arr.ndim == 1:
        arr = arr[:, None]  # [N] -> [N, 1]: a 1-D latent
    if arr.ndim == 2 and arr.shape[1] == 1 and arr.shape[0] >= 1:
        if not np.all(np.isfinite(arr)):
            raise ElbolabError("z: expected finite latent codes, got NaN or inf; check the encoder output.")
        lab, label_title = (None, "") if labels is None else label_vector(labels, arr.shape[0], label_name)
        return _latent_histogram(arr[:, 0], lab, label_title, class_names)
    coords, description = project_2d(arr, method)  # [N, 2]
    lab, label_title = (None, "") if labels is None else label_vector(labels, coords.shape[0], label_name)
    classes = np.unique(lab) if lab is not None else np.array([])
    names = _class_names(classes, class_names) if lab is not None else []
    # Many classes (20 newsgroups): a wide figure (the report shows it across the page, not in half of it, so the
    # legend's names stay legible); the legend sits beside the axes
    many = 10 < len(classes) <= 20
    fig, ax = plt.subplots(figsize=(9.8 if many else 7.0, 5.2), dpi=_DPI)
    size = 12 if coords.shape[0] <= 2000 else 4
    title = f"Latent codes: {description}"
    if lab is None or len(classes) == 1:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.6, linewidths=0)
        if lab is not None:  # one class: a legend of one entry says nothing, the title says it
            title += f"\nevery code has {label_title} {names[0]}"
    elif len(classes) <= 20:  # a legend is readable for up to 20 classes (MNIST digits, 20 newsgroups)
        colours = _class_colours(classes, class_names)
        order = np.random.default_rng(0).permutation(coords.shape[0])  # mixed draw order: no class hides the rest
        lab_shuffled, coords_shuffled = lab[order], coords[order]
        for i, (cls, name) in enumerate(zip(classes, names)):
            mask = lab_shuffled == cls
            ax.scatter(coords_shuffled[mask, 0], coords_shuffled[mask, 1], s=size, alpha=0.7, linewidths=0,
                       color=colours[i], label=f"{name} ({int(mask.sum())})" if many else name)
        # beside the axes, never over the points
        ax.legend(title=label_title + (" (codes)" if many else ""), fontsize=9, title_fontsize=9, markerscale=2.5,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, handletextpad=0.3,
                  labelspacing=0.3 if many else 0.5)
    else:
        points = ax.scatter(coords[:, 0], coords[:, 1], c=lab, s=size, alpha=0.7, linewidths=0,
                            cmap="viridis")
        fig.colorbar(points, ax=ax, label=label_title)
    if note:
        title += f"\n{note}"
    is_pca = description.startswith("PCA")
    ax.set_xlabel("PC 1" if is_pca else "z0")
    ax.set_ylabel("PC 2" if is_pca else "z1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_latent_scatter(z, labels, path, *, method: str = "auto", label_name: str | None = None,
                        class_names=None, note: str | None = None) -> Path:
    """Latent codes in 2-D (projected with :func:`project_2d`), coloured by label if given.

    ``labels`` are class ids [N] or factors [N, F] (coloured by the first factor; ``label_name`` names it in the
    legend). ``class_names[c]`` names class id c in the legend (e.g. the 20 newsgroups) and ``note`` is a line under
    the title (e.g. why the codes are not coloured). A 1-D latent ([N, 1] or [N]) gets a histogram of z instead,
    stacked per label.
    """
    return save_figure(latent_scatter_figure(z, labels, method=method, label_name=label_name,
                                             class_names=class_names, note=note), path)


def kl_bar_figure(kl_per_dim):
    kl = _to_numpy(kl_per_dim, "kl_per_dim").reshape(-1)  # [d]
    if kl.size == 0:
        raise ElbolabError("kl_per_dim: expected one KL value per latent dimension, got none.")
    fig, ax = plt.subplots(figsize=(min(max(0.25 * kl.size + 1.5, 3.5), 12.0), 2.6), dpi=_DPI)
    ax.bar(np.arange(kl.size), kl, color="#4c72b0")
    if kl.size <= 20:  # dimensions are whole numbers: one tick each, or integer ticks when there are many
        ax.set_xticks(np.arange(kl.size))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.set_title("KL per latent dimension", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def kl_anatomy_figure(anatomy: dict):
    """One stacked bar: the mean KL(q(z|x) || p(z)) as index-code mutual information + total correlation +
    dimension-wise KL (Hoffman & Johnson 2016; Chen et al. 2018), each segment labelled in nats."""
    parts = [("I(x; z): index-code mutual information", anatomy["mutual_information"], "#4c72b0"),
             ("TC: total correlation of q(z)", anatomy["total_correlation"], "#dd8452"),
             ("dimension-wise KL(q(z_j) || p(z_j))", anatomy["dimension_wise_kl"], "#55a868")]
    fig, ax = plt.subplots(figsize=(8.0, 1.6), dpi=_DPI)
    left = 0.0
    for label, value, colour in parts:
        width = max(float(value), 0.0)
        ax.barh(0, width, left=left, color=colour, label=f"{label}: {value:.2f}")
        left += width
    ax.set_yticks([])
    ax.set_xlabel("nats per example")
    ax.set_title(f"Where the KL goes: {anatomy['average_kl']:.2f} nats on average", fontsize=10)
    fig.tight_layout()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.7), ncol=1, fontsize=9, frameon=False)  # below the label
    return fig


def plot_kl_per_dim(kl_per_dim, path) -> Path:
    """Bar chart of the average KL of each latent dimension (collapsed dimensions sit near 0)."""
    return save_figure(kl_bar_figure(kl_per_dim), path)


# ------------------------------------------------------------------------------------ importance sampling
def plot_is_diagnostics(diagnostics: dict, path, *, split: str = "test") -> Path:
    """Is K large enough? Per-example ESS/K, log weights of three examples, and log p(x) against K (from
    ``evaluate.importance_diagnostics``)."""
    k, n = diagnostics["k"], diagnostics["n_examples"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=_DPI)
    ess = _to_numpy(diagnostics["ess"], "ess").reshape(-1) / k
    ax = axes[0]
    ax.hist(ess, bins=np.linspace(0, 1, 41), color="#4c72b0")
    ax.set_xlabel("ESS / K (effective share of the K samples)")
    ax.set_ylabel("examples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Effective sample size, {n} {split} examples, K = {k:,}", fontsize=11)
    ax = axes[1]
    colours = ("#c44e52", "#8172b2", "#55a868")
    for (shown, colour, what) in zip(diagnostics["shown"], colours, ("lowest", "median", "highest")):
        log_w = _to_numpy(shown["log_w"], "log_w").reshape(-1)
        ax.hist(np.maximum(log_w, -30), bins=60, histtype="step", lw=1.6, color=colour,
                label=f"{what} ESS: example {shown['index']}, ESS {shown['ess']:.0f}")
    ax.set_xlabel("log w - max log w (clipped at -30)")
    ax.set_ylabel("importance samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Log weights of three examples", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    ks = np.array([c["k"] for c in diagnostics["curve"]])
    means = np.array([c["log_px"] for c in diagnostics["curve"]])
    ses = np.array([c["mc_stderr"] for c in diagnostics["curve"]], dtype=float)
    ax.errorbar(ks, means, yerr=np.nan_to_num(ses), marker="o", ms=4, capsize=3, color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("K importance samples (log scale; K = 1 is the ELBO estimate)")
    ax.set_ylabel("mean log p(x) estimate (nats)")
    ax.set_title("log p(x) against K: it should flatten", fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
