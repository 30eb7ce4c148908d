"""Where elbolab's fp32 training step loses time against the raw fused-Adam loop (784-400-20 Bernoulli VAE, batch 128).

Two measurements, interleaved over --rounds in one process (the machine is shared: read the ratios):

1. The model's loss alone, forward + backward, on one fixed batch: ``VAE.loss`` (torch.distributions: an
   Independent Normal q(z|x) with rsample, an Independent Bernoulli p(x|z), ``kl_divergence`` against N(0, I)) against
   the same networks with the loss written out by hand (``binary_cross_entropy_with_logits`` and the closed-form KL
   of ``log_var``). No optimiser.
2. Trainer epochs (``Trainer._train_epoch``, ms per step) with parts of the loop switched off one at a time: the
   finiteness check of the gradients (``optim.any_nonfinite``), the per-step metric sums (``MetricTotals.add``), the
   uint8 -> float densification of the batch (float rows given instead), torch.distributions' argument validation
   (off everywhere); and all four off together. Next to them the raw fused-Adam loop on the same float rows.

Run:  ELBOLAB_DATA=/work/shared/data .venv/bin/python benchmarks/bench_step_overhead.py [--rounds 3 --train-size 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time

import _common as common
import torch
from torch.nn import functional as F

HIDDEN, LATENT, INPUT_DIM, BATCH = (400,), 20, 784, 128


def build_vae():
    from elbolab.models import get_model_class

    cls = get_model_class("vae")
    return cls(cls.config_class(input_dim=INPUT_DIM, image_shape=(1, 28, 28), latent_dim=LATENT, hidden=HIDDEN,
                                activation="relu", likelihood="bernoulli"))


def hand_written_loss(model, x: torch.Tensor) -> torch.Tensor:
    """The same networks as ``model``, the ELBO written out: BCE with logits + closed-form KL of log_var."""
    enc = model.encoder
    h = enc.body(x)
    mu, log_var = enc.loc(h), enc.log_var(h)  # [B, d]
    z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
    logits = model.decoder(z)  # [B, D]
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)  # [B]
    kl = 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1).sum(-1)  # [B]
    return (recon + kl).mean()


def loss_only(args, x: torch.Tensor) -> list[str]:
    from elbolab.data.core import Batch
    from elbolab.schedules import StepContext

    torch.manual_seed(0)
    model = build_vae()
    xb = x[:BATCH].contiguous()
    batch, ctx = Batch(xb, index=torch.arange(BATCH)), StepContext(values={})
    contenders = {"VAE.loss (torch.distributions)": lambda: model(batch, ctx).losses["model"].backward(),
                  "hand-written loss": lambda: hand_written_loss(model, xb).backward()}
    times = {name: [] for name in contenders}
    for r in range(args.rounds * 3):
        for name in list(contenders)[r % 2:] + list(contenders)[:r % 2]:
            fn = contenders[name]
            for _ in range(20):
                fn()
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[name].append((time.perf_counter() - start) / args.calls)
    base = common.median(times["hand-written loss"])
    rows = [[name, f"{common.median(v) * 1e3:.3f}", f"{min(v) * 1e3:.3f}-{max(v) * 1e3:.3f}",
             common.ratio(common.median(v), base)] for name, v in times.items()]
    return common.markdown_table(["forward + backward, one batch of 128", "ms (median)", "range",
                                  "time vs hand-written"], rows)


class FloatRows:
    """The training rows already as float32 (what the raw loop indexes), behind the trainer's data interface."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, index, generator=None):
        from elbolab.data.core import Batch

        return Batch(self.x[index], index=index)


@contextlib.contextmanager
def switched_off(parts: set[str]):
    import elbolab.trainer as trainer_module

    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    if "check" in parts:
        patch(trainer_module, "any_nonfinite", lambda tensors: False)
    if "metrics" in parts:  # keep only the loss (the epoch line needs it), as a tensor, without a float() per step
        def add_loss_only(self, out, batch_size):
            self.sums["loss"] = self.sums.get("loss", 0.0)
            self.counts["loss"] = self.counts.get("loss", 0) + batch_size
        patch(trainer_module.MetricTotals, "add", add_loss_only)
    if "validation" in parts:
        torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
        torch.distributions.Distribution.set_default_validate_args(True)


def trainer_ms_per_step(train, x: torch.Tensor, parts: set[str], epochs: int) -> float:
    from elbolab.config import TrainConfig
    from elbolab.trainer import Trainer

    torch.manual_seed(0)
    config = TrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, seed=0, progress=False, tensorboard=False)
    scratch = tempfile.mkdtemp(prefix="bench-step-")
    trainer = Trainer(build_vae(), config, f"{scratch}/run", model_name="vae", data_info={"source": "mnist"})
    spans, inner = [], trainer._train_epoch

    def timed_epoch(data):
        start = time.perf_counter()
        record = inner(data)
        spans.append(time.perf_counter() - start)
        return record

    trainer._train_epoch = timed_epoch
    with switched_off(parts):
        trainer.fit(FloatRows(x) if "densify" in parts else train, None)
    shutil.rmtree(scratch, ignore_errors=True)
    steps = -(-len(x) // BATCH)
    return min(spans[1:]) / steps  # the first epoch warms up


def raw_ms_per_step(x: torch.Tensor, epochs: int) -> float:
    torch.manual_seed(0)
    model = build_vae()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    spans = []
    for _ in range(epochs):
        start = time.perf_counter()
        for index in torch.randperm(x.shape[0]).split(BATCH):
            loss = hand_written_loss(model, x[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
        spans.append(time.perf_counter() - start)
    return min(spans[1:]) / -(-len(x) // BATCH)


def trainer_ablation(args, train, x: torch.Tensor) -> list[str]:
    variants = {"elbolab Trainer, as shipped": set(),
                "without the gradient finiteness check": {"check"},
                "without the per-step metric sums": {"metrics"},
                "float rows instead of uint8 (no densify)": {"densify"},
                "distributions' argument validation off": {"validation"},
                "all four off": {"check", "metrics", "densify", "validation"}}
    times = {name: [] for name in [*variants, "raw loop, fused Adam, hand-written loss"]}
    names = list(times)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in variants:
                times[name].append(trainer_ms_per_step(train, x, variants[name], args.epochs))
            else:
                times[name].append(raw_ms_per_step(x, args.epochs))
    base = common.median(times["elbolab Trainer, as shipped"])
    rows = [[name, f"{common.median(v) * 1e3:.3f}", f"{min(v) * 1e3:.3f}-{max(v) * 1e3:.3f}",
             common.ratio(base, common.median(v))] for name, v in times.items()]
    return common.markdown_table(["training loop (fp32, one thread)", "ms / step (median)", "range",
                                  "as shipped / this"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=common.data_dir_default() or "/work/shared/data")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=3, help="epochs per trainer run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200, help="loss-only calls per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    common.set_threads(args.threads)
    from elbolab.data import load_data

    splits = load_data("mnist", data_dir=args.data_dir, binarize="none", val_size=10000)
    train = splits.train.head(args.train_size)
    x = train.rows(torch.arange(len(train)))  # [N, 784] float32 grey levels (elbolab stores uint8)
    info = common.machine_info()
    lines = common.header_lines("fp32 training step: elbolab against the raw fused-Adam loop", info, {
        "workload": f"784-400-20 ReLU Bernoulli VAE, batch {BATCH}, {len(train)} MNIST grey-level images, "
                    f"{args.rounds} interleaved rounds, best epoch of {args.epochs} (first is warm-up) per run"})
    lines += loss_only(args, x) + [""] + trainer_ablation(args, train, x)
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
