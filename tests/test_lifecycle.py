"""The run lifecycle: what a run prints, stopping (Ctrl-C) and exact resume mid-epoch, crashes and NaNs before and
after the first checkpoint, --resume with only --out, --overwrite, locking, never touching a user's files."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file

from elbolab import loading, pipeline, runs
from elbolab.cli import main
from elbolab.config import TrainConfig
from elbolab.data import load_data
from elbolab.errors import CheckpointError, ElbolabError, TrainingDiverged, TrainingInterrupted
from elbolab.models import ModelConfig, register_model
from elbolab.models.vae import VAE
from elbolab.trainer import Trainer

QUIET = dict(latent_dim=2, hidden=(16,), batch_size=64, tensorboard=False, figures=False)
STEPS_PER_EPOCH = 20  # 1257 digits training rows / 64


def _weights(run):
    return load_file(str(run / runs.WEIGHTS))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


class _Trouble(VAE):
    """A VAE that, at its N-th training step, sends itself SIGINT (a Ctrl-C), raises (a crash), or returns a NaN
    loss or NaN gradients."""

    at, kind = 10**9, "sigint"

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def loss(self, batch, ctx):
        out = super().loss(batch, ctx)
        if not self.training:
            return out
        self.calls += 1
        if self.calls == type(self).at:
            if self.kind in ("sigint", "sigterm"):  # to this thread: handled now, not when another thread runs
                signal.raise_signal(signal.SIGINT if self.kind == "sigint" else signal.SIGTERM)
            elif self.kind == "crash":
                raise RuntimeError("simulated crash")
            elif self.kind == "nan-loss":
                out.losses["model"] = out.loss * float("nan")
            elif self.kind == "nan-grad":  # a finite loss (sqrt(0) = 0) whose gradient is inf * 0 = NaN
                out.losses["model"] = out.loss + torch.sqrt((self.decoder[0].bias * 0).sum())
        return out


register_model("test-trouble")(_Trouble)


def _trouble(kind, at):
    _Trouble.kind, _Trouble.at = kind, at


@pytest.fixture(autouse=True)
def _reset_trouble():
    yield
    _trouble("sigint", 10**9)


# ------------------------------------------------------------------------------------------- watching
def test_a_run_prints_plain_epoch_lines_and_a_summary(tmp_path, capsys):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=2, **QUIET)
    out = capsys.readouterr().out
    lines = out.splitlines()
    n_params = sum(p.numel() for p in loading.load_run(run)[0].parameters())
    assert lines[0].startswith(f"vae: {n_params:,} parameters; ") and "training examples" in lines[0]
    assert lines[1].startswith("about ") and "per epoch here" in lines[1]  # timed on the first steps
    lines = lines[2:]
    assert lines[0].startswith("epoch 1/2  train elbo ") and "| val elbo " in lines[0] and lines[0].endswith(" s")
    assert lines[1].startswith("epoch 2/2")
    assert "best val ELBO" in lines[2] and str((run / "index.html").resolve()) in lines[2]
    assert "\r" not in out  # not a terminal: no progress-bar redraws
    records = [json.loads(line) for line in (run / runs.METRICS).read_text().splitlines()]
    assert all("time" in r and r["time"].endswith("+00:00") and r["seconds"] >= 0 for r in records)
    manifest = json.loads((run / runs.MANIFEST).read_text())
    assert manifest["wall_time_s"] > 0 and manifest["summary"]["best_epoch"] in (1, 2)
    assert manifest["summary"]["last_epoch"] == 2
    assert isinstance(manifest["command"], list)


def test_posterior_collapse_is_called_out(tmp_path, capsys):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=2, beta=30.0, **QUIET)
    out = capsys.readouterr().out
    assert "warning: posterior collapse" in out and "--kl-warmup" in out and "free_bits" in out
    summary = json.loads((run / runs.MANIFEST).read_text())["summary"]
    assert summary["active_units"] == 0 and summary["collapse_warning"]
    healthy = pipeline.train("vae", "digits", out=tmp_path / "h", epochs=3, **dict(QUIET, lr=3e-3))
    assert json.loads((healthy / runs.MANIFEST).read_text())["summary"]["collapse_warning"] is None


def test_the_collapse_advice_names_only_remedies_the_model_accepts():
    from elbolab.evaluate import collapse_check
    from elbolab.models import get_model_class

    data = load_data("digits", binarize="static").val
    for name, offered in (("vae", True), ("iwae", False)):
        torch.manual_seed(0)
        cls = get_model_class(name)
        model = cls(cls.config_class(input_dim=64, latent_dim=2))
        with torch.no_grad():  # a collapsed encoder: q(z|x) = N(0, I) for every x
            model.encoder.loc.weight.zero_(), model.encoder.loc.bias.zero_()
            model.encoder.log_var.weight.zero_(), model.encoder.log_var.bias.zero_()
        warning = collapse_check(model, data)["collapse_warning"]
        assert warning.startswith("posterior collapse: 0 of 2") and "more --epochs" in warning
        assert ("--kl-warmup" in warning and "free_bits" in warning) is offered
        assert ("--beta" in warning) is offered  # the IWAE refuses --beta and free bits


# ------------------------------------------------------------------------------------ stopping, resuming
def test_ctrl_c_stops_at_a_safe_point_and_resume_is_exact_mid_epoch(tmp_path, capsys):
    opts = dict(QUIET, binarize="dynamic", mc_samples=2, seed=5)
    straight = pipeline.train("test-trouble", "digits", out=tmp_path / "straight", epochs=2, **opts)
    _trouble("sigint", STEPS_PER_EPOCH + 7)  # in the middle of epoch 2
    with pytest.raises(TrainingInterrupted, match="--resume"):
        pipeline.train("test-trouble", "digits", out=tmp_path / "stopped", epochs=2, **opts)
    state = runs.load_tensors(tmp_path / "stopped" / runs.CHECKPOINT)[1]["trainer"]
    assert state["epoch"] == 1 and state["in_epoch"]["batch"] == 7 and state["step"] == STEPS_PER_EPOCH + 7
    _trouble("sigint", 10**9)
    resumed = pipeline.train(out=tmp_path / "stopped", resume=True, figures=False)  # only --out
    _assert_same_weights(straight, resumed)
    a = [json.loads(x) for x in (straight / runs.METRICS).read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / runs.METRICS).read_text().splitlines()]
    for ra, rb in zip(a, b, strict=True):  # the interrupted epoch's averages are exact too
        assert {k: v for k, v in ra.items() if k not in ("time", "seconds")} == {
            k: v for k, v in rb.items() if k not in ("time", "seconds")}
    manifest = json.loads((resumed / runs.MANIFEST).read_text())
    assert len(manifest["resumes"]) == 1 and manifest["resumes"][0]["from_step"] == STEPS_PER_EPOCH + 7


def test_sigterm_stops_at_a_safe_point_too_and_resume_is_exact(tmp_path):
    # a session's end or a scheduler sends SIGTERM (a background job ignores SIGINT): a checkpoint, not a loss
    opts = dict(QUIET, binarize="dynamic", seed=6)
    straight = pipeline.train("test-trouble", "digits", out=tmp_path / "straight", epochs=2, **opts)
    _trouble("sigterm", STEPS_PER_EPOCH + 3)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        pipeline.train("test-trouble", "digits", out=tmp_path / "stopped", epochs=2, **opts)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    _trouble("sigint", 10**9)
    resumed = pipeline.train(out=tmp_path / "stopped", resume=True, figures=False)
    _assert_same_weights(straight, resumed)


def test_cli_ctrl_c_exits_130_and_says_how_to_continue(tmp_path, capsys):
    _trouble("sigint", 3)
    code = main(["train", "test-trouble", "--out", str(tmp_path / "r"), "--epochs", "1", "--hidden", "8",
                 "--latent-dim", "2", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code == 130 and f"elbolab train --out {tmp_path / 'r'} --resume" in err


def test_checkpoint_every_allows_exact_resume_after_a_crash(tmp_path):
    opts = dict(QUIET, binarize="dynamic", seed=1)
    straight = pipeline.train("test-trouble", "digits", out=tmp_path / "s", epochs=1, **opts)
    _trouble("crash", 11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.train("test-trouble", "digits", out=tmp_path / "c", epochs=1, checkpoint_every=4, **opts)
    state = runs.load_tensors(tmp_path / "c" / runs.CHECKPOINT)[1]["trainer"]
    assert state["step"] == 8 and state["in_epoch"]["batch"] == 8
    _trouble("crash", 10**9)
    resumed = pipeline.train(out=tmp_path / "c", resume=True, figures=False)
    _assert_same_weights(straight, resumed)


def test_resume_changes_nothing_when_it_fails(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, **QUIET)
    before = {name: (run / name).read_bytes() for name in (runs.CONFIG, runs.MANIFEST, runs.CHECKPOINT,
                                                             runs.METRICS)}
    with pytest.raises(ElbolabError, match="latent_dim differs"):
        pipeline.train(out=run, resume=True, epochs=2, latent_dim=3, figures=False)
    with pytest.raises(ElbolabError, match="trained on"):
        pipeline.train("vae", "mnist", out=run, resume=True, epochs=2, figures=False)
    (run / runs.CHECKPOINT).write_bytes(before[runs.CHECKPOINT][:100])  # a damaged checkpoint
    with pytest.raises(CheckpointError):
        pipeline.train(out=run, resume=True, epochs=2, figures=False)
    for name in (runs.CONFIG, runs.MANIFEST, runs.METRICS):
        assert (run / name).read_bytes() == before[name], name


# --------------------------------------------------------------------------------- failures and NaNs
@pytest.mark.parametrize("kind", ["nan-loss", "nan-grad"])
def test_nan_before_the_first_checkpoint_leaves_a_folder_that_can_be_trained_into(kind, tmp_path):
    _trouble(kind, 3)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet"):
        pipeline.train("test-trouble", "digits", out=tmp_path / "r", epochs=1, **QUIET)
    _trouble(kind, 10**9)
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        pipeline.train(out=tmp_path / "r", resume=True, figures=False)
    pipeline.train("test-trouble", "digits", out=tmp_path / "r", epochs=1, **QUIET)  # no --overwrite needed
    assert (tmp_path / "r" / runs.CHECKPOINT).is_file()


def test_nan_gradient_stops_before_any_weight_changes(tmp_path):
    _trouble("nan-grad", STEPS_PER_EPOCH + 2)
    with pytest.raises(TrainingDiverged, match="gradients of .* became NaN"):
        pipeline.train("test-trouble", "digits", out=tmp_path / "r", epochs=2, **QUIET)
    saved = runs.load_tensors(tmp_path / "r" / runs.CHECKPOINT)[0]
    assert all(torch.isfinite(v).all() for k, v in saved.items() if k.startswith("model."))
    assert runs.load_tensors(tmp_path / "r" / runs.CHECKPOINT)[1]["trainer"]["epoch"] == 1


# ------------------------------------------------------------------------------------ sharing a folder
def test_overwrite_restarts_and_is_needed_to_replace_a_run(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, **QUIET)
    with pytest.raises(CheckpointError, match="--overwrite"):
        pipeline.train("vae", "digits", out=run, epochs=1, **QUIET)
    pipeline.train("vae", "digits", out=run, epochs=1, overwrite=True, **dict(QUIET, latent_dim=3))
    assert json.loads((run / runs.CONFIG).read_text())["model_config"]["latent_dim"] == 3
    assert len((run / runs.METRICS).read_text().splitlines()) == 2  # the old records are gone


def test_a_folder_in_use_is_refused(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    lock = runs.RunLock(folder).acquire()
    try:
        with pytest.raises(CheckpointError, match="in use"):
            pipeline.train("vae", "digits", out=folder, epochs=1, **QUIET)
    finally:
        lock.release()
    assert not (folder / runs.CONFIG).exists()
    pipeline.train("vae", "digits", out=folder, epochs=1, **QUIET)  # released: trains


def test_a_users_files_are_never_overwritten(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "manifest.json").write_text("my notes")
    (folder / "index.html").write_text("my page")
    with pytest.raises(CheckpointError, match="not a run folder"):
        pipeline.train("vae", "digits", out=folder, epochs=1, **QUIET)
    with pytest.raises(CheckpointError, match="not a run folder"):
        pipeline.train("vae", "digits", out=folder, epochs=1, overwrite=True, **QUIET)
    assert (folder / "manifest.json").read_text() == "my notes" and (folder / "index.html").read_text() == "my page"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        pipeline.train("vae", "digits", out=tmp_path / "a-file", epochs=1, **QUIET)


def test_files_get_the_users_umask_and_stale_temporaries_are_removed(tmp_path):
    old = os.umask(0o027)
    try:
        folder = tmp_path / "r"
        folder.mkdir()
        (folder / ".checkpoint.safetensors.abc.tmp").write_bytes(b"half")  # left by a killed process
        run = pipeline.train("vae", "digits", out=folder, epochs=1, **QUIET)
    finally:
        os.umask(old)
    for name in (runs.CONFIG, runs.WEIGHTS, runs.CHECKPOINT, runs.MANIFEST):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name
    assert not list(run.glob(".*.tmp"))


# -------------------------------------------------------------------------------------- best, device
def test_keep_best_and_device(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=3, keep_best=True, device="cpu", **QUIET)
    assert (run / runs.BEST_WEIGHTS).is_file()
    records = [json.loads(x) for x in (run / runs.METRICS).read_text().splitlines()]
    best_epoch = max((r for r in records if r["split"] == "val"), key=lambda r: r["elbo"])["epoch"]
    state = runs.load_tensors(run / runs.CHECKPOINT)[1]["trainer"]
    assert state["best"][1] == best_epoch
    plain = pipeline.train("vae", "digits", out=tmp_path / "p", epochs=3, **QUIET)
    _assert_same_weights(run, plain)  # cpu is the default: the same numbers
    with pytest.raises(ElbolabError, match="device|cpu"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ElbolabError, match="not available"):
            TrainConfig(device="cuda")


def test_trainer_moves_the_model_to_its_device():
    model = VAE(ModelConfig(input_dim=64, latent_dim=2, hidden=(8,)))
    trainer = Trainer(model, TrainConfig(device="cpu", progress=False, tensorboard=False), "/unused",
                      model_name="vae")
    assert next(trainer.model.parameters()).device.type == "cpu"
    data = load_data("digits")
    assert trainer.context(0.5).values["beta"] == 1.0 and len(data.train) > 0


def test_the_report_repeats_the_collapse_warning(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, **dict(QUIET, beta=30.0, figures=True))
    html = (run / "index.html").read_text()
    assert "posterior collapse" in html and "--kl-warmup" in html


def test_eval_says_which_weights_it_uses(tmp_path, capsys):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=3, keep_best=True, **QUIET)
    best_epoch = json.loads((run / runs.MANIFEST).read_text())["summary"]["best_epoch"]
    last = pipeline.evaluate(run, k=5)
    best = pipeline.evaluate(run, k=5, weights="best")
    assert last["weights"] == "model.safetensors (last, epoch 3)"
    assert best["weights"] == f"model.best.safetensors (best, epoch {best_epoch})" and best["device"] == "cpu"
    plain = pipeline.train("vae", "digits", out=tmp_path / "p", epochs=1, **QUIET)
    with pytest.raises(CheckpointError, match="--keep-best"):
        pipeline.evaluate(plain, k=5, weights="best")
    capsys.readouterr()
    assert main(["eval", str(run), "--iw-samples", "5", "--weights", "best"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("weights: model.best.safetensors") and "\r" not in out
    assert "log p(x) (IS)" not in out  # a quick evaluation prints no progress lines off a terminal


def test_a_file_system_failure_is_one_clear_line(tmp_path, capsys):
    # /proc refuses new entries even to root: an OSError from the file system, as a read-only or full disk gives
    code = main(["train", "vae", "--out", "/proc/elbolab-test-run", "--epochs", "1", "--hidden", "8"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "/proc/elbolab-test-run" in lines[0] and "writable" in lines[0]
    assert "Traceback" not in err


def test_long_evaluations_report_progress_as_plain_lines_off_a_terminal(monkeypatch, capsys):
    import time

    from elbolab.estimators import progress_over_examples

    clock = iter(range(0, 1000, 4))  # every call 4 s later
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    assert list(progress_over_examples(range(0, 100, 10), "log p(x) (IS)", 10, 10, 100)) == list(range(0, 100, 10))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "log p(x) (IS): 30 of 100 examples, 12 s" and lines[-1].startswith("log p(x) (IS): 100 of 100")
    assert 3 <= len(lines) <= 5


def test_a_foreign_config_json_does_not_make_a_run_folder(tmp_path):
    folder = tmp_path / "site"
    (folder / "figures").mkdir(parents=True)
    (folder / "config.json").write_text('{"name": "my web app"}')
    (folder / "figures" / "diagram.png").write_text("keep")
    with pytest.raises(CheckpointError, match="not a run folder"):
        pipeline.train("vae", "digits", out=folder, epochs=1, **QUIET)
    assert (folder / "figures" / "diagram.png").read_text() == "keep"
    assert json.loads((folder / "config.json").read_text()) == {"name": "my web app"}


def test_resume_summary_and_eval_labels_cover_the_whole_run(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=2, keep_best=True, **QUIET)
    pipeline.train(out=run, resume=True, epochs=4, figures=False)
    records = [json.loads(x) for x in (run / runs.METRICS).read_text().splitlines()]
    best = max((r for r in records if r["split"] == "val"), key=lambda r: r["elbo"])["epoch"]
    summary = json.loads((run / runs.MANIFEST).read_text())["summary"]
    assert summary["last_epoch"] == 4 and summary["best_epoch"] == best
    assert pipeline.evaluate(run, k=5)["weights"] == "model.safetensors (last, epoch 4)"
    before = (run / runs.CONFIG).read_bytes()
    with pytest.raises(CheckpointError, match="already trained 4 epochs"):
        pipeline.train(out=run, resume=True, epochs=3, figures=False)
    assert (run / runs.CONFIG).read_bytes() == before


def test_a_plain_resume_keeps_the_runs_tensorboard_setting(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["--out", str(out), "--hidden", "8", "--latent-dim", "2"]
    assert main(["train", "vae", *args, "--epochs", "1", "--no-tensorboard"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert json.loads((out / runs.CONFIG).read_text())["train_config"]["tensorboard"] is False
    assert not (out / "tensorboard").exists()


def test_ctrl_c_in_the_last_step_of_an_epoch_stops_after_it(tmp_path):
    _trouble("sigint", STEPS_PER_EPOCH)  # the last step of epoch 1
    with pytest.raises(TrainingInterrupted, match="after epoch 1"):
        pipeline.train("test-trouble", "digits", out=tmp_path / "r", epochs=3, **QUIET)
    assert runs.load_tensors(tmp_path / "r" / runs.CHECKPOINT)[1]["trainer"]["epoch"] == 1


# ------------------------------------------------------------------------------------ evaluation history
def test_every_evaluation_is_kept_and_the_report_shows_the_newest_per_split(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, latent_dim=2, hidden=(16,), progress=False,
                         tensorboard=False)
    first = pipeline.evaluate(run, k=10, limit=30)
    second = pipeline.evaluate(run, k=20, limit=40)
    val = pipeline.evaluate(run, k=10, split="val")
    assert first["log_px"]["n_examples"] == 30 and second["log_px"]["n_examples"] == 40
    assert val["log_px"]["n_examples"] == len(load_data("digits").val)
    saved = sorted(p.name for p in (run / runs.EVALUATIONS).iterdir())
    assert len(saved) == 3 and len({first["saved_to"], second["saved_to"], val["saved_to"]}) == 3
    kept = runs.read_evaluations(run)
    assert [r["log_px"]["k"] for r in kept if r["split"] == "test"] == [10, 20]  # nothing overwritten
    latest = runs.latest_per_split(kept)
    assert list(latest) == ["test", "val"] and latest["test"]["log_px"]["k"] == 20
    assert json.loads((run / runs.EVAL).read_text())["split"] == "val"  # eval.json: the latest of any split
    page = (run / "index.html").read_text()  # refreshed by evaluate
    assert "3 evaluations kept" in page and "40 (--limit)" in page
    with pytest.raises(ElbolabError, match="--limit N >= 1"):
        pipeline.evaluate(run, k=10, limit=0)
    assert len(list((run / runs.EVALUATIONS).iterdir())) == 3
