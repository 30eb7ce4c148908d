"""Training loop: Adam, epochs, validation, metrics (JSONL + TensorBoard), checkpoints, exact resume, DDP.

Schedules live here, not in the models: beta (with optional linear KL warm-up, Bowman et al. 2016; Sønderby et al.
2016) and the number of Monte-Carlo samples arrive in ``model.loss`` as arguments.

Reproducibility: the batch order of epoch e comes from ``DistributedSampler(seed, epoch=e)`` and dynamic
binarisation from a generator seeded by (seed, epoch, rank), so neither needs saving; the global torch RNG (the
reparameterisation noise) is saved in the checkpoint. A resumed CPU run therefore ends with bit-identical
parameters to an uninterrupted one. Under ``torchrun`` each of W processes takes batch_size / W examples of every
global batch (the sampler interleaves ranks over one shared permutation) and DDP averages the gradients, so one
step equals a one-process step on the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data.distributed import DistributedSampler

from elbolab import runs
from elbolab.checkpoint import load_checkpoint, save_checkpoint
from elbolab.errors import CheckpointError, ElbolabError, TrainingDiverged


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    adam_eps: float = 1e-8
    beta: float = 1.0
    kl_warmup_epochs: float = 0.0
    mc_samples: int = 1
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True

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

    def beta_at(self, epoch_progress: float) -> float:
        """beta after ``epoch_progress`` epochs: linear warm-up from 0, then constant."""
        if self.kl_warmup_epochs == 0:
            return self.beta
        return self.beta * min(1.0, epoch_progress / self.kl_warmup_epochs)


def distributed_context() -> tuple[int, int]:
    """(rank, world size); initialises the gloo process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), world


class Trainer:
    def __init__(self, model, config: TrainConfig, run_dir, *, model_name: str, data_info: dict | None = None):
        self.model, self.config, self.run_dir = model, config, Path(run_dir)
        self.model_name, self.data_info = model_name, data_info or {}
        self.rank, self.world = distributed_context()
        if config.batch_size % self.world:
            raise ElbolabError(
                f"expected a batch size divisible by the {self.world} processes, got {config.batch_size}"
            )
        groups = model.parameter_groups()
        param_groups = [{"params": params, "name": name} for name, params in groups.items()]
        try:
            # fused Adam: one kernel for all parameters instead of a per-parameter loop (about 4x less optimiser
            # time on CPU, measured in benchmarks/bench_vae_train.py); needs torch >= 2.4 on CPU
            self.optimizer = torch.optim.Adam(param_groups, lr=config.lr, eps=config.adam_eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.Adam(param_groups, lr=config.lr, eps=config.adam_eps)
        self.module = model
        if self.world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(model)
        self.epoch, self.step = 0, 0
        self._writer = None

    # ----- run folder -----
    def run_config(self) -> dict:
        return {
            "model": self.model_name,
            "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.config),
            "data": self.data_info,
        }

    def _prepare_run_dir(self, resume: bool) -> None:
        config_path = self.run_dir / runs.CONFIG
        if resume:
            saved = runs.read_json(config_path)
            mine = json.loads(json.dumps(self.run_config()))  # tuples -> lists, as saved
            for key in ("model", "model_config", "data"):
                if saved.get(key) != mine[key]:
                    raise CheckpointError(
                        f"--resume: the {key} differs from the run in {self.run_dir} (saved {saved.get(key)}, "
                        f"got {mine[key]}); resume with the same settings or use a new --out"
                    )
            ignore = {"epochs", "progress", "tensorboard"}
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
        state = load_checkpoint(self.run_dir / runs.CHECKPOINT, self.model, self.optimizer)
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
        if resume:
            self._resume()
        if len(train) < self.world:
            raise ElbolabError(f"expected at least {self.world} training examples, got {len(train)}")
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
                save_checkpoint(self.run_dir / runs.CHECKPOINT, self.model, self.optimizer, state)
                runs.save_tensors(self.run_dir / runs.WEIGHTS, self.model.state_dict())
            if self.world > 1:
                torch.distributed.barrier()
            history.extend(records)
        if self._writer is not None:
            self._writer.close()
        return history

    def _train_epoch(self, train) -> dict:
        cfg, n = self.config, len(train)
        sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(self.epoch)
        order = torch.tensor(list(sampler))  # this rank's share of one shared permutation
        local_batch = cfg.batch_size // self.world
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        batches = order.split(local_batch)
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        for i, index in enumerate(self._progress(batches)):
            x = train.batch(index, generator)  # [B, D]
            beta = cfg.beta_at(self.epoch + i / len(batches))
            out = self.module(x, beta=beta, mc_samples=cfg.mc_samples)
            if not torch.isfinite(out.loss):
                raise TrainingDiverged(
                    f"the loss became {out.loss.item()} at epoch {self.epoch + 1}, step {self.step + 1}; the last good "
                    f"checkpoint in {self.run_dir} is kept. Try a lower --lr, a Bernoulli likelihood for [0,1] data, "
                    "or check the data for extreme values"
                )
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.optimizer.step()
            self.step += 1
            count += len(index)
            with torch.no_grad():
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value.sum())
                sums["loss"] = sums.get("loss", 0.0) + float(out.loss) * len(index)
        record = {k: v / count for k, v in sums.items()}
        record.update(epoch=self.epoch + 1, step=self.step, split="train", beta=cfg.beta_at(self.epoch + 1))
        return record

    @torch.no_grad()
    def _validate(self, val, batch_size: int = 1000) -> dict:
        cfg = self.config
        self.model.eval()
        generator = torch.Generator().manual_seed(cfg.seed + 7919)  # the same binarisation every epoch
        sums: dict[str, float] = {}
        for index in torch.arange(len(val)).split(batch_size):
            out = self.model.loss(val.batch(index, generator), beta=cfg.beta, mc_samples=cfg.mc_samples)
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.sum())
            sums["loss"] = sums.get("loss", 0.0) + float(out.loss) * len(index)
        record = {k: v / len(val) for k, v in sums.items()}
        record.update(epoch=self.epoch + 1, step=self.step, split="val", beta=cfg.beta)
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
