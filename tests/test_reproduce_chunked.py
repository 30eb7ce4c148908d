"""benchmarks/reproduce/chunked.py: the planner that trains a reproduction run in chunks before a deadline and
resumes it, driven here by a fake training command that writes metrics.jsonl records (no elbolab training)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPRODUCE = Path(__file__).resolve().parent.parent / "benchmarks" / "reproduce"
sys.path.insert(0, str(REPRODUCE))
chunked = pytest.importorskip("chunked")

# writes train records for the epochs after the last one in metrics.jsonl up to the target, each "seconds" long
FAKE_TRAIN = """
import json, sys
from pathlib import Path
run, target, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
run.mkdir(exist_ok=True)
path = run / "metrics.jsonl"
done = max([json.loads(l)["epoch"] for l in path.read_text().splitlines()] if path.exists() else [0])
with open(path, "a") as f:
    for e in range(done + 1, target + 1):
        f.write(json.dumps({"epoch": e, "split": "train", "seconds": seconds}) + "\\n")
(run / "checkpoint.safetensors").write_text("x")
(run / "config.json").write_text("{}")
"""


def fake(run: Path, seconds: float, calls: list):
    def command(target: int, resume: bool) -> list[str]:
        calls.append((target, resume))
        return [sys.executable, "-c", FAKE_TRAIN, str(run), str(target), str(seconds)]
    return command


def test_a_new_run_measures_one_epoch_then_fills_the_time_left(tmp_path):
    """1 epoch first (no speed known), then as many 60-s epochs as fit in the chunk (30 min -> 28 at 1.05x), then
    the rest; each chunk is one ledger line and one after_chunk call, and the second chunk resumes."""
    run, calls, after = tmp_path / "run", [], []
    code = chunked.train_in_chunks(run, 40, fake(run, 60.0, calls), time.time() + 10 * 3600, chunk_minutes=30,
                                   after_chunk=lambda: after.append(1))
    assert code == 0
    assert calls == [(1, False), (29, True), (40, True)]
    assert len(after) == 3
    ledger = [json.loads(line) for line in chunked.sessions_path(run).read_text().splitlines()]
    assert [(r["epochs_from"], r["epochs_to"]) for r in ledger] == [(0, 1), (1, 29), (29, 40)]
    assert chunked.epochs_done(chunked.read_metrics(run)) == 40


def test_no_chunk_starts_when_the_next_epoch_does_not_fit_before_the_deadline(tmp_path):
    """With 100-s epochs and 150 s left (margin 60 s), nothing is started; the run stays as it was."""
    run, calls = tmp_path / "run", []
    chunked.train_in_chunks(run, 3, fake(run, 100.0, calls), time.time() + 1e6)  # 3 epochs of 100 s recorded
    calls.clear()
    code = chunked.train_in_chunks(run, 10, fake(run, 100.0, calls), time.time() + 150, margin_seconds=60)
    assert code == 0 and calls == []
    assert chunked.epochs_done(chunked.read_metrics(run)) == 3


def test_a_paused_epoch_does_not_set_the_plan(tmp_path):
    """The speed is the median of the recent epochs: one 5,000-s epoch (a SIGSTOP) among 10-s ones is ignored
    (and listed as slow)."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"epoch": e, "split": "train", "seconds": 5000.0 if e == 3 else 10.0} for e in range(1, 8)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 8, "spl')
    metrics = chunked.read_metrics(run)  # the cut last line is skipped
    assert chunked.epochs_done(metrics) == 7
    assert chunked.seconds_per_epoch(metrics) == 10.0
    assert chunked.slow_epochs(metrics) == [3]


def test_the_scoreboard_holds_what_the_result_files_say():
    """docs/reproductions.md's generated blocks equal the --table output of the committed result files (a number
    changed by hand in a block, or a result file committed without re-rendering the page, fails here)."""
    scoreboard = pytest.importorskip("scoreboard")
    page = scoreboard.PAGE.read_text()
    assert scoreboard.render(page, scoreboard.RESULTS) == page, "run benchmarks/reproduce/scoreboard.py"


def test_the_scoreboard_notices_a_changed_result(tmp_path):
    """The check can fail: a result file with another epoch count changes the IWAE block."""
    import shutil

    scoreboard = pytest.importorskip("scoreboard")
    results = tmp_path / "results"
    shutil.copytree(scoreboard.RESULTS, results)
    path = results / "iwae_table1_vae-k1.json"
    if not path.is_file():
        pytest.skip("no vae-k1 result file")
    record = json.loads(path.read_text())
    record["epochs_done"] += 1
    path.write_text(json.dumps(record))
    page = scoreboard.PAGE.read_text()
    assert scoreboard.render(page, results) != page
