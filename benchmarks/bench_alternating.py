"""The VAE as EM (notes 001 s3, notes 003, notes 004): joint updates against alternating encoder (E-like) and
decoder (M-like) updates (``--set updates=alternate``, the NVDM schedule), on the same data and seeds.

Three schedules per seed: ``joint`` for E epochs; ``alternate`` for E epochs (the same optimiser steps, so each
group gets half the updates); ``alternate x2`` for 2E epochs (as many updates per group as joint gets, twice the
steps). Each is scored on the test split: the ELBO (100 draws of z per image, closed-form KL) and the importance-
sampled log p(x) (K importance samples); the table gives the median over the seeds and the per-seed values.

Run:  nohup .venv/bin/python benchmarks/bench_alternating.py --out /tmp/alternating.md > /tmp/alternating.log 2>&1 &
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as common
import torch

from elbolab import loading, pipeline
from elbolab.data import load_data
from elbolab.estimators import importance_sampled_log_px
from elbolab.inference import local_elbo


def score(run: Path, test_batch, k: int) -> tuple[float, float]:
    model, _ = loading.load_run(run)
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        elbo = float(local_elbo(model, test_batch, model.encode(test_batch), 100).mean())
        log_px = importance_sampled_log_px(model, test_batch, k=k).mean
    return elbo, log_px


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden", default="128")
    parser.add_argument("--k", type=int, default=1000, help="importance samples for log p(x)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = common.machine_info()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    schedules = {"joint": ("joint", args.epochs), "alternate": ("alternate", args.epochs),
                 "alternate x2": ("alternate", 2 * args.epochs)}
    test = load_data(args.data, binarize="dynamic").test
    test_batch = test.batch(torch.arange(len(test)), torch.Generator().manual_seed(0))
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in schedules}
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.seeds):
            for name, (updates, epochs) in schedules.items():
                started = time.perf_counter()
                run = pipeline.train("vae", args.data, out=Path(work) / f"{name}-{seed}", epochs=epochs,
                                     updates=updates, latent_dim=args.latent_dim, hidden=hidden, seed=seed,
                                     binarize="dynamic", progress=False, tensorboard=False, figures=False)
                seconds = time.perf_counter() - started
                elbo, log_px = score(run, test_batch, args.k)
                results[name].append((elbo, log_px, seconds))
                print(f"seed {seed} {name}: test ELBO {elbo:.2f}, log p(x) {log_px:.2f}, {seconds:.1f} s", flush=True)
    lines = common.header_lines("VAE as EM: joint vs alternating updates", info, {
        "data": f"{args.data}, dynamically binarised; test split {len(test)} images (one binarisation, seed 0)",
        "model": f"vae, MLP {hidden}, latent {args.latent_dim}, Bernoulli decoder, Adam lr 1e-3, batch 128",
        "budget": f"{args.epochs} epochs (alternate x2: {2 * args.epochs}); seeds 0..{args.seeds - 1}",
        "scores": f"test ELBO (100 draws per image) and IS log p(x) with K = {args.k}; median over seeds",
    })
    rows = []
    for name, values in results.items():
        elbos, log_pxs, secs = zip(*values)
        rows.append([name, f"{common.median(elbos):.2f}", f"{common.median(log_pxs):.2f}",
                     f"{common.median(secs):.1f}", ", ".join(f"{e:.2f}" for e in elbos)])
    lines += common.markdown_table(["schedule", "test ELBO", "test log p(x)", "train s", "ELBO per seed"], rows)
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
