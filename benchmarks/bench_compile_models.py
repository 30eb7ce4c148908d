"""torch.compile (inductor, CPU) on every registered model's training step: does it compile, what does compiling
cost, does the compiled step run faster, and does it compute the same loss.

Per model (``bench_models.SETTINGS``: MNIST-sized data, 64x64 sprites for the conv models, one random batch of
--batch-size rows from ``bench_models.make_batch``), two copies built from the same seed (``bench_models.build``)
each with its own optimisers: the eager copy steps with ``bench_models.step``; the compiled copy runs the same step
with ``torch.compile(model)(batch, ctx)`` in place of ``model(batch, ctx)`` (the optimiser steps stay eager; the
backward is AOTAutograd's compiled graph). A fresh inductor cache (TORCHINDUCTOR_CACHE_DIR in a temporary
directory unless already set) makes the compile times those of a first run.

Columns:
  compiles?      "yes", or "no: <exception type>: <first line of its message>" (the row is then "does not compile")
  graph breaks   torch._dynamo's graph_break counter summed over the compiled steps (0 = one graph per step)
  compile s      wall time of the first two compiled steps minus two steady eager steps
  eager / compiled ms/step   median over --rounds interleaved rounds (order alternating) of --steps steps each
  speed-up       median over the rounds of eager time / compiled time (> 1: compiled is faster)
  loss diff      max abs difference of the summed loss between eager and compiled forwards from identical
                 (untrained) weights on a fresh batch, same seed, inductor's fallback_random on (the same draws)
  verdict        "pays" (speed-up >= 1.05), "no gain" (0.95-1.05), "slower" (< 0.95), or "does not compile"

Run:  .venv/bin/python benchmarks/bench_compile_models.py --threads 1 --rounds 5
      .venv/bin/python benchmarks/bench_compile_models.py --models vae iwae --out /tmp/compile.md --json /tmp/c.json
      .venv/bin/python benchmarks/bench_compile_models.py --smoke      (vae, batch 16, 1 round of 2 steps)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# a fresh inductor cache, so that the compile times are those of a first run (no kernels from earlier runs)
_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="bench-compile-models-")
if _CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE

import _common as common  # noqa: E402
import bench_models  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

from elbolab.models import available_models  # noqa: E402
from elbolab.schedules import StepContext  # noqa: E402

SMOKE_MODELS = ["vae"]


def step_with(forward, batch, groups, optimizers, index: int) -> None:
    """``bench_models.step`` with the forward call given: ``forward`` is the model or ``torch.compile(model)``."""
    out = forward(batch, StepContext(step=index, epoch=0.0, values={"beta": 1.0}))
    names = [g for g in groups if out.losses.get(g) is not None]
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    for j, g in enumerate(names):
        out.losses[g].backward(inputs=groups[g], retain_graph=j < len(names) - 1)
    for g in names:
        optimizers[g].step()


def timed_steps(forward, built, steps: int, first_index: int) -> float:
    """Seconds per step over ``steps`` steps of one copy (``built`` = model, batch, groups, optimizers)."""
    _, batch, groups, optimizers = built
    start = time.perf_counter()
    for i in range(steps):
        step_with(forward, batch, groups, optimizers, first_index + i)
    return (time.perf_counter() - start) / steps


def summed_loss(forward, batch) -> torch.Tensor:
    out = forward(batch, StepContext(step=0, epoch=0.0, values={"beta": 1.0}))
    return sum(v for v in out.losses.values() if v is not None).detach()


def loss_agreement(name: str, pristine, batch_size: int) -> float:
    """Max abs loss difference, eager vs compiled, identical weights and draws (fallback_random), a fresh batch."""
    batch, _ = bench_models.make_batch(name, batch_size, torch.Generator().manual_seed(1))
    torch._dynamo.reset()  # the training graphs were built without fallback_random: no reuse of them
    inductor_config.fallback_random = True
    try:
        compiled = torch.compile(copy.deepcopy(pristine))
        torch.manual_seed(5)
        eager_loss = summed_loss(copy.deepcopy(pristine), batch)
        torch.manual_seed(5)
        compiled_loss = summed_loss(compiled, batch)
        return float((eager_loss - compiled_loss).abs().max())
    finally:
        inductor_config.fallback_random = False


def verdict(speedup: float) -> str:
    return "pays" if speedup >= 1.05 else "no gain" if speedup >= 0.95 else "slower"


def measure_model(name: str, args) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = bench_models.build(name, args.batch_size)  # (model, batch, groups, optimizers), seed 0
    pristine = copy.deepcopy(eager[0])  # untrained weights for the agreement check
    other = bench_models.build(name, args.batch_size)  # the same weights again, for the compiled copy
    row = {"model": name, "compiles": True, "error": None, "graph_breaks": None, "compile_s": None,
           "eager_ms": None, "compiled_ms": None, "speedup": None, "loss_diff": None, "verdict": None}
    for i in range(2):  # eager warm-up: first-call allocations, lazy initialisation
        step_with(eager[0], *eager[1:], i)
    eager_times, compiled_times = [], []
    try:
        compiled = torch.compile(other[0])
        first_two = timed_steps(compiled, other, 2, 0) * 2  # tracing + inductor codegen + C++ builds
        for r in range(args.rounds):  # interleaved, order alternating each round
            pair = [(eager_times, eager[0], eager), (compiled_times, compiled, other)]
            for times, forward, built in pair if r % 2 == 0 else pair[::-1]:
                times.append(timed_steps(forward, built, args.steps, 2 + r * args.steps))
        row["graph_breaks"] = sum(torch._dynamo.utils.counters.get("graph_break", {}).values())
    except Exception as err:  # noqa: BLE001 - a model that does not compile is a result, not a crash
        message = (str(err).strip().splitlines() or [""])[0][:200]
        row.update(compiles=False, error=f"{type(err).__name__}: {message}", verdict="does not compile")
        return row
    eager_s = statistics.median(eager_times)
    row["eager_ms"] = eager_s * 1e3
    row["compiled_ms"] = statistics.median(compiled_times) * 1e3
    row["compile_s"] = first_two - 2 * eager_s
    row["speedup"] = statistics.median(e / c for e, c in zip(eager_times, compiled_times))
    row["verdict"] = verdict(row["speedup"])
    try:
        row["loss_diff"] = loss_agreement(name, pristine, args.batch_size)
    except Exception as err:  # noqa: BLE001 - the fallback_random compile can fail on its own
        row["error"] = f"agreement check: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    return row


def table_row(row: dict) -> list[str]:
    def num(key: str, digits: int) -> str:
        return common.fmt(row[key], digits) if row[key] is not None else "-"

    compiles = "yes" if row["compiles"] else f"no: {row['error']}"
    diff = f"{row['loss_diff']:.1e}" if row["loss_diff"] is not None else "-"
    speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
    breaks = str(row["graph_breaks"]) if row["graph_breaks"] is not None else "-"
    return [row["model"], compiles, breaks, num("compile_s", 1), num("eager_ms", 2), num("compiled_ms", 2),
            speedup, diff, row["verdict"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, help="model names (default: every registered model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per round and copy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    p.add_argument("--json", default=None, help="write the rows as JSON to this file")
    p.add_argument("--smoke", action="store_true", help="vae, batch 16, 1 round of 2 steps")
    args = p.parse_args()
    if args.smoke:
        args.models, args.batch_size, args.rounds, args.steps = args.models or SMOKE_MODELS, 16, 1, 2
    registered = available_models()
    names = args.models or sorted(registered)
    unknown = [n for n in names if n not in registered]
    if unknown:
        p.error(f"unknown model(s) {unknown}; registered: {sorted(registered)}")
    common.set_threads(args.threads)
    info = common.machine_info()
    rows = []
    for name in names:
        rows.append(measure_model(name, args))
        print(f"{name}: {rows[-1]['verdict']}", flush=True)
    extra = {"work": f"one training step (forward, backward, optimiser step), batch {args.batch_size}, "
                     "bench_models settings; compiled: torch.compile(model), default options",
             "timing": f"{args.rounds} interleaved rounds x {args.steps} steps, median ms/step; compile s = first "
                       "two compiled steps minus two steady eager steps, fresh inductor cache"
                       + (" (smoke run: not a measurement)" if args.smoke else "")}
    lines = common.header_lines("torch.compile on every model's training step (inductor, CPU)", info, extra)
    lines += common.markdown_table(["model", "compiles?", "graph breaks", "compile s", "eager ms/step",
                                    "compiled ms/step", "speed-up", "loss diff", "verdict"],
                                   [table_row(r) for r in rows])
    common.write_output(lines, args.out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"info": info, "batch_size": args.batch_size, "rounds": args.rounds,
                                               "steps": args.steps, "threads": args.threads, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    finally:  # also after --help or a usage error: the temporary cache was made at import
        if _CACHE:
            shutil.rmtree(_CACHE, ignore_errors=True)
