"""Latent traversals of any model: one latent dimension swept at a time, the others held at a seed image's mean.

For a seed image x, mu = E_q[z|x] (``model.latent_means``: group "z", else the first group). Row j of the figure
decodes z = mu with z_j replaced by each of ``steps`` values evenly spaced over [-span, span] (the prior's +-3
standard deviations by default), through ``model.decode_mean`` (E[x|z]). A disentangled model changes one factor
per row (Higgins et al. 2017, fig. 1 and 7; Kim & Mnih 2018, fig. 8). Rows are labelled with the dimension and, when
the model defines ``kl_terms``, its KL(q(z_j|x) || p(z_j)) averaged over the batch given: dimensions with KL near 0
are unused and decode to the same image all along their row. With ``dims=None`` every dimension is drawn, most
informative (largest KL) first.

Outputs: ``traversals.png`` (rows = dimensions, columns = values) and ``traversals.gif`` (one frame per value, all
dimensions side by side, played forwards and back).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from elbolab.data.core import as_batch
from elbolab.errors import ElbolabError
from elbolab.plots import as_images, mosaic_figure, save_figure, tile

GIF_CELL = 96  # each image is enlarged (by a whole factor) to at least this many pixels high in the GIF
GIF_MS = 120  # milliseconds per frame


def _latent_code(means: dict[str, torch.Tensor], terms: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(code [B, d], KL per dimension [B, d] or None): group "z", else the only group, else every group joined in
    order, as a hierarchical model's decoder takes z = cat(z1..zL) (in a top-down hierarchy p(x|z1) reads z1 only,
    so rows of higher layers stay constant: their effect goes through the prior of z1, not the decoder mean)."""
    names = ["z"] if "z" in means else list(means)
    code = torch.cat([means[n] for n in names], -1)
    kl = None
    if terms is not None and all(n in terms and terms[n].shape == means[n].shape for n in names):
        kl = torch.cat([terms[n] for n in names], -1)
    return code, kl


@torch.no_grad()
def traversal_images(model, batch_or_image, dims: Sequence[int] | None = None, steps: int = 9,
                     span: float = 3.0) -> tuple[torch.Tensor, list[int], np.ndarray, np.ndarray | None]:
    """(images [len(dims), steps, D], dims, values [steps], KL per dimension [d] or None).

    ``batch_or_image``: a Batch, a tensor [B, D] or one image [D]; the first row is the seed, the whole batch
    averages the KL labels."""
    if isinstance(batch_or_image, torch.Tensor) and batch_or_image.dim() == 1:
        batch_or_image = batch_or_image[None]  # [1, D]
    batch = as_batch(batch_or_image)
    if len(batch) == 0:
        raise ElbolabError("traverse: expected at least one image, got an empty batch")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ElbolabError(f"traverse: expected steps >= 2, got {steps!r}")
    if not span > 0:
        raise ElbolabError(f"traverse: expected span > 0, got {span!r}")
    model.eval()
    like = next(model.parameters())
    batch = batch.to(like)
    try:
        terms = model.kl_terms(batch)
    except (ElbolabError, NotImplementedError):
        terms = None
    means, kl_terms = _latent_code(model.latent_means(batch), terms)  # [B, d], [B, d] or None
    latent_dim = means.shape[-1]
    kl = None if kl_terms is None else kl_terms.mean(0).cpu().numpy()  # [d]
    if dims is None:
        dims = list(np.argsort(-kl, kind="stable")) if kl is not None else list(range(latent_dim))
    dims = [int(j) for j in dims]
    if not dims or any(not 0 <= j < latent_dim for j in dims):
        raise ElbolabError(f"traverse: expected dimensions in 0..{latent_dim - 1}, got {dims}; try --dims 0,1,2")
    values = torch.linspace(-span, span, steps, dtype=means.dtype, device=means.device)  # [S]
    z = means[0].repeat(len(dims), steps, 1)  # [R, S, d]
    for row, j in enumerate(dims):
        z[row, :, j] = values
    images = model.decode_mean(z)  # [R, S, D]
    return images.cpu(), dims, values.cpu().numpy(), kl


def _row_label(j: int, kl: np.ndarray | None) -> str:
    return f"z{j}" if kl is None else f"z{j}\nKL {kl[j]:.2f}"


def save_grid(images: torch.Tensor, dims, values, kl, image_shape, path, *, title: str | None = None) -> Path:
    """The traversal as a PNG grid: one row per dimension (labelled), one column per value."""
    rows, steps = images.shape[:2]
    cells = as_images(images.reshape(rows * steps, -1), image_shape, "traversal")
    mosaic = tile([cells[r * steps:(r + 1) * steps] for r in range(rows)], steps)
    fig, ax = mosaic_figure(mosaic, title or "latent traversals (other dimensions at the seed's mean)",
                             0.75, steps, rows)
    h, w = cells.shape[1:3]
    ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(rows)])
    ax.set_yticklabels([_row_label(j, kl) for j in dims], fontsize=9)
    ax.set_xticks([1 + c * (w + 1) + w / 2 for c in range(steps)])
    ax.set_xticklabels([f"{v:+.1f}" for v in values], fontsize=9)
    ax.set_xlabel("value of the swept dimension z_j")
    ax.set_ylabel("dimension (KL in nats)" if kl is not None else "dimension")
    return save_figure(fig, path)


def save_gif(images: torch.Tensor, dims, values, image_shape, path) -> Path:
    """An animated GIF: frame t shows every swept dimension at value t, labelled; forwards then back."""
    from PIL import Image, ImageDraw, ImageFont

    rows, steps = images.shape[:2]
    cells = as_images(images.reshape(rows * steps, -1), image_shape, "traversal")  # [R*S, H, W(, 3)]
    cells = (np.clip(cells, 0, 1) * 255).astype(np.uint8).reshape(rows, steps, *cells.shape[1:])
    scale = max(1, -(-GIF_CELL // cells.shape[2]))  # 8 x 8 digits x12, 64 x 64 sprites x2
    h, w = cells.shape[2] * scale, cells.shape[3] * scale
    header, gutter = 34, 4
    font = ImageFont.load_default(size=12)
    frames = []
    for t in [*range(steps), *range(steps - 2, 0, -1)]:
        frame = Image.new("RGB", (rows * (w + gutter) + gutter, h + header + gutter), (128, 128, 128))
        draw = ImageDraw.Draw(frame)
        draw.text((gutter, 2), f"z_j = {values[t]:+.2f}", fill=(255, 255, 255), font=font)
        for r, j in enumerate(dims):
            cell = Image.fromarray(cells[r, t]).resize((w, h), Image.NEAREST).convert("RGB")
            left = gutter + r * (w + gutter)
            frame.paste(cell, (left, header))
            draw.text((left, 18), f"z{j}", fill=(255, 255, 255), font=font)
        frames.append(frame)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_MS, loop=0)
    return path


def traverse(model, batch_or_image, out_dir, dims: Sequence[int] | None = None, steps: int = 9,
             span: float = 3.0, *, name: str = "traversals") -> list[Path]:
    """Draw the traversals of ``model`` around the first image of ``batch_or_image`` into ``out_dir``:
    [out_dir/NAME.png, out_dir/NAME.gif]."""
    shape = getattr(model.config, "image_shape", None)
    if shape is None:
        raise ElbolabError("traverse: this model's data are not images (no image_shape); there is nothing to draw")
    images, dims, values, kl = traversal_images(model, batch_or_image, dims, steps, span)
    out_dir = Path(out_dir)
    return [save_grid(images, dims, values, kl, shape, out_dir / f"{name}.png"),
            save_gif(images, dims, values, shape, out_dir / f"{name}.gif")]
