"""Anything that can take more than ~10 s says what it is doing and how far it is: off a terminal, a plain line
``DESC: DONE of TOTAL UNIT, S s`` every ``ELBOLAB_PROGRESS_EVERY`` seconds (elbolab/progress.py; 10 by default).
Each command runs here on a tiny model with its output captured (not a terminal) and the interval at 0, so every
phase that reports progress prints its lines however quick it is; with the default interval a quick command prints
none. A phase known to be silent is marked xfail (strict: it fails once fixed, so that the mark is removed), with
the place to fix. On a real terminal (tmux) the bar is checked in test_a_terminal_gets_a_bar_and_a_file_plain_lines;
the last tests check the warning about torch threads beside busy cores (--threads)."""

import contextlib
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elbolab import pipeline
from elbolab.cli import main
from elbolab.data.bow import save_bow_npz
from elbolab.progress import EVERY_VARIABLE

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = re.compile(r"^(?P<desc>.+): (?P<done>[\d,]+) of (?P<total>[\d,]+) (?P<unit>[\w-]+), \d+ s(, .+)?$")
TINY = dict(epochs=1, batch_size=64, figures=False, progress=False, tensorboard=False)
QUICK = ["--epochs", "1", "--batch-size", "64", "--no-tensorboard"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def phases(text: str) -> dict[str, list[tuple[int, int, str]]]:
    """The progress lines of an output by phase (their description): [(done, total, unit)] in order."""
    found: dict[str, list[tuple[int, int, str]]] = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            found.setdefault(match["desc"], []).append(
                (int(match["done"].replace(",", "")), int(match["total"].replace(",", "")), match["unit"]))
    return found


def reported(text: str, desc_start: str, total: int | None = None, unit: str | None = None, *,
             complete: bool = True) -> list:
    """The lines of the phase whose description starts with ``desc_start``: it reports, counts up (to its total,
    ``total`` when given, and ends there when ``complete``)."""
    matching = {desc: lines for desc, lines in phases(text).items() if desc.startswith(desc_start)}
    assert matching, f"no progress lines of {desc_start!r} in:\n{text}"
    for desc, lines in matching.items():
        dones = [done for done, _, _ in lines]
        assert dones == sorted(dones) and (lines[-1][0] == lines[-1][1] or not complete), (desc, lines)
        if total is not None:
            assert {t for _, t, _ in lines} == {total}, (desc, lines)
        if unit is not None:
            assert {u for _, _, u in lines} == {unit}, (desc, lines)
    return [line for lines in matching.values() for line in lines]


def captured(*args) -> str:
    """The stdout of one command run in this process (not a terminal) with a progress line at every update; for
    module fixtures, whose outputs several tests read."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EVERY_VARIABLE, "0")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture
def every_update(monkeypatch):
    """A progress line at every update, as if each phase took longer than the interval."""
    monkeypatch.setenv(EVERY_VARIABLE, "0")


@pytest.fixture
def default_interval(monkeypatch):
    monkeypatch.delenv(EVERY_VARIABLE, raising=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("progress")


@pytest.fixture(scope="module")
def vae_run(folder):
    return pipeline.train("vae", "digits", out=folder / "vae", latent_dim=3, hidden=(16,), train_size=300, **TINY)


@pytest.fixture(scope="module")
def nvdm_run(folder):
    import scipy.sparse

    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, size=(60, 10))
    counts[:, 0] += 1  # no empty document
    path = save_bow_npz(folder / "docs.npz", scipy.sparse.csr_matrix(counts), vocabulary=[f"w{j}" for j in range(10)])
    return pipeline.train("nvdm", str(path), out=folder / "nvdm", latent_dim=3, hidden=(16,), **TINY)


# ------------------------------------------------------------------------------------------------ the interval
def test_the_interval_comes_from_the_environment(monkeypatch, capsys):
    from elbolab.progress import LINE_EVERY_S, Progress, line_every

    for text, seconds in (("0", 0.0), ("2.5", 2.5), ("", LINE_EVERY_S), ("soon", LINE_EVERY_S),
                          ("-1", LINE_EVERY_S), ("nan", LINE_EVERY_S)):
        monkeypatch.setenv(EVERY_VARIABLE, text)
        assert line_every() == seconds, text
    monkeypatch.setenv(EVERY_VARIABLE, "0")
    with Progress("a phase", total=3, unit="parts") as bar:
        for _ in range(3):
            bar.update(1)
    assert capsys.readouterr().out.splitlines() == [f"a phase: {i} of 3 parts, 0 s" for i in (1, 2, 3)]
    monkeypatch.delenv(EVERY_VARIABLE)
    with Progress("a phase", total=3) as bar:
        bar.update(3)
    assert capsys.readouterr().out == ""  # a quick phase is quiet


# ------------------------------------------------------------------------------------------------ train
@pytest.fixture(scope="module")
def local_vi(folder):
    """What ``train local-vi`` and then ``eval`` of that run print: the epochs, then the fits of q(z) for the rows
    the collapse check, the figures and the estimates score (the review's silent "36 s after 'done in'")."""
    run = folder / "local-vi"
    trained = captured("train", "local-vi", "--data", "digits", "--latent-dim", "2", "--hidden", "16",
                       "--train-size", "200", "--set", "fit_steps=2", "--set", "val_rows=20", "--out", run,
                       "--epochs", "2", "--batch-size", "64", "--no-tensorboard")
    return trained, captured("eval", run, "--iw-samples", "2", "--limit", "300")


def test_train_says_each_epoch_and_local_vi_its_fits(local_vi):
    trained, evaluated = local_vi
    lines = trained.splitlines()
    assert any(line.startswith("about ") and "per epoch here" in line for line in lines)
    epoch_lines = [line[:9] for line in lines if line.startswith("epoch ") and not LINE.match(line)]
    assert epoch_lines == ["epoch 1/2", "epoch 2/2"]
    reported(trained, "local-vi: fitting q(z) for", unit="examples")
    reported(evaluated, "local-vi: fitting q(z) for", unit="examples")  # the test rows (identical ones once)


def test_train_reports_within_a_long_epoch_off_a_terminal(local_vi):
    reported(local_vi[0], "epoch 1/2", total=4)  # 200 rows in batches of 64


@pytest.fixture(scope="module")
def vade(folder):
    return captured("train", "vade", "--data", "digits", "--latent-dim", "2", "--hidden", "16", "--train-size",
                    "200", "--set", "n_clusters=3", "--set", "gmm_n_init=2", "--out", folder / "vade", *QUICK)


def test_vade_says_it_fits_its_prior(vade):
    assert "vade: fitting the 3-component prior by EM on 200 codes (2 restarts, diag covariances)" in vade
    assert vade.index("vade: fitting the") < vade.index("epoch 1/1")


def test_vade_reports_how_far_its_em_is(vade):
    reported(vade, "EM: 2 restarts on 200 points", total=2, unit="restarts")


# ------------------------------------------------------------------------------------------------ eval
@pytest.fixture(scope="module")
def evaluated(vae_run):
    return captured("eval", vae_run, "--iw-samples", "5", "--limit", "20", "--naive-samples", "3", "--ais-steps",
                    "3", "--ais-chains", "2", "--ais-examples", "4", "--bdmc", "2")


def test_eval_reports_every_phase(evaluated):
    reported(evaluated, "KL anatomy over 20 examples", total=20, unit="points")
    reported(evaluated, "log p(x) by AIS (3 steps, 2 chains)", total=4 * 3, unit="example-steps")
    reported(evaluated, "BDMC (3 steps each way, 2 simulated examples)", total=2 * 3, unit="steps")
    assert "log p(x) by AIS = " in evaluated and "BDMC on 2 simulated examples" in evaluated


def test_eval_log_px_follows_the_interval(evaluated):
    reported(evaluated, "log p(x) (IS)", total=20, unit="examples")
    reported(evaluated, "log p(x) (naive)", total=20, unit="examples")


def test_eval_disentanglement_reports_its_images(folder, every_update, capsys, monkeypatch):
    import elbolab.disentanglement as metrics

    sprites = pipeline.train("beta-vae", "sprites", out=folder / "sprites", latent_dim=4, hidden=(16,),
                             train_size=64, val_size=32, **TINY)
    small = functools.partial(metrics.disentanglement_scores, batch_size=8, num_train=20, num_eval=10,
                              num_points=100, bins=5)
    monkeypatch.setattr(pipeline, "disentanglement_scores", small)  # the metrics' own tests use full sizes
    out = run(capsys, "eval", sprites, "--iw-samples", "2", "--limit", "8", "--disentanglement")
    # up to its total even when no latent unit is active (FactorVAE then casts no votes; its images count as done)
    lines = reported(out, "disentanglement metrics (quick protocol): drawing and encoding", unit="images")
    assert len(lines) >= 3 and "beta-VAE metric" in out


# ------------------------------------------------------------------------------------------------ analyses
def test_holes_and_encode_report_their_work(vae_run, every_update, capsys, tmp_path):
    out = run(capsys, "holes", vae_run, "--n-points", "100", "--n-samples", "3000")
    reported(out, "prior holes: q(z)/p(z) at 3,000 prior draws", total=3000 + 3000, unit="draws")
    out = run(capsys, "encode", vae_run, "--out", tmp_path / "codes.npy")
    reported(out, "encode: E[z|x] of the", unit="examples")


def test_quick_commands_print_no_flood_of_lines(vae_run, nvdm_run, default_interval, capsys, tmp_path):
    """With the default interval, nothing that ends within seconds prints a progress line."""
    for args in (["eval", vae_run, "--iw-samples", "5", "--limit", "20", "--ais-steps", "2", "--ais-chains", "2",
                  "--ais-examples", "2", "--bdmc", "1"],
                 ["holes", vae_run, "--n-points", "100", "--n-samples", "2000"],
                 ["encode", vae_run, "--out", tmp_path / "codes.csv"],
                 ["traverse", vae_run, "--dims", "0", "--steps", "3", "--out", tmp_path / "t"],
                 ["sample", vae_run, "-n", "4", "--out", tmp_path / "s.png"],
                 ["topics", nvdm_run, "--top", "3"],
                 ["neighbours", nvdm_run, "w1", "-n", "2"]):
        out = run(capsys, *args)
        assert phases(out) == {}, (args[0], out)
        assert len(out.splitlines()) <= 12, (args[0], out)


# ------------------------------------------------------------------------------------------------ classical
def test_gmm_fit_reports_its_iterations(every_update, capsys, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "points.csv"
    np.savetxt(path, np.concatenate([rng.normal(-3, 1, (60, 2)), rng.normal(3, 1, (60, 2))]), delimiter=",")
    out = run(capsys, "gmm", "fit", path, "-k", "2", "--n-init", "2", "--out", tmp_path / "gmm")
    reported(out, "EM: 2 restarts on 120 points", total=2, unit="restarts")


def test_denoise_reports_its_sweeps(every_update, capsys, tmp_path):
    out = run(capsys, "denoise", "--size", "16", "--sweeps", "5", "--out", tmp_path / "ising")
    for method in ("meanfield", "icm", "gibbs"):  # the chosen one, then the two others for the comparison
        reported(out, f"{method}: at most 5 sweeps", total=5, unit="sweeps", complete=False)


# ------------------------------------------------------------------------------------------------ a terminal
def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"the command in tmux did not finish within {seconds:.0f} s")
        time.sleep(0.2)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_a_terminal_gets_a_bar_and_a_file_plain_lines(tmp_path):
    """``elbolab train`` in a detached tmux pane 100 columns wide: everything written to the terminal is recorded
    (pipe-pane, so no timing matters) and holds tqdm's bar; the same command into a file writes plain lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(EVERY_VARIABLE, None)
    train = [sys.executable, "-m", "elbolab", "train", "vae", "--data", "digits", "--latent-dim", "2", "--hidden",
             "16", "--epochs", "2", "--batch-size", "32", "--train-size", "640", "--no-tensorboard"]
    recording, finished = tmp_path / "terminal.out", tmp_path / "finished"
    socket = f"elbolab-test-{os.getpid()}"  # a server of our own, never the user's
    tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
    script = (f"tmux -L {socket} wait-for go; {subprocess.list2cmdline(train + ['--out', str(tmp_path / 'tty')])}; "
              f"echo $? > {finished}; exec sleep 600")  # the pane stays for capture-pane
    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", "bar", "-x", "100", "-y", "30", "sh", "-c", script],
                       check=True, env=env, cwd=tmp_path, timeout=30)
        subprocess.run([*tmux, "pipe-pane", "-t", "bar", "-o", f"cat >> {recording}"], check=True, timeout=30)
        subprocess.run([*tmux, "wait-for", "-S", "go"], check=True, timeout=30)  # recording before any output
        _wait_for(finished, 180)
        pane = subprocess.run([*tmux, "capture-pane", "-p", "-t", "bar"], capture_output=True, text=True,
                              timeout=30).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)
    assert finished.read_text().strip() == "0", pane
    written = recording.read_bytes().decode(errors="replace")  # as written: \r kept
    # tqdm's bar, drawn as it starts (so however quick the epoch): description, percentage, '|', count, rate
    assert re.search(r"epoch 1/2:\s+\d+%\|", written) and "/20 [" in written and "batches/s" in written, written
    assert "\r" in written  # redrawn in place
    assert "epoch 2/2  train elbo" in pane  # the plain epoch lines stay on the screen; the bars are cleared

    with open(tmp_path / "log.txt", "w") as log:
        code = subprocess.run(train + ["--out", str(tmp_path / "file")], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=tmp_path, timeout=180).returncode
    text = (tmp_path / "log.txt").read_bytes().decode()
    assert code == 0, text
    assert "\r" not in text and "\x1b" not in text and "%|" not in text, text
    assert [line[:9] for line in text.splitlines() if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]


# ------------------------------------------------------------------------------------------------ threads
def _machine(monkeypatch, *, cpus: int, load: float, runnable: int | None):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(pipeline, "_runnable_now", lambda: runnable)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("ELBOLAB_BUSY_WARNING", "1")  # conftest switches it off for every other test


@pytest.mark.parametrize("cpus, threads, load, runnable, warns", [
    (2, 2, 1.0, 2, True),  # the other core busy: the case measured at ~50x
    (2, 2, 0.2, 1, False),  # idle
    (2, 2, 1.9, 1, False),  # a command that has just ended left its load; nothing else runs now
    (2, 2, 1.0, None, True),  # no /proc/loadavg: the load average alone
    (2, 1, 1.9, 3, False),  # one thread needs one core
    (8, 4, 3.0, 4, False),  # four cores to spare
    (8, 8, 3.0, 4, True),
])
def test_busy_cores_warning(monkeypatch, cpus, threads, load, runnable, warns):
    _machine(monkeypatch, cpus=cpus, load=load, runnable=runnable)
    line = pipeline.busy_cores_warning(threads)
    assert (line is not None) == warns, line
    if warns:
        assert line.startswith("warning: ") and f"load average {load:.1f}" in line and f"{cpus} cores" in line
        assert "--threads " in line and "OMP_NUM_THREADS=" in line
        suggested = int(line.split("--threads ")[1].split()[0])
        assert 1 <= suggested < threads


def test_train_and_eval_warn_once_when_busy_and_obey_threads(vae_run, folder, monkeypatch, capsys):
    """On a busy machine (faked: 2 cores, one busy) torch's 2 threads get one warning line on stderr as the work
    starts; --threads 1, OMP_NUM_THREADS or --no-progress silence it; an idle machine never sees it. The commands
    really run one thread: torch.get_num_threads is faked too, as 2 threads beside a busy core are the ~50x
    slowdown itself."""
    _machine(monkeypatch, cpus=2, load=1.2, runnable=2)
    train = ["train", "vae", "--data", "digits", "--latent-dim", "2", "--hidden", "8", "--train-size", "128",
             *QUICK]
    evaluate = ["eval", vae_run, "--iw-samples", "2", "--limit", "5"]
    with monkeypatch.context() as fake:
        fake.setattr(torch, "get_num_threads", lambda: 2)
        for args in ([*train, "--out", folder / "busy"], evaluate):
            code = main([str(a) for a in args])
            err = capsys.readouterr().err
            assert code == 0 and err.count("warning: torch will use 2 threads") == 1, (args[0], err)
            assert "load average 1.2 over the last minute on 2 cores" in err and "--threads 1" in err
            assert "OMP_NUM_THREADS=1" in err and len(err.splitlines()) == 1
        fake.setenv("OMP_NUM_THREADS", "2")  # a choice made
        assert main([str(a) for a in evaluate]) == 0 and "warning" not in capsys.readouterr().err
        fake.delenv("OMP_NUM_THREADS")
        assert main([str(a) for a in (*evaluate, "--no-progress")]) == 0
        assert "warning" not in capsys.readouterr().err
        _machine(fake, cpus=2, load=0.1, runnable=1)  # idle
        assert main([str(a) for a in evaluate]) == 0 and "warning" not in capsys.readouterr().err
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # --threads 1: run with one thread (manifest.json says so), no warning, the caller's number restored
        assert main([str(a) for a in (*train, "--out", folder / "one", "--threads", "1")]) == 0
        assert "warning" not in capsys.readouterr().err and torch.get_num_threads() == 2
        assert json.loads((folder / "one" / "manifest.json").read_text())["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert main([str(a) for a in (*evaluate, "--threads", "0")]) == 2
    assert "--threads N >= 1" in capsys.readouterr().err


def test_no_progress_also_silences_what_a_model_reports_from_inside(tmp_path, monkeypatch, capsys):
    """local-vi fits q(z) inside training and for its figures, with its own Progress: --no-progress reaches it."""
    monkeypatch.setenv(EVERY_VARIABLE, "0")  # every update would print a line
    options = dict(latent_dim=2, hidden=(16,), train_size=600, epochs=1, batch_size=64, tensorboard=False,
                   fit_steps=2, val_rows=20)
    pipeline.train("local-vi", "digits", out=tmp_path / "quiet", progress=False, **options)
    assert "local-vi: fitting q(z)" not in capsys.readouterr().out
    pipeline.train("local-vi", "digits", out=tmp_path / "talking", progress=True, **options)
    assert "local-vi: fitting q(z)" in capsys.readouterr().out  # the same run with progress says it
