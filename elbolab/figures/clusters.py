"""Figures of clustering models (VaDE; Jiang et al. 2017, notes 004): the latent codes coloured by predicted cluster
and by label, samples generated per cluster (one row each), the confusion matrix after Hungarian matching, and
snapshots of the latent codes during training (the clusters forming).

The model supplies ``encoder_means``, ``predict`` and ``sample_per_cluster`` (see elbolab/models/vade.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from elbolab import runs
from elbolab.clustering import cluster_accuracy, match_clusters, matched_confusion
from elbolab.errors import ElbolabError
from elbolab.plots import as_images, label_vector, mosaic_figure, plt, project_2d, save_figure, tile

N_POINTS = 2000  # test examples in the scatter and the confusion matrix figures
SNAPSHOTS = "snapshots"  # run_dir/figures/snapshots/epoch_XXXX.safetensors


def _scatter_panel(ax, coords: np.ndarray, values: np.ndarray, title: str, legend_title: str | None,
                   colours: dict | None = None, names: dict | None = None) -> None:
    """One panel, a colour per value: ``colours`` {value: colour index} (default: in sorted order), ``names``
    {value: legend text}."""
    classes = np.unique(values)
    colours = colours or {int(cls): i for i, cls in enumerate(classes)}
    cmap = plt.get_cmap("tab10" if max(colours.values()) < 10 else "tab20")
    size = 10 if len(coords) <= 2000 else 4
    for cls in classes:
        mask = values == cls
        ax.scatter(coords[mask, 0], coords[mask, 1], s=size, alpha=0.7, linewidths=0,
                   color=cmap(colours[int(cls)] % cmap.N), label=(names or {}).get(int(cls), str(int(cls))))
    if legend_title is not None and len(classes) <= 20:
        ax.legend(title=legend_title, fontsize=8, markerscale=2, loc="best", framealpha=0.8,
                  ncol=1 if len(classes) <= 10 else 2)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)


def plot_cluster_scatter(z, clusters, labels, path, *, title: str | None = None) -> Path:
    """Latent codes [N, d] (PCA to 2-D when d > 2) side by side: coloured by predicted cluster, and by label (the
    second panel only when labels [N] are given). The same projection in both panels; with labels, a cluster takes
    the colour of the class it is matched to (Hungarian matching), so that the panels read side by side."""
    coords, description = project_2d(z)  # [N, 2]
    predicted, _ = label_vector(clusters, len(coords), "cluster")
    panels = [(predicted, "predicted cluster", "cluster", None, None)]
    if labels is not None:
        true = label_vector(labels, len(coords), "label")[0]
        class_colours = {int(c): i for i, c in enumerate(np.unique(true))}
        matched = match_clusters(true, predicted)  # {cluster: class}
        unmatched = [int(c) for c in np.unique(predicted) if int(c) not in matched]
        colours = {clu: class_colours[cls] for clu, cls in matched.items()}
        colours.update({clu: len(class_colours) + i for i, clu in enumerate(unmatched)})
        names = {clu: f"{clu} -> {cls}" for clu, cls in matched.items()}
        panels = [(predicted, "predicted cluster (colour of its matched class)", "cluster -> class", colours, names),
                  (true, "true label", "label", class_colours, None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 5.4), dpi=100, squeeze=False)
    is_pca = description.startswith("PCA")
    for ax, (values, what, legend, colours, names) in zip(axes[0], panels):
        _scatter_panel(ax, coords, values, f"coloured by {what}", legend, colours, names)
        ax.set_xlabel("PC 1" if is_pca else "z0")
        ax.set_ylabel("PC 2" if is_pca else "z1")
    fig.suptitle(title or f"Latent means E_q[z]: {description}", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_cluster_samples(images, image_shape, path, *, title: str = "samples per cluster: E[x|z], z ~ p(z|c)") -> Path:
    """[K, n, D] images in [0, 1] -> a grid with one row per cluster, labelled by cluster id."""
    images = torch.as_tensor(images)
    if images.dim() != 3:
        raise ElbolabError(f"expected images [clusters, samples, pixels], got shape {list(images.shape)}")
    k, n = images.shape[:2]
    flat = as_images(images.reshape(k * n, -1), image_shape, "images")  # [K*n, H, W(, 3)]
    rows = [flat[i * n:(i + 1) * n] for i in range(k)]
    fig, ax = mosaic_figure(tile(rows, n), title, 0.6, n, k)
    h = flat.shape[1]
    ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(k)], [str(r) for r in range(k)])
    ax.set_ylabel("cluster")
    return save_figure(fig, path)


def plot_matched_confusion(y_true, y_pred, path) -> Path:
    """Counts of (class, cluster) after Hungarian matching: the matched cluster of class j in column j."""
    table, classes, clusters = matched_confusion(y_true, y_pred)
    accuracy = cluster_accuracy(y_true, y_pred)
    size = max(4.5, 0.5 * max(table.shape) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    image = ax.imshow(table, cmap="Blues")
    fig.colorbar(image, ax=ax, label="examples")
    threshold = table.max() / 2 if table.size else 0
    for (r, c), count in np.ndenumerate(table):
        ax.text(c, r, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    ax.set_xticks(range(len(clusters)), [str(int(c)) for c in clusters])
    ax.set_yticks(range(len(classes)), [str(int(c)) for c in classes])
    ax.set_xlabel("predicted cluster (columns ordered by the matching)")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion after Hungarian matching: accuracy {accuracy:.1%} (N = {table.sum()})", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def save_latent_snapshot(model, data, run_dir, epoch: int, n: int = 1000) -> Path:
    """Encoder means and predicted clusters of the first ``n`` examples of ``data`` at ``epoch`` (for the proposed
    per-epoch hook), as run_dir/figures/snapshots/epoch_XXXX.safetensors."""
    index = torch.arange(min(n, len(data)))
    batch = data.batch(index, torch.Generator().manual_seed(0))
    tensors = {"z": model.encoder_means(batch), "cluster": model.predict(batch)}
    if batch.y is not None and batch.y.dim() == 1:
        tensors["label"] = batch.y
    path = Path(run_dir) / runs.FIGURES / SNAPSHOTS / f"epoch_{epoch:04d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.save_tensors(path, tensors, {"epoch": epoch})
    return path


def plot_latent_snapshots(run_dir, path, *, max_panels: int = 6) -> Path | None:
    """Up to ``max_panels`` saved snapshots (first, last and evenly spaced between), each projected by its own PCA
    and coloured by predicted cluster; None when there are fewer than two snapshots."""
    files = sorted((Path(run_dir) / runs.FIGURES / SNAPSHOTS).glob("epoch_*.safetensors"))
    if len(files) < 2:
        return None
    picks = sorted({round(i) for i in np.linspace(0, len(files) - 1, min(max_panels, len(files)))})
    fig, axes = plt.subplots(1, len(picks), figsize=(4.0 * len(picks), 4.2), dpi=100, squeeze=False)
    for ax, i in zip(axes[0], picks):
        tensors, meta = runs.load_tensors(files[i])
        coords, _ = project_2d(tensors["z"])
        _scatter_panel(ax, coords, tensors["cluster"].numpy(), f"epoch {meta['epoch']}", None)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle("Latent means during training, coloured by predicted cluster", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def cluster_figures(model, run_dir, splits, *, n_points: int = N_POINTS, per_cluster: int = 10) -> list[Path]:
    """The clustering figures of a run: scatter, samples per cluster, matched confusion, snapshots if saved."""
    fig_dir = Path(run_dir) / runs.FIGURES
    test = splits.test
    batch = test.batch(torch.arange(min(n_points, len(test))), torch.Generator().manual_seed(0))
    clusters = model.predict(batch)
    labels = batch.y if batch.y is not None and batch.y.dim() == 1 else None
    paths = [plot_cluster_scatter(model.encoder_means(batch), clusters, labels, fig_dir / "cluster_scatter.png")]
    if model.config.image_shape is not None:
        paths.append(plot_cluster_samples(model.sample_per_cluster(per_cluster), model.config.image_shape,
                                          fig_dir / "cluster_samples.png"))
    if labels is not None:
        paths.append(plot_matched_confusion(labels, clusters, fig_dir / "cluster_confusion.png"))
    snapshots = plot_latent_snapshots(run_dir, fig_dir / "cluster_snapshots.png")
    return paths + ([snapshots] if snapshots is not None else [])


__all__ = ["cluster_figures", "plot_cluster_samples", "plot_cluster_scatter", "plot_latent_snapshots",
           "plot_matched_confusion", "save_latent_snapshot"]
