"""The figures every image model draws by default (a model's ``figures`` hook calls ``standard_figures``)."""

from __future__ import annotations

from pathlib import Path

import torch

from elbolab import plots, runs
from elbolab.data.xor import xor_points
from elbolab.figures.toy import plot_toy_regions


@torch.no_grad()
def standard_figures(model, run_dir, splits, *, n_samples: int = 100, seed: int = 0,
                     scatter: bool = True) -> list[Path]:
    """The default figures of a model: samples, reconstructions, training curves, 2-D manifold (latent_dim == 2)
    and the latent scatter (a histogram for one latent dimension)."""

    run_dir = Path(run_dir)
    fig_dir = run_dir / runs.FIGURES
    shape = model.config.image_shape
    torch.manual_seed(seed)
    paths = []
    test = splits.test
    batch = test.batch(torch.arange(min(len(test), 2000)), torch.Generator().manual_seed(seed))
    if shape is not None:
        paths.append(plots.plot_image_grid(model.sample(n_samples), shape, fig_dir / "samples.png",
                                           title="samples: E[x|z], z ~ p(z)"))
        paths.append(plots.plot_reconstructions(batch.x[:10], model.reconstruct(batch[:10]), shape,
                                                fig_dir / "reconstructions.png"))
        if model.config.latent_dim >= 2:
            paths.append(plots.plot_latent_manifold(model.decode_mean, shape, fig_dir / "manifold.png",
                                                    latent_dim=model.config.latent_dim,
                                                    dims=most_informative_pair(model, batch),
                                                    note="the two dimensions of highest KL; the others at 0"
                                                    if model.config.latent_dim > 2 else None))
    metrics_path = run_dir / runs.METRICS
    if metrics_path.exists():
        records, _ = runs.read_metrics(metrics_path)
        paths.append(plots.plot_training_curves(records, fig_dir / "curves.png"))
    if test.meta.get("toy") == "xor" and model.config.latent_dim == 2:  # notes 002 s4.10: each point's region
        paths.append(plot_toy_regions(model, xor_points(), fig_dir / "toy_regions.png"))
    means = next(iter(model.latent_means(batch).values()))
    if scatter:  # a model with its own picture of the codes (VaDE's clusters) leaves this one out
        meta = test.meta or {}
        paths.append(plots.plot_latent_scatter(means, batch.y, fig_dir / "latent_scatter.png",
                                               label_name=meta.get("label_name"),
                                               class_names=meta.get("class_names"),
                                               note=_no_labels_note(meta) if batch.y is None else None))
    return paths


def most_informative_pair(model, batch) -> tuple[int, int]:
    """The two latent dimensions with the largest mean KL(q(z_j|x) || p(z_j)) on ``batch``, lowest index first (the
    others are held at 0 in the manifold, so sweeping two inactive ones would draw one image many times); (0, 1)
    when the model has no per-dimension KL."""
    terms = model.kl_terms(batch[:500]) if model.config.latent_dim > 2 else None
    if not terms:
        return (0, 1)
    kl = next(iter(terms.values())).mean(0)  # [d] of the first latent group
    top = sorted(int(j) for j in kl.argsort(descending=True)[:2])
    return (top[0], top[1])



def _no_labels_note(meta: dict) -> str | None:
    """Why the scatter is not coloured, when the data say (20news: the NVDM files carry no newsgroup)."""
    return f"not coloured by label: {meta['labels_note']}" if meta.get("labels_note") else None
