"""torch.compile (inductor, C++ backend on CPU) on the 784-400-20 VAE: the training step and the evaluator's block.

Two pieces of work, each run eager and compiled in the same process, on the same weights and inputs:

  train  one optimiser step of ``Trainer``'s loop: ``model(batch, ctx)`` (encoder, rsample, Bernoulli decoder
         log-prob, KL, metrics), ``backward()``, fused Adam. Compiled: ``torch.compile(model)``; the backward is
         AOTAutograd's compiled backward graph. ``--compiled-autograd`` adds a row with
         ``torch._dynamo.config.compiled_autograd`` (the backward traced again at run time).
  eval   the evaluator's inner block, ``model.importance_samples(x, k_chunk)[1]`` under no_grad for one example and
         the chunk ``plan_chunks`` picks at K = 5000 (2500 samples: a [2500, 1, 784] decoder block); and end to end,
         ``importance_sampled_log_px`` on --eval-images images at K = 5000, eager and with ``compile=True`` (what
         ``elbolab eval --compile`` runs), compile time included.

Reported: compile time (first call(s) minus a steady call), steady-state ms per call (median over interleaved
rounds, order rotated), speed-up eager / compiled, and agreement with eager: the max abs difference of the loss, of
every gradient and of the log weights, with inductor's ``fallback_random`` on (the same random draws as eager;
without it inductor generates its own, equally valid, noise), and whether a changing scheduled value (KL warm-up,
``beta`` a new float every step) recompiles.

Run:  ELBOLAB_DATA=/work/shared/data .venv/bin/python benchmarks/bench_compile.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

# a fresh inductor cache, so that the compile times are those of a first run (no kernels from earlier runs)
_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="bench-compile-inductor-")
if _CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE

import _common as common  # noqa: E402
import torch  # noqa: E402

BATCH, K_CHUNK = 128, 2500


def build_model():
    from elbolab.models import get_model_class

    torch.manual_seed(0)
    cls = get_model_class("vae")
    return cls(cls.config_class(input_dim=784, image_shape=(1, 28, 28), latent_dim=20, hidden=(400,),
                                activation="relu", likelihood="bernoulli"))


def load_x(args) -> tuple[torch.Tensor, str]:
    try:
        from elbolab.data import load_data

        splits = load_data("mnist", data_dir=args.data_dir)
        return splits.train.rows(torch.arange(BATCH * args.batches)), "MNIST grey levels"
    except Exception as err:  # noqa: BLE001 - no MNIST: synthetic grey levels of the same shape
        torch.manual_seed(1)
        return torch.rand(BATCH * args.batches, 784), f"synthetic uniform [0, 1] ({type(err).__name__})"


class TrainStep:
    """One step of the trainer's loop on a model of its own (eager or compiled)."""

    def __init__(self, model, compiled: bool, **options):
        from elbolab.optim import adam

        self.model = model
        self.module = torch.compile(model, **options) if compiled else model
        self.opt = adam(list(model.parameters()), {"lr": 1e-3})

    def __call__(self, batch, ctx):
        self.opt.zero_grad(set_to_none=True)
        out = self.module(batch, ctx)
        out.losses["model"].backward()
        self.opt.step()
        return out


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(args) -> list[str]:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from elbolab.data.core import Batch
    from elbolab.schedules import StepContext

    common.set_threads(args.threads)
    info = common.machine_info()
    x, what = load_x(args)
    batches = [Batch(x[i * BATCH:(i + 1) * BATCH], index=torch.arange(BATCH)) for i in range(args.batches)]
    ctx = StepContext(values={"beta": 1.0})
    base = build_model()
    rows, notes = [], []
    one = batches[0][:1]  # the evaluator's block at K = 5000: one example, 2500 samples

    # ----- training step: compile time and steady speed -----
    # an epoch of 50,000 rows ends with a batch of 80: with the default (automatic dynamic shapes) that batch
    # recompiles the graph with a symbolic batch size, which every later step then uses; dynamic=False compiles
    # one static graph per batch size instead
    partial = batches[2][:80]
    contenders = {"eager": TrainStep(copy.deepcopy(base), compiled=False),
                  "compiled": TrainStep(copy.deepcopy(base), compiled=True),
                  "compiled, after a batch of 80 (default: dynamic batch size)": TrainStep(copy.deepcopy(base),
                                                                                           compiled=True),
                  "compiled dynamic=False, after a batch of 80": TrainStep(copy.deepcopy(base), compiled=True,
                                                                           dynamic=False)}
    compile_s = {}
    for name, step in contenders.items():
        start = time.perf_counter()
        step(batches[0], ctx)
        step(batches[1], ctx)  # a second call: any recompile (dynamic shapes, guards) shows here
        if "after" in name:
            step(partial, ctx)
            step(batches[3], ctx)
        compile_s[name] = time.perf_counter() - start - (compile_s["eager"] if "after" in name else 0)
    if args.compiled_autograd:
        torch._dynamo.config.compiled_autograd = True
        contenders["compiled + compiled autograd"] = TrainStep(copy.deepcopy(base), compiled=True)
        start = time.perf_counter()
        try:
            contenders["compiled + compiled autograd"](batches[0], ctx)
            contenders["compiled + compiled autograd"](batches[1], ctx)
            compile_s["compiled + compiled autograd"] = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - report, do not fail the benchmark
            notes.append(f"compiled autograd failed: {type(err).__name__}: {str(err)[:200]}")
            del contenders["compiled + compiled autograd"]
        torch._dynamo.config.compiled_autograd = False
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = contenders[name]
            if name.endswith("autograd"):
                torch._dynamo.config.compiled_autograd = True
            start = time.perf_counter()
            for i in range(args.steps):
                step(batches[i % len(batches)], ctx)
            times[name].append((time.perf_counter() - start) / args.steps)
            torch._dynamo.config.compiled_autograd = False
    steady = {name: common.median(v) for name, v in times.items()}
    for name in names:
        first = compile_s[name] - 2 * steady[name]
        rows.append([f"train step ({name})", f"{first:.1f}" if name != "eager" else "-", f"{steady[name] * 1e3:.2f}",
                     f"{min(times[name]) * 1e3:.2f}-{max(times[name]) * 1e3:.2f}",
                     common.ratio(steady["eager"], steady[name]), common.fmt(BATCH / steady[name])])

    # ----- evaluator block -----
    model = copy.deepcopy(base).eval()
    eager_is = lambda: model.importance_samples(one, K_CHUNK)[1]  # noqa: E731
    compiled_block = torch.compile(lambda b: model.importance_samples(b, K_CHUNK)[1])
    with torch.no_grad():
        eager_is()
        start = time.perf_counter()
        compiled_block(one)
        compiled_block(one)
        first = time.perf_counter() - start
        ev = {"eager": [], "compiled": []}
        calls = max(1, args.steps // 4)
        for r in range(args.rounds):
            pair = [("eager", eager_is), ("compiled", lambda: compiled_block(one))]
            for name, fn in (pair if r % 2 == 0 else pair[::-1]):
                ev[name].append(timed(fn, calls))
    med = {k: common.median(v) for k, v in ev.items()}
    for name in ("eager", "compiled"):
        rows.append([f"importance_samples, 1 x {K_CHUNK} samples ({name})",
                     f"{first - 2 * med['compiled']:.1f}" if name == "compiled" else "-", f"{med[name] * 1e3:.2f}",
                     f"{min(ev[name]) * 1e3:.2f}-{max(ev[name]) * 1e3:.2f}", common.ratio(med["eager"], med[name]),
                     common.fmt(K_CHUNK / med[name]) + " samples/s"])

    # ----- the evaluator end to end: elbolab eval's estimate, eager vs --compile (compile time included) -----
    from elbolab.estimators import importance_sampled_log_px

    torch._dynamo.reset()
    images = Batch(x[:args.eval_images], index=torch.arange(args.eval_images))
    end_to_end = {}
    for name, compiled in (("eager", False), ("--compile", True)):
        torch.manual_seed(7)
        start = time.perf_counter()
        estimate = importance_sampled_log_px(model, images, k=5000, compile=compiled)
        end_to_end[name] = (time.perf_counter() - start, estimate)
    for name, (seconds, _) in end_to_end.items():
        rows.append([f"importance_sampled_log_px, {args.eval_images} images, K = 5000 ({name}, compile included)",
                     "-", f"{seconds * 1e3:.0f}", "-", common.ratio(end_to_end["eager"][0], seconds),
                     common.fmt(args.eval_images / seconds) + " images/s"])
    gap = float((end_to_end["eager"][1].per_example - end_to_end["--compile"][1].per_example).abs().max())
    notes.append(f"end to end (one run each, same seed): log p(x) {end_to_end['eager'][1].mean:.4f} eager, "
                 f"{end_to_end['--compile'][1].mean:.4f} compiled; max per-image gap {gap:.1e} nats")

    # ----- agreement with eager (same draws: fallback_random) -----
    inductor_config.fallback_random = True
    eager_m, comp_m = copy.deepcopy(base), copy.deepcopy(base)
    compiled_fn = torch.compile(comp_m)
    torch.manual_seed(3)
    out_e = eager_m(batches[0], ctx)
    out_e.losses["model"].backward()
    torch.manual_seed(3)
    out_c = compiled_fn(batches[0], ctx)
    out_c.losses["model"].backward()
    loss_diff = float((out_e.losses["model"] - out_c.losses["model"]).abs().detach())
    grad_diff = max(float((a.grad - b.grad).abs().max()) for a, b in zip(eager_m.parameters(), comp_m.parameters()))
    elbo_diff = float((out_e.metrics["elbo"] - out_c.metrics["elbo"]).abs().max().detach())
    eager_m.eval()
    comp_m.eval()
    with torch.no_grad():
        torch.manual_seed(4)
        lw_e = eager_m.importance_samples(one, K_CHUNK)[1]
        is_fn = torch.compile(lambda b: comp_m.importance_samples(b, K_CHUNK)[1])
        torch.manual_seed(4)
        lw_c = is_fn(one)
    lw_diff = float((lw_e - lw_c).abs().max())
    notes.append(f"agreement with eager (fallback_random, same draws): loss {loss_diff:.1e}, per-example ELBO "
                 f"{elbo_diff:.1e}, gradients {grad_diff:.1e} (max abs); log weights [2500, 1] {lw_diff:.1e} "
                 f"(of values around {float(lw_e.mean()):.0f})")
    torch._dynamo.reset()
    inductor_config.fallback_random = False

    # ----- recompilation under a changing beta (KL warm-up) -----
    counts = torch._dynamo.utils.counters
    counts.clear()
    warm = TrainStep(copy.deepcopy(base), compiled=True)
    for i in range(12):
        warm(batches[i % len(batches)], StepContext(step=i, epoch=i / 100, values={"beta": i / 100}))
    notes.append(f"beta changing every step (12 steps of KL warm-up): {counts['stats'].get('unique_graphs', 0)} "
                 "graphs compiled (the first specialised on beta = 0.0, then one with beta a dynamic input)")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(base))(batches[0], ctx)
    reasons = sorted({str(b.reason).splitlines()[0][:120] for b in explained.break_reasons})
    notes.append(f"torch._dynamo.explain(model)(batch, ctx): {explained.graph_count} graph(s), "
                 f"{explained.graph_break_count} graph break(s){': ' + '; '.join(reasons) if reasons else ''}")
    torch._dynamo.reset()

    extra = {"model": "784-400-20 ReLU Bernoulli VAE (elbolab 'vae'), batch 128, fused Adam; inputs: " + what,
             "timing": f"{args.rounds} interleaved rounds x {args.steps} steps (eval: {max(1, args.steps // 4)} "
                       "calls), median ms per call; compile s = first two calls minus two steady calls (four "
                       "calls for the 'after a batch of 80' rows); the first compiled row and the eval row start "
                       "from an empty inductor cache, later train rows reuse its kernels (their compile s is "
                       "mostly tracing)",
             "inductor": f"cpp backend, {torch._inductor.config.cpp.simdlen or 'auto'} simdlen"}
    lines = common.header_lines("torch.compile (inductor, CPU) vs eager", info, extra)
    lines += common.markdown_table(["work", "compile s", "ms / call (median)", "range", "speed-up vs eager",
                                    "throughput"], rows)
    return lines + [""] + [f"- {note}" for note in notes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=common.data_dir_default() or "/work/shared/data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="train steps per round and contender")
    p.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    p.add_argument("--compiled-autograd", action="store_true")
    p.add_argument("--eval-images", type=int, default=200, help="images of the end-to-end evaluation (K = 5000)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    try:
        common.write_output(measure(args), args.out)
    finally:
        if _CACHE:
            import shutil

            shutil.rmtree(_CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
