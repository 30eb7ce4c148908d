"""The IWAE paper's table 1 on this machine: VAE and IWAE (k = 5, 50), one and two stochastic layers, and the
Ladder VAE, on dynamically binarised MNIST; test log p(x) with K importance samples, next to the papers' numbers.

Burda, Grosse & Salakhutdinov 2016, table 1 (test NLL, nats; 3,280 passes with their learning-rate schedule):
one stochastic layer (784-200-200-50 tanh): VAE 86.76, IWAE k=5 85.54, k=50 84.78; two layers (+ 100-100-50):
VAE 85.33, IWAE k=5 83.89, k=50 82.90. Sonderby et al. 2016, Table 1: the plain five-layer Ladder VAE trained on
the ELBO (batch norm, warm-up) 82.12, the row run here; their best variant (+ fine-tuning + importance-weighted
training, k = 10) 81.74 needs the importance-weighted ladder, which elbolab does not have yet.

Each contender is one `elbolab train` run (the CLI, as a user would run it) with the same budget (--epochs,
--batch-size, Adam lr with an optional --lr-schedule), run --jobs at a time with one torch thread each; then each is
evaluated in this process on the same test images (binarised once with seed 0, the first --eval-limit of them) with
--eval-k importance samples, keeping the per-example estimates so that every model is compared with the one-layer
VAE as a paired difference (mean and s.e. over the same images). The table states the budget, the wall times, and
the Monte-Carlo s.e. of each log p(x).

Run:  ELBOLAB_DATA=/work/shared/data nohup .venv/bin/python benchmarks/bench_iwae_table.py --workdir /tmp/iwae \
        --epochs 20 --eval-k 5000 --eval-limit 2000 --out /tmp/iwae/table.md > /tmp/iwae.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as common
import numpy as np
import torch

ONE_LAYER = ["--hidden", "200,200", "--latent-dim", "50", "--activation", "tanh"]
TWO_LAYERS = ["--set", "latent_dims=100,50", "--hidden", "200,100", "--activation", "tanh"]
# name -> (model, extra CLI arguments, the paper's test NLL)
CONTENDERS = {
    "vae": ("vae", ONE_LAYER, 86.76),
    "iwae-k5": ("iwae", ONE_LAYER + ["--set", "k=5"], 85.54),
    "iwae-k50": ("iwae", ONE_LAYER + ["--set", "k=50"], 84.78),
    # the paper's second architecture: z1 of 100 (bottom) under 200-200 tanh, z2 of 50 under 100-100 tanh
    "vae-2layer": ("hvae", TWO_LAYERS, 85.33),
    "iwae-2layer-k5": ("hiwae", TWO_LAYERS + ["--set", "k=5"], 83.89),
    "iwae-2layer-k50": ("hiwae", TWO_LAYERS + ["--set", "k=50"], 82.90),
    "ladder-vae": ("ladder-vae", [], 82.12),  # Sonderby et al. Table 1, the plain model on the ELBO
}


def elbolab_cli() -> list[str]:
    script = Path(sys.executable).with_name("elbolab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "elbolab"]


def train_command(name: str, run: Path, args) -> list[str]:
    model, extra, _ = CONTENDERS[name]
    cmd = elbolab_cli() + ["train", model, "--data", "mnist", "--binarize", "dynamic", "--val-size", "1000",
                           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                           "--adam-eps", "1e-4", "--seed", str(args.seed), "--out", str(run),
                           "--no-tensorboard", *extra]
    if args.lr_schedule:
        cmd += ["--schedule", f"lr={args.lr_schedule}"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd


def train_all(names: list[str], args, workdir: Path) -> dict[str, float]:
    """Train the contenders --jobs at a time (one torch thread each); resumes a run whose folder exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running, seconds = list(names), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            run = workdir / name
            if (run / "model.safetensors").exists() and (run / "manifest.json").exists():
                seconds[name] = json.loads((run / "manifest.json").read_text()).get("wall_time_s", float("nan"))
                print(f"{name}: already trained ({run})", flush=True)
                continue
            log = open(workdir / f"{name}.train.log", "w")
            cmd = train_command(name, run, args)
            print("$ " + " ".join(cmd), flush=True)
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
        for name, (proc, started, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                seconds[name] = time.time() - started
                print(f"{name}: exit {proc.returncode} after {seconds[name]:.0f} s", flush=True)
                if proc.returncode != 0:
                    print((workdir / f"{name}.train.log").read_text()[-2000:], flush=True)
                del running[name]
        time.sleep(2)
    return seconds


def evaluate_all(names: list[str], args, workdir: Path) -> dict[str, dict]:
    from elbolab import loading
    from elbolab.data import load_data
    from elbolab.evaluate import evaluate_model

    test = load_data("mnist", data_dir=args.data_dir, binarize="dynamic", seed=0, val_size=1000).test
    test = test.head(min(args.eval_limit or len(test), len(test)))
    results = {}
    for name in names:
        run = workdir / name
        cached = workdir / f"{name}.eval.json"
        if cached.exists() and (workdir / f"{name}.per_example.npy").exists():
            results[name] = json.loads(cached.read_text())
            results[name]["per_example"] = np.load(workdir / f"{name}.per_example.npy")
            continue
        if not (run / "model.safetensors").exists():
            print(f"{name}: no trained model, skipped", flush=True)
            continue
        model, _ = loading.load_run(run)
        start = time.perf_counter()
        result, per_example = evaluate_model(model, test, k=args.eval_k, seed=0, return_per_example=True)
        result["eval_seconds"] = time.perf_counter() - start
        cached.write_text(json.dumps(result, indent=2))
        np.save(workdir / f"{name}.per_example.npy", per_example.numpy())
        result["per_example"] = per_example.numpy()
        results[name] = result
        print(f"{name}: log p(x) {result['log_px']['mean']:.2f} (MC s.e. {result['log_px']['mc_stderr']:.3f}) "
              f"in {result['eval_seconds']:.0f} s", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="run folders and cached evaluations (re-running resumes)")
    p.add_argument("--data-dir", default=common.data_dir_default())
    p.add_argument("--only", default="vae,iwae-k5,iwae-k50", help=f"comma-separated, from {', '.join(CONTENDERS)}")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="", help="e.g. step:0.001:0.7:10 (passed as --schedule lr=...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (one torch thread each)")
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=0, help="first N test images (0: all 10,000)")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS, help="torch threads for the evaluation")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        sys.exit(f"unknown contenders {unknown}; expected some of {list(CONTENDERS)}")
    if common.data_dir_default() is None and args.data_dir is None:
        sys.exit("MNIST not found: set ELBOLAB_DATA to a folder holding mnist/ (skipped)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    seconds = train_all(names, args, workdir)
    common.set_threads(args.threads)
    results = evaluate_all(names, args, workdir)
    base = results.get("vae")
    rows = []
    for name in names:
        if name not in results:
            rows.append([name, "not run", "", "", "", "", "", f"{CONTENDERS[name][2]:.2f}"])
            continue
        r = results[name]
        diff = ""
        if base is not None and name != "vae":
            d = r["per_example"] - base["per_example"]
            diff = f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(len(d)):.2f}"
        rows.append([name, f"{-r['log_px']['mean']:.2f}", f"{r['log_px']['mc_stderr']:.3f}",
                     f"{-r['elbo']:.2f}" if r.get("elbo") is not None else "", f"{r['active_units']} / "
                     f"{r['latent_dim']}", diff, f"{seconds.get(name, float('nan')) / 60:.1f} + "
                     f"{r['eval_seconds'] / 60:.1f}", f"{CONTENDERS[name][2]:.2f}"])
    n_test = len(base["per_example"]) if base is not None else args.eval_limit
    lines = common.header_lines(
        "The IWAE paper's table 1 (test NLL, dynamically binarised MNIST)", info,
        {"budget": f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}"
                   + (f" scheduled {args.lr_schedule}" if args.lr_schedule else "") + ", eps 1e-4, seed "
                   f"{args.seed}; {args.jobs} trainings at a time, one torch thread each (the paper: 3,280 epochs)",
         "evaluation": f"K = {args.eval_k} importance samples on the first {n_test} test images (binarised once, "
                       "seed 0), the same images and draws for every model"})
    lines += common.markdown_table(
        ["model", "test NLL (nats)", "MC s.e.", "-ELBO", "active units", "log p(x) - VAE's (paired, s.e.)",
         "train + eval (min)", "paper NLL"], rows)
    lines += ["", "NLL = -log p(x) estimated with K importance samples (a stochastic upper bound on the true NLL); "
              "MC s.e. is its Monte-Carlo standard error (delta method); the paired column is this model's log p(x) "
              "minus the one-layer VAE's on the same images, with the s.e. over images."]
    common.write_output(lines, args.out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
