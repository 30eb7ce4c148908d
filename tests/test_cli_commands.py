"""The analysis commands on trained runs (traverse, holes, topics, neighbours, eval --disentanglement), data paths
routed to their loaders, and model options that reach a model only when given."""

import json

import numpy as np
import pytest
import torch

from elbolab.cli import main
from elbolab.data.bow import save_bow_npz
from elbolab.data.mmap import write_mmap

QUICK = ["--epochs", "2", "--batch-size", "32", "--no-progress", "--no-tensorboard"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("commands") / "vae"
    assert main(["train", "vae", "--data", "digits", "--out", str(out), "--latent-dim", "3", "--hidden", "32",
                 *QUICK]) == 0
    return out


def test_traverse_writes_the_grid_and_the_gif(vae_run, capsys, tmp_path):
    code, out, err = run(capsys, "traverse", vae_run, "--dims", "0,2", "--steps", "5", "--out", tmp_path / "t")
    assert code == 0, err
    paths = out.split()
    assert [p.rsplit(".", 1)[-1] for p in paths] == ["png", "gif"]
    from PIL import Image

    with Image.open(paths[1]) as gif:
        assert gif.n_frames == 2 * 5 - 2  # the sweep's 5 steps forwards, then back without repeating the ends
        assert gif.size[0] == 2 * (8 * 12 + 4) + 4  # two swept dimensions side by side, 8 x 8 digits at x12
    code, _, err = run(capsys, "traverse", vae_run, "--dims", "0,x")
    assert code == 2 and "expected --dims" in err
    code, _, err = run(capsys, "traverse", vae_run, "--dims", "7")
    assert code == 2 and "7" in err


def test_holes_prints_the_mass_and_draws_the_figure(vae_run, capsys):
    code, out, err = run(capsys, "holes", vae_run, "--n-points", "200", "--n-samples", "5000")
    assert code == 0, err
    lines = out.strip().splitlines()  # progress lines first when the machine is slow (a line every 10 s)
    first = next(i for i, line in enumerate(lines) if line.startswith("prior mass in holes"))
    mass = float(lines[first].split(": ")[1].split(" +- ")[0])
    assert 0.0 <= mass <= 1.0
    assert lines[first + 1:] and lines[first + 1].endswith("prior_holes.png")


def test_eval_disentanglement_needs_factor_data(vae_run, capsys):
    code, _, err = run(capsys, "eval", vae_run, "--iw-samples", "2", "--limit", "5", "--disentanglement")
    assert code == 2 and "known generative factors" in err
    assert not (vae_run / "evaluations").exists()  # refused before anything was evaluated or written


def test_eval_disentanglement_on_sprites(tmp_path, capsys, monkeypatch):
    import functools

    import elbolab.disentanglement as metrics

    out = tmp_path / "sprites"
    code, _, err = run(capsys, "train", "beta-vae", "--data", "sprites", "--train-size", "64", "--val-size", "32",
                       "--out", out, "--latent-dim", "4", "--hidden", "32", *QUICK)
    assert code == 0, err
    small = functools.partial(metrics.disentanglement_scores, batch_size=8, num_train=60, num_eval=30,
                              num_points=300, bins=5)
    monkeypatch.setattr(metrics, "disentanglement_scores", small)  # the metrics' own tests use full sizes
    code, out_text, err = run(capsys, "eval", out, "--iw-samples", "2", "--limit", "8", "--disentanglement",
                              "--no-progress")
    assert code == 0, err
    assert "beta-VAE metric" in out_text and "MIG" in out_text
    record = json.loads((out / "eval.json").read_text())["disentanglement"]
    assert all(0.0 <= record[name]["eval_accuracy"] <= 1.0 for name in ("beta_vae", "factor_vae"))
    assert record["mig"]["mig"] >= -1e-9
    html = (out / "index.html").read_text()
    assert "<h3>Disentanglement</h3>" in html and "MIG of factor shape" in html


def test_topics_and_neighbours_of_an_nvdm_trained_on_a_sparse_npz(tmp_path, capsys):
    import scipy.sparse

    rng = np.random.default_rng(0)
    words = [f"w{j}" for j in range(10)]
    first_half = np.r_[np.ones(5), np.zeros(5)]  # two planted topics: words 0-4 and words 5-9
    counts = rng.poisson(1.5, size=(80, 10)) * np.where(np.arange(80)[:, None] < 40, first_half, 1 - first_half)
    counts[:, 0] += 1  # no empty document
    path = save_bow_npz(tmp_path / "docs.npz", scipy.sparse.csr_matrix(counts), vocabulary=words)
    out = tmp_path / "nvdm"
    code, _, err = run(capsys, "train", "nvdm", "--data", path, "--out", out, "--latent-dim", "3", *QUICK)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())["model_config"]
    assert config["hidden"] == [500] and config["activation"] == "tanh"  # nvdm's own defaults, not the CLI's
    code, text, err = run(capsys, "topics", out, "--top", "4")
    assert code == 0, err
    lines = text.strip().splitlines()
    assert len(lines) == 3 and all(len(line.split(":")[1].split()) == 4 for line in lines)
    code, text, err = run(capsys, "neighbours", out, "w1", "w7", "-n", "3")
    assert code == 0, err
    rows = text.strip().splitlines()
    assert [r.split(":")[0] for r in rows] == ["w1", "w7"] and all(r.count("(") == 3 for r in rows)
    assert "w1 (" not in rows[0].split(":", 1)[1]  # a word is not its own neighbour
    code, _, err = run(capsys, "neighbours", out, "nosuchword")
    assert code == 2 and "nosuchword" in err
    code, text, err = run(capsys, "eval", out, "--iw-samples", "3", "--no-progress")
    assert code == 0, err
    line = next(x for x in text.splitlines() if x.startswith("nvdm: "))  # the model's own numbers, by name
    perplexity = float(line.split("perplexity elbo ")[1].split(",")[0])
    recorded = json.loads((out / "eval.json").read_text())["model_metrics"]["perplexity_elbo"]
    assert perplexity == pytest.approx(recorded, rel=1e-3) and perplexity > 1.0


def test_a_memory_mapped_folder_trains_through_data_path(tmp_path, capsys):
    images = (torch.rand(90, 8, 8) < 0.3)
    folder = write_mmap(tmp_path / "bits.mmap", images)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "vae", "--data", folder, "--out", out, "--latent-dim", "2", "--hidden", "16",
                       *QUICK)
    assert code == 0, err
    data = json.loads((out / "config.json").read_text())
    assert data["model_config"]["image_shape"] == [1, 8, 8] and data["model_config"]["latent_dim"] == 2


def test_model_defaults_hold_when_a_flag_is_not_given(tmp_path, capsys):
    out = tmp_path / "hvae"
    code, _, err = run(capsys, "train", "hvae", "--data", "digits", "--out", out, "--set", "latent_dims=4,2",
                       *QUICK)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())["model_config"]
    assert config["latent_dim"] == 6 and config["activation"] == "tanh" and config["hidden"] == [200, 100]


def test_eval_compile_says_whether_the_compiled_code_ran(vae_run, capsys, compile_fails):
    with pytest.warns(UserWarning, match="torch.compile failed"):
        code, out, err = run(capsys, "eval", vae_run, "--iw-samples", "4", "--limit", "10", "--compile",
                             "--no-progress")
    assert code == 0, err
    assert f"compiled: no, torch.compile failed (RuntimeError: {compile_fails}); evaluated eagerly" in out
    saved = json.loads((vae_run / "eval.json").read_text())
    assert saved["compiled"] is False and compile_fails in saved["compile_fallback"]


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv"])
def test_encode_writes_the_latent_means_and_labels_and_never_touches_the_run(vae_run, capsys, tmp_path, suffix):
    from elbolab import loading

    before = sorted(p.name for p in vae_run.rglob("*"))
    target = tmp_path / f"codes{suffix}"
    code, out, err = run(capsys, "encode", vae_run, "--out", target)
    assert code == 0 and "codes of 3 dimensions" in out, err
    model, config = loading.load_run(vae_run)
    test = loading.load_run_data(config["data"]).test
    batch = test.batch(torch.arange(len(test)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.latent_means(batch)["z"].numpy()
    if suffix == ".npy":
        z, y = np.load(target), None
    elif suffix == ".npz":
        z, y = np.load(target)["z"], np.load(target)["y"]
    else:
        table = np.loadtxt(target, delimiter=",", skiprows=1)
        z, y = table[:, :3], table[:, 3]
        assert target.read_text().splitlines()[0] == "z1,z2,z3,y"
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
    if y is not None:
        np.testing.assert_array_equal(y, batch.y.numpy())
    assert sorted(p.name for p in vae_run.rglob("*")) == before
    code, _, err = run(capsys, "encode", vae_run, "--out", target)  # never replaced without --overwrite
    assert code == 2 and "already exists" in err


def test_traverse_and_holes_into_the_run_folder_refresh_its_report(vae_run, capsys):
    (vae_run / "index.html").unlink()
    code, out, err = run(capsys, "traverse", vae_run, "--dims", "0", "--steps", "3")
    assert code == 0 and "report refreshed" in out and (vae_run / "index.html").is_file(), err
    assert "traversals" in (vae_run / "index.html").read_text().lower()


def test_sample_writes_the_array_with_a_npy_name_and_the_grid_with_a_png(vae_run, capsys, tmp_path):
    import numpy as np
    import torch

    from elbolab.loading import load_run

    code, out, err = run(capsys, "sample", vae_run, "-n", "5", "--out", tmp_path / "s.npy", "--seed", "3")
    assert code == 0, err
    array = np.load(tmp_path / "s.npy")
    model, _ = load_run(vae_run)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model.sample(5).numpy()  # the same draws: the file holds the decoder means themselves
    assert array.shape == (5, 64) and array.dtype == np.float32 and np.allclose(array, expected)
    assert run(capsys, "sample", vae_run, "-n", "5", "--out", tmp_path / "s.txt")[0] == 2  # neither png nor npy


def test_compare_names_which_run_minus_which_and_both_values(vae_run, capsys, tmp_path):
    other = tmp_path / "other"
    assert main(["train", "vae", "--data", "digits", "--out", str(other), "--latent-dim", "2", "--hidden", "16",
                 *QUICK]) == 0
    code, out, err = run(capsys, "eval", vae_run, "--iw-samples", "4", "--limit", "30", "--compare", other)
    assert code == 0, err
    record = json.loads((vae_run / "eval.json").read_text())
    c = record["compare"]
    line = next(line for line in out.splitlines() if line.startswith("paired difference"))
    assert f"this run ({record['log_px']['mean']:.2f}) minus {other} ({c['other_mean']:.2f})" in line
    assert f"{c['mean_difference']:+.3f}" in line
