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


# ------------------------------------------------------------- 7. trust at the edges (issue 25, review 2026-12-07)
TINY = dict(latent_dim=2, hidden=(16,), epochs=1, progress=False, tensorboard=False, figures=False)


def resave(path, edit_tensors=None, edit_metadata=None):
    """Rewrite a safetensors file with a valid header (as another tool would), editing its tensors or metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    if edit_tensors is not None:
        tensors = edit_tensors(tensors)
    if edit_metadata is not None:
        metadata = edit_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_init_from_an_unrelated_architecture_is_refused_unless_partial(trained, tmp_path):
    from elbolab.models import get_model_class

    pretrained, _ = loading.load_run(trained)  # hidden=(8,)
    cls = get_model_class("vae")
    model = cls(cls.config_class(input_dim=64, latent_dim=2, hidden=(16,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ElbolabError, match=r"only 3 of VAE's 10 tensors match .*architectures differ.*"
                                           r"pass --init-partial .*to copy them anyway"):
        model.load_pretrained(pretrained.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing copied
    copied = model.load_pretrained(pretrained.state_dict(), partial=True)
    assert list(copied) == ["decoder.2.bias", "encoder.loc.bias", "encoder.log_var.bias"]
    assert (copied.copied, copied.total) == (3, 10)
    assert copied.summary().startswith("init-from: copied 3 of 10 tensors (decoder.2.bias")
    same = cls(pretrained.config).load_pretrained(pretrained.state_dict())
    assert (same.copied, same.total) == (10, 10)
    with pytest.raises(ElbolabError, match="--init-partial"):  # through the pipeline: refused before any file
        pipeline.train("vae", "digits", out=tmp_path / "never", init_from=trained, **TINY)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16])
def test_weights_of_another_dtype_are_refused(run, capsys, dtype):
    resave(run / runs.WEIGHTS, lambda t: {k: (v * 100).to(dtype) for k, v in t.items()})
    found = str(dtype).replace("torch.", "")
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '.*' is {found}, expected float32"):
        loading.load_run(run)
    code, _, err = cli(capsys, "sample", str(run), "-n", "4", "--out", str(run / "s.png"))
    assert code == 2 and err.count("\n") == 1 and f"is {found}, expected float32" in err


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16])
def test_a_checkpoint_of_another_dtype_is_refused_on_resume(run, dtype):
    path = run / runs.CHECKPOINT
    resave(path, lambda t: {k: v.to(dtype) if k.startswith("model.") else v for k, v in t.items()})
    saved = path.read_bytes()
    found = str(dtype).replace("torch.", "")
    with pytest.raises(CheckpointError, match=rf"checkpoint.safetensors: tensor 'model\..*' is {found}, "
                                              r"expected float32"):
        pipeline.train(out=run, resume=True, epochs=2)
    assert path.read_bytes() == saved


def test_a_config_edited_to_another_likelihood_is_refused(run, capsys):
    edit_config(run, lambda c: c["model_config"].update(likelihood="gaussian"))
    expected = (r"config.json does not match the weights: it was edited or comes from another run "
                r"\(model_config.likelihood is 'gaussian' in config.json, 'bernoulli' in {}\)")
    with pytest.raises(CheckpointError, match=expected.format("model.safetensors")):
        loading.load_run(run)
    with pytest.raises(CheckpointError, match=expected.format("checkpoint.safetensors")):
        pipeline.train(out=run, resume=True, epochs=2)
    code, _, err = cli(capsys, "eval", str(run), "--iw-samples", "5", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "model_config.likelihood" in err


def test_weights_carry_their_config_and_older_files_still_load(run):
    _, meta = runs.load_tensors(run / runs.WEIGHTS)
    saved = json.loads((run / runs.CONFIG).read_text())
    assert meta["config"]["model"] == "vae" and meta["config"]["model_config"] == saved["model_config"]
    assert len(meta["config"]["sha256"]) == 64
    assert runs.load_tensors(run / runs.CHECKPOINT)[1]["config"] == meta["config"]
    # a field added after the weights were saved (absent from both the old config.json and the old metadata)
    old = {k: v for k, v in meta["config"]["model_config"].items() if k != "encoder_covariance"}
    edit_config(run, lambda c: c["model_config"].pop("encoder_covariance"))
    resave(run / runs.WEIGHTS, edit_metadata=lambda m: {"json": json.dumps(
        {"config": runs.model_config_metadata("vae", old)})})
    loading.load_run(run)
    # a file written before weights carried their config: no metadata at all
    save_file(load_file(str(run / runs.WEIGHTS)), str(run / runs.WEIGHTS))
    edit_config(run, lambda c: c["model_config"].update(likelihood="gaussian"))
    model, _ = loading.load_run(run)  # nothing to compare with: accepted, as before
    assert model.config.likelihood == "gaussian"


def test_an_older_beta_vae_config_still_matches_its_weights(tmp_path):
    run = pipeline.train("beta-vae", "digits", out=tmp_path / "b", **TINY)

    def older_form(config):  # beta in the model config, no beta schedule: upgraded on read
        config["model_config"]["beta"] = 4.0
        config["train_config"]["schedules"].pop("beta", None)

    edit_config(run, older_form)
    model, config = loading.load_run(run)
    assert "beta" not in config["model_config"] and config["train_config"]["schedules"]["beta"] == "constant:4.0"
    pipeline.train(out=run, resume=True, epochs=2)


def test_a_full_disk_while_training_is_one_line_and_resume_stays_exact(tmp_path, monkeypatch, capsys):
    import errno

    from safetensors import SafetensorError

    reference = pipeline.train("vae", "digits", out=tmp_path / "ref", **{**TINY, "epochs": 2})
    run = pipeline.train("vae", "digits", out=tmp_path / "run", **TINY)
    checkpoint = (run / runs.CHECKPOINT).read_bytes()

    def disk_full(tensors, filename, metadata=None):  # what safetensors raises when the write fails
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(runs, "save_file", disk_full)
    with pytest.raises(OSError) as info:
        pipeline.train(out=run, resume=True, epochs=2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(run / runs.CHECKPOINT)
    code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress",
                       "--no-tensorboard")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"could not write {run / runs.CHECKPOINT}: No space left on device" in err
    assert (run / runs.CHECKPOINT).read_bytes() == checkpoint and not list(run.glob(".*.tmp"))

    def metrics_full(self, records):  # Python's own write error names no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "save_file", save_file)
    monkeypatch.setattr("elbolab.loggers.MetricsLog.write", metrics_full)
    with pytest.raises(OSError) as info:
        pipeline.train(out=run, resume=True, epochs=2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(run / runs.METRICS)
    with pytest.raises(OSError, match="No space left") as info:  # any atomic write (JSON files too)
        runs.atomic_write(run / "x.json", lambda tmp: metrics_full(None, None))
    assert info.value.filename == str(run / "x.json") and not (run / "x.json").exists()
    monkeypatch.undo()
    pipeline.train(out=run, resume=True, epochs=2)  # space again: the resume is exact
    for name in (runs.WEIGHTS, runs.CHECKPOINT):
        ours, theirs = load_file(str(run / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_full_disk_while_saving_an_evaluation_names_the_file(tmp_path, monkeypatch):
    import errno

    def disk_full(obj, f, **kwargs):
        f.write('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")  # as Python's write raises it: no file name

    monkeypatch.setattr(runs.json, "dump", disk_full)
    result = {"evaluated_at": "2026-12-07T10:00:00+0000", "split": "test", "log_px": {"k": 5, "n_examples": 9}}
    with pytest.raises(OSError, match="No space left") as info:
        runs.save_evaluation(tmp_path, result)
    assert info.value.filename == str(tmp_path / runs.EVALUATIONS / "test-K5-n9-20261207T100000Z.json")
    assert not list((tmp_path / runs.EVALUATIONS).iterdir())  # no half-written evaluation


def test_the_real_safetensors_write_error_becomes_an_os_error(tmp_path):
    """safetensors' own error on a failed write (here: a file-size limit, EFBIG; a full disk is ENOSPC)."""
    code = f"""
import resource, signal, torch
from elbolab import runs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    runs.save_tensors({str(tmp_path / 'w.safetensors')!r}, {{"a": torch.zeros(10000)}})
except OSError as error:
    print(error.errno, error.filename, error.strerror)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    import errno

    assert done.stdout.split(" ", 2) == [str(errno.EFBIG), str(tmp_path / "w.safetensors"), "File too large\n"], \
        done.stderr
    assert not list(tmp_path.glob("*"))  # neither the file nor a temporary


def test_prior_holes_of_an_autoencoder_is_refused_in_one_line(tmp_path, capsys):
    from elbolab.prior_holes import prior_holes

    run = pipeline.train("autoencoder", "digits", out=tmp_path / "ae", **TINY)
    with pytest.raises(ElbolabError, match=r"has no q\(z\|x\): prior holes need a model with a posterior, e.g. vae"):
        prior_holes(run, figures=False)
    code, _, err = cli(capsys, "holes", str(run))
    assert code == 2 and err.count("\n") == 1 and "no q(z|x)" in err


def test_non_finite_values_are_named_as_the_user_gave_them(tmp_path):
    from elbolab.schedules import Schedule

    with pytest.raises(ElbolabError, match=r"^gamma: expected a finite number, got inf") as info:
        pipeline.train("factor-vae", "digits", out=tmp_path / "never", gamma=float("inf"), **TINY)
    assert "constant:" not in str(info.value) and not (tmp_path / "never").exists()
    with pytest.raises(ElbolabError, match=r"^beta: expected a finite number, got 1e400"):
        Schedule.parse("1e400", "beta")
    with pytest.raises(ElbolabError, match=r"schedule beta: expected finite numbers, got inf in 'linear:0:1:inf'"):
        Schedule.parse("linear:0:1:inf", "beta")
    with pytest.raises(ElbolabError, match="kl_warmup_epochs") as info:  # refused by its own name (config.py)
        pipeline.train("vae", "digits", out=tmp_path / "never", kl_warmup_epochs=float("inf"), **TINY)
    assert "linear:" not in str(info.value)


def test_a_shape_mismatch_on_resume_is_one_line(run, capsys):
    edit_config(run, lambda c: c["model_config"].update(latent_dim=3))
    code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress",
                       "--no-tensorboard")
    assert code == 2 and err.count("\n") == 1, err
    assert "tensor 'model.encoder.loc.weight' has shape [2, 8] in the checkpoint" in err and "[3, 8]" in err


def test_gmm_on_values_near_1e300_says_overflow(tmp_path, capsys):
    from elbolab.classical import GaussianMixture

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (40, 2)), rng.normal(5, 1, (40, 2))]) * 1e300
    np.savetxt(tmp_path / "big.csv", X, delimiter=",")
    with pytest.raises(DataError, match=r"the data overflow float64 arithmetic \(values up to .*e300\); "
                                        r"standardise the columns \(subtract the mean, divide by the s.d.\)"):
        GaussianMixture(2, random_state=0).fit(X)
    for method in ("em", "vb"):
        code, _, err = cli(capsys, "gmm", "fit", str(tmp_path / "big.csv"), "-k", "2", "--method", method,
                           "--out", str(tmp_path / method))
        assert code == 2 and "overflow float64 arithmetic" in err and "singular" not in err, err
        assert err.count("\n") == 1


def test_ctrl_c_during_the_final_report_says_the_run_is_complete(tmp_path, monkeypatch):
    from elbolab.errors import TrainingInterrupted
    from elbolab.models.base import LatentVariableModel

    def interrupted(self, run_dir, splits):
        raise KeyboardInterrupt

    monkeypatch.setattr(LatentVariableModel, "figures", interrupted)
    try:
        with pytest.raises(TrainingInterrupted, match=r"training is complete \(weights and checkpoint saved\); "
                                                      r"the report was interrupted: rebuild it with 'elbolab report"):
            pipeline.train("vae", "digits", out=tmp_path / "r", **{**TINY, "figures": True})
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped pipeline.train")
    assert (tmp_path / "r" / runs.CHECKPOINT).is_file()


# ---------------------------------------------------------------- the evaluation's own edges (issue 25: 7, 8, 10, 11)
@pytest.fixture(scope="module")
def two_digit_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    quiet = dict(epochs=1, hidden=(16,), latent_dim=2, progress=False, tensorboard=False, figures=False)
    return {name: pipeline.train("vae", "digits", out=folder / name, **{**quiet, **options})
            for name, options in (("a", {}), ("seed", {"seed": 1}), ("gauss", {"likelihood": "gaussian"}))}


def test_compare_is_refused_before_any_evaluation_by_what_defines_the_examples(two_digit_runs):
    runs_ = two_digit_runs
    for other, expected in (("seed", "other test examples"), ("gauss", "same support")):
        with pytest.raises(ElbolabError, match=expected):
            pipeline.evaluate(runs_["a"], k=5, compare=runs_[other], refresh_report=False)
    assert not (runs_["a"] / "evaluations").exists()  # refused before the first run was evaluated


def test_an_impossible_number_of_importance_samples_is_refused_up_front(two_digit_runs):
    with pytest.raises(ElbolabError, match="days on this machine"):
        pipeline.evaluate(two_digit_runs["a"], k=10**12, refresh_report=False)


def test_an_unwritable_run_folder_is_refused_before_evaluating(two_digit_runs, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ElbolabError, match="Read-only file system.*would be lost"):
        pipeline.evaluate(two_digit_runs["a"], k=5, refresh_report=False)


@pytest.mark.parametrize("args, expected", [
    (["--schedule", "beta="], "with a value"),
    (["--set", "condition=label", "--set", "given_quadrants=7"], "given_quadrants in 1, 2, 3"),
])
def test_empty_specs_and_options_the_other_options_ignore_are_refused(tmp_path, capsys, args, expected):
    from elbolab.cli import main

    model = "cvae" if "condition=label" in args else "vae"
    code = main(["train", model, "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
