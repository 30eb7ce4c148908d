"""The command line on the embedded digits data: every command, and bad input giving one clear line and exit 2."""

import json
import subprocess
import sys

import pytest

from elbolab.cli import main

TRAIN = ["--epochs", "2", "--latent-dim", "2", "--hidden", "32", "--batch-size", "64", "--no-progress",
         "--no-tensorboard"]


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "vae", "--data", "digits", "--out", str(out), *TRAIN]) == 0
    return out


def test_models_lists_the_registry(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "vae" in out and "autoencoder" in out and "iwae" in out
    code, out, _ = run(capsys, "models", "iwae")
    assert code == 0 and "k " in out and "gradient" in out and "dreg" in out and "input_dim" not in out


def test_set_and_schedule_reach_the_model_and_the_metrics(tmp_path, capsys):
    out = tmp_path / "iwae"
    code, _, err = run(capsys, "train", "iwae", "--out", str(out), *TRAIN, "--set", "k=3", "--set",
                       "gradient=dreg", "--binarize", "dynamic")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["k"] == 3 and config["model_config"]["gradient"] == "dreg"
    out = tmp_path / "fb"
    code, _, err = run(capsys, "train", "vae", "--out", str(out), *TRAIN, "--schedule", "free_bits=linear:0:0.5:2")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["free_bits"] for r in records if r["split"] == "train"] == [0.25, 0.5]


def test_train_writes_a_complete_run_folder(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "manifest.json",
            "figures", "index.html"} <= names
    figures = {p.name for p in (trained_run / "figures").iterdir()}
    assert {"samples.png", "reconstructions.png", "curves.png", "manifold.png", "latent_scatter.png"} <= figures
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"] == "vae" and config["model_config"]["latent_dim"] == 2


def test_eval_sample_report(trained_run, capsys, tmp_path):
    code, out, _ = run(capsys, "eval", str(trained_run), "--iw-samples", "50", "--no-progress")
    assert code == 0
    result = json.loads((trained_run / "eval.json").read_text())
    assert result["log_px"]["mean"] >= result["elbo"] - 1.0  # IS estimate sits above the ELBO (up to MC noise)
    # grey-level digits under a Bernoulli likelihood: a score, not a log-density, and said so
    assert result["log_px"]["is_density"] is False and "not a log-density" in result["log_px_note"]
    assert "Bernoulli score (not a log-density)" in out and "Monte-Carlo s.e." in out
    png = tmp_path / "s.png"
    code, out, _ = run(capsys, "sample", str(trained_run), "-n", "16", "--out", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "report", str(trained_run))
    assert code == 0
    html = (trained_run / "index.html").read_text()
    assert "log_px" in html or "log p(x)" in html


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "nosuchmodel", "--out", "{tmp}/a"], "expected a model in"),
        (["train", "vae", "--out", "{tmp}/a", "--hidden", "4x4"], "--hidden: expected positive integers"),
        (["train", "vae", "--out", "{tmp}/a", "--binarize", "sometimes"], "sometimes"),
        (["train", "vae", "--out", "{tmp}/a", "--data", "{tmp}/missing.npy"], "missing.npy"),
        (["train", "vae", "--out", "{tmp}/a", "--likelihood", "poisson"], "likelihood"),
        (["train", "vae", "--out", "{tmp}/a", "--lr", "0"], "learning rate"),
        (["train", "vae", "--out", "{tmp}/a", "--set", "k=3"], "has no such option"),
        (["train", "iwae", "--out", "{tmp}/a", "--set", "k=three"], "expected int"),
        (["train", "vae", "--out", "{tmp}/a", "--set", "k"], "KEY=VALUE"),
        (["train", "vae", "--out", "{tmp}/a", "--schedule", "beta=sometimes"], "schedule beta"),
        (["train", "iwae", "--out", "{tmp}/a", "--beta", "2"], "does not read"),
        (["eval", "{tmp}/no-run"], "run folder"),
        (["sample", "{tmp}/no-run"], "run folder"),
        (["report", "{tmp}/no-run"], "run folder"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, expected, capsys, tmp_path):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "train")
    assert code == 2 and "Missing option '--out'" in err


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    cmd = [sys.executable, "-m", "elbolab", "eval", str(tmp_path / "nothing")]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_demo_runs_offline_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--epochs", "2", "--iw-samples", "20"]
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "log p(x)" in stdout and (out / "index.html").exists()
    # the demo trains on binarised digits, so its log p(x) is a true log-likelihood
    assert "not a log-density" not in stdout
    assert json.loads((out / "eval.json").read_text())["log_px"]["is_density"] is True
    first = (out / "model.safetensors").read_bytes()
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and (tmp_path / "demo-1" / "index.html").exists()
    assert (out / "model.safetensors").read_bytes() == first


@pytest.mark.data
def test_vae_on_real_mnist_end_to_end(tmp_path, capsys):
    import os

    root = os.environ.get("ELBOLAB_DATA")
    if not root or not os.path.isdir(os.path.join(root, "mnist")):
        pytest.skip("needs ELBOLAB_DATA with mnist/")
    out = tmp_path / "mnist"
    code = main(["train", "vae", "--data", "mnist", "--binarize", "dynamic", "--epochs", "1", "--hidden", "128",
                 "--latent-dim", "8", "--batch-size", "256", "--no-progress", "--no-tensorboard", "--out", str(out)])
    assert code == 0
    capsys.readouterr()
    code, stdout, _ = run(capsys, "eval", str(out), "--iw-samples", "10", "--no-progress")
    result = json.loads((out / "eval.json").read_text())
    assert code == 0 and result["n_examples"] == 10000
    # one epoch of a small VAE on binarised MNIST: a real model, far better than chance (784 log 2 = 543 nats)
    assert -200 < result["log_px"]["mean"] < -90
    assert result["log_px"]["mean"] >= result["elbo"] - 0.5


def test_rerunning_a_runs_own_config_reproduces_it(trained_run, tmp_path, capsys):
    again = tmp_path / "again"
    code, _, err = run(capsys, "train", "--config", str(trained_run / "config.json"), "--out", str(again),
                       "--no-progress")
    assert code == 0, err
    from safetensors.torch import load_file

    a, b = load_file(str(trained_run / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    mine, theirs = (json.loads((folder / "config.json").read_text()) for folder in (trained_run, again))
    assert mine["model_config"] == theirs["model_config"] and mine["data"] == theirs["data"]


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'model = "vae"\nepochs = 1\nlatent_dim = 3\nhidden = [16]\n[schedules]\nbeta = "linear:0:1:2"\n'),
    (".json", '{"model": "vae", "epochs": 1, "latent_dim": 3, "hidden": [16], "schedules": {"beta": "linear:0:1:2"}}'),
    (".yaml", "model: vae\nepochs: 1\nlatent_dim: 3\nhidden: [16]\nschedules:\n  beta: linear:0:1:2\n"),
])
def test_a_settings_file_starts_a_run_and_flags_given_win(tmp_path, capsys, suffix, text):
    settings = tmp_path / f"run{suffix}"
    settings.write_text(text)
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "--config", str(settings), "--out", str(out), "--latent-dim", "2",
                       "--no-progress", "--no-tensorboard")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "vae" and config["model_config"]["latent_dim"] == 2  # the flag over the file
    assert config["model_config"]["hidden"] == [16] and config["train_config"]["epochs"] == 1
    assert config["train_config"]["schedules"] == {"beta": "linear:0:1:2"}


@pytest.mark.parametrize("text, expected", [
    ("epochs = [", "not valid TOML"),
    ('model = "vae"\nlatent_dims = 2\n', "unknown option"),
    ('model = "vae"\nepochs = "many"\n', "epochs as int"),
])
def test_a_bad_settings_file_is_one_line(tmp_path, capsys, text, expected):
    settings = tmp_path / "bad.toml"
    settings.write_text(text)
    code, _, err = run(capsys, "train", "--config", str(settings), "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_the_cli_flags_are_fields_of_the_configs():
    import dataclasses

    from elbolab.cli import DATA_FLAGS, MODEL_FLAGS, TRAIN_FLAGS
    from elbolab.config import BETA_SUGAR, TrainConfig
    from elbolab.models import ModelConfig
    from elbolab.pipeline import DATA_OPTIONS

    assert set(MODEL_FLAGS.values()) <= {f.name for f in ModelConfig.option_fields()}
    assert set(TRAIN_FLAGS.values()) <= {f.name for f in dataclasses.fields(TrainConfig)} | set(BETA_SUGAR)
    assert set(DATA_FLAGS.values()) <= set(DATA_OPTIONS)


def test_repeated_set_and_schedule_with_different_values_are_refused(tmp_path, capsys):
    for args in (["--set", "k=2", "--set", "k=3"], ["--schedule", "beta=constant:1", "--schedule", "beta=constant:2"]):
        code, _, err = run(capsys, "train", "iwae", "--out", str(tmp_path / "r"), *args, "--no-progress")
        assert code == 2 and "given twice" in err, err
