"""Training loop: one Adam per parameter group, epochs, validation, metrics (JSONL + TensorBoard), checkpoints,
exact resume, DDP.

Schedules live here, not in the models: every step the trainer evaluates the schedules (beta with optional KL
warm-up, free bits, capacity, ...; see ``elbolab.schedules``) and hands the model a StepContext. A model returns
one loss per parameter group; each is backed into its own group's parameters only (``backward(inputs=...)``),
then every optimiser steps, so a discriminator is trained on its own objective and never on the VAE's.

Reproducibility: the batch order of epoch e comes from ``DistributedSampler(seed, epoch=e)`` and dynamic
binarisation from a generator seeded by (seed, epoch, rank), so neither needs saving; the global torch RNG (the
reparameterisation noise) is saved in the checkpoint, every rank's under torchrun. A resumed CPU run therefore ends
with bit-identical parameters to an uninterrupted one, with one process or several. Under ``torchrun`` each of W
processes takes batch_size / W examples of every global batch (the sampler interleaves ranks over one shared
permutation) and the gradients are averaged (DDP for one parameter group; an explicit all-reduce per group for
several), so one step equals a one-process step on the same global batch.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data.distributed import DistributedSampler

from elbolab import runs
from elbolab.checkpoint import load_checkpoint, save_checkpoint
from elbolab.config import TrainConfig, check_device, check_settings_for
from elbolab.errors import CheckpointError, ElbolabError, TrainingDiverged, TrainingInterrupted
from elbolab.loggers import MetricsLog, MetricTotals, epoch_line
from elbolab.models.base import check_parameter_groups
from elbolab.optim import adam, any_nonfinite, step_optimizer
from elbolab.precision import autocast, cpu_has_native_bf16
from elbolab.progress import Progress, format_duration
from elbolab.run_folder import RunFolder, check_resume_settings, now_utc
from elbolab.schedules import StepContext, evaluate_schedules, parse_schedules

# Scheduled values the trainer itself reads (a model may read them too): ``lr`` sets the learning rate every step.
TRAINER_VALUES = ("lr",)

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
        check_parameter_groups(model, self.groups)
        options = model.optimizer_options()
        unknown = set(options) - set(self.groups)
        if unknown:
            raise ElbolabError(f"optimizer_options names groups {sorted(unknown)} that parameter_groups lacks")
        defaults = {"lr": config.lr, "eps": config.adam_eps, "betas": (config.adam_beta1, config.adam_beta2)}
        self.optimizers = {name: adam(params, {**defaults, **options.get(name, {})})
                           for name, params in self.groups.items()}
        self._base_lrs = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        self.schedules = parse_schedules(config.schedule_specs(model.scheduled_defaults()))
        check_settings_for(model, config, trainer_values=TRAINER_VALUES)
        self.module = model
        self._reduce_gradients = False
        if self.world > 1:
            if len(self.groups) == 1:
                self.module = torch.nn.parallel.DistributedDataParallel(model)
            else:  # DDP expects one backward per forward; several groups average their gradients explicitly
                self._reduce_gradients = True
        self._compile_pending = config.compile  # compiled on the first step (see _compiled_forward)
        self._like = next(model.parameters())  # the device and dtype batches must have
        self._move_batches = self._like.device.type != "cpu" or self._like.dtype != torch.float32
        self.epoch, self.step = 0, 0
        self._resume_point: dict | None = None  # mid-epoch position restored from a checkpoint
        self.folder = RunFolder(self.run_dir, rank=self.rank)
        self.metrics_log = MetricsLog(self.run_dir, tensorboard=config.tensorboard and self.rank == 0)
        self._stop = StopOnInterrupt(enabled=False)  # replaced by the loop's handler
        self._checkpointed = False  # whether this run folder holds a checkpoint yet
        self.best = None  # (val elbo, epoch)
        self._estimate_pending = True

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

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> dict | None:
        """Check the folder and, on resume, the saved settings and the checkpoint (loaded in memory only); write
        nothing until every check has passed. Returns the loaded trainer state on resume."""
        self.folder.check(resume=resume, overwrite=overwrite)
        state = None
        if resume:
            saved = self.folder.saved_config()
            self.init_from = saved.get("init_from")  # a resume continues from the checkpoint, not from init_from
            check_resume_settings(self.run_dir, saved, self.run_config(), type(self.model.config))
            state = load_checkpoint(self.run_dir / runs.CHECKPOINT, self.model, self.optimizers, self.model_name)
            if self.config.epochs <= state["epoch"]:
                raise CheckpointError(
                    f"--resume: the run in {self.run_dir} has already trained {state['epoch']} epochs; pass --epochs "
                    f"greater than {state['epoch']} to train further (nothing was changed; its report: elbolab "
                    f"report {self.run_dir})"
                )
        if self.world > 1:  # every rank checks before rank 0 writes
            torch.distributed.barrier()
        self.folder.start(self.run_config(), seed=self.config.seed, resume_from=state)
        self._checkpointed = resume
        return state

    def _resume(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        in_epoch = state.get("in_epoch")  # None at an epoch boundary
        self._resume_point = None if in_epoch is None else {**in_epoch, "binarize": state["extra"]["binarize"]}
        if self.world > 1:  # each rank continues its own random stream (saved by rank 0 for every rank)
            own = state["extra"].get(f"rng_rank{self.rank}")
            if own is not None and state.get("world") == self.world:
                torch.set_rng_state(own)
            else:  # a checkpoint written by another number of processes: a new, deterministic stream per rank
                torch.manual_seed(state["rng_seed_base"] + self.epoch * self.world + self.rank)
        self.best = tuple(state["best"]) if state.get("best") else None
        self.folder.keep_metrics_through(self.epoch)

    # ----- the loop -----
    def fit(self, train, val=None, *, resume: bool = False, overwrite: bool = False) -> list[dict]:
        cfg = self.config
        if len(train) < self.world:
            raise ElbolabError(f"expected at least {self.world} training examples, got {len(train)}")
        if cfg.precision == "bf16" and self._like.device.type == "cpu" and not cpu_has_native_bf16():
            self.say("note: this CPU has no AVX512-BF16 or AMX, so bfloat16 is emulated: expect --precision bf16 "
                     "to run slower than fp32 here (it pays on CPUs that have them)")
        self.folder.open()
        try:
            state = self._prepare_run_dir(resume, overwrite)  # on resume: the checkpoint's RNG state is restored
            if resume:
                self._resume(state)
            else:
                torch.manual_seed(cfg.seed)  # the same on every rank: prepare must give every process one model
                self.model.prepare(train, self.context(0.0))
                torch.manual_seed(cfg.seed * self.world + self.rank)
            return self._loop(train, val)
        finally:
            self.metrics_log.close()
            self.folder.close()

    def _loop(self, train, val) -> list[dict]:
        cfg, history = self.config, []
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(f"{self.model_name}: {n_params:,} parameters; {len(train):,} training examples, batches of "
                 f"{cfg.batch_size}, epochs {self.epoch + 1} to {cfg.epochs}")
        started = time.perf_counter()
        with StopOnInterrupt(enabled=self.world == 1) as stop:
            self._stop = stop
            try:
                while self.epoch < cfg.epochs:
                    history.extend(self._epoch(train, val))
                    if stop.requested and self.epoch < cfg.epochs:  # Ctrl-C during the epoch's last step
                        raise TrainingInterrupted(
                            f"stopped after epoch {self.epoch}; checkpoint written. Continue with: elbolab train "
                            f"--out {self.run_dir} --resume")
                self.metrics_log.settings_with_results(self.run_config(), history)
            finally:
                self.folder.add_wall_time(time.perf_counter() - started)
        return history

    def _epoch(self, train, val) -> list[dict]:
        """One epoch: train, validate (rank 0), then log, keep, checkpoint and report it."""
        epoch_start = time.perf_counter()
        records = [self._train_epoch(train)]
        if val is not None and len(val) and self.rank == 0:
            records.append(self._validate(val))
        self.epoch += 1
        seconds = time.perf_counter() - epoch_start
        for r in records:
            r.update(time=now_utc(), seconds=round(seconds, 3))
        rng_states = self._gather_rng_states()  # every rank takes part; rank 0 saves them
        if self.rank == 0:
            self._check_weights_finite()
            with runs.writing(self.run_dir / runs.METRICS):  # a full disk: one OSError naming the file
                self.metrics_log.write(records)
            self._keep_best(records)
            self._epoch_end_hook(val)
            self.metrics_log.images(self.model, val if val is not None and len(val) else train, self.step,
                                    self.config.seed)
            self._save_checkpoint(None, rng_states=rng_states)
            runs.save_tensors(self.run_dir / runs.WEIGHTS, self.model.state_dict(), self._weights_metadata())
            self.say(epoch_line(self.epoch, self.config.epochs, records, seconds))
        if self.world > 1:
            torch.distributed.barrier()
        return records

    def _gather_rng_states(self) -> list[torch.Tensor] | None:
        """Every rank's torch RNG state, on rank 0 (None in a single process: the checkpoint holds the one state)."""
        if self.world == 1:
            return None
        gathered: list = [None] * self.world
        torch.distributed.all_gather_object(gathered, torch.get_rng_state())
        return gathered

    def _save_checkpoint(self, in_epoch: dict | None, generator: torch.Generator | None = None,
                         rng_states: list[torch.Tensor] | None = None) -> None:
        state = {"epoch": self.epoch, "step": self.step, "rng_seed_base": self.config.seed * self.world,
                 "world": self.world, "in_epoch": in_epoch, "best": list(self.best) if self.best else None}
        extra = {"binarize": generator.get_state()} if generator is not None else {}
        extra.update({f"rng_rank{rank}": rng for rank, rng in enumerate(rng_states or [])})
        save_checkpoint(self.run_dir / runs.CHECKPOINT, self.model, self.optimizers, state, extra,
                        config=runs.model_config_metadata(self.model_name, self.model.config.to_dict()))
        self._checkpointed = True

    def _weights_metadata(self) -> dict:
        """What model.safetensors and model.best.safetensors carry besides the tensors: the model config they were
        trained with and its fingerprint (``load_run`` refuses a config.json edited since)."""
        return {"config": runs.model_config_metadata(self.model_name, self.model.config.to_dict())}

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
        key = self.model.selection_metric  # the bound the model trains (the IWAE's), else the ELBO
        score = val[key] if key in val else (val["elbo"] if "elbo" in val else -val["loss"])
        if self.best is None or score > self.best[0]:
            self.best = (score, self.epoch)
            runs.save_tensors(self.run_dir / runs.BEST_WEIGHTS, self.model.state_dict(), self._weights_metadata())

    def _autocast(self):
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
        timed = self._estimate_pending  # the first epoch of this session: its first steps give the estimate
        epoch_started, start_timed = time.perf_counter(), start
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
            compiling = self._compile_pending
            with self._autocast():
                out = self._compiled_forward(batch, ctx) if compiling else self.module(batch, ctx)
            self._step(out)
            totals.add(out, len(index))
            if compiling and i + 1 < len(batches):  # the estimate times the compiled steps, not the compiling
                epoch_started, start_timed = time.perf_counter(), i + 1
            if timed and (i + 1 - start_timed == ESTIMATE_AFTER_STEPS or i + 1 == len(batches)):
                timed = self._estimate_pending = False
                per_step = (time.perf_counter() - epoch_started) / (i + 1 - start_timed)
                self.say(f"about {format_duration(per_step * len(batches))} per epoch here ({per_step * 1e3:.1f} ms "
                         f"per step of {cfg.batch_size}, timed on {i + 1 - start_timed} steps)")
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix_str(totals.running(), refresh=False)
            if i + 1 < len(batches) and (self._stop.requested or (
                    cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)):
                if self.rank == 0:
                    self._save_checkpoint({"batch": i + 1, "totals": totals.state()}, generator)
                if self._stop.requested:
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

    def _compiled_forward(self, batch, ctx):
        """The first step with --compile: compile the model's forward (torch.compile compiles on this first call);
        if that fails, say why and go on eagerly. The batch is the same either way, and a failed compile has
        drawn no random numbers from the model's draws that the eager call repeats (the seed stays reproducible
        only up to torch.compile's own random streams, which differ from eager's)."""
        self._compile_pending = False
        if not type(self.model).compiles_faster:
            self.say(f"--compile: torch.compile was measured no faster than eager for {self.model_name}'s training "
                     "step (BENCHMARKS.md, torch.compile per model); compiling as asked")
        eager = self.module
        started = time.perf_counter()
        try:
            self.module = torch.compile(eager)
            out = self.module(batch, ctx)
        except Exception as err:  # noqa: BLE001 - any compiler failure: train eagerly instead
            self.module = eager
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.say(f"--compile: torch.compile failed ({type(err).__name__}: {first_line[:200]}); training eagerly")
            return eager(batch, ctx)
        self.say(f"--compile: compiled in {time.perf_counter() - started:.1f} s (the first step included)")
        return out

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
        if any_nonfinite(grads + [out.losses[name].detach().reshape(1) for name in names]):  # one pass over all
            self._diverged(out, grads)
        for name in names:
            step_optimizer(self.optimizers[name])
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
        val = self.model.validation_rows(val)
        param = next(self.model.parameters())
        for index in torch.arange(len(val)).split(batch_size):
            with self._autocast():
                totals.add(self.model(val.batch(index, generator).to(param), ctx), len(index))
        record = totals.means(1)
        record.update(epoch=self.epoch + 1, step=self.step, split="val", **ctx.values)
        return record

    def _progress(self, total: int, done: int) -> Progress | None:
        """A bar on a terminal; otherwise a plain line every ELBOLAB_PROGRESS_EVERY (10) seconds within a long
        epoch, with the running metrics (the epoch line follows at its end)."""
        if not self.config.progress or self.rank != 0:
            return None
        return Progress(f"epoch {self.epoch + 1}/{self.config.epochs}", total, "batches", initial=done).__enter__()


ESTIMATE_AFTER_STEPS = 20


class StopOnInterrupt:
    """The first Ctrl-C (SIGINT) or SIGTERM (a scheduler's or a session's end, a background job's kill) asks the loop
    to stop at the next safe point, after a checkpoint; a second Ctrl-C stops at once. Installed only in a single
    process, for each signal whose handler is still Python's default (not under torchrun, not when the caller
    handles the signal itself; a background job whose SIGINT is ignored still gets SIGTERM)."""

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self._previous = enabled, False, {}

    def __enter__(self) -> StopOnInterrupt:
        if self.enabled:
            for signum, default in self.DEFAULTS.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = default
                    signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        what = "Ctrl-C again to stop at once, without a checkpoint" if signum == signal.SIGINT else "SIGTERM"
        print(f"\nstopping after this step ({what})", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
