"""The evaluation record: what ``elbolab eval`` writes (RUN/eval.json, RUN/evaluations/*.json), the report and the
CLI read. Written down here, versioned, and read through ``Evaluation.from_dict``, which also reads the records of
earlier versions.

Versions: 1 (no ``schema_version`` key; before 2026-12-07: ESS and K at the top level in the oldest files, the naive
estimate as ``naive_log_px`` in some); 2 (this schema). A value of the wrong type (a hand edit) or a key this version
does not know (a newer writer) is kept in ``other`` and shown as it is, never dropped and never a crash.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

SCHEMA_VERSION = 2


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value) -> bool:
    return _number(value) and math.isfinite(value)


@dataclass
class Estimate:
    """An estimate of log p(x) in nats per example, with its uncertainties (``estimators.LogLikelihoodEstimate``):
    ``mc_stderr`` (Monte Carlo: other importance samples), ``sd_over_examples`` / ``stderr_over_examples`` (another
    test set), the mean and minimum effective sample size of the weights, K and the number of examples."""

    mean: float | None = None
    mc_stderr: float | None = None
    bias_estimate: float | None = None
    sd_over_examples: float | None = None
    stderr_over_examples: float | None = None
    ess_mean: float | None = None
    ess_min: float | None = None
    k: int | None = None
    n_examples: int | None = None
    is_density: bool | None = None  # False: a Bernoulli score of grey levels, not a log-density
    is_exact_estimate: bool | None = None  # False: the weights use an approximate density (a learned ratio)
    warning: str | None = None  # K looks too small (estimators.k_warning): the CLI and the report show it


@dataclass
class Comparison:
    """The paired difference of log p(x), this run minus ``other_run``, example by example on the same examples."""

    other_run: str | None = None
    mean_difference: float | None = None
    stderr: float | None = None
    n_examples: int | None = None
    other_mean: float | None = None


@dataclass
class Evaluation:
    schema_version: int = SCHEMA_VERSION
    # what was evaluated, and how
    split: str = "test"
    dataset: str | None = None
    model: str | None = None
    weights: str | None = None
    seed: int | None = None
    device: str | None = None
    precision: str | None = None
    limit: int | None = None  # only the first N examples of the split were scored
    limit_reason: str | None = None  # "--limit" (asked for) or "budget" (the default's ~1 minute; --full for all)
    split_size: int | None = None  # examples in the split
    n_examples: int | None = None
    evaluated_at: str | None = None
    compiled: bool | None = None
    compile_fallback: str | None = None
    # the estimates
    log_px: Estimate | None = None
    log_px_naive: Estimate | None = None
    log_px_note: str | None = None
    elbo: float | None = None
    compare: Comparison | None = None
    log_px_against_k: dict | None = None  # {"n_examples", "curve": [{"k", "log_px", "mc_stderr"}]}
    # annealed importance sampling (a stochastic lower bound): mean, mc_stderr, n_examples, steps, chains,
    # leapfrog_steps, acceptance, seconds
    log_px_ais: dict | None = None
    # bidirectional Monte Carlo on simulated data: lower, upper, gap, n_examples, steps, chains, seconds
    bdmc: dict | None = None
    # the latent space
    latent_dim: int | None = None
    active_units: int | None = None
    active_units_per_group: dict[str, int] | None = None
    kl_per_dim: list[float] | None = None
    kl_per_group: dict[str, float] | None = None
    # the mean KL split into index-code MI, total correlation and dimension-wise KL (elbolab.kl_anatomy)
    kl_anatomy: dict | None = None
    # further analyses and the model's own numbers
    disentanglement: dict | None = None
    model_metrics: dict = field(default_factory=dict)
    other: dict = field(default_factory=dict)  # unknown keys, and values of the wrong type, as they were

    @classmethod
    def from_dict(cls, record: dict) -> Evaluation:
        """A record of any version; never raises on a malformed value (it lands in ``other``)."""
        record = dict(record) if isinstance(record, dict) else {}
        version = record.pop("schema_version", 1)
        if version == 1:
            record = _upgrade_from_1(record)
        other = dict(record.pop("other", {}) or {})
        values = {}
        hints = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in record.items():
            if key not in hints or key == "other":
                other[key] = value
            elif key in ("log_px", "log_px_naive"):
                values[key] = _parsed(Estimate, value, other, key)
            elif key == "compare":
                values[key] = _parsed(Comparison, value, other, key)
            elif _fits(hints[key].type, value):
                values[key] = value
            else:
                other[key] = value
        evaluation = cls(schema_version=SCHEMA_VERSION, other=other, **values)
        if evaluation.model_metrics is None:
            evaluation.model_metrics = {}
        return evaluation

    def to_dict(self) -> dict:
        """JSON-ready, in the form ``from_dict`` reads; fields left at None are left out."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "other":
                continue
            if dataclasses.is_dataclass(value):
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
            if value is None or (f.name == "model_metrics" and not value):
                continue
            out[f.name] = value
        return {**self.other, **out}


def _upgrade_from_1(record: dict) -> dict:
    """Version 1 to 2: ESS and K at the top level move into log_px; ``naive_log_px`` becomes ``log_px_naive``."""
    if "naive_log_px" in record and "log_px_naive" not in record:
        record["log_px_naive"] = record.pop("naive_log_px")
    estimate_fields = {f.name for f in dataclasses.fields(Estimate)} | {"stderr"}
    # the oldest files: flat log_px_mean, log_px_mc_stderr, naive_log_px_mean, ...
    for prefix, key in (("log_px_naive", "log_px_naive"), ("naive_log_px", "log_px_naive"), ("log_px", "log_px")):
        flat = {f: record.pop(f"{prefix}_{f}") for f in sorted(estimate_fields) if f"{prefix}_{f}" in record}
        if flat and not isinstance(record.get(key), dict):
            record[key] = flat
    for key in ("log_px", "log_px_naive"):  # "stderr" is the older name of the s.e. over examples
        block = record.get(key)
        if isinstance(block, dict) and "stderr" in block and "stderr_over_examples" not in block:
            record[key] = {**{k: v for k, v in block.items() if k != "stderr"}, "stderr_over_examples": block["stderr"]}
    block = record.get("log_px")
    if isinstance(block, dict):
        block = dict(block)
        for legacy in ("ess_mean", "ess_min", "k", "n_examples"):
            if legacy not in block and legacy in record:
                block[legacy] = record[legacy] if legacy == "n_examples" else record.pop(legacy)
        record["log_px"] = block
    return record


_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "list": list}


def _fits(annotation: str, value) -> bool:
    """Whether ``value`` fits a field annotated ``annotation`` (the string form, from ``from __future__``)."""
    if value is None:
        return "None" in annotation
    base = annotation.replace(" | None", "").split("[")[0]
    kind = _TYPES.get(base)
    if kind is None:
        return True
    if kind in (int, (int, float)) and isinstance(value, bool):
        return False
    if base == "list":
        return isinstance(value, list) and all(_number(v) for v in value)
    return isinstance(value, kind)


def _parsed(cls, value, other: dict, key: str):
    if not isinstance(value, dict):
        if value is not None:
            other[key] = value
        return None
    names = {f.name: f for f in dataclasses.fields(cls)}
    known = {k: v for k, v in value.items() if k in names and _fits(names[k].type, v)}
    rest = {k: v for k, v in value.items() if k not in known}
    if rest:
        other[key] = rest
    return cls(**known)
