"""Plots, HTML report and run manifest: files are valid, layouts and numbers match independent references."""

from __future__ import annotations

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


# ------------------------------------------------------------------------------------------- image grids
def test_image_grid_png_and_layout_follow_ncols(tmp_path):
    images = torch.rand(10, D)
    wide = read_png(plots.plot_image_grid(images, SHAPE, tmp_path / "a" / "wide.png", ncols=5))
    tall = read_png(plots.plot_image_grid(images.numpy(), SHAPE, tmp_path / "tall.png", ncols=2))
    # 2 rows x 5 columns of 6x5 images is wider than tall, 5 rows x 2 columns the reverse.
    assert wide.shape[1] > 1.5 * wide.shape[0]
    assert tall.shape[0] > 1.5 * tall.shape[1]


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


def test_kl_per_dim_bar_chart(tmp_path):
    read_png(plots.plot_kl_per_dim(np.array([3.0, 0.01, 2.0, 0.0]), tmp_path / "kl.png"))


# ------------------------------------------------------------------------------------------------ report
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
    # Config values, escaped user text, eval numbers (mean ± stderr), manifest seed and versions.
    assert "0.00123" in page and "data.name" in page and "mnist" in page
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "-95.4321 ± 0.2468" in page and "-97.2500 ± 0.7500" in page and ">7<" in page
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
