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

from elbolab.errors import ElbolabError

__all__ = [
    "epoch_means",
    "latent_grid",
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


def _check_image_shape(image_shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ElbolabError(
            f"image_shape: expected (height, width) with positive sizes, got {tuple(image_shape)}; "
            "for MNIST pass (28, 28)."
        )
    return shape


def _as_images(x, image_shape, name: str) -> np.ndarray:
    """[N, D], [N, H, W] or [N, 1, H, W] in [0, 1] -> [N, H, W], clipped (decoders may overshoot slightly)."""
    h, w = _check_image_shape(image_shape)
    arr = _to_numpy(x, name)
    if arr.ndim > 2 and math.prod(arr.shape[1:]) == h * w:  # [N, H, W] or [N, 1, H, W] (conv decoders)
        arr = arr.reshape(arr.shape[0], h * w)
    if arr.ndim != 2 or arr.shape[1] != h * w:
        raise ElbolabError(
            f"{name}: expected shape [N, {h * w}] (flattened {h}x{w} images), got {list(arr.shape)}; "
            "reshape to [N, height*width] or pass the matching image_shape."
        )
    if arr.shape[0] == 0:
        raise ElbolabError(f"{name}: expected at least one image, got none; pass a non-empty batch.")
    if not np.all(np.isfinite(arr)):
        raise ElbolabError(
            f"{name}: expected finite pixel values in [0, 1], got NaN or inf; "
            "check the model output (did training diverge?)."
        )
    return np.clip(arr, 0.0, 1.0).reshape(-1, h, w)


def _tile(rows: Sequence[np.ndarray], ncols: int) -> np.ndarray:
    """Rows of [n_i, H, W] images (n_i <= ncols) -> one 2-D mosaic with 1-pixel gutters."""
    h, w = rows[0].shape[1:]
    mosaic = np.full((len(rows) * (h + 1) + 1, ncols * (w + 1) + 1), _PAD_VALUE)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            top, left = 1 + r * (h + 1), 1 + c * (w + 1)
            mosaic[top : top + h, left : left + w] = img
    return mosaic


def _mosaic_figure(mosaic: np.ndarray, title: str | None, cell_inches: float, ncols: int, nrows: int):
    width = min(max(ncols * cell_inches, 3.0), 16.0)
    height = min(max(nrows * cell_inches, 1.5), 16.0) + (0.4 if title else 0.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=_DPI)
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return fig, ax


def _save(fig, path) -> Path:
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
def plot_image_grid(images, image_shape, path, *, ncols: int = 10, title: str | None = None) -> Path:
    """Grid of images ([N, H*W] in [0, 1]), ``ncols`` per row; e.g. samples from the prior."""
    if int(ncols) < 1:
        raise ElbolabError(f"ncols: expected a positive integer, got {ncols}; try ncols=10.")
    imgs = _as_images(images, image_shape, "images")  # [N, H, W]
    ncols = min(int(ncols), imgs.shape[0])
    rows = [imgs[i : i + ncols] for i in range(0, imgs.shape[0], ncols)]
    fig, _ = _mosaic_figure(_tile(rows, ncols), title, 0.6, ncols, len(rows))
    return _save(fig, path)


def plot_reconstructions(inputs, reconstructions, image_shape, path, *, n: int = 10) -> Path:
    """First ``n`` inputs with their reconstructions beneath; row pairs of at most 10 columns."""
    x = _as_images(inputs, image_shape, "inputs")  # [N, H, W]
    x_hat = _as_images(reconstructions, image_shape, "reconstructions")
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
    fig, ax = _mosaic_figure(_tile(rows, ncols), "Inputs (top) and reconstructions (beneath)", 0.6,
                             ncols, len(rows))
    h = x.shape[1]
    ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(len(rows))], labels, fontsize=8)
    return _save(fig, path)


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
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


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
                         quantile_range: tuple[float, float] = (0.05, 0.95)) -> Path:
    """Decoder means over a grid of normal quantiles (one call with all n*n points), tiled as images."""
    h, w = _check_image_shape(image_shape)
    z = latent_grid(n, latent_dim, dims, quantile_range)  # [n*n, latent_dim]
    with torch.no_grad():
        decoded = decode_mean(z)
    imgs = _as_images(decoded, (h, w), "decode_mean(z)")  # [n*n, H, W]
    if imgs.shape[0] != z.shape[0]:
        raise ElbolabError(
            f"decode_mean(z): expected {z.shape[0]} images (one per latent point), got {imgs.shape[0]}; "
            "the decoder must map [M, latent_dim] to [M, height*width]."
        )
    rows = [imgs[r * n : (r + 1) * n] for r in range(n)]
    d0, d1 = dims
    fig, ax = _mosaic_figure(_tile(rows, n), f"Decoder mean over the latent grid (z{d0}, z{d1})",
                             0.4, n, n)
    q = z[:n, d0].numpy()  # the column values, ascending
    step = max(1, math.ceil(n / 7))  # about 7 tick labels per axis stays legible
    idx = list(range(0, n, step))
    centres_x = [1 + c * (w + 1) + w / 2 for c in idx]
    centres_y = [1 + r * (h + 1) + h / 2 for r in idx]
    ax.set_xticks(centres_x, [f"{q[c]:.2f}" for c in idx], fontsize=7)
    ax.set_yticks(centres_y, [f"{q[n - 1 - r]:.2f}" for r in idx], fontsize=7)
    ax.set_xlabel(f"z{d0}")
    ax.set_ylabel(f"z{d1}")
    return _save(fig, path)


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


def plot_latent_scatter(z, labels, path, *, method: str = "auto") -> Path:
    """Latent codes in 2-D (projected with :func:`project_2d`), coloured by integer label if given."""
    coords, description = project_2d(z, method)  # [N, 2]
    fig, ax = plt.subplots(figsize=(6.0, 5.2), dpi=_DPI)
    size = 12 if coords.shape[0] <= 2000 else 4
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.6, linewidths=0)
    else:
        lab = _to_numpy(labels, "labels").reshape(-1)
        if lab.shape[0] != coords.shape[0]:
            raise ElbolabError(f"labels: expected one label per latent code ({coords.shape[0]}), got "
                               f"{lab.shape[0]}; pass labels of the same examples or None.")
        classes = np.unique(lab)
        if len(classes) <= 20:  # a legend is readable for few classes (e.g. MNIST digits)
            cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
            for i, cls in enumerate(classes):
                mask = lab == cls
                name = str(int(cls)) if float(cls).is_integer() else f"{cls:g}"
                ax.scatter(coords[mask, 0], coords[mask, 1], s=size, alpha=0.7, linewidths=0,
                           color=cmap(i), label=name)
            ax.legend(title="label", fontsize=8, markerscale=2, loc="best", framealpha=0.8)
        else:
            points = ax.scatter(coords[:, 0], coords[:, 1], c=lab, s=size, alpha=0.7, linewidths=0,
                                cmap="viridis")
            fig.colorbar(points, ax=ax, label="label")
    is_pca = description.startswith("PCA")
    ax.set_xlabel("PC 1" if is_pca else "z0")
    ax.set_ylabel("PC 2" if is_pca else "z1")
    ax.set_title(f"Latent codes: {description}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _kl_bar_figure(kl_per_dim):
    kl = _to_numpy(kl_per_dim, "kl_per_dim").reshape(-1)  # [d]
    if kl.size == 0:
        raise ElbolabError("kl_per_dim: expected one KL value per latent dimension, got none.")
    fig, ax = plt.subplots(figsize=(min(max(0.25 * kl.size + 1.5, 3.5), 12.0), 2.6), dpi=_DPI)
    ax.bar(np.arange(kl.size), kl, color="#4c72b0")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.set_title("KL per latent dimension", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_kl_per_dim(kl_per_dim, path) -> Path:
    """Bar chart of the average KL of each latent dimension (collapsed dimensions sit near 0)."""
    return _save(_kl_bar_figure(kl_per_dim), path)
