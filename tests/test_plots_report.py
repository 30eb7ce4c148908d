"""Plots, HTML report and run manifest: files are valid, layouts and numbers match independent references."""

from __future__ import annotations

import contextlib
import html
import json
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.decomposition import PCA

from elbolab import manifest as manifest_mod
from elbolab import plots
from elbolab.errors import CheckpointError, ElbolabError
from elbolab.manifest import collect_manifest
from elbolab.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHAPE = (6, 5)  # small non-square images catch height/width mix-ups
D = SHAPE[0] * SHAPE[1]


def read_png(path) -> np.ndarray:
    """Check the file is a PNG that is not one flat colour; return its pixels [H, W, C] in [0, 1]."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 20 and pixels.shape[1] > 20
    assert pixels[..., :3].std() > 0.05, "image is (almost) a single colour"
    return pixels


def grey(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., :3].mean(axis=-1)  # [H, W]


def has_colour(pixels: np.ndarray, rgb, tol: float = 0.06) -> bool:
    """Whether at least a few pixels have this colour (each channel within ``tol``)."""
    return int((np.abs(pixels[..., :3] - np.asarray(rgb)).max(axis=-1) < tol).sum()) >= 4


# ------------------------------------------------------------------------------------------- image grids
def test_image_grid_png_and_layout_follow_ncols(tmp_path):
    images = torch.rand(10, D)
    wide = read_png(plots.plot_image_grid(images, SHAPE, tmp_path / "a" / "wide.png", ncols=5))
    tall = read_png(plots.plot_image_grid(images.numpy(), SHAPE, tmp_path / "tall.png", ncols=2))
    # 2 rows x 5 columns of 6x5 images is wider than tall, 5 rows x 2 columns the reverse.
    assert wide.shape[1] > 1.5 * wide.shape[0]
    assert tall.shape[0] > 1.5 * tall.shape[1]


def test_grid_shape_is_the_most_square_layout_that_divides_n():
    assert plots.grid_shape(16) == (4, 4)
    assert [plots.grid_shape(n) for n in (1, 3, 4, 6, 10, 12, 36, 64, 100)] == [
        (1, 1), (1, 3), (2, 2), (2, 3), (2, 5), (3, 4), (6, 6), (8, 8), (10, 10)]
    # no full layout within 2.5:1 (7, 13, 14 = 2 x 7): the fewest empty cells of a near-square one, in the last row
    assert [plots.grid_shape(n) for n in (7, 13, 14)] == [(2, 4), (3, 5), (3, 5)]
    for n in range(1, 200):
        rows, cols = plots.grid_shape(n)
        assert rows * cols >= n > (rows - 1) * cols and rows <= cols  # no empty row, never taller than wide
        if any(n % r == 0 and r <= n // r <= 2.5 * r for r in range(1, n + 1)):
            assert rows * cols == n, n  # a full grid whenever there is one
    with pytest.raises(ElbolabError, match="at least one image"):
        plots.grid_shape(0)


def test_sixteen_samples_make_a_four_by_four_grid(tmp_path):
    """``elbolab sample RUN -n 16`` (plot_image_grid without ncols): 4 x 4 images, not 10 + 6 with grey fillers."""
    images = torch.ones(16, 64)  # white 8 x 8 images: the mid-grey gutters between them are the only grey lines
    pixels = grey(mpimg.imread(plots.plot_image_grid(images, (8, 8), tmp_path / "s16.png")))
    gutter = np.abs(pixels - 0.5) < 0.1
    top, bottom = np.flatnonzero(gutter.any(axis=1))[[0, -1]]
    left, right = np.flatnonzero(gutter.any(axis=0))[[0, -1]]
    white = pixels[top:bottom + 1, left:right + 1] > 0.95  # the mosaic, without the white page around it
    cols = white.any(axis=0)  # columns crossing an image
    rows = white.any(axis=1)

    def runs_of(mask):
        return int((np.diff(mask.astype(int)) == 1).sum() + mask[0])

    assert runs_of(cols) == 4 and runs_of(rows) == 4
    assert 0.8 < pixels.shape[1] / pixels.shape[0] < 1.25  # about square


def test_image_grid_accepts_title_and_rejects_bad_shapes(tmp_path):
    read_png(plots.plot_image_grid(torch.rand(3, D), SHAPE, tmp_path / "t.png", title="Samples"))
    with pytest.raises(ElbolabError, match=r"\[N, 30\]"):
        plots.plot_image_grid(torch.rand(3, D + 1), SHAPE, tmp_path / "bad.png")
    with pytest.raises(ElbolabError, match="finite"):
        plots.plot_image_grid(torch.full((3, D), float("nan")), SHAPE, tmp_path / "nan.png")
    with pytest.raises(ElbolabError, match="image_shape"):
        plots.plot_image_grid(torch.rand(3, D), (D,), tmp_path / "shape.png")


def test_reconstructions_put_inputs_above_reconstructions(tmp_path):
    # Two greys distinct from the white page, the black frame and text, and the 0.5 gutters.
    inputs, recons = torch.full((4, D), 0.25), torch.full((4, D), 0.75)
    g = grey(read_png(plots.plot_reconstructions(inputs, recons, SHAPE, tmp_path / "r.png", n=4)))
    input_rows = np.flatnonzero((np.abs(g - 0.25) < 0.03).mean(axis=1) > 0.3)
    recon_rows = np.flatnonzero((np.abs(g - 0.75) < 0.03).mean(axis=1) > 0.3)
    assert input_rows.size and recon_rows.size
    assert input_rows.max() < recon_rows.min()


def test_reconstructions_need_one_per_input(tmp_path):
    with pytest.raises(ElbolabError, match="one per input"):
        plots.plot_reconstructions(torch.rand(4, D), torch.rand(3, D), SHAPE, tmp_path / "r.png")


# --------------------------------------------------------------------------------------- training curves
def vae_records(rng, epochs=3, steps=4):
    """Several train records per epoch (per step) and one val record per epoch, as a trainer logs."""
    records = []
    for epoch in range(1, epochs + 1):
        for step in range(steps):
            kl, recon = rng.uniform(1, 10), rng.uniform(-200, -90)
            records.append({"epoch": epoch, "step": epoch * steps + step, "split": "train",
                            "loss": kl - recon, "elbo": recon - kl, "kl": kl, "recon": recon})
        kl, recon = rng.uniform(1, 10), rng.uniform(-200, -90)
        records.append({"epoch": epoch, "step": epoch * steps, "split": "val",
                        "loss": kl - recon, "elbo": recon - kl, "kl": kl, "recon": recon})
    return records


def test_epoch_means_match_numpy_per_split_and_epoch():
    records = vae_records(np.random.default_rng(0))
    table = plots.epoch_means(records)
    for split in ("train", "val"):
        for epoch in (1, 2, 3):
            chosen = [r for r in records if r["split"] == split and r["epoch"] == epoch]
            for key in ("elbo", "kl", "recon", "loss"):
                assert table[split][epoch][key] == pytest.approx(np.mean([r[key] for r in chosen]))


def test_training_curves_plot_what_exists(tmp_path):
    records = vae_records(np.random.default_rng(1))
    full = read_png(plots.plot_training_curves(records, tmp_path / "curves.png"))
    autoencoder = [{k: r[k] for k in ("epoch", "step", "split", "loss")} for r in records]
    loss_only = read_png(plots.plot_training_curves(autoencoder, tmp_path / "ae.png"))
    # Three panels (ELBO, KL, recon) against the single loss panel of the autoencoder.
    assert full.shape[1] > 2 * loss_only.shape[1]
    with pytest.raises(ElbolabError, match="metrics"):
        plots.plot_training_curves([{"epoch": 1, "split": "train"}], tmp_path / "none.png")


# ------------------------------------------------------------------------------------------ latent space
class RecordingDecoder:
    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, z):
        self.calls.append(z.clone())
        brightness = torch.special.ndtr(z.sum(dim=1, keepdim=True))  # [M, 1] in (0, 1)
        return brightness.expand(-1, D) * torch.linspace(0.2, 1.0, D)  # [M, D]


@pytest.mark.parametrize(("n", "latent_dim", "dims"), [(5, 2, (0, 1)), (4, 4, (3, 1))])
def test_manifold_decodes_the_normal_quantile_grid(tmp_path, n, latent_dim, dims):
    decoder = RecordingDecoder()
    read_png(plots.plot_latent_manifold(decoder, SHAPE, tmp_path / "m.png", n=n, latent_dim=latent_dim,
                                        dims=dims))
    assert len(decoder.calls) == 1
    z = decoder.calls[0].numpy()
    assert z.shape == (n * n, latent_dim)
    quantiles = norm.ppf(np.linspace(0.05, 0.95, n))  # scipy: independent of torch's icdf
    for d in dims:
        values, counts = np.unique(z[:, d], return_counts=True)
        np.testing.assert_allclose(values, quantiles, atol=1e-5)
        assert np.all(counts == n)
    pairs = {(round(float(a), 5), round(float(b), 5)) for a, b in z[:, list(dims)]}
    assert len(pairs) == n * n  # every combination once: a full grid
    held = [d for d in range(latent_dim) if d not in dims]
    assert np.all(z[:, held] == 0.0)


def test_latent_grid_row_major_with_largest_second_coordinate_on_top():
    n = 3
    z = plots.latent_grid(n).numpy()
    q = norm.ppf(np.linspace(0.05, 0.95, n))
    for r in range(n):
        for c in range(n):
            np.testing.assert_allclose(z[r * n + c], [q[c], q[n - 1 - r]], atol=1e-5)


def test_manifold_rejects_bad_requests(tmp_path):
    with pytest.raises(ElbolabError, match="dims"):
        plots.plot_latent_manifold(RecordingDecoder(), SHAPE, tmp_path / "m.png", n=3, dims=(0, 0))
    with pytest.raises(ElbolabError, match="latent_dim"):
        plots.plot_latent_manifold(RecordingDecoder(), SHAPE, tmp_path / "m.png", n=3, latent_dim=1)
    with pytest.raises(ElbolabError, match="decode_mean"):
        plots.plot_latent_manifold(lambda z: torch.rand(len(z), D - 1), SHAPE, tmp_path / "m.png", n=3)


def test_project_2d_pca_matches_svd_and_sklearn():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(200, 5)) * np.array([4.0, 2.0, 1.0, 0.5, 0.1]) @ rng.normal(size=(5, 5))
    coords, description = plots.project_2d(torch.tensor(z), "auto")
    assert coords.shape == (200, 2) and "PCA" in description
    centred = z - z.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:2].T
    for j in range(2):  # principal axes are defined up to sign
        sign = np.sign(coords[:, j] @ reference[:, j])
        np.testing.assert_allclose(coords[:, j], sign * reference[:, j], atol=1e-8)
    np.testing.assert_allclose(coords, PCA(n_components=2).fit_transform(z), atol=1e-8)


def test_project_2d_other_methods_and_errors():
    z = np.random.default_rng(3).normal(size=(30, 4))
    np.testing.assert_array_equal(plots.project_2d(z, "first2")[0], z[:, :2])
    np.testing.assert_array_equal(plots.project_2d(z[:, :2], "auto")[0], z[:, :2])
    with pytest.raises(ElbolabError, match="at least 2 latent"):
        plots.project_2d(z[:, :1])
    with pytest.raises(ElbolabError, match="method"):
        plots.project_2d(z, "tsne")


def test_latent_scatter_variants(tmp_path):
    rng = np.random.default_rng(4)
    z = torch.tensor(rng.normal(size=(300, 6)))
    read_png(plots.plot_latent_scatter(z, torch.tensor(rng.integers(0, 10, 300)), tmp_path / "s1.png"))
    read_png(plots.plot_latent_scatter(z[:, :2], None, tmp_path / "s2.png"))
    read_png(plots.plot_latent_scatter(z, rng.integers(0, 50, 300), tmp_path / "s3.png", method="first2"))
    with pytest.raises(ElbolabError, match="one label per"):
        plots.plot_latent_scatter(z, np.zeros(299), tmp_path / "s4.png")


def test_latent_scatter_names_its_classes_one_colour_each():
    """20 classes with names (the 20 newsgroups): one colour per class present, the legend by name; a class's colour
    is fixed by its id, so it does not change when another class is absent."""
    rng = np.random.default_rng(9)
    names = [f"group.{c}" for c in range(20)]
    labels = rng.integers(0, 20, 600)
    labels[labels == 5] = 6  # class 5 absent
    fig = plots.latent_scatter_figure(rng.normal(size=(600, 4)), labels, label_name="newsgroup", class_names=names)
    ax = fig.axes[0]
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    present = sorted(set(labels.tolist()))
    assert entries == [f"{names[c]} ({int((labels == c).sum())})" for c in present]
    colours = [tuple(c.get_facecolor()[0]) for c in ax.collections]
    assert len(colours) == 19 and len(set(colours)) == 19
    palette = plots.class_colours(20)
    assert all(colour[:3] == pytest.approx(palette[c][:3]) for colour, c in zip(colours, present))
    # neighbouring classes (comp.graphics, comp.os...) get different hues, not two shades of one
    assert palette[1] != palette[0] and palette[0] == matplotlib.colormaps["tab20"](0)
    assert palette[1] == matplotlib.colormaps["tab20"](2) and palette[10] == matplotlib.colormaps["tab20"](1)
    assert fig.get_size_inches()[0] >= 1.8 * fig.get_size_inches()[1]  # a wide figure: the report shows it full width
    matplotlib.pyplot.close(fig)
    one = plots.latent_scatter_figure(rng.normal(size=(50, 2)), np.ones(50), label_name="newsgroup",
                                      class_names=["a", "b"], note="why not coloured")
    assert one.axes[0].get_legend() is None and "every code has newsgroup b" in one.axes[0].get_title()
    assert "why not coloured" in one.axes[0].get_title()
    matplotlib.pyplot.close(one)


def test_report_topics_table_from_topics_json(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    topics = [{"dim": 2, "words": ["god", "jesus", "church"], "spread": 0.5},
              {"dim": 0, "words": ["game", "team", "<hockey>"], "spread": 0.25}]
    (run / "topics.json").write_text(json.dumps({"top": 3, "topics": topics}))
    (run / "eval.json").write_text(json.dumps({"split": "test", "kl_per_dim": [1.5, 0.0, 3.25]}))
    page = write_report(run).read_text(encoding="utf-8")
    section = page[page.index('<section id="topics">'):]
    section = section[:section.index("</section>")]
    assert "<td>h2</td><td>god jesus church</td>" in section
    assert "<td>h0</td><td>game team &lt;hockey&gt;</td>" in section
    assert section.index("h2") < section.index("h0")  # in the file's order (largest spread first)
    assert '<td class="num">3.25</td>' in section and "KL (nats)" in section  # each dimension's KL from eval
    assert "<img" not in section  # text, not a picture of text
    (run / "topics.json").write_text("[1, 2]")
    assert "holds no list of topics" in write_report(run).read_text(encoding="utf-8")
    (run / "topics.json").unlink()
    assert '<section id="topics">' not in write_report(run).read_text(encoding="utf-8")


def test_kl_per_dim_bar_chart(tmp_path):
    read_png(plots.plot_kl_per_dim(np.array([3.0, 0.01, 2.0, 0.0]), tmp_path / "kl.png"))


def test_latent_scatter_of_a_1d_latent_is_a_histogram_per_label(tmp_path):
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 400)
    z = torch.tensor(rng.normal(size=(400, 1)) + labels[:, None])  # [N, 1]: a model trained with --latent-dim 1
    pixels = read_png(plots.plot_latent_scatter(z, torch.tensor(labels), tmp_path / "h.png"))
    # Stacked bars in the first three tab10 colours (alpha 0.85 over white), one per label.
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):
        rgb = 0.85 * np.array(matplotlib.colors.to_rgb(colour)) + 0.15
        assert has_colour(pixels, rgb), colour
    read_png(plots.plot_latent_scatter(z[:, 0], None, tmp_path / "flat.png"))  # [N] and no labels
    read_png(plots.plot_latent_scatter(z, rng.normal(size=400), tmp_path / "many.png"))  # continuous labels
    read_png(plots.plot_latent_scatter(z, rng.integers(0, 4, (400, 2)), tmp_path / "factors.png"))
    with pytest.raises(ElbolabError, match="one label per"):
        plots.plot_latent_scatter(z, labels[:-1], tmp_path / "bad.png")
    with pytest.raises(ElbolabError, match="finite"):
        plots.plot_latent_scatter(torch.full((5, 1), float("nan")), None, tmp_path / "nan.png")


def test_latent_scatter_colours_by_the_first_factor(tmp_path):
    rng = np.random.default_rng(7)
    z = rng.normal(size=(300, 4))
    factors = np.stack([rng.integers(0, 3, 300), rng.integers(0, 40, 300), rng.uniform(size=300)], axis=1)
    pixels = read_png(plots.plot_latent_scatter(torch.tensor(z), torch.tensor(factors), tmp_path / "f.png"))
    # Factor 0 has 3 values: the first three tab10 colours (alpha 0.7 over white), not a fourth, no colour bar.
    tab10 = [0.7 * np.array(matplotlib.colors.to_rgb(c)) + 0.3 for c in ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")]
    assert all(has_colour(pixels, rgb) for rgb in tab10[:3]) and not has_colour(pixels, tab10[3])
    read_png(plots.plot_latent_scatter(z, factors[:, 1:], tmp_path / "f2.png", label_name="position"))
    read_png(plots.plot_latent_scatter(z, factors[:, :1], tmp_path / "f3.png"))  # [N, 1]
    with pytest.raises(ElbolabError, match=r"\[N, F\]"):
        plots.plot_latent_scatter(z, np.zeros((300, 2, 2)), tmp_path / "bad.png")
    with pytest.raises(ElbolabError, match="one label per"):
        plots.plot_latent_scatter(z, factors[:-1], tmp_path / "bad.png")


def test_one_channel_shape_draws_exactly_like_height_width(tmp_path):
    images = torch.rand(6, 64, generator=torch.Generator().manual_seed(8))
    grid_hw = mpimg.imread(plots.plot_image_grid(images, (8, 8), tmp_path / "hw.png", ncols=3))
    grid_chw = mpimg.imread(plots.plot_image_grid(images.reshape(6, 1, 8, 8), (1, 8, 8), tmp_path / "chw.png",
                                                  ncols=3))
    np.testing.assert_array_equal(grid_hw, grid_chw)
    recon_hw = mpimg.imread(plots.plot_reconstructions(images, 1 - images, (8, 8), tmp_path / "rhw.png"))
    recon_chw = mpimg.imread(plots.plot_reconstructions(images, 1 - images, (1, 8, 8), tmp_path / "rchw.png"))
    np.testing.assert_array_equal(recon_hw, recon_chw)
    decoder = lambda z: torch.special.ndtr(z.sum(1, keepdim=True)) * torch.linspace(0.2, 1.0, 64)  # noqa: E731
    manifold_hw = mpimg.imread(plots.plot_latent_manifold(decoder, (8, 8), tmp_path / "mhw.png", n=4))
    manifold_chw = mpimg.imread(plots.plot_latent_manifold(decoder, (1, 8, 8), tmp_path / "mchw.png", n=4))
    np.testing.assert_array_equal(manifold_hw, manifold_chw)


def rgb_rows(n: int, colour) -> torch.Tensor:
    """n flat channel-first RGB 8x8 images of one colour, [n, 3*8*8]."""
    return torch.tensor(colour, dtype=torch.float32)[None, :, None, None].expand(n, 3, 8, 8).reshape(n, -1)


def test_rgb_images_are_drawn_in_colour_channel_first(tmp_path):
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    images = torch.cat([rgb_rows(2, red), rgb_rows(2, blue)])  # [4, 192]
    grid = read_png(plots.plot_image_grid(images, (3, 8, 8), tmp_path / "rgb.png", ncols=2))
    # Channel-first rows: whole images of red and of blue (a channel-last reading would give white and black).
    assert has_colour(grid, red) and has_colour(grid, blue)
    assert not has_colour(grid, (0.0, 1.0, 0.0))
    read_png(plots.plot_image_grid(images.reshape(4, 3, 8, 8), (3, 8, 8), tmp_path / "rgb4d.png"))
    recon = read_png(plots.plot_reconstructions(rgb_rows(3, red), rgb_rows(3, blue), (3, 8, 8),
                                                tmp_path / "recon.png"))
    red_rows = np.flatnonzero(np.abs(recon[..., :3] - red).max(axis=-1).__lt__(0.06).any(axis=1))
    blue_rows = np.flatnonzero(np.abs(recon[..., :3] - blue).max(axis=-1).__lt__(0.06).any(axis=1))
    assert red_rows.size and blue_rows.size and red_rows.max() < blue_rows.min()  # inputs above
    decoder = lambda z: torch.special.ndtr(z[:, :1, None]).expand(-1, 3, 64).clone().mul_(  # noqa: E731
        torch.tensor([1.0, 0.0, 0.0])[:, None]).reshape(len(z), -1)  # red of varying brightness
    manifold = read_png(plots.plot_latent_manifold(decoder, (3, 8, 8), tmp_path / "m.png", n=4))
    assert (manifold[..., 0] - manifold[..., 1] > 0.5).sum() > 50  # red tiles
    with pytest.raises(ElbolabError, match=r"\[N, 192\]"):
        plots.plot_image_grid(torch.rand(2, 64), (3, 8, 8), tmp_path / "bad.png")
    with pytest.raises(ElbolabError, match="channels"):
        plots.plot_image_grid(torch.rand(2, 128), (2, 8, 8), tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------------ report
def row_value(page: str, quantity: str) -> str | None:
    """The Value cell of the evaluation row named ``quantity`` (HTML-escaped text), or None."""
    match = re.search(r"<tr><td>" + re.escape(html.escape(quantity, quote=True)) + r'</td><td class="num">(.*?)</td>',
                      page)
    return None if match is None else html.unescape(match.group(1))


def summary_cards(page: str) -> dict[str, str]:
    """{label: value} of the summary cards (unescaped)."""
    found = re.findall(r'<div class="label">(.*?)</div><div class="value">(.*?)</div>', page)
    return {html.unescape(label): html.unescape(value) for label, value in found}


def make_png(path, seed):
    images = torch.rand(4, D, generator=torch.Generator().manual_seed(seed))
    return plots.plot_image_grid(images, SHAPE, path, ncols=2)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    config = {"model": "vae", "latent_dim": 2, "lr": 0.00123, "note": "<script>alert('x')</script>",
              "data": {"name": "mnist", "binarize": True}}
    (run / "config.json").write_text(json.dumps(config))
    evaluation = {"log_px": {"mean": -95.4321, "stderr": 0.2468}, "ess_mean": 812.5,
                  "naive_log_px_mean": -97.25, "naive_log_px_stderr": 0.75, "active_units": 7,
                  "kl_per_dim": [3.2, 0.01, 2.9]}
    (run / "eval.json").write_text(json.dumps(evaluation))
    records = vae_records(np.random.default_rng(5))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "manifest.json").write_text(json.dumps(collect_manifest(seed=123)))
    # File names sort alphabetically in the opposite of the page order (samples first).
    make_png(run / "figures" / "reconstructions.png", 0)
    make_png(run / "figures" / "samples.png", 1)
    return run, records


def test_report_is_self_contained_and_complete(run_dir):
    run, records = run_dir
    page_path = write_report(run)
    assert page_path == run / "index.html"
    assert not (run / "index.html.tmp").exists()
    page = page_path.read_text(encoding="utf-8")
    for heading in ("Summary", "Evaluation", "Training", "Figures", "Configuration", "Manifest"):
        assert f">{heading}</h2>" in page
    # Config values, escaped user text, eval numbers, manifest seed and versions. This older eval.json has no
    # Monte-Carlo s.e.: its "stderr" is over examples, so it gets its own row and no "±".
    assert "0.00123" in page and "data.name" in page and "mnist" in page
    # the one script is the report's own figure zoom; the user's text is escaped, never run
    assert page.count("<script") == 1 and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "-95.43" in page and "-97.25" in page and ">7<" in page and "±" not in page
    assert row_value(page, "s.e. over examples (sampling of the test set)") == "0.2468"
    assert re.search(r"s\.e\. over examples[^<]*</td><td class=\"num\">0\.7500<", page)  # the naive estimator
    assert ">123<" in page and torch.__version__ in page
    # Last-epoch table: means over the epoch's records, computed here independently.
    last_train = [r["kl"] for r in records if r["split"] == "train" and r["epoch"] == 3]
    last_val = [r["recon"] for r in records if r["split"] == "val" and r["epoch"] == 3]
    assert f"{np.mean(last_train):.4f}" in page and f"{np.mean(last_val):.4f}" in page
    # Two figures plus the KL-per-dimension bar chart, all embedded; nothing external.
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page
    assert re.findall(r'src="(?!data:image/png;base64,)', page) == []
    assert page.index("Samples from the model") < page.index("Inputs (top) and their reconstructions")


def test_report_figure_count_without_kl_and_with_a_broken_png(run_dir):
    run, _ = run_dir
    evaluation = json.loads((run / "eval.json").read_text())
    del evaluation["kl_per_dim"]
    (run / "eval.json").write_text(json.dumps(evaluation))
    (run / "figures" / "broken.png").write_bytes(b"not a png")
    page = write_report(run).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "broken.png is not a valid PNG" in page


def test_report_partial_run_dir_builds_with_notes(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "autoencoder", "epochs": 5}))
    page = write_report(run).read_text(encoding="utf-8")
    assert "autoencoder" in page
    for missing in ("eval.json", "metrics.jsonl", "manifest.json"):
        assert f"{missing} not found" in page
    assert page.count("data:image/png;base64,") == 0


def test_report_survives_corrupt_files(tmp_path):
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "eval.json").write_text("{not json")
    good = {"epoch": 1, "step": 10, "split": "train", "loss": 1.5}
    (run / "metrics.jsonl").write_text(json.dumps(good) + "\n" + '{"epoch": 2, "spl')
    page = write_report(run).read_text(encoding="utf-8")
    assert "eval.json could not be read" in page
    assert "1 unreadable line(s) in metrics.jsonl" in page and "1.5000" in page


NEW_EVAL = {
    "log_px": {"mean": -93.7, "mc_stderr": 0.01, "bias_estimate": -0.002, "sd_over_examples": 26.0,
               "stderr_over_examples": 0.26, "ess_mean": 450.4, "ess_min": 3.1, "k": 5000, "n_examples": 10000,
               "is_density": True},
    "elbo": -95.1, "active_units": 12, "latent_dim": 20, "kl_per_dim": [0.5] * 12 + [0.001] * 8, "split": "test",
    "dataset": "digits/test", "model": "vae", "seed": 0, "n_examples": 10000,
}


def report_page(tmp_path, evaluation, config=None, name="run") -> str:
    run = tmp_path / name
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(evaluation))
    if config is not None:
        (run / "config.json").write_text(json.dumps(config))
    return write_report(run).read_text(encoding="utf-8")


def section(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return page[start : page.index("</section>", start)]


def test_report_data_card_from_the_data_dict_of_config_json(tmp_path):
    data = {"source": "digits", "binarize": "dynamic", "seed": 0, "val_size": None, "data_dir": None}
    cards = summary_cards(report_page(tmp_path, NEW_EVAL, {"model": "vae", "data": data}))
    assert cards["Data"] == "digits (binarize dynamic)" and cards["Model"] == "vae"
    # A file source shows its file name (the full path as the card's tooltip); binarize "none" is left out.
    data = {**data, "source": "/data/sets/faces.npz", "binarize": "none"}
    page = report_page(tmp_path, NEW_EVAL, {"model": "vae", "data": data}, name="file")
    assert summary_cards(page)["Data"] == "faces.npz" and 'title="/data/sets/faces.npz"' in page
    assert summary_cards(report_page(tmp_path, {}, {"data": "mnist"}, name="old"))["Data"] == "mnist"


def test_report_pairs_log_px_only_with_its_monte_carlo_stderr(tmp_path):
    page = report_page(tmp_path, NEW_EVAL)
    evaluation = section(page, "evaluation")
    assert row_value(evaluation, "log p(x)") == "-93.700 ± 0.010 (MC s.e.)"
    # Every "a ± b" on the page (summary card included) has the Monte-Carlo s.e. as b, never a spread over examples.
    pairs = re.findall(r"(-?\d+\.\d+) ± (\d+\.\d+)", page)
    assert pairs and all(b == "0.010" for _, b in pairs)
    assert row_value(evaluation, "s.d. over examples") == "26.00"
    assert row_value(evaluation, "s.e. over examples (sampling of the test set)") == "0.2600"
    assert row_value(evaluation, "Estimated bias of the mean") == "-0.0020"
    assert row_value(evaluation, "Effective sample size, mean over examples") == "450.4 of K = 5,000"
    assert row_value(evaluation, "ELBO") == "-95.10"
    # Grouped under human names, not a dump of dotted keys.
    assert evaluation.index("<h3>log p(x) estimate</h3>") < evaluation.index("<h3>Latent diagnostics</h3>")
    assert row_value(evaluation, "Active units") == "12 of 20"
    assert "log_px.mean" not in page and "mc_stderr" not in page and "Other values" not in page
    assert evaluation.count("data:image/png;base64,") == 1  # the KL-per-dimension chart


def test_report_headline_card_is_log_px_not_ess(tmp_path):
    cards = summary_cards(report_page(tmp_path, NEW_EVAL))
    assert cards["test log p(x)"] == "-93.700 ± 0.010"
    assert not any("ess" in label.lower() or "450" in value for label, value in cards.items())
    # Keys ordered so that a search for "log_px" meets the ESS first, as in older reports.
    reordered = {"log_px": {k: NEW_EVAL["log_px"][k] for k in ("ess_mean", "ess_min", "k", "mean", "mc_stderr")}}
    assert summary_cards(report_page(tmp_path, reordered, name="b"))["test log p(x)"] == "-93.700 ± 0.010"
    assert summary_cards(report_page(tmp_path, {"elbo": -95.1, "ess_mean": 3.0}, name="c"))["test ELBO"] == "-95.10"


def test_report_reads_the_older_stderr_as_spread_over_examples(tmp_path):
    page = report_page(tmp_path, {"log_px": {"mean": -95.4321, "stderr": 0.2468, "k": 100, "n_examples": 50}})
    assert "±" not in page
    assert row_value(page, "log p(x)") == "-95.43"
    assert row_value(page, "s.e. over examples (sampling of the test set)") == "0.2468"
    assert summary_cards(page)["test log p(x)"] == "-95.43"


def test_report_flags_a_score_that_is_not_a_log_density(tmp_path):
    note = "Bernoulli likelihood on grey-level data: a negative cross-entropy, not a log-density"
    score = {**NEW_EVAL, "log_px": {**NEW_EVAL["log_px"], "is_density": False}, "log_px_note": note}
    page = report_page(tmp_path, score, {"model": "vae", "model_config": {"likelihood": "bernoulli"}})
    cards = summary_cards(page)
    assert "test log p(x)" not in cards
    assert cards["test Bernoulli score (not a log-density)"] == "-93.700 ± 0.010"
    assert 'class="card warn"' in page
    # The note sits next to the number: in the summary right after the cards, and above the evaluation table.
    summary, evaluation = section(page, "summary"), section(page, "evaluation")
    assert 'class="callout"' in summary and html.escape(note, quote=True) in summary
    assert evaluation.index(html.escape(note, quote=True)) < evaluation.index("<table")
    assert row_value(evaluation, "Bernoulli score (not a log-density)") == "-93.700 ± 0.010 (MC s.e.)"
    # Without the likelihood in config.json, the note names it; a note alone also keeps "log p(x)" from standing bare.
    assert "test Bernoulli score (not a log-density)" in summary_cards(report_page(tmp_path, score, name="b"))
    only_note = {**NEW_EVAL, "log_px_note": "an approximation"}
    page = report_page(tmp_path, only_note, name="c")
    assert "test log p(x) (see note)" in summary_cards(page) and "an approximation" in section(page, "summary")
    is_false = {**NEW_EVAL, "log_px": {**NEW_EVAL["log_px"], "is_density": False}}
    page = report_page(tmp_path, is_false, name="d")
    assert "test Score (not a log-density)" in summary_cards(page) and 'class="callout"' in page


def test_report_shows_a_paired_comparison(tmp_path):
    evaluation = {**NEW_EVAL, "compare": {"other_run": "runs/b", "mean_difference": 1.23, "stderr": 0.05,
                                          "n_examples": 10000, "other_mean": -94.9}}
    page = report_page(tmp_path, evaluation)
    assert row_value(page, "Paired difference vs runs/b") == "+1.230 ± 0.050 (s.e. over 10,000 examples)"
    assert row_value(page, "log p(x) of runs/b") == "-94.90"


def test_report_groups_naive_estimate_model_metrics_and_unknown_keys(tmp_path):
    evaluation = {**NEW_EVAL, "log_px_naive": {"mean": -99.5, "mc_stderr": None, "sd_over_examples": 30.0,
                                               "stderr_over_examples": 0.3, "ess_mean": None, "k": 100},
                  "active_units_per_group": {"z1": 5, "z2": 7}, "kl_per_group": {"z1": 3.0, "z2": 4.5},
                  "model_metrics": {"cluster_accuracy": 0.91}, "kl_per_dim": None, "something_new": 4}
    page = report_page(tmp_path, evaluation)
    assert "<h3>Naive estimator (samples from the prior), for comparison</h3>" in page
    assert row_value(page, "log p(x), naive estimate") == "-99.50"
    assert row_value(page, "Active units, group z2") == "7" and row_value(page, "KL, group z1") == "3.0000"
    assert "cluster accuracy" in page and "0.9100" in page
    assert "<h3>Other values</h3>" in page and "something_new" in page
    assert page.count("data:image/png;base64,") == 0  # no KL per dimension: no chart


def test_report_missing_run_dir_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="expected a run folder"):
        write_report(tmp_path / "does-not-exist")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="run folder"):
        write_report(tmp_path / "file")


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_keys_versions_and_json(monkeypatch):
    manifest = collect_manifest(seed=7, extra={"command": "train", "path": manifest_mod.Path("/x")})
    for key in ("seed", "timestamp_utc", "python", "platform", "cpu_model", "logical_cores",
                "torch_threads", "versions", "git_commit", "git_dirty"):
        assert key in manifest
    assert manifest["seed"] == 7 and manifest["torch_threads"] == torch.get_num_threads()
    assert manifest["versions"]["torch"] == torch.__version__
    assert re.match(r"^\d+\.\d+", manifest["versions"]["torch"])
    assert set(manifest["versions"]) == set(manifest_mod.TRACKED_PACKAGES)
    assert manifest["extra"] == {"command": "train", "path": "/x"}
    json.dumps(manifest)  # always saveable
    monkeypatch.setenv("PATH", "")  # no git on PATH: still a manifest, without a commit
    assert collect_manifest()["git_commit"] is None


def test_manifest_git_state_of_a_checkout(tmp_path):
    if shutil.which("git") is None:
        assert manifest_mod._git_state(tmp_path) == (None, None)
        return
    assert manifest_mod._git_state(tmp_path) == (None, None)  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    commit, dirty = manifest_mod._git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and dirty is False
    (tmp_path / "f.txt").write_text("b")
    assert manifest_mod._git_state(tmp_path) == (commit, True)


# ------------------------------------------------------------------------- reports of the classical commands
def test_command_report_escapes_text_and_keeps_anchors_unique(tmp_path):
    from elbolab.report import note_html, table_html, write_command_report

    page = write_command_report(tmp_path, "t <b>", cards=[("a<b", "1", "s&t"), ("c", "2")],
                                sections=[("Figures", note_html("<script>x</script>")), ("Figures", table_html(
                                    [("k", "v")]))]).read_text(encoding="utf-8")
    assert "t &lt;b&gt;" in page and "a&lt;b" in page and "s&amp;t" in page and "&lt;script&gt;x" in page
    assert page.count('<section id="figures">') == 1 and '<section id="figures-2">' in page
    assert page.count("<script") == 1  # the figure zoom only


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_gmm_full_covariances_give_the_fitted_density(cov_type):
    """The [K, D, D] matrices the report draws, put into a mixture density by scipy, equal score_samples."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    from elbolab.classical import GaussianMixture
    from elbolab.classical.gmm_cli import full_covariances

    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal([0, 0, 0], 1.0, (80, 3)), rng.normal([4, 1, -2], [0.5, 1.5, 1.0], (80, 3))])
    model = GaussianMixture(n_components=2, covariance_type=cov_type, random_state=0).fit(X)
    covs = full_covariances(model.covariances_, cov_type, 2, 3)
    assert covs.shape == (2, 3, 3)
    log_density = logsumexp([np.log(w) + multivariate_normal(m, c).logpdf(X)
                             for w, m, c in zip(model.weights_, model.means_, covs)], axis=0)
    np.testing.assert_allclose(log_density, model.score_samples(X), rtol=1e-8, atol=1e-8)


def test_gmm_fit_report_shows_pruned_components(tmp_path):
    from typer.testing import CliRunner

    from elbolab.classical.gmm_cli import PRUNED_WEIGHT, app

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal([0, 0], 0.5, (120, 2)), rng.normal([6, 3], 0.5, (120, 2))])
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "x.npy"), "-k", "5", "--method", "vb", "--out", str(out)])
    assert result.exit_code == 0, result.output
    params = json.loads((out / "params.json").read_text())
    n_pruned = sum(w < PRUNED_WEIGHT for w in params["weights"])
    assert n_pruned >= 2  # two clusters, five components: VB empties some
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count("<td>pruned</td>") == n_pruned and f"{5 - n_pruned} of 5 used" in page
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    assert (out / "components.png").stat().st_size > 1000
    again = CliRunner().invoke(app, ["fit", str(tmp_path / "x.npy"), "-k", "5", "--out", str(out)])
    assert again.exit_code != 0 and "index.html" in str(again.exception)  # an earlier report is not overwritten


def test_denoise_report_compares_the_three_methods(tmp_path):
    import typer
    from typer.testing import CliRunner

    from elbolab.classical.images import builtin_image, error_rate, flip_pixels
    from elbolab.classical.ising import IsingDenoiser
    from elbolab.classical.ising_cli import denoise_command

    app = typer.Typer()
    app.command("denoise")(denoise_command)
    app.command("unused")(lambda: None)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["denoise", "--noise", "flip", "--p", "0.15", "--size", "32", "--sweeps", "60",
                                      "--method", "icm", "--seed", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text(encoding="utf-8")
    clean = builtin_image(32)
    noisy = flip_pixels(clean, 0.15, 4)
    for method, name in (("meanfield", "mean-field"), ("icm", "ICM (this run)"), ("gibbs", "Gibbs")):
        with pytest.warns() if method == "meanfield" else contextlib.nullcontext():  # 60 sweeps: not converged
            fitted = IsingDenoiser(noise="flip", flip_prob=0.15, method=method, max_sweeps=60,
                                   random_state=4).fit(noisy)
        assert row_value(page, name) == f"{error_rate(fitted.predict(), clean):.4f}", method
    assert page.count("data:image/png;base64,") == 2
    alone = CliRunner().invoke(app, ["denoise", "--size", "16", "--sweeps", "10", "--no-compare",
                                     "--out", str(tmp_path / "alone")])
    assert alone.exit_code == 0, alone.output
    alone_page = (tmp_path / "alone" / "index.html").read_text(encoding="utf-8")
    assert row_value(alone_page, "mean-field (this run)") is not None and row_value(alone_page, "ICM") is None


def test_shortest_curve_report(tmp_path):
    import typer
    from typer.testing import CliRunner

    from elbolab.classical.ising_cli import functional_app

    app = typer.Typer()
    app.add_typer(functional_app, name="functional")
    app.command("unused")(lambda: None)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["functional", "shortest-curve", "--points", "9", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"{summary['euler_lagrange_residual']:.2e}" in page and page.count("data:image/png;base64,") == 2


def test_the_summary_shows_the_models_own_headline_numbers():
    from elbolab.records import Evaluation
    from elbolab.report import _model_metric_cards

    cards = "".join(_model_metric_cards(Evaluation.from_dict(
        {"model_metrics": {"accuracy": 0.9628, "nmi": 0.909, "ari": 0.919, "perplexity_is": 798.2,
                           "perplexity_elbo": 840.0}})))
    assert "96.3%" in cards and "NMI 0.909" in cards and "798" in cards and "from the ELBO 840" in cards
    assert _model_metric_cards(Evaluation.from_dict({"model_metrics": {}})) == []


def test_the_manifold_of_a_many_dimensional_latent_sweeps_its_two_most_informative_dimensions():
    import torch

    from elbolab.figures.standard import most_informative_pair
    from elbolab.models import ModelConfig, build_model

    model = build_model("vae", ModelConfig(input_dim=6, latent_dim=5, hidden=(8,)))
    kl = torch.tensor([0.1, 3.0, 0.0, 0.2, 2.0])
    model.kl_terms = lambda batch: {"z": kl.expand(4, 5)}
    assert most_informative_pair(model, torch.rand(4, 6)) == (1, 4)


def test_a_first_epoch_far_off_the_rest_does_not_flatten_the_curve():
    from elbolab.plots import _clip_first_epoch_outlier, plt

    fig, ax = plt.subplots()
    values = [-158826.0] + [-120.0 + i for i in range(9)]
    ax.plot(range(10), values)
    _clip_first_epoch_outlier(ax, values)
    low, high = ax.get_ylim()
    assert -140 < low < -120 and -110 < high < -90  # the other epochs fill the axis
    fig2, ax2 = plt.subplots()
    smooth = [-200.0 + 10 * i for i in range(10)]  # an ordinary curve: left alone
    ax2.plot(range(10), smooth)
    before = ax2.get_ylim()
    _clip_first_epoch_outlier(ax2, smooth)
    assert ax2.get_ylim() == before
    plt.close(fig)
    plt.close(fig2)


def test_the_latent_scatter_is_coloured_by_a_factor_that_varies():
    import numpy as np

    from elbolab.plots import label_vector

    factors = np.stack([np.zeros(6), np.array([0, 1, 2, 0, 1, 2]), np.arange(6)], 1)  # a constant first factor
    values, title = label_vector(factors, 6, None)
    assert list(values) == [0, 1, 2, 0, 1, 2] and title == "factor 1 (of 3)"
