"""Figures of conditional models (the CVAE, ``elbolab.models.cvae``).

* ``class_samples.png`` (condition=label): one row per class, each cell E[x|z, y] for a fresh z ~ p(z|y).
* ``inpainting.png`` (condition=quadrants): test images in columns; rows: the given quadrants (missing pixels
  mid-grey), the truth, then completions E[x|z, c] for z ~ p(z|c), with the given pixels pasted back.

Plus the unconditional model's figures that make sense here: reconstructions, training curves, the latent scatter.
(The 2-D latent manifold and the prior sample grid of ``standard_figures`` need an unconditional decoder.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from elbolab import plots, runs
from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.plots import as_images, mosaic_figure, save_figure, tile

MISSING_GREY = 0.5


def _labelled_mosaic(rows: list[np.ndarray], labels: list[str], title: str, path) -> Path:
    ncols = max(len(r) for r in rows)
    fig, ax = mosaic_figure(tile(rows, ncols), title, 0.7, ncols, len(rows))
    h = rows[0].shape[1]
    ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(len(rows))], labels, fontsize=10)
    return save_figure(fig, path)


@torch.no_grad()
def plot_class_samples(model, path, *, n_per_class: int = 10, class_names=None, seed: int = 0) -> Path:
    """One row per class of a label-conditioned model: ``n_per_class`` draws E[x|z, y], z ~ p(z|y)."""
    config = model.config
    if config.condition != "label" or config.image_shape is None:
        raise ElbolabError("class samples: expected a label-conditioned model of images")
    torch.manual_seed(seed)
    like = next(model.parameters())
    k = config.n_classes
    batch = Batch(like.new_zeros(k, config.input_dim), torch.arange(k, device=like.device))
    images = model.sample(n_per_class, batch).transpose(0, 1)  # [K, n, D]
    rows = [as_images(images[c], config.image_shape, "samples") for c in range(k)]
    names = list(class_names) if class_names is not None and len(class_names) == k else [str(c) for c in range(k)]
    return _labelled_mosaic(rows, [f"class {name}" for name in names],
                            "Conditional samples: one row per class, E[x|z,y] with z ~ p(z|y)", path)


@torch.no_grad()
def inpainting_images(model, batch: Batch, n_completions: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(given [B, D] with missing pixels grey, truth [B, D], completions [S, B, D] with the given pixels pasted)."""
    observed = model.observed(batch)  # [B, D]
    given = torch.where(observed, batch.x, torch.full_like(batch.x, MISSING_GREY))
    means = model.sample(n_completions, batch)  # [S, B, D]
    return given, batch.x, torch.where(observed, batch.x, means)


def plot_inpainting(model, batch: Batch, path, *, n_completions: int = 6, seed: int = 0) -> Path:
    """Columns: the images of ``batch``; rows: given quadrants, truth, ``n_completions`` completions."""
    config = model.config
    if config.condition != "quadrants":
        raise ElbolabError("inpainting: expected a model with condition=quadrants")
    torch.manual_seed(seed)
    given, truth, completions = inpainting_images(model, batch, n_completions)
    shape = config.image_shape
    rows = [as_images(given, shape, "given"), as_images(truth, shape, "truth")]
    rows += [as_images(c, shape, "completion") for c in completions]
    labels = ["given", "truth", *[f"sample {i + 1}" for i in range(n_completions)]]
    quadrants = f"{config.given_quadrants} quadrant{'s' if config.given_quadrants > 1 else ''}"
    return _labelled_mosaic(rows, labels, f"Inpainting from {quadrants} (grey: missing); completions E[x|z,c], "
                                          "z ~ p(z|c)", path)


@torch.no_grad()
def conditional_figures(model, run_dir, splits, *, seed: int = 0, n_images: int = 10) -> list[Path]:
    """The figures of a CVAE run into run_dir/figures: class samples or inpainting, reconstructions, curves and
    the latent scatter."""
    run_dir = Path(run_dir)
    fig_dir = run_dir / runs.FIGURES
    model.eval()
    like = next(model.parameters())
    test = splits.test
    batch = test.batch(torch.arange(min(len(test), 2000)), torch.Generator().manual_seed(seed)).to(like)
    paths = []
    shape = model.config.image_shape
    if shape is not None:
        if model.config.condition == "label":
            paths.append(plot_class_samples(model, fig_dir / "class_samples.png", seed=seed,
                                            class_names=test.meta.get("class_names")))
        else:
            paths.append(plot_inpainting(model, batch[:n_images], fig_dir / "inpainting.png", seed=seed))
        paths.append(plots.plot_reconstructions(batch.x[:10], model.reconstruct(batch[:10]), shape,
                                                fig_dir / "reconstructions.png"))
    metrics_path = run_dir / runs.METRICS
    if metrics_path.exists():
        records, _ = runs.read_metrics(metrics_path)
        paths.append(plots.plot_training_curves(records, fig_dir / "curves.png"))
    paths.append(plots.plot_latent_scatter(model.latent_means(batch)["z"], batch.y, fig_dir / "latent_scatter.png",
                                           label_name=test.meta.get("label_name"),
                                           class_names=test.meta.get("class_names")))
    return paths
