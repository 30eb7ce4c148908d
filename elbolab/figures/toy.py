"""The 2-D toy of notes 002 s4.10 (Kingma & Welling 2019, "An Introduction to Variational Autoencoders", the
figure of a VAE on four data points): which regions of a 2-D latent space each q(z|x) covers, and which point the
decoder puts there.

The data are the XOR points x = (a, b, a XOR b), a, b in {0, 1}: every coordinate is a fair coin and every pair of
coordinates is independent, yet only 4 of the 8 binary vectors occur. A decoder with independent Bernoulli outputs
can reach the best average log-likelihood, -log 4, only by using z; ignoring z it gets at most 3 log(1/2) (the
factorised fit), which is the poor local optimum (posterior collapse) the notes suspect in the original figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.patches import Ellipse

from elbolab.data.xor import xor_data, xor_points  # noqa: F401 - the toy's data, here for its users
from elbolab.plots import plt, save_figure

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def _label(point: torch.Tensor) -> str:
    return "x = " + "".join(str(int(v)) for v in point)


@torch.no_grad()
def plot_toy_regions(model, points: torch.Tensor, path, *, extent: float = 3.0, resolution: int = 150) -> Path:
    """Left: the regions where each q(z|x_i) is the densest of the four (coloured, faded where all are below 1% of
    their peak), with each q's 1 and 2 sd ellipses. Right: the point the decoder finds most probable at each z,
    shaded by that probability p(x_i|z)."""
    model.eval()
    q = model.encode(points)  # batch [n], event [2]
    axis = np.linspace(-extent, extent, resolution)
    gx, gy = np.meshgrid(axis, axis)
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], -1)).float()  # [G, 2]
    log_q = q.log_prob(grid[:, None, :])  # [G, n]
    peak = q.log_prob(q.mean)  # [n]
    owner = log_q.argmax(-1).numpy().reshape(gx.shape)
    faint = ((log_q - peak).max(-1).values < np.log(0.01)).numpy().reshape(gx.shape)
    log_px = model.decode(grid[:, None, :]).log_prob(points)  # [G, n]
    best = log_px.argmax(-1).numpy().reshape(gx.shape)
    best_p = log_px.max(-1).values.exp().numpy().reshape(gx.shape)

    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    colours = np.array([plt.matplotlib.colors.to_rgb(c) for c in COLOURS[:len(points)]])
    image = colours[owner]
    image[faint] = 0.6 * image[faint] + 0.4  # faded where no q covers the plane
    axes[0].imshow(np.clip(image, 0.0, 1.0), origin="lower", extent=(-extent, extent, -extent, extent), alpha=0.55)
    loc, sd = q.mean.numpy(), q.stddev.numpy()
    for i, point in enumerate(points):
        for k in (1, 2):
            axes[0].add_patch(Ellipse(loc[i], 2 * k * sd[i, 0], 2 * k * sd[i, 1], fill=False, lw=2 if k == 1 else 1,
                                      ls="-" if k == 1 else "--", color=COLOURS[i]))
        axes[0].plot(*loc[i], "o", color=COLOURS[i], markeredgecolor="black", label=_label(point))
    axes[0].set_title("regions of the latent space each q(z|x) covers\n(ellipses: 1 and 2 sd; faded: none > 1% of "
                      "its peak)", fontsize=12)
    best_p = np.clip(best_p, 0.0, 1.0)
    shaded = colours[best] * best_p[..., None] + (1 - best_p[..., None])
    axes[1].imshow(np.clip(shaded, 0.0, 1.0), origin="lower", extent=(-extent, extent, -extent, extent))
    for i in range(len(points)):
        axes[1].plot(*loc[i], "o", color=COLOURS[i], markeredgecolor="black")
    axes[1].set_title("most probable point under p(x|z)\n(paler: lower probability)", fontsize=12)
    for ax in axes:
        ax.set_xlabel("z1", fontsize=12)
        ax.set_ylabel("z2", fontsize=12)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
    axes[0].legend(loc="upper right", fontsize=10)
    fig.suptitle("VAE on the four XOR points (a, b, a xor b), 2-D latent space", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, path)
