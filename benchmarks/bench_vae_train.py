"""Training throughput of the 784-400-20 ReLU Bernoulli VAE on MNIST: elbolab vs raw PyTorch, pythae and Pyro.

Every contender trains the same networks (one hidden layer of 400 in encoder and decoder, latent 20, Bernoulli
decoder on grey-level MNIST, batch 128, Adam lr 1e-3) for the same number of epochs in the same process with the
same torch thread count. Rounds are interleaved (the order rotates each round) because the machine is shared;
the table reports the median over rounds of the steady-state images/s (the first --warmup-epochs are excluded).

What each timed epoch includes:
  elbolab  Trainer.fit (the loop pipeline.train runs), progress bar and TensorBoard off, no validation split:
           shuffling, batching, forward/backward/Adam, per-step finiteness check and metric sums, the per-epoch
           metrics.jsonl record, checkpoint.safetensors and model.safetensors.
  raw      a hand-written loop: randperm, tensor indexing, BCE-with-logits summed over pixels + analytic KL,
           mean over the batch, Adam, loss.item() per step. No logging, no checkpoint.
  pythae   BaseTrainer.train (what TrainingPipeline runs) with a DataLoader over its BaseDataset, no eval set,
           its per-epoch best-model deepcopy and a checkpoint every epoch (steps_saving=1, like elbolab);
           its tqdm bar is disabled (TQDM_DISABLE=1) as elbolab's is.
  raw+fused the raw loop with torch.optim.Adam(fused=True), the optimiser elbolab's Trainer uses: the fair
           baseline for the library's own per-step overhead.
  *-bf16   the same with --precision bf16 (elbolab) / torch.autocast("cpu", bfloat16) around the forward pass
           (raw), network outputs cast to float32 before the losses.
  pyro     SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step per batch (Monte-Carlo KL, as Trace_ELBO does),
           plate + scale 1/B so the loss is a batch mean; Pyro's validation is off (grey-level targets).
  elbolab-torch-step  elbolab with every optimiser step through torch.optim.Adam.step (``optim.fused_adam_step``
           off): the before of the direct fused-Adam step.
  elbolab-generic (and -bf16)  elbolab with the fused fast path of ``objectives.elbo_terms`` switched off
           (``objectives.FAST_PATH = False`` during the run): the loss built from torch.distributions objects, as
           before issue 22. Setting ELBOLAB_FAST_PATH=0 in the environment switches it off for "elbolab" as well.

The last column, "this / raw+fused (paired)", is each contender's rate over the raw+fused loop's in the same round
(median over rounds; -bf16 contenders over raw+fused-bf16): elbolab and elbolab-generic there give the after / before
ratios of issue 22.

--smoke: a few seconds on scikit-learn's embedded digits (8x8, no data files), a 64-32-4 network, 2 epochs of which
1 warm-up, one round of elbolab, elbolab-generic and raw+fused; for tests/test_fast_path.py, not for numbers.

Run:  ELBOLAB_DATA=/work/shared/data /work/bench-venv/bin/python benchmarks/bench_vae_train.py
      (issue 22: --only elbolab,elbolab-generic,raw+fused --rounds 5)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pythae always adds a tqdm bar; elbolab's is switched off by config

import _common as common  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

HIDDEN, LATENT, INPUT_DIM = (400,), 20, 784  # --smoke: (32,), 4 and the digits' 64
SMOKE_HIDDEN, SMOKE_LATENT = (32,), 4


# ----- contenders: each returns (per-epoch wall-clock seconds, mean loss of the last epoch) -----
def run_elbolab(x: torch.Tensor, train_data, args, seed: int, scratch: Path, precision: str = "fp32",
                fast_path: bool | None = None, direct_adam: bool = True):
    """``fast_path=False``: objectives.FAST_PATH off during the run (None: as the environment set it);
    ``direct_adam=False``: optim.fused_adam_step off (every step through torch.optim.Adam.step)."""
    from elbolab import objectives, optim
    from elbolab.config import TrainConfig
    from elbolab.models import get_model_class
    from elbolab.trainer import Trainer

    torch.manual_seed(seed)
    cls = get_model_class("vae")
    model = cls(cls.config_class(input_dim=x.shape[1], image_shape=train_data.image_shape, latent_dim=args.latent,
                                 hidden=args.hidden, activation="relu", likelihood="bernoulli"))
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False,
                         tensorboard=False, precision=precision)
    run_dir = Path(tempfile.mkdtemp(prefix="elbolab-", dir=scratch))
    trainer = Trainer(model, config, run_dir / "run", model_name="vae", data_info={"source": "mnist"})
    starts: list[float] = []
    train_epoch = trainer._train_epoch

    def timed_epoch(data):  # epoch boundaries: each epoch runs from one _train_epoch call to the next
        starts.append(common.now())
        return train_epoch(data)

    trainer._train_epoch = timed_epoch
    fast_before, direct_before = objectives.FAST_PATH, optim.fused_adam_step
    objectives.FAST_PATH = fast_before if fast_path is None else fast_path
    if not direct_adam:
        optim.fused_adam_step = lambda optimizer: False
    try:
        history = trainer.fit(train_data, None)
    finally:
        objectives.FAST_PATH, optim.fused_adam_step = fast_before, direct_before
    starts.append(common.now())
    shutil.rmtree(run_dir, ignore_errors=True)
    return common.spans(starts[:-1], starts[1:]), history[-1]["loss"]


def run_raw_fused(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    return run_raw(x, train_data, args, seed, scratch, fused=True)


def run_elbolab_bf16(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    return run_elbolab(x, train_data, args, seed, scratch, precision="bf16")


def run_elbolab_generic(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    return run_elbolab(x, train_data, args, seed, scratch, fast_path=False)


def run_elbolab_generic_bf16(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    return run_elbolab(x, train_data, args, seed, scratch, precision="bf16", fast_path=False)


def run_elbolab_torch_step(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    return run_elbolab(x, train_data, args, seed, scratch, direct_adam=False)


def run_raw_fused_bf16(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    return run_raw(x, train_data, args, seed, scratch, fused=True, bf16=True)


def run_raw(x: torch.Tensor, train_data, args, seed: int, scratch: Path, fused: bool = False, bf16: bool = False):
    torch.manual_seed(seed)
    nets = common.MLPVAENets(x.shape[1], args.hidden, args.latent, "relu")
    optimizer = torch.optim.Adam(nets.parameters(), lr=args.lr, fused=fused)
    durations, last = [], float("nan")
    for _ in range(args.epochs):
        start, total, steps = common.now(), 0.0, 0
        for index in torch.randperm(x.shape[0]).split(args.batch_size):
            xb = x[index]  # [B, D]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # matrix products in bf16 if asked
                h = nets.body(xb)
                mu, log_var = nets.loc(h).float(), nets.log_var(h).float()  # [B, d]
                z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
                logits = nets.decoder(z).float()  # [B, D]
            recon = F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(-1)  # [B]
            kl = 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1).sum(-1)  # [B]
            loss = (recon + kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
        durations.append(common.span(start, common.now()))
        last = total / steps
    return durations, last


def run_pythae(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    common.quiet_pythae_logging()
    torch.manual_seed(seed)
    model = common.build_pythae_vae(x.shape[1], args.hidden, args.latent, "relu")
    out_dir = Path(tempfile.mkdtemp(prefix="pythae-", dir=scratch))
    config = BaseTrainerConfig(output_dir=str(out_dir), per_device_train_batch_size=args.batch_size,
                               num_epochs=args.epochs, learning_rate=args.lr, steps_saving=args.pythae_steps_saving,
                               seed=seed, no_cuda=True)
    starts, ends, losses = [], [], []

    class EpochClock(TrainingCallback):
        def on_epoch_begin(self, training_config, **kwargs):
            starts.append(common.now())

        def on_log(self, training_config, logs, **kwargs):  # the last event of an epoch, after its checkpoint
            ends.append(common.now())
            losses.append(logs["train_epoch_loss"])

    dataset = BaseDataset(x, torch.zeros(x.shape[0]))
    trainer = BaseTrainer(model, dataset, None, training_config=config, callbacks=[EpochClock()])
    common.quiet_pythae_logging()
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return common.spans(starts, ends), losses[-1]


def run_pyro(x: torch.Tensor, train_data, args, seed: int, scratch: Path):
    import pyro
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO

    pyro.enable_validation(False)
    pyro.clear_param_store()
    torch.manual_seed(seed)
    nets = common.MLPVAENets(x.shape[1], args.hidden, args.latent, "relu")

    def model(xb):
        pyro.module("decoder", nets.decoder)
        zeros = xb.new_zeros(xb.shape[0], args.latent)
        with pyro.plate("data", xb.shape[0]), poutine.scale(scale=1.0 / xb.shape[0]):
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=nets.decoder(z)).to_event(1), obs=xb)

    def guide(xb):
        pyro.module("encoder_body", nets.body)
        pyro.module("encoder_loc", nets.loc)
        pyro.module("encoder_log_var", nets.log_var)
        with pyro.plate("data", xb.shape[0]), poutine.scale(scale=1.0 / xb.shape[0]):
            h = nets.body(xb)
            pyro.sample("z", dist.Normal(nets.loc(h), torch.exp(0.5 * nets.log_var(h))).to_event(1))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), loss=Trace_ELBO())
    durations, last = [], float("nan")
    for _ in range(args.epochs):
        start, total, steps = common.now(), 0.0, 0
        for index in torch.randperm(x.shape[0]).split(args.batch_size):
            total += svi.step(x[index])
            steps += 1
        durations.append(common.span(start, common.now()))
        last = total / steps
    return durations, last


def paired_ratio(mine: list[float] | None, theirs: list[float]) -> str:
    """Median over rounds of elbolab's rate / the contender's rate in the same round."""
    if not mine or not theirs:
        return "n/a"
    return f"{common.median([a / b for a, b in zip(mine, theirs)]):.2f}x"


CONTENDERS = {"elbolab": (run_elbolab, None), "raw+fused": (run_raw_fused, None), "raw": (run_raw, None),
              "elbolab-bf16": (run_elbolab_bf16, None), "raw+fused-bf16": (run_raw_fused_bf16, None),
              "elbolab-generic": (run_elbolab_generic, None),
              "elbolab-torch-step": (run_elbolab_torch_step, None),
              "elbolab-generic-bf16": (run_elbolab_generic_bf16, None),
              "pythae": (run_pythae, "pythae"),
              "pyro": (run_pyro, "pyro")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=common.data_dir_default(), help="folder with mnist/ (default $ELBOLAB_DATA)")
    p.add_argument("--train-size", type=int, default=0, help="training images (0 = the whole 50k train split)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per contender and round")
    p.add_argument("--warmup-epochs", type=int, default=1, help="first epochs left out of the timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the table shows the median")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--pythae-steps-saving", type=int, default=1, help="pythae checkpoint every N epochs (0 = never)")
    p.add_argument("--only", default="elbolab,raw,raw+fused,pythae,pyro", help="comma-separated contenders")
    p.add_argument("--scratch", default=None, help="folder for temporary run folders (default: system temp)")
    p.add_argument("--wait-load", type=float, default=0.0,
                   help="first wait until the 1-minute load average is below this (0 = do not wait)")
    p.add_argument("--wait-max", type=float, default=1800.0, help="longest wait for --wait-load, seconds")
    p.add_argument("--out", default=None, help="also append the markdown to this file")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds on the embedded digits, tiny network, 1 round (checks that the script runs)")
    args = p.parse_args(argv)
    args.hidden, args.latent = (SMOKE_HIDDEN, SMOKE_LATENT) if args.smoke else (HIDDEN, LATENT)
    if args.smoke:
        args.epochs, args.warmup_epochs, args.rounds, args.batch_size = 2, 1, 1, 64
        args.threads = 1  # two OpenMP threads on a busy two-core machine can stall for seconds
        if "--only" not in " ".join(argv if argv is not None else sys.argv[1:]):
            args.only = "elbolab,elbolab-generic,raw+fused"
    unknown = [s.strip() for s in args.only.split(",") if s.strip() and s.strip() not in CONTENDERS]
    if unknown:
        p.error(f"unknown contenders {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if args.epochs <= args.warmup_epochs:
        p.error("--epochs must exceed --warmup-epochs")
    args.pythae_steps_saving = args.pythae_steps_saving or None
    return args


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    from elbolab.data import load_data

    if args.smoke:  # scikit-learn's embedded 8x8 digits: no data files needed
        splits = load_data("digits", binarize="none")
    else:
        splits = load_data("mnist", data_dir=args.data_dir, binarize="none", val_size=10000)
    train = splits.train
    if args.train_size:
        train = type(train)(x=train.x[: args.train_size].contiguous(), y=train.y[: args.train_size],
                            image_shape=train.image_shape, binarize="none", name="mnist/train-subset")
    x = train.rows(torch.arange(len(train)))  # [N, 784] grey levels in [0, 1] (elbolab stores uint8)
    sizes = f"{x.shape[1]}-{'-'.join(map(str, args.hidden))}-{args.latent}"
    source = "digits (smoke test)" if args.smoke else "MNIST"
    n = x.shape[0]

    names = [s.strip() for s in args.only.split(",") if s.strip()]
    missing = {}
    active = []
    for name in names:
        fn, module = CONTENDERS[name]
        if module is not None:
            _, reason = common.optional_module(module)
            if reason:
                missing[name] = reason
                continue
        active.append(name)

    scratch = Path(args.scratch or tempfile.gettempdir())
    scratch.mkdir(parents=True, exist_ok=True)
    waited = common.wait_until_idle(args.wait_load, args.wait_max)
    info = common.machine_info()
    rates: dict[str, list[float]] = {name: [] for name in active}  # images per wall second
    cpu_rates: dict[str, list[float]] = {name: [] for name in active}  # images per process-CPU second
    losses: dict[str, list[float]] = {name: [] for name in active}
    for r in range(args.rounds):
        order = active[r % len(active):] + active[: r % len(active)]  # rotate: no contender always goes first
        for name in order:
            durations, loss = CONTENDERS[name][0](x, train, args, seed=r, scratch=scratch)
            timed = durations[args.warmup_epochs:]
            rates[name].append(n * len(timed) / sum(wall for wall, _ in timed))
            cpu_rates[name].append(n * len(timed) / sum(cpu for _, cpu in timed))
            losses[name].append(loss)
            print(f"round {r + 1}/{args.rounds} {name:15s} {rates[name][-1]:9.0f} images/s "
                  f"({cpu_rates[name][-1]:.0f} per CPU-s)  epochs (wall s) {[round(w, 2) for w, _ in durations]}  "
                  f"last-epoch loss {loss:.2f}  load {os.getloadavg()[0]:.2f}", flush=True)

    med = {name: common.median(v) for name, v in rates.items()}
    cpu_med = {name: common.median(v) for name, v in cpu_rates.items()}
    versions = {k: common.package_version(k) for k in ("pythae", "pyro-ppl")}
    load1, load5, _ = os.getloadavg()
    lines = common.header_lines(
        f"Training throughput: {sizes} ReLU Bernoulli VAE, {source}", info,
        {"setup": f"{n} training images (grey levels), batch {args.batch_size}, Adam lr {args.lr}, "
                  f"{args.epochs} epochs per run of which the first {args.warmup_epochs} are warm-up, "
                  f"{args.rounds} interleaved rounds (order rotated), median shown",
         "competitors": f"pythae {versions['pythae'] or 'not installed'}, "
                        f"pyro-ppl {versions['pyro-ppl'] or 'not installed'}",
         "idle wait": waited, "load at end": f"{load1:.2f} / {load5:.2f}"})
    rows = []
    for name in active:
        rows.append([name, common.fmt(med[name]), f"{common.fmt(min(rates[name]))}-{common.fmt(max(rates[name]))}",
                     common.fmt(1e3 * args.batch_size / med[name], 2), common.fmt(cpu_med[name]),
                     f"{common.median(losses[name]):.2f}", common.ratio(med.get("elbolab"), med[name]),
                     paired_ratio(rates.get("elbolab"), rates[name]),
                     common.ratio(cpu_med.get("elbolab"), cpu_med[name]),
                     paired_ratio(rates[name], rates.get("raw+fused-bf16" if name.endswith("-bf16") else "raw+fused"))])
    for name, reason in missing.items():
        rows.append([name, "not run", "", "", "", "", f"not importable ({reason})", "", "", ""])
    lines += common.markdown_table(
        ["contender", "images/s (median)", "range over rounds", "ms / step", "images / CPU-s", "last-epoch loss",
         "elbolab / this (medians)", "elbolab / this (paired)", "elbolab / this (CPU)",
         "this / raw+fused (paired; -bf16 rows: / raw+fused-bf16)"], rows)
    lines += ["", "Per-epoch time includes everything the library does in an epoch (see the script docstring); "
              "last-epoch loss = mean negative ELBO per image (Pyro's uses a Monte-Carlo KL). "
              "'paired' is the median over rounds of the ratio within a round (contenders run minutes apart, so this "
              "cancels slow load drifts). images / CPU-s uses this process's CPU time, less disturbed by other "
              "jobs on a shared machine (with several threads it also counts OpenMP spin-waiting)."]
    lines += per_step_overhead(train, args, steps=20 if args.smoke else 2000)
    common.write_output(lines, args.out)


def per_step_overhead(train, args, steps: int = 2000) -> list[str]:
    """What the family core adds per step before the forward pass: a Batch (uint8 rows densified, labels, row
    ids) instead of float rows x[index], and a StepContext with the schedules evaluated."""
    from elbolab.config import TrainConfig, beta_schedule
    from elbolab.models import ModelConfig, build_model
    from elbolab.trainer import Trainer

    model = build_model("vae", ModelConfig(input_dim=train.dim, latent_dim=args.latent, hidden=args.hidden))
    warmup = {"beta": beta_schedule(kl_warmup_epochs=10)}  # a KL warm-up over 10 epochs
    trainer = Trainer(model, TrainConfig(batch_size=args.batch_size, schedules=warmup, progress=False,
                                         tensorboard=False), Path(tempfile.gettempdir()) / "unused", model_name="vae")
    x = train.rows(torch.arange(len(train)))
    index = torch.randperm(len(train))[: args.batch_size]
    timings = {}
    for name, fn in (("float rows x[index] (raw loop)", lambda: x[index]),
                     ("Batch from uint8 storage (train.batch)", lambda: train.batch(index)),
                     ("StepContext with a warm-up schedule", lambda: trainer.context(1.5))):
        start = common.now()
        for _ in range(steps):
            fn()
        wall, _ = common.span(start, common.now())
        timings[name] = 1e6 * wall / steps
    return ["", "Per-step cost of the core's contracts (microseconds, mean of "
            f"{steps} calls, batch {args.batch_size}): "
            + "; ".join(f"{name} {us:.1f} us" for name, us in timings.items())]


if __name__ == "__main__":
    main()
