"""What the reproduction scripts share: a time-stamped log, the CPU's name, and training an ``elbolab train`` run in
chunks that end cleanly before a deadline and continue with ``--resume`` in the next session.

A chunk's ``--epochs`` comes from the median seconds per epoch in the run's metrics.jsonl (a new run first trains one
epoch to measure it), re-planned after every chunk because the speed moves with the machine's load. One line per
finished chunk goes to ``RUN.sessions.jsonl`` beside the run folder (a chunk killed with the session is missing
there; its epochs' seconds are still in metrics.jsonl).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} UTC] {msg}", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def elbolab() -> list[str]:
    """The command that runs this interpreter's elbolab."""
    script = Path(sys.executable).with_name("elbolab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "elbolab"]


def run_logged(cmd: list[str]) -> int:
    """Runs ``cmd`` with one thread; its output goes to this script's stdout (the log file)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log("$ " + shlex.join(cmd))
    return subprocess.run(cmd, env=env).returncode


def read_metrics(run: Path) -> dict[int, dict]:
    """epoch -> {"train": record, "val": record}; the last record of an (epoch, split) wins."""
    epochs: dict[int, dict] = {}
    path = run / "metrics.jsonl"
    if not path.is_file():
        return epochs
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if "epoch" in r and "split" in r:
            epochs.setdefault(int(r["epoch"]), {})[r["split"]] = r
    return epochs


def epochs_done(metrics: dict[int, dict]) -> int:
    return max((e for e, recs in metrics.items() if "train" in recs), default=0)


def seconds_per_epoch(metrics: dict[int, dict], last: int = 20) -> float | None:
    secs = [metrics[e]["train"]["seconds"] for e in sorted(metrics) if "train" in metrics[e]
            and "seconds" in metrics[e]["train"]][-last:]
    if not secs:
        return None
    # the median: an epoch during which a neighbour paused this process (SIGSTOP, minutes) must not set the plan
    return statistics.median(secs)


def train_seconds(metrics: dict[int, dict]) -> float:
    """Wall seconds of the finished epochs, pauses included."""
    return sum(m["train"].get("seconds", 0.0) for m in metrics.values() if "train" in m)


def slow_epochs(metrics: dict[int, dict]) -> list[int]:
    """Epochs that took over 5x the median (paused or starved by other work)."""
    spe = seconds_per_epoch(metrics)
    return [e for e in sorted(metrics) if "train" in metrics[e] and spe and metrics[e]["train"].get("seconds", 0)
            > 5 * spe]


def sessions_path(run: Path) -> Path:
    return run.parent / f"{run.name}.sessions.jsonl"


def read_sessions(run: Path) -> list[dict]:
    path = sessions_path(run)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def deadline_from(hours: float | None, until: str | None) -> float:
    """The wall time (time.time()) to stop before: ``until`` HH:MM UTC today, else now + ``hours`` (default 1)."""
    if until:
        hh, mm = (int(v) for v in until.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if at <= now:
            sys.exit(f"--until {until}: that time has passed today (UTC); give --hours instead")
        return time.time() + (at - now).total_seconds()
    return time.time() + 3600 * (hours if hours is not None else 1.0)


def add_budget_arguments(parser) -> None:
    """--hours / --until, --chunk-minutes, --margin-seconds."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=float, help="stop training cleanly before this many hours from now")
    budget.add_argument("--until", help="stop training cleanly before this UTC time today, HH:MM")
    parser.add_argument("--chunk-minutes", type=float, default=30.0,
                        help="re-plan after at most this much training (the speed moves with the machine's load)")
    parser.add_argument("--margin-seconds", type=float, default=120.0, help="kept free before the deadline")


def add_output_arguments(parser) -> None:
    """--table and --figure: print the scoreboard rows / draw the figure from the result files, and exit."""
    parser.add_argument("--table", action="store_true", help="print the scoreboard rows from the result files and exit")
    parser.add_argument("--figure", help="draw the figure of every result file to this PNG and exit")


def table_or_figure(args, table: Callable, figure: Callable) -> bool:
    """Does what --table / --figure ask (``table(args)`` returns markdown, ``figure(args, path)`` draws); True when
    one of them was given (the caller then exits)."""
    if args.table:
        print(table(args))
    if args.figure:
        figure(args, Path(args.figure))
    return bool(args.table or args.figure)


def train_in_chunks(run: Path, total_epochs: int, command: Callable[[int, bool], list[str]], deadline: float, *,
                    chunk_minutes: float = 30.0, margin_seconds: float = 120.0,
                    after_chunk: Callable[[], None] | None = None) -> int:
    """Trains ``run`` towards ``total_epochs`` until no further epoch fits before ``deadline``; returns the last exit
    code. ``command(target_epoch, resume)`` builds the ``elbolab train`` call of one chunk; ``after_chunk`` runs
    after each (e.g. to rewrite a result file)."""
    name = run.name
    code = 0
    while True:
        metrics = read_metrics(run)
        done = epochs_done(metrics)
        if done >= total_epochs:
            log(f"{name}: all {total_epochs:,} epochs done")
            return code
        resume = (run / "checkpoint.safetensors").is_file() and (run / "config.json").is_file()
        spe = seconds_per_epoch(metrics)
        left = deadline - time.time() - margin_seconds
        if spe is None:  # a new run: one epoch first, to measure the speed
            target = done + 1 if left > 60 else done
        else:
            target = min(total_epochs, done + int(min(left, 60 * chunk_minutes) // (spe * 1.05)))
        if target <= done:
            log(f"{name}: no further epoch fits before the deadline ({done} done, {spe or float('nan'):.1f} s/epoch)")
            return code
        log(f"{name}: {done} epochs done, {spe or float('nan'):.2f} s/epoch measured; training to epoch {target}")
        chunk_start = time.time()
        code = run_logged(command(target, resume))
        record = {"started": dt.datetime.fromtimestamp(chunk_start, dt.timezone.utc).isoformat(timespec="seconds"),
                  "epochs_from": done, "epochs_to": epochs_done(read_metrics(run)),
                  "wall_seconds": round(time.time() - chunk_start, 1), "exit_code": code, "cpu": cpu_model(),
                  "load_at_end": round(os.getloadavg()[0], 2)}
        with open(sessions_path(run), "a") as f:
            f.write(json.dumps(record) + "\n")
        if after_chunk is not None:
            after_chunk()
        if code != 0:
            log(f"{name}: elbolab train exited with {code}; stopping")
            return code


def evaluate_run(run: Path, data_dir: str | None, k: int, limit: int, epoch: int) -> dict | None:
    """``elbolab eval RUN --iw-samples K`` on the test set (the first ``limit`` images, or all with 0); returns the
    small record a result file keeps, or None when the evaluation failed."""
    cmd = elbolab() + ["eval", str(run), "--iw-samples", str(k), "--seed", "0", "--no-progress"]
    cmd += ["--data-dir", data_dir] if data_dir else []
    cmd += ["--limit", str(limit)] if limit else []
    start = time.time()
    if run_logged(cmd) != 0:
        log("evaluation failed (see above)")
        return None
    r = json.loads((run / "eval.json").read_text())
    lp = r["log_px"]
    se = lp.get("stderr_over_examples")
    return {"epoch": epoch, "k": lp.get("k", k), "n_examples": lp.get("n_examples", r.get("n_examples")),
            "test_nll": round(-lp["mean"], 4), "mc_stderr": round(lp["mc_stderr"], 4),
            "stderr_over_examples": round(se, 4) if se is not None else None,
            "ess_mean": lp.get("ess_mean"), "elbo": r.get("elbo"), "active_units": r.get("active_units"),
            "active_units_per_group": r.get("active_units_per_group"),
            "latent_dim": r.get("latent_dim"), "weights": r.get("weights"), "precision": r.get("precision"),
            "evaluated_at": r.get("evaluated_at"), "seconds": round(time.time() - start, 1),
            "command": shlex.join(["elbolab", *cmd[1:]])}


def progress_figure(path: Path, results: dict[str, dict], papers: dict[str, float | None], *, held_out: str,
                    marks: list[int], marks_label: str, last_epoch: int, title: str) -> None:
    """-(validation ELBO) against epochs (log axis) per contender from its result file's "curve", its test NLL
    evaluations as points, the paper's value dashed, and grey vertical lines at ``marks``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        c = r["curve"]
        pts = [(e, -v) for e, v in zip(c["epoch"], c["val_elbo"]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), color=color, lw=1.2, label=f"{name}: -ELBO, {held_out}")
            values += [v for _, v in pts[len(pts) // 10:]]
        evals = [(e["epoch"], e["test_nll"]) for e in r.get("test_evaluations", [])]
        if evals:
            ax.plot(*zip(*evals), "o", color=color, label=f"{name}: test NLL (IS)")
            values += [v for _, v in evals]
        if papers.get(name) is not None:
            ax.axhline(papers[name], color=color, ls="--", lw=0.8, label=f"{name}: paper {papers[name]}")
            values.append(papers[name])
    for mark in marks:
        ax.axvline(mark, color="0.85", lw=0.6, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(1, last_epoch)
    if values:
        ax.set_ylim(min(values) - 2, max(values) + 2)
    ax.set_xlabel(f"epoch (grey: {marks_label})")
    ax.set_ylabel("nats")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
