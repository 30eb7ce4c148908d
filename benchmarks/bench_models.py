"""Every registered model's training speed next to its arithmetic: images per second, FLOPs per image (counted by
torch.utils.flop_counter on one training step: forward, backward), and the achieved GFLOP/s, each as a ratio to
the plain VAE's, in one process, interleaved rounds, one thread.

A model far below the VAE's achieved GFLOP/s spends its time outside matrix products (Python, small kernels,
sampling); one near it is as fast as its arithmetic allows.

Run:  .venv/bin/python benchmarks/bench_models.py --rounds 3 --steps 30 --out /tmp/models.json
      .venv/bin/python benchmarks/bench_models.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from elbolab.data.core import Batch
from elbolab.models import available_models
from elbolab.optim import adam
from elbolab.schedules import StepContext

# a model's options and data for an MNIST-sized problem (784 binary pixels, or 64x64 sprites for the conv ones)
SETTINGS = {
    "vae": {}, "iwae": {}, "hiwae": {}, "hvae": {}, "ladder-vae": {}, "beta-vae": {}, "beta-tcvae": {},
    "flow-vae": {}, "vampprior": {"pseudo_inputs": 500}, "autoencoder": {}, "vade": {"hidden": (500, 500, 2000)},
    "local-vi": {}, "vae-optimal-prior": {}, "cvae": {}, "factor-vae": {}, "nvdm": {},
}
NEEDS = {"cvae": "labels", "nvdm": "counts", "local-vi": "index", "factor-vae": "sprites", "beta-vae": "sprites"}


def make_batch(name: str, size: int, generator: torch.Generator) -> tuple[Batch, dict]:
    """A random batch of the kind the model trains on, and the config's data fields."""
    need = NEEDS.get(name)
    if need == "sprites":
        x = (torch.rand(size, 4096, generator=generator) < 0.1).float()
        return Batch(x), {"input_dim": 4096, "image_shape": (1, 64, 64), "architecture": "conv"}
    if need == "counts":
        x = torch.poisson(torch.full((size, 2000), 0.05), generator=generator)
        return Batch(x), {"input_dim": 2000}
    x = (torch.rand(size, 784, generator=generator) < 0.13).float()
    fields = {"input_dim": 784, "image_shape": (1, 28, 28)}
    if need == "labels":
        return Batch(x, y=torch.randint(10, (size,), generator=generator)), {**fields, "n_classes": 10}
    if need == "index":
        return Batch(x, index=torch.arange(size)), {**fields, "n_train": size}
    return Batch(x), fields


def build(name: str, batch_size: int):
    cls = available_models()[name]
    generator = torch.Generator().manual_seed(0)
    batch, fields = make_batch(name, batch_size, generator)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    options = {k: v for k, v in {**fields, **SETTINGS.get(name, {})}.items() if k in names}
    if "architecture" in options and "architecture" not in names:
        options.pop("architecture")
    torch.manual_seed(0)
    model = cls(cls.config_class(**options))
    model.train()
    groups = model.parameter_groups()
    optimizers = {g: adam(p, {"lr": 1e-3}) for g, p in groups.items()}
    return model, batch, groups, optimizers


def step(model, batch, groups, optimizers, index: int) -> None:
    out = model(batch, StepContext(step=index, epoch=0.0, values={"beta": 1.0}))
    names = [g for g in groups if out.losses.get(g) is not None]
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    for j, g in enumerate(names):
        out.losses[g].backward(inputs=groups[g], retain_graph=j < len(names) - 1)
    for g in names:
        optimizers[g].step()


def flops_per_step(model, batch, groups, optimizers) -> int:
    with FlopCounterMode(display=False) as counter:
        step(model, batch, groups, optimizers, 0)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.rounds, args.steps, args.batch_size = 1, 2, 16
        args.models = args.models or ["vae", "iwae"]
    names = [n for n in (args.models or sorted(available_models())) if n in available_models()]
    if "vae" not in names:
        names.insert(0, "vae")
    built = {n: build(n, args.batch_size) for n in names}
    flops = {n: flops_per_step(*built[n]) / args.batch_size for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):  # interleaved: every model once per round
        for n in names:
            model, batch, groups, optimizers = built[n]
            step(model, batch, groups, optimizers, 1)  # warm
            started = time.perf_counter()
            for i in range(args.steps):
                step(model, batch, groups, optimizers, i + 2)
            seconds[n].append((time.perf_counter() - started) / args.steps)
    rows = {}
    for n in names:
        per_step = statistics.median(seconds[n])
        images = args.batch_size / per_step
        rows[n] = {"images_per_s": images, "mflops_per_image": flops[n] / 1e6,
                   "gflops_per_s": images * flops[n] / 1e9}
    vae = rows["vae"]
    print(f"{'model':20s} {'images/s':>10s} {'MFLOP/image':>12s} {'GFLOP/s':>9s} {'x VAE GFLOP/s':>14s}")
    for n, r in rows.items():
        r["ratio_to_vae"] = r["gflops_per_s"] / vae["gflops_per_s"]
        print(f"{n:20s} {r['images_per_s']:10,.0f} {r['mflops_per_image']:12.2f} {r['gflops_per_s']:9.2f} "
              f"{r['ratio_to_vae']:14.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"batch_size": args.batch_size, "rounds": args.rounds,
                                              "steps": args.steps, "threads": 1, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
