"""Figures of the prior-hole analysis (notes 001 s2.5; ``elbolab.prior_holes``): the aggregated posterior q(z)
against the prior p(z) in a plane, with the holes {q(z)/p(z) < t} shaded, and decoded samples from the holes beside
decoded samples from well-covered regions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.distributions import Independent, Normal

from elbolab.plots import as_images, plt, save_figure, tile

EXTENT = 3.5  # the plane is drawn over [-EXTENT, EXTENT]^2 (prior standard deviations)


def _grid(extent: float, n: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    axis = np.linspace(-extent, extent, n)
    gx, gy = np.meshgrid(axis, axis)
    return gx, gy, torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], -1)).float()  # [n*n, 2]


def _image_panel(ax, images, image_shape, title: str, ncols: int = 6) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=12)
    if images is None or len(images) == 0:
        ax.text(0.5, 0.5, "none found", ha="center", va="center", transform=ax.transAxes, fontsize=12)
        return
    imgs = as_images(images, image_shape, "decoded samples")
    ncols = min(ncols, len(imgs))
    ax.imshow(tile([imgs[i:i + ncols] for i in range(0, len(imgs), ncols)], ncols), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")


def plot_prior_holes(result: dict, path, *, image_shape=None, extent: float = EXTENT, resolution: int = 200) -> Path:
    """Left: log q(z) (filled contours) with the prior's 1, 2, 3 sd circles, the holes q/p < t hatched in red and
    the encoded means; then decoded samples z ~ p(z) from the holes and from well-covered regions (image data)."""
    q = result["aggregated_posterior"]
    p = result.get("prior_plane") or Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    standard = result.get("prior_name", "N(0, I)") == "N(0, I)"
    gx, gy, points = _grid(extent, resolution)
    with torch.no_grad():
        log_q = torch.cat([q.log_prob(part) for part in points.split(4096)]).numpy().reshape(gx.shape)
    with torch.no_grad():
        log_p = torch.cat([p.log_prob(part) for part in points.split(4096)]).numpy().reshape(gx.shape)
    images = image_shape is not None and "hole_images" in result
    fig, axes = plt.subplots(1, 3 if images else 1, figsize=(17 if images else 7, 6),
                             gridspec_kw={"width_ratios": [1.2, 1, 1]} if images else None)
    ax = axes[0] if images else axes
    filled = ax.contourf(gx, gy, np.maximum(log_q, log_q.max() - 12), levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="log q(z), aggregated posterior")
    t = result["threshold"]
    ax.contourf(gx, gy, (log_q - log_p < math.log(t)).astype(float), levels=[0.5, 1.5], colors="none",
                hatches=["///"])
    ax.contour(gx, gy, (log_q - log_p < math.log(t)).astype(float), levels=[0.5], colors="red", linewidths=1.5)
    if standard:  # the prior's 1, 2, 3 sd circles
        radius = np.sqrt(gx**2 + gy**2)
        circles = ax.contour(gx, gy, radius, levels=[1, 2, 3], colors="white", linestyles="--", linewidths=1)
        ax.clabel(circles, fmt={1: "p: 1 sd", 2: "2 sd", 3: "3 sd"}, fontsize=9)
    else:  # a mixture prior: its own density's contours
        ax.contour(gx, gy, log_p, levels=5, colors="white", linestyles="--", linewidths=1)
    means = result["means_plane"].numpy()
    ax.scatter(means[:, 0], means[:, 1], s=2, color="orange", alpha=0.5, label="E[z|x] of the encoded points")
    ax.plot([], [], color="red", label=f"holes: q(z)/p(z) < {t:g} (hatched)")
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    names = ("z1", "z2") if result["plane"].startswith("latent") else ("principal axis 1", "principal axis 2")
    ax.set_xlabel(names[0], fontsize=12)
    ax.set_ylabel(names[1], fontsize=12)
    ax.set_title(f"q(z) of {result['n_points']} encoded points vs p(z) = {result.get('prior_name', 'N(0, I)')}\n"
                 f"{result['plane']}\n"
                 f"prior mass in holes {result['mass']:.4f} ± {result['se']:.4f}", fontsize=12)
    ax.legend(loc="lower left", fontsize=9, framealpha=0.8)
    if images:
        where = "" if result["plane"].startswith("latent") else " of the plane"
        _image_panel(axes[1], result["hole_images"], image_shape, f"decoded z ~ p(z) in holes{where} (q/p < {t:g})")
        _image_panel(axes[2], result["covered_images"], image_shape,
                     f"decoded z ~ p(z), well covered (q/p > {result['covered']:g})")
    fig.tight_layout()
    return save_figure(fig, path)
