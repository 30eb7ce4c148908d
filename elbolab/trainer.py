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
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data.distributed import DistributedSampler

from elbolab import runs
from elbolab.checkpoint import load_checkpoint, save_checkpoint
from elbolab.errors import CheckpointError, ElbolabError, TrainingDiverged, TrainingInterrupted
from elbolab.schedules import StepContext, evaluate_schedules, parse_schedules

# What a run folder holds besides config.json and the checkpoint: --overwrite removes exactly these, and a folder
# holding any of them but no config.json is someone else's: training refuses to write into it.
RUN_FILES = (runs.WEIGHTS, runs.BEST_WEIGHTS, runs.METRICS, runs.EVAL, runs.EVALUATIONS, runs.MANIFEST, "index.html",
             runs.FIGURES, "tensorboard")
# Scheduled values the trainer itself reads (a model may read them too): ``lr`` sets the learning rate every step.
TRAINER_VALUES = ("lr",)
# Settings that may differ on --resume (they do not change the trajectory).
RESUMABLE_CHANGES = ("epochs", "progress", "tensorboard", "checkpoint_every", "keep_best", "device")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    adam_eps: float = 1e-8
    beta: float | None = None  # sugar for schedules["beta"]: constant, or linear from 0 over kl_warmup_epochs;
    # None: the model's own default (scheduled_defaults, e.g. beta-vae's 4), else 1
    kl_warmup_epochs: float = 0.0
    mc_samples: int = 1
    seed: int = 0
    progress: bool = True  # a progress bar (on a terminal) and one line per epoch
    tensorboard: bool = True
    schedules: dict[str, str] = field(default_factory=dict)  # name -> spec, e.g. {"free_bits": "constant:0.5"}
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps within an epoch (0: at epoch ends only)
    keep_best: bool = False  # also keep the weights with the best validation ELBO in model.best.safetensors
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (matrix products in bfloat16, sensitive sums in float32) | fp16 (GPU)

    def __post_init__(self):
        from elbolab.models.base import _coerce_fields

        _coerce_fields(self)
        checks = [
            (self.epochs >= 1, "epochs >= 1", self.epochs),
            (self.batch_size >= 1, "batch_size >= 1", self.batch_size),
            (self.lr > 0 and math.isfinite(self.lr), "a positive finite learning rate, e.g. 1e-3", self.lr),
            (self.adam_eps > 0, "adam_eps > 0", self.adam_eps),
            (self.beta is None or (self.beta >= 0 and math.isfinite(self.beta)), "beta >= 0", self.beta),
            (self.kl_warmup_epochs >= 0, "kl_warmup_epochs >= 0", self.kl_warmup_epochs),
            (self.mc_samples >= 1, "mc_samples >= 1", self.mc_samples),
            (self.checkpoint_every >= 0, "checkpoint_every >= 0 steps (0: at epoch ends only)",
             self.checkpoint_every),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"train config: expected {expected}, got {got!r}")
        if "beta" in self.schedules and (self.beta is not None or self.kl_warmup_epochs):
            raise ElbolabError("train config: give beta either as --beta/--kl-warmup or as --schedule beta=..., "
                               "not both")
        parse_schedules(self.schedules)  # validates the specs
        from elbolab.precision import check_precision

        check_precision(self.precision, check_device(self.device))

    def schedule_specs(self, defaults: dict[str, float] | None = None) -> dict[str, str]:
        """Every schedule: the user's, a model's own defaults (``scheduled_defaults``, e.g. beta-vae's beta 4) for
        the names the user did not schedule, and beta (from --beta / --kl-warmup, warming up to the model's beta when
        --beta is not given)."""
        defaults = dict(defaults or {})
        specs = {name: f"constant:{value!r}" for name, value in defaults.items()}
        specs.update(self.schedules)
        if "beta" not in self.schedules:
            beta = self.beta if self.beta is not None else float(defaults.get("beta", 1.0))
            warmup = self.kl_warmup_epochs
            specs["beta"] = f"linear:0:{beta!r}:{warmup!r}" if warmup else f"constant:{beta!r}"
        return specs


def check_device(device: str) -> torch.device:
    """The torch device for 'cpu', 'cuda', 'cuda:N' or 'mps', refusing one this machine lacks."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ElbolabError(f"expected a device cpu, cuda, cuda:N or mps, got {device!r}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if dev.type not in available:
        raise ElbolabError(f"expected a device cpu, cuda, cuda:N or mps, got {device!r}")
    if not available[dev.type]:
        raise ElbolabError(f"device {device!r} is not available on this machine (torch {torch.__version__}); "
                           "use --device cpu")
    return dev


def distributed_context() -> tuple[int, int]:
    """(rank, world size); initialises the gloo process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), world


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Trainer:
    def __init__(self, model, config: TrainConfig, run_dir, *, model_name: str, data_info: dict | None = None,
                 init_from: dict | None = None):
        self.config, self.run_dir = config, Path(run_dir)
        self.device = check_device(config.device)
        self.model = model.to(self.device)
        self.model_name, self.data_info, self.init_from = model_name, data_info or {}, init_from
        self.rank, self.world = distributed_context()
        if config.batch_size % self.world:
            raise ElbolabError(
                f"expected a batch size divisible by the {self.world} processes, got {config.batch_size}"
            )
        if config.checkpoint_every and self.world > 1:
            raise ElbolabError("--checkpoint-every is not supported under torchrun yet (a mid-epoch checkpoint holds "
                               "one process's data position); checkpoints are written at epoch ends")
        self.groups = model.parameter_groups()
        _check_groups(model, self.groups)
        options = model.optimizer_options()
        unknown = set(options) - set(self.groups)
        if unknown:
            raise ElbolabError(f"optimizer_options names groups {sorted(unknown)} that parameter_groups lacks")
        self.optimizers = {name: _adam(params, {"lr": config.lr, "eps": config.adam_eps, **options.get(name, {})})
                           for name, params in self.groups.items()}
        self._base_lrs = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        self.schedules = parse_schedules(config.schedule_specs(getattr(model, "scheduled_defaults", dict)()))
        explicit = set(config.schedules) | ({"beta"} if config.beta not in (None, 1.0) or config.kl_warmup_epochs
                                            else set())
        unread = sorted(explicit - set(getattr(model, "scheduled_values", ())) - set(TRAINER_VALUES))
        if unread:
            raise ElbolabError(
                f"{type(model).__name__} does not read the scheduled value(s) {unread}; it reads "
                f"{list(getattr(model, 'scheduled_values', ())) or 'none'}. Drop them (they would have no effect)"
            )
        if config.mc_samples != 1 and not getattr(model, "reads_mc_samples", False):
            raise ElbolabError(
                f"{type(model).__name__} does not use --mc-samples (got {config.mc_samples}); drop it"
                + (" (the IWAE's samples are --set k=...)" if "k" in {f.name for f in
                   dataclasses.fields(model.config)} else "")
            )
        self.module = model
        self._reduce_gradients = False
        if self.world > 1:
            if len(self.groups) == 1:
                self.module = torch.nn.parallel.DistributedDataParallel(model)
            else:  # DDP expects one backward per forward; several groups average their gradients explicitly
                self._reduce_gradients = True
        self._like = next(model.parameters())  # the device and dtype batches must have
        self._move_batches = self._like.device.type != "cpu" or self._like.dtype != torch.float32
        self.epoch, self.step = 0, 0
        self._resume_point: dict | None = None  # mid-epoch position restored from a checkpoint
        self._writer = None
        self._stop_requested = False
        self._checkpointed = False  # whether this run folder holds a checkpoint yet
        self.best = None  # (val elbo, epoch)

    def say(self, line: str) -> None:
        """One line for the person watching (rank 0, when progress is on); plain text, so logs read well."""
        if self.config.progress and self.rank == 0:
            print(line, flush=True)

    # ----- run folder -----
    def run_config(self) -> dict:
        return {
            "model": self.model_name,
            "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.config),
            "data": self.data_info,
            "init_from": self.init_from,  # the pretrained run whose weights were copied first, if any
        }

    def _check_resume_settings(self, saved: dict) -> None:
        mine = json.loads(json.dumps(self.run_config()))  # tuples -> lists, as saved
        for key in ("model", "model_config", "data"):
            theirs = saved.get(key)
            if key == "model_config" and isinstance(theirs, dict):  # options added since the run was saved
                theirs = {**json.loads(json.dumps(_option_defaults(type(self.model.config)))), **theirs}
            if isinstance(theirs, dict) and isinstance(mine[key], dict):
                differ = sorted(k for k in set(theirs) | set(mine[key]) if theirs.get(k) != mine[key].get(k))
                if differ:
                    k = differ[0]
                    raise CheckpointError(
                        f"--resume: {key}.{k} differs from the run in {self.run_dir} (saved {theirs.get(k)!r}, "
                        f"got {mine[key].get(k)!r}); resume with the saved settings (--resume needs only --out) or "
                        "use a new --out"
                    )
            elif theirs != mine[key]:
                raise CheckpointError(f"--resume: the {key} differs from the run in {self.run_dir} (saved "
                                      f"{theirs!r}, got {mine[key]!r}); resume with the saved settings or a new --out")
        saved_train = {"schedules": {}, **saved.get("train_config", {})}
        for key, value in mine["train_config"].items():
            if key not in RESUMABLE_CHANGES and key in saved_train and saved_train[key] != value:
                raise CheckpointError(
                    f"--resume: train_config.{key} differs from the saved run (saved {saved_train[key]!r}, got "
                    f"{value!r}); only {', '.join(RESUMABLE_CHANGES)} may change"
                )

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> dict | None:
        """Check the folder and, on resume, load the checkpoint; write nothing until every check has passed.
        Returns the loaded trainer state on resume."""
        config_path, checkpoint_path = self.run_dir / runs.CONFIG, self.run_dir / runs.CHECKPOINT
        has_config, has_checkpoint = _is_run_config(config_path), checkpoint_path.is_file()
        state = None
        if resume:
            if not has_checkpoint:
                what = "an incomplete run (no checkpoint yet)" if has_config else "no run"
                raise CheckpointError(f"--resume: {self.run_dir} holds {what}; train without --resume to start "
                                      "it (an incomplete run is replaced)")
            saved = runs.read_json(config_path)
            self.init_from = saved.get("init_from")  # a resume continues from the checkpoint, not from init_from
            self._check_resume_settings(saved)
            state = load_checkpoint(checkpoint_path, self.model, self.optimizers)  # in memory only
            if self.config.epochs <= state["epoch"]:
                raise CheckpointError(
                    f"--resume: the run in {self.run_dir} has already trained {state['epoch']} epochs; pass --epochs "
                    f"greater than {state['epoch']} to train further (nothing was changed)"
                )
        elif has_checkpoint and not overwrite:
            raise CheckpointError(
                f"{self.run_dir} already holds a run; add --resume to continue it, --overwrite to start it again, "
                "or choose another --out (nothing was overwritten)"
            )
        elif not has_config:  # a config.json that elbolab did not write counts as the user's file too
            foreign = [name for name in (runs.CONFIG, *RUN_FILES) if (self.run_dir / name).exists()]
            if foreign:
                raise CheckpointError(
                    f"{self.run_dir} is not a run folder but holds {', '.join(foreign)}, which training would "
                    "overwrite; choose another --out (nothing was touched)"
                )
        if self.world > 1:  # every rank checks before rank 0 writes
            torch.distributed.barrier()
        if self.rank == 0:
            from elbolab.manifest import collect_manifest

            if resume:
                manifest = runs.read_json(self.run_dir / runs.MANIFEST) if (
                    self.run_dir / runs.MANIFEST).is_file() else collect_manifest(self.config.seed)
                manifest.setdefault("resumes", []).append(
                    {"time_utc": _now(), "command": sys.argv, "from_epoch": state["epoch"], "from_step": state["step"],
                     "to_epochs": self.config.epochs})
            else:
                for name in RUN_FILES + (runs.CHECKPOINT, runs.CONFIG):  # our own files only
                    target = self.run_dir / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
                manifest = collect_manifest(self.config.seed, extra=None)
                manifest["command"] = sys.argv
            runs.write_json(config_path, self.run_config())
            runs.write_json(self.run_dir / runs.MANIFEST, manifest)
        self._checkpointed = has_checkpoint and resume
        return state

    def _resume(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        in_epoch = state.get("in_epoch")  # None at an epoch boundary
        self._resume_point = None if in_epoch is None else {**in_epoch, "binarize": state["extra"]["binarize"]}
        if self.world > 1:  # every rank restarts from rank 0's RNG; make them differ again, deterministically
            torch.manual_seed(state["rng_seed_base"] + self.epoch * self.world + self.rank)
        self.best = tuple(state["best"]) if state.get("best") else None
        # drop metric records written after the checkpoint (an interrupted epoch) and unreadable lines
        path = self.run_dir / runs.METRICS
        if self.rank == 0 and path.exists():
            records, _ = runs.read_metrics(path)
            kept = [r for r in records if isinstance(r.get("epoch"), int) and r["epoch"] <= self.epoch]
            runs.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))

    # ----- the loop -----
    def fit(self, train, val=None, *, resume: bool = False, overwrite: bool = False) -> list[dict]:
        cfg = self.config
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise CheckpointError(f"--out {self.run_dir} is a file; expected a folder for the run (new or existing)")
        if len(train) < self.world:
            raise ElbolabError(f"expected at least {self.world} training examples, got {len(train)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.precision == "bf16" and self._like.device.type == "cpu":
            from elbolab.precision import cpu_has_native_bf16

            if not cpu_has_native_bf16():
                self.say("note: this CPU has no AVX512-BF16 or AMX, so bfloat16 is emulated: expect --precision bf16 "
                         "to run slower than fp32 here (it pays on CPUs that have them)")
        lock = runs.RunLock(self.run_dir).acquire() if self.rank == 0 else None
        try:
            if lock is not None:  # only the process holding the lock may touch the folder's temporaries
                runs.remove_stale_temporaries(self.run_dir)
            state = self._prepare_run_dir(resume, overwrite)  # on resume: the checkpoint's RNG state is restored
            if resume:
                self._resume(state)
            else:
                torch.manual_seed(cfg.seed)  # the same on every rank: prepare must give every process one model
                self.model.prepare(train, self.context(0.0))
                torch.manual_seed(cfg.seed * self.world + self.rank)
            return self._loop(train, val)
        finally:
            if self._writer is not None:
                self._writer.close()
            if lock is not None:
                lock.release()

    def _loop(self, train, val) -> list[dict]:
        cfg, history = self.config, []
        previous = signal.getsignal(signal.SIGINT)
        handle_sigint = self.world == 1 and previous is signal.default_int_handler
        if handle_sigint:  # the first Ctrl-C stops at the next safe point; a second one stops at once
            def request_stop(signum, frame):
                self._stop_requested = True
                signal.signal(signal.SIGINT, signal.default_int_handler)
                print("\nstopping after this step (Ctrl-C again to stop at once, without a checkpoint)",
                      file=sys.stderr, flush=True)

            signal.signal(signal.SIGINT, request_stop)
        started = time.perf_counter()
        try:
            while self.epoch < cfg.epochs:
                epoch_start = time.perf_counter()
                record = self._train_epoch(train)
                records = [record]
                if val is not None and len(val) and self.rank == 0:
                    records.append(self._validate(val))
                self.epoch += 1
                seconds = time.perf_counter() - epoch_start
                for r in records:
                    r.update(time=_now(), seconds=round(seconds, 3))
                if self.rank == 0:
                    self._check_weights_finite()
                    self._log(records)
                    self._keep_best(records)
                    self._epoch_end_hook(val)
                    self._tensorboard_images(val if val is not None and len(val) else train)
                    self._save_checkpoint(None)
                    runs.save_tensors(self.run_dir / runs.WEIGHTS, self.model.state_dict())
                    self.say(epoch_line(self.epoch, cfg.epochs, records, seconds))
                if self.world > 1:
                    torch.distributed.barrier()
                history.extend(records)
                if self._stop_requested and self.epoch < cfg.epochs:  # Ctrl-C during the epoch's last step
                    raise TrainingInterrupted(
                        f"stopped after epoch {self.epoch}; checkpoint written. Continue with: elbolab train --out "
                        f"{self.run_dir} --resume")
            if self.rank == 0:
                self._tensorboard_hparams(history)
        finally:
            if handle_sigint:
                signal.signal(signal.SIGINT, previous)
            if self.rank == 0 and (self.run_dir / runs.MANIFEST).is_file():
                manifest = runs.read_json(self.run_dir / runs.MANIFEST)
                manifest["wall_time_s"] = round(manifest.get("wall_time_s", 0.0) + time.perf_counter() - started, 3)
                manifest["finished_utc"] = _now()
                runs.write_json(self.run_dir / runs.MANIFEST, manifest)
        return history

    def _save_checkpoint(self, in_epoch: dict | None, generator: torch.Generator | None = None) -> None:
        state = {"epoch": self.epoch, "step": self.step, "rng_seed_base": self.config.seed * self.world,
                 "in_epoch": in_epoch, "best": list(self.best) if self.best else None}
        extra = {"binarize": generator.get_state()} if generator is not None else {}
        save_checkpoint(self.run_dir / runs.CHECKPOINT, self.model, self.optimizers, state, extra)
        self._checkpointed = True

    def _check_weights_finite(self) -> None:
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(f"the weights {bad[:3]} became NaN or inf in epoch {self.epoch}; "
                                   f"{self._kept_message()}")

    def _kept_message(self) -> str:
        if self._checkpointed:
            return (f"the last good checkpoint in {self.run_dir} is kept (a resume would meet the same step: start "
                    "again with --overwrite and other settings)")
        return (f"no checkpoint was written yet, so {self.run_dir} holds an incomplete run that the next "
                "'elbolab train' into it replaces")

    def _keep_best(self, records: list[dict]) -> None:
        val = next((r for r in records if r["split"] == "val"), None)
        if not self.config.keep_best or val is None:
            return
        score = val["elbo"] if "elbo" in val else -val["loss"]
        if self.best is None or score > self.best[0]:
            self.best = (score, self.epoch)
            runs.save_tensors(self.run_dir / runs.BEST_WEIGHTS, self.model.state_dict())

    def _autocast(self):
        from elbolab.precision import autocast

        return autocast(self.config.precision, self._like.device)

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
        totals, start = MetricTotals(), 0
        if self._resume_point is not None:  # continue an epoch where a mid-epoch checkpoint left it
            start, totals = self._resume_point["batch"], MetricTotals.from_state(self._resume_point["totals"])
            generator.set_state(self._resume_point["binarize"])
            self._resume_point = None
        bar = self._progress(len(batches), start)
        prefetch = getattr(train, "prefetch", None)  # data on disk (memory-mapped): read the next rows meanwhile
        for i in range(start, len(batches)):
            index = batches[i]
            if prefetch is not None and i + 1 < len(batches):
                prefetch(batches[i + 1])
            batch = train.batch(index, generator)  # x [B, D] float32 on the CPU, y, index
            if self._move_batches:
                batch = batch.to(self._like)
            ctx = self.context(self.epoch + i / len(batches))
            if "lr" in ctx.values:
                self._set_learning_rates(ctx.values["lr"])
            with self._autocast():
                out = self.module(batch, ctx)
            self._step(out)
            totals.add(out, len(index))
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix_str(totals.running(), refresh=False)
            if i + 1 < len(batches) and (self._stop_requested or (
                    cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)):
                if self.rank == 0:
                    self._save_checkpoint({"batch": i + 1, "totals": totals.state()}, generator)
                if self._stop_requested:
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(
                        f"stopped at epoch {self.epoch + 1}, step {self.step} ({i + 1} of {len(batches)} batches); "
                        f"checkpoint written. Continue exactly where it stopped with: elbolab train --out "
                        f"{self.run_dir} --resume"
                    )
        if bar is not None:
            bar.close()
        record = totals.means(self.world)
        record.update(epoch=self.epoch + 1, step=self.step, split="train",
                      **evaluate_schedules(self.schedules, self.epoch + 1))
        return record

    def _set_learning_rates(self, lr: float) -> None:
        """The ``lr`` schedule sets the learning rate of the groups that use --lr; a group with its own rate (a
        model's optimizer_options) keeps its ratio to --lr."""
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self._base_lrs[name] * lr / self.config.lr

    def _step(self, out) -> None:
        """Back each group's loss into that group's parameters only, check everything is finite, then step every
        optimiser (a non-finite loss or gradient stops the run before any weight changes)."""
        missing = set(self.groups) - set(out.losses)
        if missing:
            raise ElbolabError(f"{type(self.model).__name__}.loss returned no loss for the groups {sorted(missing)}")
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        # a group whose loss is None rests this step (alternating updates); the decision must not depend on the rank
        names = [name for name in self.groups if out.losses[name] is not None]
        if len(self.groups) == 1:
            out.losses[names[0]].backward()
        else:
            for j, name in enumerate(names):
                out.losses[name].backward(inputs=self.groups[name], retain_graph=j < len(names) - 1)
        if self._reduce_gradients:
            for params in (self.groups[name] for name in names):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch._utils._flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat)
                flat.div_(self.world)
                for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                    p.grad = g
        grads = [p.grad for name in names for p in self.groups[name] if p.grad is not None]
        if _any_nonfinite(grads + [out.losses[name].detach().reshape(1) for name in names]):  # one pass over all
            self._diverged(out, grads)
        for name in names:
            self.optimizers[name].step()
        self.step += 1

    def _diverged(self, out, grads) -> None:
        bad_loss = next((f"the {name} loss became {v.item()}" for name, v in out.losses.items()
                         if v is not None and not torch.isfinite(v)), None)
        bad_grads = sum(not torch.isfinite(g).all() for g in grads)
        what = bad_loss or f"the gradients of {bad_grads} tensors became NaN or inf"
        raise TrainingDiverged(
            f"{what} at epoch {self.epoch + 1}, step {self.step + 1}; no weight was updated with it, and "
            f"{self._kept_message()}. Try a lower --lr, a Bernoulli likelihood for [0,1] data, or check the data "
            "for extreme values"
        )

    @torch.no_grad()
    def _epoch_end_hook(self, val) -> None:
        """The model's epoch_end hook, in eval mode without gradients, with the RNG state restored afterwards (so
        the hook cannot change the training trajectory or exact resume)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                self.model.epoch_end(self.epoch, self.run_dir, val)
        finally:
            self.model.train(was_training)

    def _validate(self, val, batch_size: int = 1000) -> dict:
        cfg = self.config
        self.model.eval()
        generator = torch.Generator().manual_seed(cfg.seed + 7919)  # the same binarisation every epoch
        ctx = self.context(self.epoch + 1)  # the schedules' values at the end of this epoch, as logged for train
        totals = MetricTotals()
        param = next(self.model.parameters())
        for index in torch.arange(len(val)).split(batch_size):
            with self._autocast():
                totals.add(self.model(val.batch(index, generator).to(param), ctx), len(index))
        record = totals.means(1)
        record.update(epoch=self.epoch + 1, step=self.step, split="val", **ctx.values)
        return record

    def _progress(self, total: int, done: int):
        """A progress bar on a terminal only: redirected output gets the plain epoch lines and nothing else."""
        if not self.config.progress or self.rank != 0 or not sys.stderr.isatty():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=done, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False,
                    unit="batch", dynamic_ncols=True)

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
                    if key not in ("epoch", "step", "split", "time") and isinstance(value, (int, float)):
                        self._writer.add_scalar(f"{r['split']}/{key}", value, r["step"])  # as metrics.jsonl
            self._writer.flush()

    def _tensorboard_images(self, data) -> None:
        """Reconstructions of the first 16 images of ``data`` and 16 samples, at this optimiser step, in eval mode
        with the RNG state restored (the training trajectory and exact resume are untouched)."""
        shape = getattr(self.model.config, "image_shape", None)
        if self._writer is None or shape is None or not len(data):
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)  # the same draws every epoch: the grid changes with the model
                param = next(self.model.parameters())
                batch = data.batch(torch.arange(min(16, len(data))), torch.Generator().manual_seed(0)).to(param)
                pairs = torch.stack([batch.x, self.model.reconstruct(batch).float()], 1)  # [B, 2, D]
                self._writer.add_images("reconstructions (original | reconstruction)",
                                        pairs.reshape(-1, *shape).clamp(0, 1).cpu(), self.step)
                try:
                    samples = self.model.sample(16)
                except ElbolabError:  # a model that samples only given a condition (cvae on quadrants)
                    samples = None
                if samples is not None:
                    self._writer.add_images("samples", samples.float().reshape(-1, *shape).clamp(0, 1).cpu(),
                                            self.step)
            self._writer.flush()
        finally:
            self.model.train(was_training)

    def _tensorboard_hparams(self, history: list[dict]) -> None:
        """The run's settings with its final metrics (TensorBoard's HPARAMS tab), once training ends."""
        if self._writer is None or not history:
            return
        settings = {}
        for group in ("model_config", "train_config", "data"):
            for key, value in (self.run_config()[group] or {}).items():
                if isinstance(value, (list, tuple, dict)):
                    value = json.dumps(value)
                if value is not None:
                    settings[f"{group.split('_')[0]}.{key}"] = value
        settings["model"] = self.model_name
        final = {}
        for r in history:  # the last record of each split
            final.update({f"final/{r['split']}/{k}": v for k, v in r.items()
                          if k not in ("epoch", "step", "split", "time", "seconds") and isinstance(v, (int, float))
                          and not isinstance(v, bool)})
        self._writer.add_hparams(settings, final, run_name="hparams")
        self._writer.flush()


def epoch_line(epoch: int, epochs: int, records: list[dict], seconds: float) -> str:
    """'epoch 3/10  train elbo -95.21 kl 21.3 | val elbo -96.03 kl 21.0 | 12.4 s'."""
    parts = [f"epoch {epoch}/{epochs}"]
    for r in records:
        keys = [k for k in ("elbo", "kl", "iwae_bound") if k in r] or ["loss"]
        parts.append(f"{r['split']} " + " ".join(f"{k} {r[k]:.2f}" for k in keys))
    return "  ".join(parts[:1]) + "  " + " | ".join(parts[1:]) + f" | {seconds:.{2 if seconds < 10 else 1}f} s"


class MetricTotals:
    """Sums of metrics over an epoch: per-example metrics [B] are summed, per-batch scalars weighted by the batch
    size, so that ``means`` is the mean over the examples each metric was reported for (a metric or loss present in
    some steps only, such as an alternating group's loss, is averaged over those steps); under torchrun the sums are
    all-reduced."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, out, batch_size: int) -> None:
        with torch.no_grad():
            values = dict(out.metrics)
            values.update({"loss" if name == "model" else f"loss_{name}": v for name, v in out.losses.items()
                           if v is not None})
            for key, value in values.items():
                total = float(value.sum()) if value.dim() else float(value) * batch_size
                self.sums[key] = self.sums.get(key, 0.0) + total
                self.counts[key] = self.counts.get(key, 0) + batch_size

    def running(self) -> str:
        """The running means so far, for the progress bar."""
        keys = [k for k in ("elbo", "kl", "iwae_bound") if k in self.sums] or ["loss"]
        return " ".join(f"{k} {self.sums[k] / max(self.counts[k], 1):.2f}" for k in keys if k in self.sums)

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict) -> MetricTotals:
        totals = cls()
        totals.sums = dict(state["sums"])
        totals.counts = {k: int(v) for k, v in state["counts"].items()}
        return totals

    def means(self, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        if world > 1:  # ranks may have seen different metric keys: reduce over the union
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, keys)
            keys = sorted(set().union(*gathered))
            totals = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.counts.get(k, 0) for k in keys],
                                  dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            values = totals.tolist()
            return {k: v / c for k, v, c in zip(keys, values[:len(keys)], values[len(keys):]) if c}
        return {k: self.sums[k] / self.counts[k] for k in keys if self.counts[k]}


def _option_defaults(config_class) -> dict:
    """The default of every field of a config dataclass that has one (what a run saved before the field existed
    trained with)."""
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json written by elbolab (not some other program's file of that name)."""
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "model_config", "train_config"} <= set(config)


def _any_nonfinite(tensors: list[torch.Tensor]) -> bool:
    """Whether any tensor holds a NaN or an inf: one fused pass (the kernel torch's GradScaler uses, with a unit
    scale), about 2.5x cheaper than norms on CPU; norms where that kernel is missing."""
    if not tensors:
        return False
    found = torch.zeros(1, device=tensors[0].device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=found.device))
    except (AttributeError, RuntimeError, NotImplementedError):
        return not bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
    return bool(found.item())


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
