"""Soak test of the run folder: random kills and interrupts across train, eval and report on a small model; every
interrupted training resumed to the end must match an uninterrupted run bit for bit, and every folder must stay
loadable (load_run, eval, report).

Each trial starts ``elbolab train`` (mid-epoch checkpoints every few steps), stops it after a random delay with
SIGKILL or SIGINT (Ctrl-C), resumes it with further random stops until it completes, and compares the final weights
with the uninterrupted reference; then it stops an ``elbolab eval`` and an ``elbolab report`` the same way and checks
that the folder still loads, evaluates and reports.

Run:  .venv/bin/python benchmarks/bench_soak.py --trials 50 --workdir /tmp/soak --out /tmp/soak/soak.json
      .venv/bin/python benchmarks/bench_soak.py --smoke          # 2 trials, a few seconds of training each
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TRAIN = ["train", "vae", "--data", "digits", "--hidden", "64", "--latent-dim", "4", "--batch-size", "32",
         "--checkpoint-every", "7", "--no-progress", "--no-tensorboard", "--seed", "3"]


def elbolab() -> list[str]:
    script = Path(sys.executable).with_name("elbolab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "elbolab"]


LAST_ERROR: list[str] = [""]


def run_until(cmd: list[str], delay: float, how: signal.Signals) -> int | None:
    """Start ``cmd``, stop it with ``how`` after ``delay`` seconds unless it finished; its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               start_new_session=True, text=True)
    try:
        _, err = process.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(how)
        _, err = process.communicate()
    LAST_ERROR[0] = (err or "").strip()[-400:]
    return process.returncode


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def trial(rng: random.Random, folder: Path, reference: Path, epochs: int, max_delay: float) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    stops, command = 0, elbolab() + TRAIN + ["--epochs", str(epochs), "--out", str(folder)]
    code = run_until(command, rng.uniform(0.5, max_delay), rng.choice([signal.SIGKILL, signal.SIGINT]))
    planned = rng.randint(1, 3)  # stops in this trial; after them the run is left to finish
    while code != 0 and stops < planned + 1:
        stops += 1
        has_checkpoint = (folder / "checkpoint.safetensors").is_file()
        again = elbolab() + (["train", "--out", str(folder), "--resume", "--no-progress"] if has_checkpoint
                             else TRAIN + ["--epochs", str(epochs), "--out", str(folder)])
        delay = rng.uniform(0.5, 2 * max_delay) if stops < planned else 600.0
        code = run_until(again, delay, rng.choice([signal.SIGKILL, signal.SIGINT]))
        if code != 0 and "has already trained" in LAST_ERROR[0]:  # stopped while drawing its report: complete
            code = 0
    identical = code == 0 and same_weights(folder, reference)
    train_error = None if code == 0 else LAST_ERROR[0]
    # interrupt an evaluation and a report, then check the folder still loads, evaluates and reports
    for cmd in (["eval", str(folder), "--iw-samples", "2000"], ["report", str(folder)]):
        run_until(elbolab() + cmd, rng.uniform(0.2, 3.0), rng.choice([signal.SIGKILL, signal.SIGINT]))
    check = subprocess.run(elbolab() + ["eval", str(folder), "--iw-samples", "20", "--limit", "20"],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return {"stops": stops, "completed": code == 0, "train_error": train_error, "bit_identical": identical,
            "loadable": check.returncode == 0, "eval_error": check.stderr.strip()[-300:] if check.returncode else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-delay", type=float, default=6.0, help="seconds before a stop, at most")
    parser.add_argument("--workdir", default="/tmp/elbolab-soak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="a JSON file for the results")
    parser.add_argument("--smoke", action="store_true", help="2 trials of 2 epochs (a check that the script runs)")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.epochs, args.max_delay = 2, 2, 3.0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    subprocess.run(elbolab() + TRAIN + ["--epochs", str(args.epochs), "--out", str(reference)], check=True,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    rng, results, started = random.Random(args.seed), [], time.perf_counter()
    for i in range(args.trials):
        results.append(trial(rng, work / "trial", reference, args.epochs, args.max_delay))
        r = results[-1]
        print(f"trial {i + 1}/{args.trials}: {r['stops']} stops, completed {r['completed']}, bit-identical "
              f"{r['bit_identical']}, loadable {r['loadable']}", flush=True)
    summary = {"trials": len(results), "stops": sum(r["stops"] for r in results),
               "bit_identical": sum(r["bit_identical"] for r in results),
               "loadable": sum(r["loadable"] for r in results), "seconds": round(time.perf_counter() - started, 1),
               "results": results}
    print(f"{summary['bit_identical']} of {summary['trials']} trials resumed bit-identically after "
          f"{summary['stops']} stops; {summary['loadable']} of {summary['trials']} folders loadable after "
          "interrupted eval and report")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if summary["bit_identical"] != summary["trials"] or summary["loadable"] != summary["trials"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
