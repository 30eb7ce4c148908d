"""Evaluation of a trained latent-variable model: log p(x) estimates and latent diagnostics.

Importance-sampled log-likelihood (Rezende et al. 2014 appendix E; Burda et al. 2016 eq. 8 and s5):

    log p(x) ~= log 1/K sum_k p(x, z_k) / q(z_k | x),   z_k ~ q(z|x)

a lower bound in expectation (the IWAE bound L_K) that increases to log p(x) as K grows. The naive estimator
samples the prior instead, log 1/K sum_k p(x | z_k) with z_k ~ p(z): unbiased for p(x) but with a far larger
variance, because few prior draws land where the posterior has its mass.

Both are computed in chunks over the K samples and over the examples, combined with a running logsumexp, so that
K = 5000 over the 10 000 MNIST test images stays within a few hundred MB.

Latent diagnostics: active units (Burda et al. 2016 s5.2) and the KL(q(z_j|x) || p(z_j)) of each latent dimension
(notes 000 eq. 7, notes 001 eq. 37, one term of the sum per dimension).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.objectives import effective_sample_size
from elbolab.schedules import StepContext

# Size of one [k_chunk, B, width] float32 block (decoder output, log-prob temporaries); the evaluator holds a
# handful of such blocks at once. Measured on a 784-400-20 VAE at K = 5000 (2-core CPU, interleaved runs): blocks of
# 4-8 MB (1250-2500 samples x 784 pixels) ran ~1.5x faster than 16-64 MB ones, whose temporaries leave the cache.
BLOCK_BYTES = 8 * 2**20

LogWeightFn = Callable[[Batch, int], torch.Tensor]  # (batch of B examples, k_chunk) -> log weights [k_chunk, B]


@dataclass(frozen=True)
class LogLikelihoodEstimate:
    """An estimate of log p(x) per example and its summary over the examples (in nats).

    Two different uncertainties, named for what they are:

    * ``mc_stderr``: the Monte-Carlo standard error of ``mean`` (how much it would move with other importance
      samples, for these examples). Delta method: per example Var(log p^_K) ~ 1/ESS_i - 1/K, so
      mc_stderr = sqrt(sum_i (1/ESS_i - 1/K)) / N. ``bias_estimate`` = -1/2 mean_i (1/ESS_i - 1/K) is the
      estimated (downward) bias of the same mean. Optimistic when the weights are heavy-tailed at small K.
    * ``sd_over_examples`` and ``stderr_over_examples`` = sd / sqrt(N): the spread of log p(x) across examples,
      which says how much the mean would move with another test set, not whether K is large enough. Two models
      are compared on the same examples by a paired difference (``paired_difference``).
    """

    mean: float
    mc_stderr: float  # nan for the naive estimator (no ESS)
    bias_estimate: float
    sd_over_examples: float
    stderr_over_examples: float
    ess_mean: float  # mean Kish effective sample size of the importance weights; nan for the naive estimator
    ess_min: float
    k: int
    n_examples: int
    per_example: torch.Tensor  # [N] float64
    compile_fallback: str | None = None  # why torch.compile was not used after all (asked for, but failed)

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-example values); nan becomes None."""
        def finite_or_none(v: float) -> float | None:
            return v if math.isfinite(v) else None

        keys = ("mean", "mc_stderr", "bias_estimate", "sd_over_examples", "stderr_over_examples", "ess_mean",
                "ess_min")
        return {**{key: finite_or_none(getattr(self, key)) for key in keys}, "k": self.k,
                "n_examples": self.n_examples}


def paired_difference(mine: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Mean of the per-example differences ``mine - theirs`` ([N] each, same examples) and its standard error."""
    if mine.shape != theirs.shape:
        raise ElbolabError(f"a paired difference needs the same examples, got {mine.shape[0]} and {theirs.shape[0]}")
    diff = (mine - theirs).double()
    n = diff.shape[0]
    stderr = float(diff.std() / math.sqrt(n)) if n > 1 else math.nan
    return {"mean_difference": float(diff.mean()), "stderr": stderr if math.isfinite(stderr) else None,
            "n_examples": n, "other_mean": float(theirs.double().mean())}


def _model_tensor(model: nn.Module) -> torch.Tensor:
    param = next(model.parameters(), None)
    if param is None:
        raise ElbolabError(f"expected a model with parameters, got {type(model).__name__} with none")
    return param


def _check_inputs(model: nn.Module, data, k: int, batch_size, chunk_size) -> Batch:
    if not isinstance(data, (torch.Tensor, Batch)):
        raise ElbolabError(f"expected x as a torch.Tensor [N, D] or a Batch, got {type(data).__name__}; "
                           "try torch.as_tensor(x)")
    batch = as_batch(data)
    x = batch.x
    input_dim = getattr(getattr(model, "config", None), "input_dim", None)
    if x.dim() != 2 or x.shape[0] < 1 or (input_dim is not None and x.shape[1] != input_dim):
        raise ElbolabError(
            f"expected x of shape [N, {input_dim if input_dim is not None else 'D'}] with N >= 1, got "
            f"{tuple(x.shape)}; flatten images to rows and use the data the model was trained on"
        )
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ElbolabError(f"expected finite x, got {bad} NaN or inf values; remove or impute them first")
    for name, value, optional in (("k", k, False), ("batch_size", batch_size, True), ("chunk_size", chunk_size, True)):
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ElbolabError(f"expected {name} to be a positive integer, got {value!r}")
    return batch


def _sample_width(model: nn.Module) -> int:
    """Floats per (sample, example) pair in the widest layer of the decoder: sets the chunk sizes."""
    config = getattr(model, "config", None)
    head = getattr(model, "likelihood_head", None)
    width = getattr(config, "input_dim", 1) * getattr(head, "outputs_per_dim", 1)
    return max(width, *getattr(config, "hidden", (1,)))


def plan_chunks(n: int, k: int, width: int, batch_size: int | None = None, chunk_size: int | None = None,
                block_bytes: int = BLOCK_BYTES) -> tuple[int, int]:
    """(batch_size, chunk_size) so that one [chunk, batch, width] float32 block fits in ``block_bytes``.

    All K samples of an example go in one chunk when they fit (the remaining room takes more examples); otherwise
    K is split into equal chunks.
    """
    pairs = max(1, block_bytes // (4 * width))  # (sample, example) pairs per block
    if chunk_size is None:
        room = max(1, pairs // (batch_size or 1))
        chunk_size = math.ceil(k / math.ceil(k / room))  # equal chunks, each at most `room`
    if batch_size is None:
        batch_size = max(1, min(n, pairs // chunk_size))
    return min(batch_size, n), min(chunk_size, k)


@torch.no_grad()
def _chunked_log_mean_exp(model: nn.Module, batch: Batch, log_weight_fn: LogWeightFn, *, k: int,
                          batch_size: int | None, chunk_size: int | None, progress: bool,
                          desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log 1/K sum_k w_k and Kish's ESS per example, ``[N]`` float64 each, from chunks of log weights."""
    param = _model_tensor(model)
    n = len(batch)
    batch_size, chunk_size = plan_chunks(n, k, _sample_width(model), batch_size, chunk_size)
    log_mean = torch.empty(n, dtype=torch.float64)
    ess = torch.empty(n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, n, batch_size)
        if progress:
            starts = _progress(starts, desc, math.ceil(n / batch_size), batch_size, n)
        for start in starts:
            part = batch[start:start + batch_size].to(param)  # B examples
            lse_w = torch.full((len(part),), -math.inf, dtype=torch.float64)  # running logsumexp of log w
            lse_2w = lse_w.clone()  # running logsumexp of 2 log w (for the ESS)
            for done in range(0, k, chunk_size):
                log_w = log_weight_fn(part, min(chunk_size, k - done))  # [k_chunk, B]
                log_w = log_w.to(device="cpu", dtype=torch.float64)
                lse_w = torch.logaddexp(lse_w, torch.logsumexp(log_w, 0))
                lse_2w = torch.logaddexp(lse_2w, torch.logsumexp(2 * log_w, 0))
            log_mean[start:start + len(part)] = lse_w - math.log(k)
            # Kish's ESS (sum w)^2 / sum w^2 from running sums: effective_sample_size over chunks
            ess[start:start + len(part)] = torch.exp(2 * lse_w - lse_2w)
    finally:
        model.train(was_training)
    if torch.isnan(log_mean).any():
        raise ElbolabError(
            f"{desc}: got NaN log weights for {int(torch.isnan(log_mean).sum())} of {n} examples; expected data in "
            "the support of the likelihood (e.g. values in [0, 1] for bernoulli) and a model without NaN parameters"
        )
    return log_mean, ess


def _progress(starts, desc: str, total: int, batch_size: int, n: int):
    """A bar on a terminal; otherwise (a log file, a scheduler) a plain line every 10 seconds."""
    import sys
    import time

    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(starts, desc=desc, unit="batch", total=total)
        return
    began = last = time.perf_counter()
    for i, start in enumerate(starts):
        yield start
        now = time.perf_counter()
        if now - last >= 10 or (i + 1 == total and now - began >= 10):  # a line every 10 s; quick jobs stay quiet
            last = now
            print(f"{desc}: {min(n, start + batch_size):,} of {n:,} examples, {now - began:.0f} s", flush=True)


def _summary(per_example: torch.Tensor, ess: torch.Tensor | None, k: int) -> LogLikelihoodEstimate:
    n = per_example.shape[0]
    sd = float(per_example.std()) if n > 1 else math.nan
    if ess is not None:
        variance = (ess.reciprocal() - 1.0 / k).clamp_min(0.0)  # [N] delta-method variance of each log p^_K
        mc_stderr, bias = float(variance.sum().sqrt() / n), float(-0.5 * variance.mean())
        ess_mean, ess_min = float(ess.mean()), float(ess.min())
    else:
        mc_stderr = bias = ess_mean = ess_min = math.nan
    return LogLikelihoodEstimate(float(per_example.mean()), mc_stderr, bias, sd, sd / math.sqrt(n), ess_mean,
                                 ess_min, k, n, per_example)


def _no_likelihood_error(model: nn.Module, cause: Exception) -> ElbolabError:
    name = getattr(model, "registry_name", type(model).__name__)
    return ElbolabError(
        f"expected a model with q(z|x) and p(x|z) to estimate log p(x), got {name!r} ({cause}); the autoencoder has "
        "no likelihood; evaluate a vae-family model, or compare autoencoders by reconstruction error"
    )


_compile = torch.compile  # indirection so the tests can simulate a machine where compiling fails


class CompiledLogWeights:
    """``model.importance_samples(b, kc)[1]`` through torch.compile (inductor), falling back to eager with a warning
    when compiling or running the compiled code fails (no C++ compiler, an unsupported torch build, ...);
    ``fallback`` then holds the reason.

    One static graph per (batch size, chunk) shape: an evaluation compiles once or twice (its last batch may be
    smaller), seconds each; the block then runs faster (BENCHMARKS.md, "Compiled kernels"). Inductor draws its own
    random numbers, so a compiled estimate differs from the eager one by Monte-Carlo noise only (with inductor's
    ``fallback_random`` the draws, and the estimates, are the same).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.fallback: str | None = None
        self._compiled = _compile(self._eager, dynamic=False)

    def _eager(self, b, kc):
        return self.model.importance_samples(b, kc)[1]

    def __call__(self, b, kc):
        if self.fallback is None:
            try:
                return self._compiled(b, kc)
            except Exception as error:  # noqa: BLE001 - any failure of the compiler means: evaluate eagerly
                self.fallback = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
                warnings.warn(f"--compile: torch.compile failed ({self.fallback}); evaluating without it (same "
                              "estimator, eager speed)", stacklevel=2)
        return self._eager(b, kc)


def importance_sampled_log_px(model: nn.Module, data, *, k: int = 5000, batch_size: int | None = None,
                              chunk_size: int | None = None, progress: bool = False,
                              compile: bool = False) -> LogLikelihoodEstimate:
    """log p(x) ~= log 1/K sum_k p(x, z_k)/q(z_k|x), z_k ~ q(z|x), per example; uses ``model.importance_samples``.

    ``data`` is a Batch (or a tensor [N, D]). ``batch_size`` examples and ``chunk_size`` samples are processed at
    a time (chosen from ``BLOCK_BYTES`` when None); the result does not depend on them except through the draws.
    ``compile``: the block of log weights through torch.compile (:class:`CompiledLogWeights`); the estimate's
    ``compile_fallback`` says why the compiled code did not run, if it did not.
    """
    batch = _check_inputs(model, data, k, batch_size, chunk_size)
    log_weights = CompiledLogWeights(model) if compile else (lambda b, kc: model.importance_samples(b, kc)[1])
    try:
        log_mean, ess = _chunked_log_mean_exp(model, batch, log_weights, k=k,
                                              batch_size=batch_size, chunk_size=chunk_size, progress=progress,
                                              desc="log p(x) (IS)")
    except NotImplementedError as err:
        raise _no_likelihood_error(model, err) from None
    estimate = _summary(log_mean, ess, k)
    if isinstance(log_weights, CompiledLogWeights) and log_weights.fallback is not None:
        estimate = dataclasses.replace(estimate, compile_fallback=log_weights.fallback)
    return estimate


def importance_diagnostics(model: nn.Module, data, *, k: int, n_examples: int = 500, seed: int = 0,
                           n_shown: int = 3) -> dict:
    """Whether K is large enough, seen three ways on the first ``n_examples`` examples (one set of K draws each):

    * ``ess``: Kish's effective sample size of each example's K weights ``[n]`` (a small ESS/K: few samples carry
      the estimate);
    * ``curve``: log p(x) (mean over the examples) and its Monte-Carlo s.e. using the first K' of the K draws, for
      K' = 1, 2, 5, 10, ... K (it should flatten; K' = 1 is the ELBO estimate);
    * ``shown``: the normalised log weights log w_k - max_k log w_k of the examples with the lowest, median and
      highest ESS (``{"ess": ..., "index": ..., "log_w": [K]}``).
    """
    if hasattr(data, "batch"):  # a split: the same binarisation as evaluate_model draws with this seed
        data = data.batch(torch.arange(min(n_examples, len(data))), torch.Generator().manual_seed(seed))
    batch = _check_inputs(model, data, k, None, None)
    batch = batch[:min(n_examples, len(batch))]
    n = len(batch)
    param = _model_tensor(model)
    _, chunk = plan_chunks(n, k, _sample_width(model))
    parts = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            part = batch.to(param)
            for done in range(0, k, chunk):
                parts.append(model.importance_samples(part, min(chunk, k - done))[1].to("cpu", torch.float64))
    finally:
        model.train(was_training)
    log_w = torch.cat(parts)  # [K, n]
    ess = effective_sample_size(log_w)  # [n]
    grid = sorted({g for g in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if g < k}
                  | {k})
    curve = []
    for kk in grid:
        head = log_w[:kk]  # [K', n]
        estimate = _summary(torch.logsumexp(head, 0) - math.log(kk), effective_sample_size(head), kk)
        curve.append({"k": kk, "log_px": estimate.mean, "mc_stderr": estimate.mc_stderr})
    order = torch.argsort(ess)
    picks = [int(order[0]), int(order[n // 2]), int(order[-1])][:n_shown]
    shown = [{"index": i, "ess": float(ess[i]), "log_w": (log_w[:, i] - log_w[:, i].max())} for i in picks]
    return {"ess": ess, "k": k, "n_examples": n, "curve": curve, "shown": shown}


def naive_log_px(model: nn.Module, data, *, k: int = 5000, batch_size: int | None = None,
                 chunk_size: int | None = None, progress: bool = False) -> LogLikelihoodEstimate:
    """log p(x) ~= log 1/K sum_k p(x | z_k), z_k ~ p(z) independently for every example (prior sampling)."""
    batch = _check_inputs(model, data, k, batch_size, chunk_size)
    if not hasattr(model, "prior") or not hasattr(model, "decode"):
        raise _no_likelihood_error(model, TypeError("no prior() or decode()"))

    def log_px_given_prior_z(b: Batch, k_chunk: int) -> torch.Tensor:
        prior = model.prior(b)
        z = prior.sample((k_chunk,) if prior.batch_shape else (k_chunk, len(b)))  # [k_chunk, B, d]
        return model.decode(z, b).log_prob(b.x)  # [k_chunk, B]

    log_mean, _ = _chunked_log_mean_exp(model, batch, log_px_given_prior_z, k=k, batch_size=batch_size,
                                        chunk_size=chunk_size, progress=progress, desc="log p(x) (naive)")
    return _summary(log_mean, None, k)


def _batched(model: nn.Module, batch: Batch, batch_size: int, fn) -> list:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ElbolabError(f"expected batch_size to be a positive integer, got {batch_size!r}")
    param = _model_tensor(model)
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
    batch = _check_inputs(model, data, 1, batch_size, None)
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
    batch = _check_inputs(model, data, 1, batch_size, None)
    groups = _per_group(model, batch, batch_size, "kl_terms")
    if groups is None:
        raise ElbolabError(f"{type(model).__name__} defines no per-dimension KL (a non-Gaussian q or prior)")
    return torch.cat([kl.mean(0) for kl in groups.values()])


def collapse_check(model: nn.Module, data, *, max_examples: int = 1000, seed: int = 0) -> dict:
    """Active units and the mean KL on up to ``max_examples`` examples of ``data``, and a warning when the posterior
    has collapsed (no or few active units, or a KL near zero). Empty for a model without a KL (an autoencoder)."""
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
        reads = set(getattr(model, "scheduled_values", ()))
        remedies = [text for name, text in (("beta", "KL warm-up (--kl-warmup 10)"),
                                             ("free_bits", "free bits (--schedule free_bits=constant:0.25)"),
                                             ("beta", "a smaller --beta")) if name in reads]
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
                   precision: str = "fp32", compile: bool = False):
    """Everything ``elbolab eval`` reports, as a JSON-ready dict; with ``return_per_example`` also the per-example
    log p(x) estimates ``[N]`` (for paired comparisons), as ``(dict, tensor)``. ``compile``: the importance
    sampling through torch.compile (see :class:`CompiledLogWeights`).

    ``precision`` "bf16" runs the networks' matrix products in bfloat16 (see ``elbolab.precision``); the
    log-likelihoods, log q and the KL stay float32 and the log-sum-exp over samples float64.

    ``data`` has ``.batch(index, generator)`` and a length; ONE binarisation of the whole set is drawn
    with ``torch.Generator().manual_seed(seed)`` so that every estimate sees the same images. The random draws of
    the estimators come from torch's global generator seeded with ``seed`` inside a forked RNG state, so the result
    is reproducible and the caller's RNG state is left untouched.
    """
    if not hasattr(data, "batch") or not hasattr(data, "__len__"):
        raise ElbolabError(f"expected data with .batch(index, generator) and a length, got {type(data).__name__}")
    from elbolab.runs import describe_nonfinite, nonfinite_tensors

    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise ElbolabError(
            f"cannot evaluate: the model's {describe_nonfinite(bad)}, so every estimate would be NaN; training "
            "diverged (train again, e.g. with a lower lr) or its weights file is damaged"
        )
    n = len(data)
    batch = data.batch(torch.arange(n), torch.Generator().manual_seed(seed))
    _check_inputs(model, batch, k, None, None)
    from elbolab.precision import autocast, check_precision

    device = _model_tensor(model).device
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
    metrics = model.eval_metrics(data, estimate.per_example) if hasattr(model, "eval_metrics") else {}
    if metrics:
        result["model_metrics"] = metrics
    result["n_examples"] = n
    result["seed"] = seed
    result["precision"] = precision
    result["compiled"] = compile and estimate.compile_fallback is None
    if compile and estimate.compile_fallback is not None:
        result["compile_fallback"] = estimate.compile_fallback
    return (result, estimate.per_example) if return_per_example else result
