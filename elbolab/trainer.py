"""Training loop: one Adam per parameter group, epochs, validation, metrics (JSONL + TensorBoard), checkpoints,
exact resume, DDP.

Schedules live here, not in the models: every step the trainer evaluates the schedules (beta with optional KL
warm-up, free bits, capacity, ...; see ``elbolab.schedules``) and hands the model a StepContext. A model returns
one loss per parameter group; each is backed into its own group's parameters only (``backward(inputs=...)``),
then every optimiser steps, so a discriminator is trained on its own objective and never on the VAE's.

Reproducibility: the batch order of epoch e comes from ``DistributedSampler(seed, epoch=e)`` and dynamic
binarisation from a generator seeded by (seed, epoch, rank), so neither needs saving; the global torch RNG (the
reparameterisation noise) is saved in the checkpoint. A resumed CPU run therefore ends with bit-identical
parameters to an uninterrupted one. Under ``torchrun`` each of W processes takes batch_size / W examples of every
global batch (the sampler interleaves ranks over one shared permutation) and the gradients are averaged (DDP for
one parameter group; an explicit all-reduce per group for several), so one step equals a one-process step on the
same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data.distributed import DistributedSampler

from elbolab import runs
from elbolab.checkpoint import load_checkpoint, save_checkpoint
from elbolab.errors import CheckpointError, ElbolabError, TrainingDiverged
from elbolab.schedules import StepContext, evaluate_schedules, parse_schedules


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    adam_eps: float = 1e-8
    beta: float = 1.0  # sugar for schedules["beta"]: constant, or linear from 0 over kl_warmup_epochs
    kl_warmup_epochs: float = 0.0
    mc_samples: int = 1
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    schedules: dict[str, str] = field(default_factory=dict)  # name -> spec, e.g. {"free_bits": "constant:0.5"}

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "epochs >= 1", self.epochs),
            (self.batch_size >= 1, "batch_size >= 1", self.batch_size),
            (self.lr > 0 and math.isfinite(self.lr), "a positive finite learning rate, e.g. 1e-3", self.lr),
            (self.adam_eps > 0, "adam_eps > 0", self.adam_eps),
            (self.beta >= 0 and math.isfinite(self.beta), "beta >= 0", self.beta),
            (self.kl_warmup_epochs >= 0, "kl_warmup_epochs >= 0", self.kl_warmup_epochs),
            (self.mc_samples >= 1, "mc_samples >= 1", self.mc_samples),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"train config: expected {expected}, got {got!r}")
        if "beta" in self.schedules and (self.beta != 1.0 or self.kl_warmup_epochs):
            raise ElbolabError("train config: give beta either as --beta/--kl-warmup or as --schedule beta=..., "
                               "not both")
        parse_schedules(self.schedules)  # validates the specs

    def schedule_specs(self) -> dict[str, str]:
        """Every schedule, beta included (from --beta / --kl-warmup unless given explicitly)."""
        specs = dict(self.schedules)
        if "beta" not in specs:
            warmup = self.kl_warmup_epochs
            specs["beta"] = f"linear:0:{self.beta!r}:{warmup!r}" if warmup else f"constant:{self.beta!r}"
        return specs


def distributed_context() -> tuple[int, int]:
    """(rank, world size); initialises the gloo process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), world


class Trainer:
    def __init__(self, model, config: TrainConfig, run_dir, *, model_name: str, data_info: dict | None = None,
                 init_from: dict | None = None):
        self.model, self.config, self.run_dir = model, config, Path(run_dir)
        self.model_name, self.data_info, self.init_from = model_name, data_info or {}, init_from
        self.rank, self.world = distributed_context()
        if config.batch_size % self.world:
            raise ElbolabError(
                f"expected a batch size divisible by the {self.world} processes, got {config.batch_size}"
            )
        self.groups = model.parameter_groups()
        _check_groups(model, self.groups)
        options = model.optimizer_options()
        unknown = set(options) - set(self.groups)
        if unknown:
            raise ElbolabError(f"optimizer_options names groups {sorted(unknown)} that parameter_groups lacks")
        self.optimizers = {name: _adam(params, {"lr": config.lr, "eps": config.adam_eps, **options.get(name, {})})
                           for name, params in self.groups.items()}
        self.schedules = parse_schedules(config.schedule_specs())
        explicit = set(config.schedules) | ({"beta"} if config.beta != 1.0 or config.kl_warmup_epochs else set())
        unread = sorted(explicit - set(getattr(model, "scheduled_values", ())))
        if unread:
            raise ElbolabError(
                f"{type(model).__name__} does not read the scheduled value(s) {unread}; it reads "
                f"{list(getattr(model, 'scheduled_values', ())) or 'none'}. Drop them (they would have no effect)"
            )
        self.module = model
        self._reduce_gradients = False
        if self.world > 1:
            if len(self.groups) == 1:
                self.module = torch.nn.parallel.DistributedDataParallel(model)
            else:  # DDP expects one backward per forward; several groups average their gradients explicitly
                self._reduce_gradients = True
        self.epoch, self.step = 0, 0
        self._writer = None

    # ----- run folder -----
    def run_config(self) -> dict:
        return {
            "model": self.model_name,
            "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.config),
            "data": self.data_info,
            "init_from": self.init_from,  # the pretrained run whose weights were copied first, if any
        }

    def _prepare_run_dir(self, resume: bool) -> None:
        config_path = self.run_dir / runs.CONFIG
        if resume:
            saved = runs.read_json(config_path)
            self.init_from = saved.get("init_from")  # a resume continues from the checkpoint, not from init_from
            mine = json.loads(json.dumps(self.run_config()))  # tuples -> lists, as saved
            for key in ("model", "model_config", "data"):
                if saved.get(key) != mine[key]:
                    raise CheckpointError(
                        f"--resume: the {key} differs from the run in {self.run_dir} (saved {saved.get(key)}, "
                        f"got {mine[key]}); resume with the same settings or use a new --out"
                    )
            ignore = {"epochs", "progress", "tensorboard"}
            saved["train_config"].setdefault("schedules", {})
            saved_train = {k: v for k, v in saved["train_config"].items() if k not in ignore}
            mine_train = {k: v for k, v in mine["train_config"].items() if k not in ignore}
            if saved_train != mine_train:
                raise CheckpointError(
                    f"--resume: training settings differ from the saved run ({saved_train} vs {mine_train}); "
                    "only --epochs may change"
                )
        elif (self.run_dir / runs.CONFIG).exists() or (self.run_dir / runs.CHECKPOINT).exists():
            raise CheckpointError(
                f"{self.run_dir} already holds a run; add --resume to continue it or choose another --out "
                "(nothing was overwritten)"
            )
        if self.world > 1:  # every rank checks before rank 0 writes
            torch.distributed.barrier()
        if self.rank == 0:
            runs.write_json(config_path, self.run_config())
            from elbolab.manifest import collect_manifest

            runs.write_json(self.run_dir / runs.MANIFEST, collect_manifest(self.config.seed))

    def _resume(self) -> None:
        state = load_checkpoint(self.run_dir / runs.CHECKPOINT, self.model, self.optimizers)
        self.epoch, self.step = state["epoch"], state["step"]
        if self.world > 1:  # every rank restarts from rank 0's RNG; make them differ again, deterministically
            torch.manual_seed(state["rng_seed_base"] + self.epoch * self.world + self.rank)
        # drop metric records written after the checkpoint (an interrupted epoch)
        path = self.run_dir / runs.METRICS
        if self.rank == 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= self.epoch]
            runs.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    # ----- the loop -----
    def fit(self, train, val=None, *, resume: bool = False) -> list[dict]:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_run_dir(resume)
        torch.manual_seed(cfg.seed * self.world + self.rank)
        if len(train) < self.world:
            raise ElbolabError(f"expected at least {self.world} training examples, got {len(train)}")
        if resume:
            self._resume()
        else:
            self.model.prepare(train, self.context(0.0))
        history = []
        while self.epoch < cfg.epochs:
            record = self._train_epoch(train)
            records = [record]
            if val is not None and len(val) and self.rank == 0:
                records.append(self._validate(val))
            self.epoch += 1
            if self.rank == 0:
                self._log(records)
                state = {"epoch": self.epoch, "step": self.step, "rng_seed_base": cfg.seed * self.world}
                save_checkpoint(self.run_dir / runs.CHECKPOINT, self.model, self.optimizers, state)
                runs.save_tensors(self.run_dir / runs.WEIGHTS, self.model.state_dict())
            if self.world > 1:
                torch.distributed.barrier()
            history.extend(records)
        if self._writer is not None:
            self._writer.close()
        return history

    def context(self, epoch_progress: float) -> StepContext:
        return StepContext(step=self.step, epoch=epoch_progress, mc_samples=self.config.mc_samples,
                           values=evaluate_schedules(self.schedules, epoch_progress))

    def _train_epoch(self, train) -> dict:
        cfg, n = self.config, len(train)
        sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(self.epoch)
        order = torch.tensor(list(sampler))  # this rank's share of one shared permutation
        local_batch = cfg.batch_size // self.world
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        batches = order.split(local_batch)
        self.model.train()
        totals = MetricTotals()
        for i, index in enumerate(self._progress(batches)):
            batch = train.batch(index, generator)  # x [B, D], y, index
            out = self.module(batch, self.context(self.epoch + i / len(batches)))
            self._step(out)
            totals.add(out, len(index))
        record = totals.means(self.world)
        record.update(epoch=self.epoch + 1, step=self.step, split="train",
                      **evaluate_schedules(self.schedules, self.epoch + 1))
        return record

    def _step(self, out) -> None:
        """Back each group's loss into that group's parameters only, then step every optimiser."""
        missing = set(self.groups) - set(out.losses)
        if missing:
            raise ElbolabError(f"{type(self.model).__name__}.loss returned no loss for the groups {sorted(missing)}")
        for name, value in out.losses.items():
            if not torch.isfinite(value):
                raise TrainingDiverged(
                    f"the {name} loss became {value.item()} at epoch {self.epoch + 1}, step {self.step + 1}; the "
                    f"last good checkpoint in {self.run_dir} is kept. Try a lower --lr, a Bernoulli likelihood for "
                    "[0,1] data, or check the data for extreme values"
                )
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        names = list(self.groups)
        if len(names) == 1:
            out.losses[names[0]].backward()
        else:
            for j, name in enumerate(names):
                out.losses[name].backward(inputs=self.groups[name], retain_graph=j < len(names) - 1)
        if self._reduce_gradients:
            for params in self.groups.values():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch._utils._flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat)
                flat.div_(self.world)
                for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                    p.grad = g
        for optimizer in self.optimizers.values():
            optimizer.step()
        self.step += 1

    @torch.no_grad()
    def _validate(self, val, batch_size: int = 1000) -> dict:
        cfg = self.config
        self.model.eval()
        generator = torch.Generator().manual_seed(cfg.seed + 7919)  # the same binarisation every epoch
        ctx = self.context(self.epoch + 1)  # the schedules' values at the end of this epoch, as logged for train
        totals = MetricTotals()
        for index in torch.arange(len(val)).split(batch_size):
            totals.add(self.model(val.batch(index, generator), ctx), len(index))
        record = totals.means(1)
        record.update(epoch=self.epoch + 1, step=self.step, split="val", **ctx.values)
        return record

    def _progress(self, batches):
        if not self.config.progress or self.rank != 0:
            return batches
        from tqdm.auto import tqdm

        return tqdm(batches, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False, disable=None)

    def _log(self, records: list[dict]) -> None:
        with open(self.run_dir / runs.METRICS, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        if self.config.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            for r in records:
                for key, value in r.items():
                    if key not in ("epoch", "step", "split"):
                        self._writer.add_scalar(f"{r['split']}/{key}", value, r["epoch"])
            self._writer.flush()


class MetricTotals:
    """Sums of metrics over an epoch: per-example metrics [B] are summed, per-batch scalars weighted by the batch
    size, so that ``means`` is the mean over examples either way; under torchrun the sums are all-reduced."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, out, batch_size: int) -> None:
        with torch.no_grad():
            values = dict(out.metrics)
            values.update({"loss" if name == "model" else f"loss_{name}": v for name, v in out.losses.items()})
            for key, value in values.items():
                total = float(value.sum()) if value.dim() else float(value) * batch_size
                self.sums[key] = self.sums.get(key, 0.0) + total
        self.count += batch_size

    def means(self, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        if world > 1:
            totals = torch.tensor([self.sums[k] for k in keys] + [self.count], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            *values, count = totals.tolist()
            return {k: v / count for k, v in zip(keys, values)}
        return {k: self.sums[k] / self.count for k in keys}


def _adam(params, options: dict) -> torch.optim.Optimizer:
    try:
        # fused Adam: one kernel for all parameters instead of a per-parameter loop (about 4x less optimiser
        # time on CPU, measured in benchmarks/bench_vae_train.py); needs torch >= 2.4 on CPU
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **options)


def _check_groups(model, groups: dict) -> None:
    """Every trainable parameter in exactly one group."""
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise ElbolabError(f"a parameter is in both groups {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if orphans:
        raise ElbolabError(f"parameters {orphans[:3]} are in no parameter group; no optimiser would train them")
