"""Evaluation of a trained latent-variable model: the record ``elbolab eval`` writes.

log p(x) by importance sampling (``elbolab.estimators``), whether K is large enough (``importance_diagnostics``), the
ELBO, and latent diagnostics: active units (Burda et al. 2016 s5.2) and the KL(q(z_j|x) || p(z_j)) of each latent
dimension (notes 000 eq. 7, notes 001 eq. 37, one term of the sum per dimension).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, Normal

from elbolab.ais import ais_log_px, bdmc
from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.estimators import (
    LogLikelihoodEstimate,
    check_inputs,
    importance_sampled_log_px,
    k_warning,
    model_tensor,
    naive_log_px,
    plan_chunks,
    sample_width,
)
from elbolab.kl_anatomy import kl_anatomy
from elbolab.precision import autocast, check_precision
from elbolab.progress import Progress
from elbolab.runs import describe_nonfinite, nonfinite_tensors
from elbolab.schedules import StepContext

# The default evaluation's budget: about a minute on this machine (issue 22); --full gives the papers' protocol.
QUICK_EVAL_SECONDS = 60.0
PROBE_EXAMPLES, PROBE_SAMPLES = 2, 1000  # the cost probe of estimated_log_px_seconds
QUICK_EVAL_MIN_EXAMPLES = 500  # below this the s.e. over examples (about s.d./sqrt(N)) grows past ~1 nat on MNIST


def estimated_log_px_seconds(model: nn.Module, data, k: int) -> float | None:
    """Seconds importance sampling with K = ``k`` would take on all of ``data`` here: the estimator itself
    (``importance_sampled_log_px``, with its blocks, log-sum-exp and statistics) is timed on the first
    ``PROBE_EXAMPLES`` examples at K = min(k, ``PROBE_SAMPLES``), after a warm-up call at K = 16 (it pays the
    one-off costs), and scaled linearly in N and K. Blocks of a few samples per example cost less per sample than
    the evaluation's (a cache-sized block), which is why the probe draws as many as it does. None when the model
    cannot importance-sample (the estimator itself says why)."""
    import time

    n = min(PROBE_EXAMPLES, len(data))
    generator = torch.Generator().manual_seed(0)
    batch = data.batch(torch.arange(n), generator).to(model_tensor(model))
    k_probe = min(k, PROBE_SAMPLES)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            importance_sampled_log_px(model, batch, k=min(k_probe, 16))
            started = time.perf_counter()
            importance_sampled_log_px(model, batch, k=k_probe)
            return (time.perf_counter() - started) * (len(data) / n) * (k / k_probe)
    except (NotImplementedError, ElbolabError):
        return None


def quick_budget_examples(n_total: int, seconds_all: float, *, target_seconds: float = QUICK_EVAL_SECONDS,
                          minimum: int = QUICK_EVAL_MIN_EXAMPLES) -> int:
    """How many examples (the first N of the split) the default evaluation scores: all of them when that takes at
    most twice ``target_seconds``, else as many as fit ``target_seconds`` (rounded down to a hundred), but never
    fewer than ``minimum``. The estimator's bias at K is unchanged; only the s.e. over examples grows."""
    if n_total < 1 or seconds_all < 0 or target_seconds <= 0:
        raise ElbolabError(f"expected n_total >= 1, seconds >= 0, target > 0; got {n_total}, {seconds_all}, "
                           f"{target_seconds}")
    if seconds_all <= 2 * target_seconds:
        return n_total
    fitting = int(n_total * target_seconds / seconds_all)
    fitting = fitting // 100 * 100 if fitting >= 100 else fitting
    return min(n_total, max(minimum, fitting))


def paired_difference(mine: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Mean of the per-example differences ``mine - theirs`` ([N] each, same examples) and its standard error."""
    if mine.shape != theirs.shape:
        raise ElbolabError(f"a paired difference needs the same examples, got {mine.shape[0]} and {theirs.shape[0]}")
    diff = (mine - theirs).double()
    n = diff.shape[0]
    stderr = float(diff.std() / math.sqrt(n)) if n > 1 else math.nan
    return {"mean_difference": float(diff.mean()), "stderr": stderr if math.isfinite(stderr) else None,
            "n_examples": n, "other_mean": float(theirs.double().mean())}


def importance_diagnostics(model: nn.Module, data, *, k: int, estimate: LogLikelihoodEstimate | None = None,
                           n_examples: int | None = None, seed: int = 0, n_shown: int = 3) -> dict:
    """Whether K is large enough, seen three ways on the examples of the estimate itself (the same draws):

    * ``ess``: Kish's effective sample size of each example's K weights ``[n]`` (a small ESS/K: few samples carry
      the estimate);
    * ``curve``: log p(x) (mean over the examples) and its Monte-Carlo s.e. using the first K' of the K draws, for
      K' = 1, 2, 5, 10, ... K (it should flatten; K' = 1 is the ELBO estimate);
    * ``shown``: the normalised log weights log w_k - max_k log w_k of the examples with the lowest, median and
      highest ESS (``{"ess": ..., "index": ..., "log_w": [K]}``), drawn again for those examples only.

    ``estimate`` is the headline estimate (``importance_sampled_log_px``); without it, one is made on the first
    ``n_examples`` examples (all by default). Memory stays within the estimator's blocks either way."""
    if hasattr(data, "batch"):  # a split: the same binarisation as evaluate_model draws with this seed
        data = data.batch(torch.arange(len(data) if n_examples is None else min(n_examples, len(data))),
                          torch.Generator().manual_seed(seed))
    batch = check_inputs(model, data, k, None, None)
    if n_examples is not None:
        batch = batch[:n_examples]
    if estimate is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            estimate = importance_sampled_log_px(model, batch, k=k)
    ess, n = estimate.ess, len(batch)
    order = torch.argsort(ess)
    picks = [int(order[0]), int(order[n // 2]), int(order[-1])][:n_shown]
    param = model_tensor(model)
    _, chunk = plan_chunks(len(picks), k, sample_width(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            part = batch[torch.tensor(picks)].to(param)
            log_w = torch.cat([model.importance_samples(part, min(chunk, k - done))[1].to("cpu", torch.float64)
                               for done in range(0, k, chunk)])  # [K, n_shown]
    finally:
        model.train(was_training)
    shown = [{"index": i, "ess": float(ess[i]), "log_w": log_w[:, j] - log_w[:, j].max()}
             for j, i in enumerate(picks)]
    return {"ess": ess, "k": k, "n_examples": n, "curve": estimate.curve, "shown": shown}


def _batched(model: nn.Module, batch: Batch, batch_size: int, fn) -> list:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ElbolabError(f"expected batch_size to be a positive integer, got {batch_size!r}")
    param = model_tensor(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [fn(batch[i:i + batch_size].to(param)) for i in range(0, len(batch), batch_size)]
    finally:
        model.train(was_training)


def _per_group(model: nn.Module, batch: Batch, batch_size: int, hook: str) -> dict[str, torch.Tensor] | None:
    """A per-group hook (``latent_means`` or ``kl_terms``) over the whole batch: {group: [N, d_g]} float64."""
    parts = _batched(model, batch, batch_size, getattr(model, hook))
    if any(part is None for part in parts):
        return None
    return {group: torch.cat([part[group].double().cpu() for part in parts]) for group in parts[0]}


def active_units_per_group(model: nn.Module, data, *, threshold: float = 0.01,
                           batch_size: int = 1000) -> dict[str, tuple[int, torch.Tensor]]:
    """Burda et al. 2016 s5.2 per latent group: unit u is active if Cov_x(E_{q(z|x)}[z_u]) > threshold.

    Returns {group: (number of active units, per-dimension variance [d_g] float64, unbiased over x)}."""
    batch = check_inputs(model, data, 1, batch_size, None)
    result = {}
    for group, means in _per_group(model, batch, batch_size, "latent_means").items():
        variance = means.var(0) if means.shape[0] > 1 else torch.zeros(means.shape[1], dtype=torch.float64)
        result[group] = (int((variance > threshold).sum()), variance)
    return result


def active_units(model: nn.Module, data, *, threshold: float = 0.01,
                 batch_size: int = 1000) -> tuple[int, torch.Tensor]:
    """Active units over all latent groups: (count, per-dimension variance [d] float64)."""
    groups = active_units_per_group(model, data, threshold=threshold, batch_size=batch_size)
    return sum(count for count, _ in groups.values()), torch.cat([v for _, v in groups.values()])


def kl_per_dimension(model: nn.Module, data, *, batch_size: int = 1000) -> torch.Tensor:
    """Mean over x of KL(q(z_j|x) || p(z_j)) for each latent dimension j (all groups), ``[d]`` float64.

    For a diagonal q this sums to the mean KL(q(z|x) || p(z)); for a full-covariance q the marginals
    N(mu_j, Sigma_jj) are used, and the sum then leaves out the correlation part of the KL.
    """
    batch = check_inputs(model, data, 1, batch_size, None)
    groups = _per_group(model, batch, batch_size, "kl_terms")
    if groups is None:
        raise ElbolabError(f"{type(model).__name__} defines no per-dimension KL (a non-Gaussian q or prior)")
    return torch.cat([kl.mean(0) for kl in groups.values()])


def collapse_check(model: nn.Module, data, *, max_examples: int = 1000, seed: int = 0,
                   schedules: dict | None = None) -> dict:
    """Active units and the mean KL on up to ``max_examples`` examples of ``data``, and a warning when the posterior
    has collapsed (no or few active units, or a KL near zero), with the remedies this model accepts and the run
    (its ``schedules``) has not already tried. Empty for a model without a KL (an autoencoder)."""
    n = min(len(data), max_examples)
    batch = data.batch(torch.arange(n), torch.Generator().manual_seed(seed))
    kl_groups = _per_group(model, batch, 1000, "kl_terms")
    if kl_groups is None:
        return {}
    groups = active_units_per_group(model, batch)
    active = sum(count for count, _ in groups.values())
    latent_dim = sum(int(v.shape[0]) for _, v in groups.values())
    mean_kl = float(sum(kl.sum(1).mean() for kl in kl_groups.values()))
    result = {"active_units": active, "latent_dim": latent_dim, "mean_kl": mean_kl, "collapse_warning": None}
    if active == 0 or active * 10 <= latent_dim or mean_kl < 0.1:
        reads, tried = set(model.scheduled_values), dict(schedules or {})
        warmed_up = str(tried.get("beta", "")).startswith(("linear:0:", "cyclical:"))
        remedies = [text for name, text, done in (
            ("beta", "KL warm-up (--kl-warmup 10)", warmed_up),
            ("free_bits", "free bits (--schedule free_bits=constant:0.25)", "free_bits" in tried),
            ("beta", "a smaller --beta", False)) if name in reads and not done]
        remedies += model.collapse_remedies()
        result["collapse_warning"] = (
            f"posterior collapse: {active} of {latent_dim} latent units are active and the mean KL is {mean_kl:.3g} "
            f"nats, so the decoder mostly ignores z. Try {', '.join(remedies + ['more --epochs'])}"
        )  # only the remedies this model accepts (the IWAE has no KL weight to anneal)
    return result


def _mean_elbo(model: nn.Module, batch: Batch, batch_size: int) -> float | None:
    per_batch = _batched(model, batch, batch_size, lambda b: model(b, StepContext()).metrics.get("elbo"))
    if any(values is None for values in per_batch):  # a model that reports no ELBO
        return None
    return float(torch.cat([values.double().cpu() for values in per_batch]).mean())


def _density_note(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why log p(x) is not a log-density of these data, or None when it is."""
    head = getattr(model, "likelihood_head", None)
    scores_density = getattr(head, "scores_density", None)
    if scores_density is None or scores_density(x):
        return None
    return (f"the {model.config.likelihood} likelihood on data outside its support (e.g. Bernoulli on grey levels) "
            "gives a score, a negative cross-entropy, not a log-density; binarise the data (--binarize dynamic) or "
            "use --likelihood continuous-bernoulli for a true log-likelihood")


def evaluate_model(model: nn.Module, data, *, k: int = 5000, naive_k: int | None = None, seed: int = 0,
                   progress: bool = False, batch_size: int = 1000, return_per_example: bool = False,
                   precision: str = "fp32", compile: bool = False, return_estimate: bool = False):
    """Everything ``elbolab eval`` reports, as a JSON-ready dict; with ``return_per_example`` also the per-example
    log p(x) estimates ``[N]`` (for paired comparisons), as ``(dict, tensor)``. ``compile``: the importance
    sampling through torch.compile (see :class:`CompiledLogWeights`).

    ``precision`` "bf16" runs the networks' matrix products in bfloat16 (see ``elbolab.precision``); the
    log-likelihoods, log q and the KL stay float32 and the log-sum-exp over samples float64. ``return_estimate``:
    also the headline ``LogLikelihoodEstimate`` (per-example values, ESS, log p(x) against K), as ``(dict, it)``.

    ``data`` has ``.batch(index, generator)`` and a length; ONE binarisation of the whole set is drawn
    with ``torch.Generator().manual_seed(seed)`` so that every estimate sees the same images. The random draws of
    the estimators come from torch's global generator seeded with ``seed`` inside a forked RNG state, so the result
    is reproducible and the caller's RNG state is left untouched.
    """
    if not hasattr(data, "batch") or not hasattr(data, "__len__"):
        raise ElbolabError(f"expected data with .batch(index, generator) and a length, got {type(data).__name__}")
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise ElbolabError(
            f"cannot evaluate: the model's {describe_nonfinite(bad)}, so every estimate would be NaN; training "
            "diverged (train again, e.g. with a lower lr) or its weights file is damaged"
        )
    n = len(data)
    batch = data.batch(torch.arange(n), torch.Generator().manual_seed(seed))
    check_inputs(model, batch, k, None, None)
    device = model_tensor(model).device
    check_precision(precision, device)
    with torch.random.fork_rng(devices=[]), autocast(precision, device):
        torch.manual_seed(seed)
        estimate = importance_sampled_log_px(model, batch, k=k, progress=progress, compile=compile)
        result: dict = {"log_px": estimate.to_dict()}
        if naive_k:
            result["log_px_naive"] = naive_log_px(model, batch, k=naive_k, progress=progress).to_dict()
        elbo = _mean_elbo(model, batch, batch_size)
    note = _density_note(model, batch.x)
    result["log_px"]["is_density"] = note is None
    warning = k_warning(estimate)
    if warning is not None:
        result["log_px"]["warning"] = warning
    result["log_px"]["is_exact_estimate"] = bool(getattr(model, "log_px_is_exact_estimate", True))
    notes = [note] if note is not None else []
    if not result["log_px"]["is_exact_estimate"]:
        notes.append("this model's importance weights use an approximate density (e.g. a learned density ratio): "
                     "log p(x) is an approximation, neither a bound nor unbiased")
    if notes:
        result["log_px_note"] = "; ".join(notes)
    if elbo is not None:
        result["elbo"] = elbo
    groups = active_units_per_group(model, batch, batch_size=batch_size)
    result["active_units"] = sum(count for count, _ in groups.values())
    result["latent_dim"] = sum(int(v.shape[0]) for _, v in groups.values())
    if len(groups) > 1:
        result["active_units_per_group"] = {g: count for g, (count, _) in groups.items()}
    kl_groups = _per_group(model, batch, batch_size, "kl_terms")
    result["kl_per_dim"] = None if kl_groups is None else [float(v) for g in kl_groups.values() for v in g.mean(0)]
    if kl_groups is not None and len(kl_groups) > 1:
        result["kl_per_group"] = {g: float(kl.sum(1).mean()) for g, kl in kl_groups.items()}
    anatomy = kl_anatomy_of(model, batch, batch_size=batch_size, seed=seed, progress=progress)
    if anatomy is not None:
        result["kl_anatomy"] = anatomy
    metrics = model.eval_metrics(data, estimate.per_example)
    if metrics:
        result["model_metrics"] = metrics
    result["n_examples"] = n
    result["seed"] = seed
    result["precision"] = precision
    result["compiled"] = compile and estimate.compile_fallback is None
    if compile and estimate.compile_fallback is not None:
        result["compile_fallback"] = estimate.compile_fallback
    result["log_px_against_k"] = {"n_examples": n, "curve": estimate.curve}
    if return_estimate:
        return result, estimate
    return (result, estimate.per_example) if return_per_example else result


def ais_evaluation(model: nn.Module, data, *, steps: int, chains: int = 16, leapfrog_steps: int = 10,
                   n_examples: int = 100, batch_size: int = 25, seed: int = 0, progress: bool = True) -> dict:
    """AIS from the prior to the posterior (``elbolab.ais``) on the first ``n_examples`` examples of ``data``, with
    the binarisation ``evaluate_model`` draws for this seed: a stochastic lower bound on log p(x) per example, whose
    mean and Monte-Carlo s.e. are returned with the acceptance rate and the wall time."""
    if hasattr(data, "batch"):
        data = data.batch(torch.arange(min(n_examples, len(data))), torch.Generator().manual_seed(seed))
    batch = as_batch(data)[:n_examples]
    param = model_tensor(model)
    values, errors, acceptance = [], [], []
    with Progress(f"log p(x) by AIS ({steps} steps, {chains} chains)", total=len(batch) * steps,
                  unit="example-steps", enabled=progress) as bar:
        for start in range(0, len(batch), batch_size):
            part = batch[start:start + batch_size].to(param)
            out = ais_log_px(model, part, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps,
                             seed=seed + start, progress=lambda done, total, n=len(part): bar.update(n))
            values.append(out["log_px"])
            errors.append(out["stderr"])
            acceptance.append(out["acceptance"] * len(part))
    log_px, stderr = torch.cat(values), torch.cat(errors)
    return {"mean": float(log_px.mean()), "mc_stderr": float(stderr.pow(2).sum().sqrt() / len(log_px)),
            "sd_over_examples": float(log_px.std()) if len(log_px) > 1 else None, "n_examples": len(log_px),
            "steps": steps, "chains": chains, "leapfrog_steps": leapfrog_steps,
            "acceptance": sum(acceptance) / len(log_px), "seconds": round(bar.seconds(), 2)}


def bdmc_evaluation(model: nn.Module, *, n_examples: int, steps: int, chains: int = 16, leapfrog_steps: int = 10,
                    seed: int = 0, progress: bool = True) -> dict:
    """Bidirectional Monte Carlo on ``n_examples`` data simulated from the model: forward AIS (a lower bound) and
    reverse AIS from the exact posterior sample (an upper bound) sandwich the true log p(x) of those data; their gap
    says how far to trust AIS (and importance sampling) at this many steps."""
    with Progress(f"BDMC ({steps} steps each way, {n_examples} simulated examples)", total=2 * steps,
                  unit="steps", enabled=progress) as bar:
        out = bdmc(model, n_examples, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps, seed=seed,
                   progress=lambda done, total: bar.update(1))
    return {"lower": out["lower_mean"], "upper": out["upper_mean"], "gap": out["gap"], "n_examples": n_examples,
            "steps": steps, "chains": chains, "leapfrog_steps": leapfrog_steps,
            "acceptance_forward": out["acceptance_forward"], "acceptance_reverse": out["acceptance_reverse"],
            "seconds": round(bar.seconds(), 2)}


def kl_anatomy_of(model: nn.Module, batch: Batch, *, batch_size: int = 1000, max_points: int = 5000,
                  seed: int = 0, progress: bool = True) -> dict | None:
    """Where the model spends its KL (``elbolab.kl_anatomy``, Hoffman & Johnson 2016; Chen et al. 2018): the mean
    KL(q(z|x) || p(z)) over the first ``max_points`` examples split into index-code mutual information, total
    correlation and dimension-wise KL, by the exact-aggregate estimator. None for a model whose q is not a
    diagonal Gaussian or whose prior is not a factorised Gaussian."""
    if not (model.has_posterior and model.encode_is_q):
        return None
    batch = batch[:max_points]
    param = model_tensor(model)
    means, stds = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(batch), batch_size):
                part = batch[start:start + batch_size].to(param)
                q = model.encode(part)
                if not (isinstance(q, Independent) and isinstance(q.base_dist, Normal)):
                    return None
                means.append(q.base_dist.loc.float().cpu())
                stds.append(q.base_dist.scale.float().cpu())
            prior = model.prior(batch[:1].to(param))
        with Progress(f"KL anatomy over {len(batch):,} examples", total=len(batch), unit="points",
                      enabled=progress) as bar:
            result = kl_anatomy(torch.cat(means), torch.cat(stds), prior, seed=seed,
                                progress=lambda done, total: bar.update(done - bar.done))
    except (ElbolabError, NotImplementedError):  # a mixture prior, a full-covariance q: no such split here
        return None
    keep = ("mutual_information", "mutual_information_se", "total_correlation", "total_correlation_se",
            "dimension_wise_kl", "dimension_wise_kl_se", "average_kl", "mutual_information_bound", "estimator",
            "n_points", "sum_minus_average_kl")
    return {k: result[k] for k in keep if k in result}
