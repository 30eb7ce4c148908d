"""The IWAE paper's Table 1 on its own protocol, one contender per call, resumable across sessions.

Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders" (ICLR), Table 1, MNIST column (test NLL in
nats, K = 5000): one stochastic layer VAE 86.76, IWAE k=5 85.54, IWAE k=50 84.78; two stochastic layers VAE 85.33,
IWAE k=5 83.89, IWAE k=50 82.90 (numbers as the project's notes and benchmarks/bench_iwae_table.py quote them).

The protocol (the authors' code, github.com/yburda/iwae, experiments.py / datasets.py / optimizers.py):
  * MNIST with a fresh Bernoulli draw of every training image at every use (``--binarize dynamic``); the code trains
    on the first 59,600 training images and holds out 400 (unused for model selection): here ``--val-size 400``,
    a random 400 held out (seed 0), so 59,600 training images as well; the full 10,000 test images.
  * One layer: 784-200-200-50 tanh (both networks); two layers: x -> 200-200 -> z1 (100) -> 100-100 -> z2 (50) and
    back, tanh (hvae / hiwae with latent_dims=100,50, hidden 200,100, two deterministic layers per block).
  * Adam, epsilon 1e-4, batch 20; stage i = 0..7 lasts 3^i epochs at lr 1e-3 * 10^(-i/7) (3,280 epochs):
    ``--schedule lr=geometric:0.001:0.7196857:1:3``.
  * Test log p(x) by importance sampling with K = 5000 on the full test set (``elbolab eval --iw-samples 5000``).

What this script does, per call: train the contender NAME in RUNS/NAME (default /work/runs/iwae_table1/NAME, outside
the repository) with ``elbolab train``, resuming with ``--resume`` when the folder holds a checkpoint, for at most
--hours (or until --until HH:MM UTC): it trains in chunks, each chunk's --epochs chosen from the measured seconds per
epoch (metrics.jsonl) so that training stops cleanly before the deadline; then, when the 3,280 epochs are done (or
with --evaluate), runs ``elbolab eval RUN --iw-samples K`` if it fits; and writes the small result file
benchmarks/reproduce/results/iwae_table1_NAME.json (epochs done, hours, CPU, precision, the thinned ELBO curve, the
test evaluations). Weights stay in the run folder; nothing under the repository grows beyond that JSON.

One command re-runs or continues a row:
  OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/reproduce/iwae_table1.py vae-k1 --hours 6 \\
      >> /work/runs/iwae_table1/vae-k1.log 2>&1 &
Only the result file (no training):  .venv/bin/python benchmarks/reproduce/iwae_table1.py vae-k1 --report-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from chunked import (
    add_budget_arguments,
    add_output_arguments,
    cpu_model,
    deadline_from,
    elbolab,
    epochs_done,
    evaluate_run,
    log,
    progress_figure,
    read_metrics,
    read_sessions,
    seconds_per_epoch,
    slow_epochs,
    table_or_figure,
    train_in_chunks,
    train_seconds,
)

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
RUNS_DEFAULT = Path("/work/runs/iwae_table1")
DATA_DIR_DEFAULT = os.environ.get("ELBOLAB_DATA", "/work/shared/data")
SCHEDULE = "geometric:0.001:0.7196857:1:3"
SCHEDULE_EPOCHS = 3280  # sum of 3^i, i = 0..7
STAGE_ENDS = [1, 4, 13, 40, 121, 364, 1093, 3280]  # the epoch at which each learning-rate stage ends
VAL_SIZE = 400  # the authors' code holds out 400 of the 60,000 training images (datasets.binarized_mnist)

ONE_LAYER = ["--hidden", "200,200", "--latent-dim", "50", "--activation", "tanh"]
TWO_LAYERS = ["--set", "latent_dims=100,50", "--hidden", "200,100", "--activation", "tanh"]
# name -> (elbolab model, its arguments, the paper's test NLL, Table 1 row)
CONTENDERS = {
    "vae-k1": ("vae", ONE_LAYER, 86.76, "MNIST, 1 stochastic layer, VAE, k = 1"),
    "iwae-k5": ("iwae", ONE_LAYER + ["--set", "k=5"], 85.54, "MNIST, 1 stochastic layer, IWAE, k = 5"),
    "iwae-k50": ("iwae", ONE_LAYER + ["--set", "k=50"], 84.78, "MNIST, 1 stochastic layer, IWAE, k = 50"),
    "vae-2layer": ("hvae", TWO_LAYERS, 85.33, "MNIST, 2 stochastic layers, VAE, k = 1"),
    "iwae-2layer-k5": ("hiwae", TWO_LAYERS + ["--set", "k=5"], 83.89, "MNIST, 2 stochastic layers, IWAE, k = 5"),
    "iwae-2layer-k50": ("hiwae", TWO_LAYERS + ["--set", "k=50"], 82.90, "MNIST, 2 stochastic layers, IWAE, k = 50"),
}
EVAL_SECONDS_PER_IMAGE = 0.1  # K = 5000, one thread, one stochastic layer (measured 2026-12-07); a first guess only


def train_command(name: str, run: Path, target: int, args, resume: bool) -> list[str]:
    common = ["--epochs", str(target), "--checkpoint-every", str(args.checkpoint_every), "--no-progress",
              "--no-tensorboard"]
    if resume:
        return elbolab() + ["train", "--out", str(run), "--resume", *common]
    model, extra, _, _ = CONTENDERS[name]
    return elbolab() + ["train", model, "--out", str(run), "--data", "mnist", "--data-dir", args.data_dir,
                        "--binarize", "dynamic", "--val-size", str(VAL_SIZE), *extra, "--batch-size", "20",
                        "--lr", "1e-3", "--adam-eps", "1e-4", "--schedule", f"lr={SCHEDULE}", "--seed",
                        str(args.seed), "--precision", args.precision, *common]


def thin_curve(metrics: dict[int, dict]) -> dict:
    """Every epoch up to 100, then every 10th to 1,000, every 30th beyond, plus each stage's end and the last."""
    done = epochs_done(metrics)
    keep = sorted({e for e in metrics if "train" in metrics[e] and (
        e <= 100 or (e <= 1000 and e % 10 == 0) or e % 30 == 0 or e in STAGE_ENDS or e == done)})
    curve: dict[str, list] = {"epoch": keep, "lr": [], "train_elbo": [], "val_elbo": []}
    bound = any("iwae_bound" in metrics[e]["train"] for e in keep)
    if bound:
        curve["train_iwae_bound"], curve["val_iwae_bound"] = [], []
    for e in keep:
        tr, va = metrics[e]["train"], metrics[e].get("val", {})
        curve["lr"].append(tr.get("lr"))
        curve["train_elbo"].append(round(tr["elbo"], 3) if "elbo" in tr else None)
        curve["val_elbo"].append(round(va["elbo"], 3) if "elbo" in va else None)
        if bound:
            curve["train_iwae_bound"].append(round(tr["iwae_bound"], 3) if "iwae_bound" in tr else None)
            curve["val_iwae_bound"].append(round(va["iwae_bound"], 3) if "iwae_bound" in va else None)
    return curve


def write_result(name: str, run: Path, args, evaluations: list[dict]) -> Path:
    model, extra, paper, row = CONTENDERS[name]
    metrics = read_metrics(run)
    done = epochs_done(metrics)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    sessions = read_sessions(run)
    spe = seconds_per_epoch(metrics)
    last = evaluations[-1] if evaluations else None
    complete = done >= SCHEDULE_EPOCHS
    status = ("complete" if complete and last and last["epoch"] >= SCHEDULE_EPOCHS and not (last["n_examples"] or 0)
              < 10000 else f"in progress: {done} of {SCHEDULE_EPOCHS:,} epochs")
    result = {
        "contender": name,
        "paper": {"source": "Burda, Grosse & Salakhutdinov 2016, Importance Weighted Autoencoders, Table 1",
                  "row": row, "test_nll": paper,
                  "verified": "quoted from the project's notes / benchmarks/bench_iwae_table.py, not re-read from "
                              "the paper's PDF in this session"},
        "protocol": {"data": f"MNIST, dynamic binarisation, {60000 - VAL_SIZE:,} training images ({VAL_SIZE} held "
                             "out, seed 0, as the authors' code holds out 400), full 10,000 test images",
                     "model": f"elbolab {model} {' '.join(extra)}",
                     "optimiser": "Adam (torch: beta1 0.9, beta2 0.999), eps 1e-4, batch 20",
                     "schedule": f"lr={SCHEDULE}: 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7 "
                                 f"({SCHEDULE_EPOCHS:,} epochs)",
                     "evaluation": f"elbolab eval --iw-samples {args.eval_k} on the test set"},
        "status": status,
        "epochs_done": done,
        "schedule_epochs": SCHEDULE_EPOCHS,
        "train_hours": round(train_seconds(metrics) / 3600, 3),  # wall seconds of the epochs, pauses included
        "slow_epochs": slow_epochs(metrics),  # paused or starved (> 5x the median)
        "wall_hours_chunks": round(sum(s.get("wall_seconds", 0.0) for s in sessions) / 3600, 3),
        "seconds_per_epoch_recent": round(spe, 3) if spe else None,
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": 1,
        "precision": config.get("train_config", {}).get("precision"),
        "seed": config.get("train_config", {}).get("seed"),
        "run_dir": str(run),
        "command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce/iwae_table1.py {name} --hours H "
                   f"(resumes {run})",
        "test": last,
        "test_evaluations": evaluations,
        "chunks": sessions,
        "curve": thin_curve(metrics),
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"iwae_table1_{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def previous_evaluations(name: str, args) -> list[dict]:
    out = Path(args.results_dir) / f"iwae_table1_{name}.json"
    if out.is_file():
        try:
            return json.loads(out.read_text()).get("test_evaluations", [])
        except ValueError:
            return []
    return []


def load_results(args) -> dict[str, dict]:
    out = {}
    for name in CONTENDERS:
        path = Path(args.results_dir) / f"iwae_table1_{name}.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())
    return out


def markdown_table(args) -> str:
    """The scoreboard's IWAE rows, from the result files only (a contender without one: 'not run yet')."""
    results = load_results(args)
    lines = ["| Table 1 row | paper NLL | ours: test NLL (MC s.e.) | budget so far | verdict | command |",
             "|---|---|---|---|---|---|"]
    for name, (_, _, paper, row) in CONTENDERS.items():
        cmd = f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce/iwae_table1.py {name} --hours H`"
        r = results.get(name)
        if r is None:
            lines.append(f"| {row} | {paper:.2f} | not run yet | - | - | {cmd} |")
            continue
        test = r.get("test")
        if test:
            ours = (f"{test['test_nll']:.2f} (MC s.e. {test['mc_stderr']:.3f}; K = {test['k']}, "
                    f"{test['n_examples']:,} test images, epoch {test['epoch']:,})")
        else:
            ours = "no test evaluation yet"
        last_val = next((v for v in reversed(r["curve"]["val_elbo"]) if v is not None), None)
        if last_val is not None:
            ours += f"; val ELBO {last_val:.2f} at epoch {r['epochs_done']:,}"
        budget = (f"{r['epochs_done']:,} of {r['schedule_epochs']:,} epochs, {r['train_hours']:.2f} h training "
                  f"({r['seconds_per_epoch_recent']} s/epoch recently), {r['cpu']}, 1 thread, {r['precision']}")
        if r["status"] == "complete" and test:
            diff = test["test_nll"] - paper
            verdict = (f"{'reproduced' if abs(diff) <= 0.5 else 'not reproduced'}: {diff:+.2f} nats from the paper")
        else:
            verdict = f"{r['status']}; resumed by the command"
        lines.append(f"| {row} | {paper:.2f} | {ours} | {budget} | {verdict} | {cmd} |")
    return "\n".join(lines)


def figure(args, path: Path) -> None:
    """-(validation ELBO) against epochs (log axis) per contender, and the test NLL evaluations as points."""
    progress_figure(path, load_results(args), {name: c[2] for name, c in CONTENDERS.items()},
                    held_out=f"{VAL_SIZE} held-out images", marks=STAGE_ENDS,
                    marks_label="ends of the learning-rate stages", last_epoch=SCHEDULE_EPOCHS,
                    title="IWAE paper, Table 1 protocol: progress per contender")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", choices=list(CONTENDERS))
    add_budget_arguments(p)
    p.add_argument("--runs-dir", default=str(RUNS_DEFAULT), help="run folders (outside the repository)")
    p.add_argument("--data-dir", default=DATA_DIR_DEFAULT)
    p.add_argument("--results-dir", default=str(RESULTS), help="where the result JSON goes (a test: elsewhere)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="a new run's precision")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="also checkpoint every N steps in an epoch")
    p.add_argument("--evaluate", action="store_true", help="evaluate now even if the schedule is not complete")
    p.add_argument("--no-evaluate", action="store_true", help="never evaluate (not even at the schedule's end)")
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=0, help="first N test images only (0: all 10,000)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the result file")
    add_output_arguments(p)
    args = p.parse_args(argv)
    if table_or_figure(args, markdown_table, figure):
        return 0
    if args.name is None:
        p.error("a contender name is needed (or --table / --figure)")
    name = args.name
    run = Path(args.runs_dir) / name
    run.parent.mkdir(parents=True, exist_ok=True)
    evaluations = previous_evaluations(name, args)
    if args.report_only:
        log(f"wrote {write_result(name, run, args, evaluations)}")
        return 0

    deadline = deadline_from(args.hours, args.until)
    log(f"{name}: run folder {run}; deadline "
        f"{dt.datetime.fromtimestamp(deadline, dt.timezone.utc).strftime('%H:%M:%S')} UTC; CPU {cpu_model()}; "
        f"load {os.getloadavg()[0]:.2f}")
    code = train_in_chunks(run, SCHEDULE_EPOCHS, lambda target, resume: train_command(name, run, target, args, resume),
                           deadline, chunk_minutes=args.chunk_minutes, margin_seconds=args.margin_seconds,
                           after_chunk=lambda: write_result(name, run, args, evaluations))
    done = epochs_done(read_metrics(run))

    want_eval = (not args.no_evaluate and code == 0 and done > 0 and (args.evaluate or done >= SCHEDULE_EPOCHS))
    if want_eval and any(e["epoch"] == done and e["k"] == args.eval_k and e["n_examples"] ==
                         (args.eval_limit or 10000) for e in evaluations):
        log(f"{name}: already evaluated at epoch {done} with K = {args.eval_k}")
        want_eval = False
    if want_eval:
        n = args.eval_limit or 10000
        per_image = EVAL_SECONDS_PER_IMAGE * (1.5 if "2layer" in name else 1.0)
        timed = [e["seconds"] / e["n_examples"] for e in evaluations  # same K, enough images to time
                 if e.get("k") == args.eval_k and (e.get("n_examples") or 0) >= 200]
        if timed:
            per_image = max(timed)
        need = n * per_image * 1.2 + 30
        if time.time() + need > deadline:
            log(f"{name}: evaluation needs about {need / 60:.0f} min, more than is left before the deadline; "
                "the next call evaluates")
        else:
            record = evaluate_run(run, args.data_dir, args.eval_k, args.eval_limit, done)
            if record:
                evaluations.append(record)
                log(f"{name}: test NLL {record['test_nll']:.2f} (MC s.e. {record['mc_stderr']:.3f}, "
                    f"K = {record['k']}, {record['n_examples']} images) at epoch {done}")
    out = write_result(name, run, args, evaluations)
    log(f"{name}: wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
