"""DDP on one CPU machine: 1 process x 2 torch threads vs 2 processes x 1 thread (torchrun, gloo on loopback).

The 784-400-20 ReLU Bernoulli VAE on the 50,000-image MNIST training split (grey levels), global batch 128, Adam
lr 1e-3, trained by ``pipeline.train`` (what ``elbolab train vae --data mnist`` runs), progress, TensorBoard and
figures off. Each run is its own process tree (``python bench_ddp.py --worker`` or ``torchrun --standalone
--nproc-per-node 2 bench_ddp.py --worker``); rounds are interleaved, the order rotated each round, because the
machine is shared. Per epoch the worker records (rank 0) the training seconds (``Trainer._train_epoch``, wrapped
here, not changed), the validation seconds and the validation ELBO; the table reports steady-state training
images/s (epochs after the first), time to a target validation ELBO (training + validation time, cumulated over
epochs), and the ratio 2x1 / 1x2 paired within each round.

``--rdzv-check`` instead tests the multi-node launch as far as one machine allows: two torchrun agents, each
started like one node of a two-node job (``--nnodes 2 --nproc-per-node 1``) meeting over loopback, once with the
c10d rendezvous (``--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT --rdzv-id ID``) and once with the static one
(``--node-rank R --master-addr 127.0.0.1 --master-port PORT``); their weights are compared with a 1-process run on
the same data.

Run:  ELBOLAB_DATA=/work/shared/data .venv/bin/python benchmarks/bench_ddp.py [--epochs 3] [--rounds 3] \
          [--train-size 20000] [--target -135]
      .venv/bin/python benchmarks/bench_ddp.py --rdzv-check [--rdzv-size 2560]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common

HERE = Path(__file__).resolve()
CONFIGS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}  # name -> (processes, torch threads per process)


# ----- the worker: one training run, run by each process -----
def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from elbolab import pipeline
    from elbolab.trainer import Trainer

    timings: list[dict] = []
    train_epoch, validate = Trainer._train_epoch, Trainer._validate

    def timed_train(self, train):
        start = time.perf_counter()
        record = train_epoch(self, train)
        timings.append({"epoch": self.epoch + 1, "train_s": time.perf_counter() - start, "images": len(train)})
        return record

    def timed_validate(self, val, *a, **k):
        start = time.perf_counter()
        record = validate(self, val, *a, **k)
        timings[-1].update(val_s=time.perf_counter() - start, val_elbo=record.get("elbo"))
        return record

    Trainer._train_epoch, Trainer._validate = timed_train, timed_validate
    started = time.perf_counter()
    pipeline.train("vae", "mnist", out=args.run_dir, data_dir=args.data_dir, epochs=args.epochs, batch_size=128,
                   hidden=(400,), latent_dim=20, activation="relu", likelihood="bernoulli", lr=1e-3,
                   train_size=args.train_size or None, progress=False, tensorboard=False, figures=False,
                   overwrite=True)
    if int(os.environ.get("RANK", "0")) == 0:
        info = {"timings": timings, "wall_s": time.perf_counter() - started,
                "world": int(os.environ.get("WORLD_SIZE", "1")), "threads": torch.get_num_threads()}
        (Path(args.run_dir) / "bench_timings.json").write_text(json.dumps(info))


# ----- the driver -----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(args, run: Path, threads: int, epochs: int | None = None, train_size: int | None = None) -> list:
    return [str(HERE), "--worker", "--run-dir", str(run), "--threads", str(threads), "--epochs",
            str(epochs or args.epochs), "--train-size", str(args.train_size if train_size is None else train_size),
            "--data-dir", args.data_dir]


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(HERE.parent.parent))


def launch(args, name: str, run: Path) -> dict:
    procs, threads = CONFIGS[name]
    if procs == 1:
        cmd = [sys.executable, *_worker_args(args, run, threads)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               *_worker_args(args, run, threads)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    info = json.loads((run / "bench_timings.json").read_text())
    info.update(process_wall_s=wall, load_before=load_before, load_after=os.getloadavg()[0])
    return info


def steady_rate(info: dict) -> float:
    steady = info["timings"][1:] or info["timings"]
    return sum(t["images"] for t in steady) / sum(t["train_s"] for t in steady)


def time_to_target(info: dict, target: float) -> tuple[float | None, int | None]:
    total = 0.0
    for t in info["timings"]:
        total += t["train_s"] + t.get("val_s", 0.0)
        if t.get("val_elbo") is not None and t["val_elbo"] >= target:
            return total, t["epoch"]
    return None, None


def benchmark(args) -> list[str]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-ddp-", dir=args.scratch))
    info = common.machine_info()
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    try:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                results[name].append(launch(args, name, scratch / f"{name}-{r}"))
                res = results[name][-1]
                print(f"round {r + 1} {name}: {steady_rate(res):,.0f} images/s, load {res['load_before']:.2f}"
                      f" -> {res['load_after']:.2f}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    extra = {"model": "784-400-20 ReLU Bernoulli VAE, MNIST grey levels, global batch 128, Adam lr 1e-3",
             "runs": f"{args.rounds} interleaved rounds x {args.epochs} epochs; steady state = epochs 2..; "
                     f"train images {args.train_size or 50000}",
             "target": f"validation ELBO >= {args.target} (time = training + validation, cumulated)",
             "load per run (1-min, before -> after)": "; ".join(
                 f"{n} {res['load_before']:.2f}->{res['load_after']:.2f}" for n in names for res in results[n])}
    lines = common.header_lines("DDP on one machine: 1 process x 2 threads vs 2 processes x 1 thread", info, extra)
    rows = []
    base = results["1x2"]
    for name in names:
        rates = [steady_rate(res) for res in results[name]]
        ttts = [time_to_target(res, args.target) for res in results[name]]
        paired = [steady_rate(a) / steady_rate(b) for a, b in zip(results[name], base)]
        vals = [t["val_s"] for res in results[name] for t in res["timings"] if "val_s" in t]
        elbos = [res["timings"][-1].get("val_elbo") for res in results[name]]
        reached = [t for t, _ in ttts if t is not None]
        rows.append([f"{CONFIGS[name][0]} process(es) x {CONFIGS[name][1]} thread(s)", common.fmt(common.median(rates)),
                     f"{common.fmt(min(rates))}-{common.fmt(max(rates))}", f"{common.median(paired):.2f}x",
                     common.fmt(common.median(vals), 2),
                     (f"{common.fmt(common.median(reached), 1)} s (epoch {ttts[0][1]})" if reached else "not reached"),
                     common.fmt(common.median([e for e in elbos if e is not None]), 2)])
    lines += common.markdown_table(
        ["configuration", "train images/s (median)", "range", "/ 1x2 (paired)", "validation s / epoch",
         f"time to val ELBO >= {args.target}", f"val ELBO after {args.epochs} epochs"], rows)
    return lines


# ----- multi-node launch, emulated with two agents on loopback -----
def rdzv_check(args) -> list[str]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-rdzv-", dir=args.scratch))
    epochs, size = 1, args.rdzv_size
    lines = common.header_lines("Multi-node torchrun launch, two agents on loopback", common.machine_info(),
                                {"data": f"MNIST, first {size} training images, 1 epoch, global batch 128"})
    try:
        # the reference: the same job as one torchrun agent with 2 processes (a VAE draws different noise on each
        # rank, so a 1-process run differs by the noise; 2 agents x 1 process must give the standalone 2 x 1 run)
        one = scratch / "standalone"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        *_worker_args(args, one, 1, epochs, size)], env=_env(1), check=True, capture_output=True)
        rows = []
        for backend in ("c10d", "static"):
            port, run = _free_port(), scratch / backend
            agents, shown = [], ""
            for node in range(2):
                if backend == "c10d":
                    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                            "--rdzv-id", f"elbolab-check-{port}"]
                else:
                    rdzv = ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                       *rdzv, *_worker_args(args, run, 1, epochs, size)]
                agents.append(subprocess.Popen(cmd, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True))
                shown = shown or " ".join(rdzv)
                time.sleep(1.0)  # the first agent hosts the c10d store
            outs = [a.communicate(timeout=600) for a in agents]
            codes = [a.returncode for a in agents]
            if any(codes):
                rows.append([backend, f"exit codes {codes}", outs[0][1][-500:].replace("\n", " "), ""])
                continue
            diff = _max_weight_difference(one, run)
            world = json.loads((run / "bench_timings.json").read_text())["world"]
            rows.append([backend, f"ok, world size {world}", f"{diff:.2e}", shown])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return lines + common.markdown_table(
        ["rendezvous", "result", "max abs weight difference vs standalone 2-process run", "flags (node 0)"], rows)


def _max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=common.data_dir_default() or "/work/shared/data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-size", type=int, default=20000, help="training images (0 = all 50,000)")
    p.add_argument("--target", type=float, default=-135.0, help="target validation ELBO (nats)")
    p.add_argument("--rdzv-check", action="store_true", help="test the multi-node launch flags on loopback")
    p.add_argument("--rdzv-size", type=int, default=2560, help="training images for --rdzv-check")
    p.add_argument("--scratch", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    common.write_output(rdzv_check(args) if args.rdzv_check else benchmark(args), args.out)


if __name__ == "__main__":
    main()
