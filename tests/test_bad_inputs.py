"""Bad input gives one clear error, never a traceback from deep inside: edited or damaged run folders, NaN weights,
empty IDX files, malformed metrics.jsonl lines, in-memory arrays and mistyped options from Python."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import elbolab
from elbolab import loading, pipeline, runs
from elbolab.cli import main
from elbolab.data import load_arrays, load_data, load_mnist, read_idx
from elbolab.errors import CheckpointError, DataError, ElbolabError
from elbolab.evaluate import evaluate_model

FAST = dict(latent_dim=2, hidden=(8,), batch_size=64, progress=False, tensorboard=False, figures=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run; tests edit copies of it."""
    return pipeline.train("vae", "digits", out=tmp_path_factory.mktemp("bad") / "run", epochs=1, **FAST)


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def edit_config(run, edit):
    config = json.loads((run / runs.CONFIG).read_text())
    edit(config)
    (run / runs.CONFIG).write_text(json.dumps(config))


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- 1. config.json disagreeing with the weights


def test_edited_latent_dim_names_the_tensor_and_shapes(run, capsys):
    edit_config(run, lambda c: c["model_config"].update(latent_dim=5))
    with pytest.raises(CheckpointError) as info:
        loading.load_run(run)
    message = str(info.value)
    assert "encoder.loc.weight" in message and "[2, 8]" in message and "[5, 8]" in message
    assert "latent_dim=5" in message and "restore config.json" in message
    code, _, err = cli(capsys, "eval", str(run), "--iw-samples", "5", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "does not match config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("key", ["model", "model_config"])
def test_missing_key_in_config_is_named(run, key):
    edit_config(run, lambda c: c.pop(key))
    with pytest.raises(CheckpointError, match=f"lacks '{key}'.*train again"):
        loading.load_run(run)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["model_config"].update(latent_dim="two"), r"latent_dim as int, got 'two'"),
    (lambda c: c["model_config"].update(hidden="wide"), r"hidden as tuple"),
    (lambda c: c["model_config"].pop("input_dim"), r"input_dim"),
    (lambda c: c["model_config"].update(latnet_dim=2), r"unknown keys \['latnet_dim'\]"),
    (lambda c: c.update(model="vea"), r"expected a model in .*got 'vea'"),
    (lambda c: c.update(model_config=[2, 8]), r"'model_config' as an object, got .*list"),
    (lambda c: c.update(model=3), r"'model' as a string"),
])
def test_wrong_types_in_config_give_one_checkpoint_error(run, edit, expected):
    edit_config(run, edit)
    with pytest.raises(CheckpointError, match=expected) as info:
        loading.load_run(run)
    assert str(info.value).startswith(str(run / runs.CONFIG))


def test_config_that_is_not_an_object(run):
    (run / runs.CONFIG).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object .* got a JSON list"):
        loading.load_run(run)


def test_weights_missing_a_tensor(run):
    weights = load_file(str(run / runs.WEIGHTS))
    weights.pop("decoder.0.bias")
    save_file(weights, str(run / runs.WEIGHTS))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing, e.g. \['decoder.0.bias'\]"):
        loading.load_run(run)


# ---------------------------------------------------------------- 2. NaN weights


def test_nan_weights_are_named_at_load_and_at_eval(run, capsys):
    weights = load_file(str(run / runs.WEIGHTS))
    weights["decoder.0.weight"][:3, 0] = float("nan")
    weights["decoder.2.bias"][1] = float("inf")
    save_file(weights, str(run / runs.WEIGHTS))
    expected = r"'decoder.0.weight' holds 3 NaN value\(s\) \(and 1 more tensor\(s\)\).*diverged.*damaged"
    with pytest.raises(CheckpointError, match=expected):
        loading.load_run(run)
    with pytest.raises(CheckpointError, match=expected):
        pipeline.evaluate(run, k=5)
    code, _, err = cli(capsys, "eval", str(run), "--iw-samples", "5", "--no-progress")
    assert code == 2 and "decoder.0.weight" in err and "Traceback" not in err


def test_evaluate_model_refuses_a_model_with_nan_parameters(trained):
    model, config = loading.load_run(trained)
    with torch.no_grad():
        model.decoder[0].bias[0] = float("nan")
    test = load_data("digits", seed=config["data"]["seed"]).test
    with pytest.raises(ElbolabError, match=r"'decoder.0.bias' holds 1 NaN value\(s\).*diverged"):
        evaluate_model(model, test, k=5)


# ---------------------------------------------------------------- 3. IDX files declaring 0 images


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_declaring_zero_images(tmp_path, gz):
    data = idx_bytes(np.zeros((0, 28, 28), dtype=np.uint8))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"holds no data: its header declares 0 x 28 x 28 .*0 items.*re-download"):
        read_idx(path, ndim=3)
    path.write_bytes(idx_bytes(np.zeros((5, 0, 28), dtype=np.uint8)))
    with pytest.raises(DataError, match=r"items of 0 x 28 values"):
        read_idx(path, ndim=3)


@pytest.mark.parametrize("empty", ["t10k-images-idx3-ubyte", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_load_mnist_with_an_empty_file(tmp_path, monkeypatch, empty):
    monkeypatch.setenv("ELBOLAB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 4, 4)), "train-labels-idx1-ubyte": rng.integers(0, 10, 20),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (6, 4, 4)), "t10k-labels-idx1-ubyte": rng.integers(0, 10, 6),
    }
    arrays[empty] = arrays[empty][:0]
    for name, array in arrays.items():
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    with pytest.raises(DataError, match=f"{empty}.gz holds no data.*0 items"):
        load_mnist(tmp_path, val_size=5)


# ---------------------------------------------------------------- 4. malformed lines in metrics.jsonl


def test_read_metrics_skips_bad_lines_and_numbers_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 1, "split": "train", "elbo": -5.0}\n{"epoch": 1, "spl\n\n[1, 2]\n'
                     b'{"epoch": 2, "split": "train", "elbo": -4.0}\n{"epoch": 3, "x": "\xff\xfe"}\n')
    records, bad = runs.read_metrics(path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert bad == [2, 4, 6]
    assert runs.read_metrics(tmp_path / "absent.jsonl") == ([], [])


def test_report_notes_the_bad_line_numbers(run):
    from elbolab.report import write_report

    with open(run / runs.METRICS, "a") as f:
        f.write('{"epoch": 2, "spl\n')
    n_lines = len((run / runs.METRICS).read_text().splitlines())
    page = write_report(run).read_text()
    assert f"1 unreadable line(s) in metrics.jsonl were skipped (line {n_lines})" in page


def test_cli_report_survives_a_malformed_metrics_line(run, capsys):
    with open(run / runs.METRICS, "a") as f:
        f.write('{"epoch": 2, "spl\n')
    code, _, err = cli(capsys, "report", str(run))
    assert code == 0, err
    assert "unreadable line(s) in metrics.jsonl" in (run / "index.html").read_text()


def test_resume_survives_a_malformed_metrics_line(run):
    with open(run / runs.METRICS, "a") as f:
        f.write('{"epoch": 2, "spl\n')
    pipeline.train(out=run, resume=True, epochs=2, figures=False)
    records, bad = runs.read_metrics(run / runs.METRICS)
    assert [r["epoch"] for r in records if r["split"] == "train"] == [1, 2]


# ---------------------------------------------------------------- 5. in-memory arrays and mistyped options


def digits_arrays():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32)[:300], bunch.target[:300]


def test_train_on_a_numpy_array(tmp_path):
    x, _ = digits_arrays()
    out = pipeline.train("vae", x, out=tmp_path / "np", epochs=1, **FAST)
    data = json.loads((out / runs.CONFIG).read_text())["data"]
    assert data["source"] == "in-memory" and data["shape"] == [300, 64] and data["labels"] is False
    assert len(data["sha256"]) == 64 and data["seed"] == 0 and data["binarize"] == "none"
    model, _ = elbolab.load_run(out)
    assert model.config.input_dim == 64 and model.config.image_shape is None
    assert not (out / "data.npy").exists() and sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 2e6


def test_train_on_a_tensor_tuple_of_images_with_labels(tmp_path):
    x, y = digits_arrays()
    images = torch.from_numpy(x).reshape(-1, 8, 8).requires_grad_()
    out = pipeline.train("vae", (images, torch.from_numpy(y)), out=tmp_path / "t", epochs=1, seed=3,
                         binarize="dynamic", **FAST)
    config = json.loads((out / runs.CONFIG).read_text())
    assert config["data"]["shape"] == [300, 8, 8] and config["data"]["labels"] is True
    assert config["data"]["seed"] == 3 and config["model_config"]["image_shape"] == [1, 8, 8]
    # the same numbers as a NumPy array give the same digest
    from elbolab.data import load_in_memory

    _, info = load_in_memory((x.reshape(-1, 8, 8), y), seed=3, binarize="dynamic")
    assert info["sha256"] == config["data"]["sha256"]


def test_evaluating_an_in_memory_run_says_how(tmp_path, capsys):
    x, _ = digits_arrays()
    out = pipeline.train("vae", x, out=tmp_path / "m", epochs=1, seed=2, **FAST)
    with pytest.raises(DataError, match=r"in-memory array .*not store.*load_arrays\(x, binarize='none', seed=2\)"):
        pipeline.evaluate(out, k=5)
    code, _, err = cli(capsys, "eval", str(out), "--iw-samples", "5", "--no-progress")
    assert code == 2 and "load_arrays" in err
    # and the recipe in the message works
    model, config = elbolab.load_run(out)
    splits = load_arrays(x, binarize=config["data"]["binarize"], seed=config["data"]["seed"])
    result = evaluate_model(model, splits.test, k=5)
    assert result["log_px"]["n_examples"] == 45


@pytest.mark.parametrize("data, expected", [
    (np.arange(10.0), r"in-memory array: expected features as \[N, D\].*reshape it to \[N, 1\]"),
    (np.array([[0.5, 0.5]] * 9 + [[0.5, np.nan]]),
     r"in-memory array contains 1 NaN value\(s\) \(first in row 9, counting from 0\)"),
    (np.array([["a", "b"]] * 10), r"expected numeric"),
    ((np.ones((10, 2)), np.zeros(9)), r"expected 10 labels"),
    ((np.ones((10, 2)), np.full(10, 0.5)), r"expected integer labels"),
    ((np.ones((10, 2)), np.zeros(10), np.zeros(10)), r"x or a tuple \(x, y\).*tuple of 3 items"),
    ([[0.1, 0.2]] * 10, r"expected data as a NumPy array or a torch tensor, got list"),
    (42, r"got int"),
    ((np.ones((10, 2)), [1] * 10), r"expected the labels y as a NumPy array"),
    (np.ones((2, 2)), r"has 2 row\(s\): expected at least 3"),
])
def test_bad_in_memory_data(tmp_path, data, expected):
    with pytest.raises(DataError, match=expected):
        pipeline.train("vae", data, out=tmp_path / "never", epochs=1, **FAST)
    assert not (tmp_path / "never").exists()


def test_in_memory_binarize_needs_unit_interval(tmp_path):
    with pytest.raises(DataError, match="binarize='static' needs values in \\[0, 1\\]"):
        pipeline.train("vae", torch.full((20, 4), 3.0), out=tmp_path / "never", binarize="static", **FAST)


@pytest.mark.parametrize("option, expected", [
    (dict(hidden=400), r"expected hidden as tuple, got 400 \(int\)"),
    (dict(latent_dim="2"), r"expected latent_dim as int, got '2' \(str\)"),
    (dict(epochs=1.5), r"epochs.*1\.5"),
])
def test_mistyped_options_from_python(tmp_path, option, expected):
    options = {**FAST, "epochs": 1, **option}
    with pytest.raises(ElbolabError, match=expected):
        pipeline.train("vae", "digits", out=tmp_path / "never", **options)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- 6. elbolab.load_run


def test_load_run_from_the_package_root(trained):
    assert elbolab.load_run is loading.load_run and "load_run" in elbolab.__all__
    model, config = elbolab.load_run(trained)
    assert config["model"] == "vae" and not model.training
    z = model.encode(torch.rand(3, 64)).mean
    assert z.shape == (3, 2) and model.decode(z).mean.shape == (3, 64)


def test_import_elbolab_stays_light():
    code = "import sys, elbolab; assert 'torch' not in sys.modules, 'torch imported'; print(elbolab.__all__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "load_run" in done.stdout


# ----------------------------------------------------------------------- options that would be silently ignored
def test_options_that_would_have_no_effect_are_refused(tmp_path, capsys):
    quiet = dict(latent_dim=2, hidden=(8,), epochs=1, progress=False, tensorboard=False, figures=False)
    with pytest.raises(ElbolabError, match="does not use --mc-samples.*--set k"):
        pipeline.train("iwae", "digits", out=tmp_path / "iwae", mc_samples=5, **quiet)
    with pytest.raises(ElbolabError, match="does not use --mc-samples"):
        pipeline.train("autoencoder", "digits", out=tmp_path / "ae", mc_samples=2, **quiet)
    run = pipeline.train("vae", "digits", out=tmp_path / "vae", mc_samples=2, **quiet)  # the VAE reads L
    with pytest.raises(ElbolabError, match="give one"):
        pipeline.train(out=run, resume=True, overwrite=True, epochs=2)
    with pytest.raises(ElbolabError, match="Give one of them"):
        pipeline.train(out=run, resume=True, init_from=run, epochs=2)
    assert runs.read_json(run / runs.CONFIG)["train_config"]["epochs"] == 1  # nothing was touched
    code = main(["train", "vae", "--out", str(tmp_path / "twice"), "--latent-dim", "3", "--set", "latent_dim=4",
                 "--epochs", "1", "--no-progress"])
    assert code == 2 and "latent_dim given both as --set and as its own flag (--latent-dim)" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()
