"""Where training's numbers go: metrics.jsonl (one JSON record per epoch and split, the run's own record) and,
optionally, TensorBoard (scalars as in metrics.jsonl, reconstructions and samples, the settings with the final
metrics), plus the one plain line per epoch a person reads.

Metric keys the rest of elbolab relies on (a model's ``LossOutput.metrics``): ``elbo`` (the plain ELBO per example:
--keep-best, the epoch line, the training summary, the report's curves and the evaluator read it), ``kl`` and
``iwae_bound`` (shown on the epoch line when present); the trainer adds ``loss`` (and ``loss_GROUP`` for extra
parameter groups) and the record keys ``epoch``, ``step``, ``split``, ``time`` and ``seconds``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from elbolab import runs
from elbolab.errors import ElbolabError

HEADLINE_METRICS = ("elbo", "kl", "iwae_bound")  # shown on the epoch line and the progress bar, when present
RECORD_KEYS = ("epoch", "step", "split", "time", "seconds")


def headline_keys(values) -> list[str]:
    return [k for k in HEADLINE_METRICS if k in values] or ["loss"]


def epoch_line(epoch: int, epochs: int, records: list[dict], seconds: float) -> str:
    """'epoch 3/10  train elbo -95.21 kl 21.3 | val elbo -96.03 kl 21.0 | 12.4 s'."""
    parts = [f"epoch {epoch}/{epochs}"]
    for r in records:
        parts.append(f"{r['split']} " + " ".join(f"{k} {r[k]:.2f}" for k in headline_keys(r)))
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
        keys = headline_keys(self.sums)
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


class MetricsLog:
    """Appends records to RUN/metrics.jsonl and mirrors their numbers to TensorBoard (RUN/tensorboard)."""

    def __init__(self, run_dir, *, tensorboard: bool):
        self.run_dir, self.tensorboard = Path(run_dir), tensorboard
        self._writer = None

    def _tensorboard(self):
        if self.tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # TensorBoard's import is slow: only when used

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def write(self, records: list[dict]) -> None:
        with open(self.run_dir / runs.METRICS, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for r in records:
                for key, value in r.items():
                    if key not in RECORD_KEYS and isinstance(value, (int, float)):
                        writer.add_scalar(f"{r['split']}/{key}", value, r["step"])  # as metrics.jsonl
            writer.flush()

    def images(self, model, data, step: int, seed: int) -> None:
        """Reconstructions of the first 16 images of ``data`` and 16 samples, in eval mode with the RNG state
        restored (the training trajectory and exact resume are untouched)."""
        shape = getattr(model.config, "image_shape", None)
        if self._writer is None or shape is None or not len(data):
            return
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the same draws every epoch: the grid changes with the model
                param = next(model.parameters())
                batch = data.batch(torch.arange(min(16, len(data))), torch.Generator().manual_seed(0)).to(param)
                pairs = torch.stack([batch.x, model.reconstruct(batch).float()], 1)  # [B, 2, D]
                self._writer.add_images("reconstructions (original | reconstruction)",
                                        pairs.reshape(-1, *shape).clamp(0, 1).cpu(), step)
                try:
                    samples = model.sample(16)
                except ElbolabError:  # a model that samples only given a condition (cvae on quadrants)
                    samples = None
                if samples is not None:
                    self._writer.add_images("samples", samples.float().reshape(-1, *shape).clamp(0, 1).cpu(), step)
            self._writer.flush()
        finally:
            model.train(was_training)

    def settings_with_results(self, run_config: dict, history: list[dict]) -> None:
        """The run's settings with its final metrics (TensorBoard's HPARAMS tab), once training ends."""
        if self._writer is None or not history:
            return
        settings = {}
        for group in ("model_config", "train_config", "data"):
            for key, value in (run_config[group] or {}).items():
                if isinstance(value, (list, tuple, dict)):
                    value = json.dumps(value)
                if value is not None:
                    settings[f"{group.split('_')[0]}.{key}"] = value
        settings["model"] = run_config["model"]
        final = {}
        for r in history:  # the last record of each split
            final.update({f"final/{r['split']}/{k}": v for k, v in r.items()
                          if k not in RECORD_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)})
        self._writer.add_hparams(settings, final, run_name="hparams")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
