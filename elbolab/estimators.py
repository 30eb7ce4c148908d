"""Estimators of log p(x) for any model with ``importance_samples`` (and, for the naive one, a prior and decoder).

Importance-sampled log-likelihood (Rezende et al. 2014 appendix E; Burda et al. 2016 eq. 8 and s5):

    log p(x) ~= log 1/K sum_k p(x, z_k) / q(z_k | x),   z_k ~ q(z|x)

a lower bound in expectation (the IWAE bound L_K) that increases to log p(x) as K grows. The naive estimator
samples the prior instead, log 1/K sum_k p(x | z_k) with z_k ~ p(z): unbiased for p(x) but with a far larger
variance, because few prior draws land where the posterior has its mass.

Both are computed in chunks over the K samples and over the examples, combined with a running logsumexp, so that
K = 5000 over the 10 000 MNIST test images stays within a few hundred MB.

The evaluator (``elbolab.evaluate``) adds the diagnostics and the record; models use these estimators directly.
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
from elbolab.progress import line_every

# Size of one [k_chunk, B, width] float32 block (decoder output, log-prob temporaries); the evaluator holds a
# handful of such blocks at once. Blocks of 4-8 MB (1250-2500 samples x 784 pixels) keep those temporaries in the
# cache; 16-64 MB ones leave it and run slower (timing in BENCHMARKS.md).
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
    ess: torch.Tensor | None = None  # [N] Kish ESS per example (None for the naive estimator)
    # log p(x) from the first K' of the same K draws, K' on K_GRID: [{"k", "log_px", "mc_stderr"}] (it should flatten)
    curve: list[dict] | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-example values); nan becomes None."""
        def finite_or_none(v: float) -> float | None:
            return v if math.isfinite(v) else None

        keys = ("mean", "mc_stderr", "bias_estimate", "sd_over_examples", "stderr_over_examples", "ess_mean",
                "ess_min")
        return {**{key: finite_or_none(getattr(self, key)) for key in keys}, "k": self.k,
                "n_examples": self.n_examples}


def model_tensor(model: nn.Module) -> torch.Tensor:
    param = next(model.parameters(), None)
    if param is None:
        raise ElbolabError(f"expected a model with parameters, got {type(model).__name__} with none")
    return param


def check_inputs(model: nn.Module, data, k: int, batch_size, chunk_size) -> Batch:
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


def sample_width(model: nn.Module) -> int:
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


K_GRID = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def k_grid(k: int) -> list[int]:
    """The K' < K of K_GRID, and K: where log p(x) against K is drawn."""
    return sorted({g for g in K_GRID if g < k} | {k})


@torch.no_grad()
def chunked_log_mean_exp(model: nn.Module, batch: Batch, log_weight_fn: LogWeightFn, *, k: int,
                          batch_size: int | None, chunk_size: int | None, progress: bool,
                          desc: str, grid: list[int] | None = None):
    """log 1/K sum_k w_k and Kish's ESS per example, ``[N]`` float64 each, from chunks of log weights; with
    ``grid``, also the running logsumexps of w and w^2 after the first K' draws for each K' in it (``[G, N]`` each),
    from the same draws at no extra model cost."""
    param = model_tensor(model)
    n = len(batch)
    batch_size, chunk_size = plan_chunks(n, k, sample_width(model), batch_size, chunk_size)
    log_mean = torch.empty(n, dtype=torch.float64)
    ess = torch.empty(n, dtype=torch.float64)
    grid = list(grid or [])
    at_grid = torch.empty(2, len(grid), n, dtype=torch.float64)  # lse w, lse 2w after the first K' draws
    was_training = model.training
    model.eval()
    try:
        starts = range(0, n, batch_size)
        if progress:
            starts = progress_over_examples(starts, desc, math.ceil(n / batch_size), batch_size, n)
        for start in starts:
            part = batch[start:start + batch_size].to(param)  # B examples
            lse_w = torch.full((len(part),), -math.inf, dtype=torch.float64)  # running logsumexp of log w
            lse_2w = lse_w.clone()  # running logsumexp of 2 log w (for the ESS)
            for done in range(0, k, chunk_size):
                log_w = log_weight_fn(part, min(chunk_size, k - done))  # [k_chunk, B]
                log_w = log_w.to(device="cpu", dtype=torch.float64)
                for g, kk in enumerate(grid):
                    if done < kk <= done + len(log_w):  # K' falls in this chunk: the running sums up to it
                        head = log_w[:kk - done]
                        at_grid[0, g, start:start + len(part)] = torch.logaddexp(lse_w, torch.logsumexp(head, 0))
                        at_grid[1, g, start:start + len(part)] = torch.logaddexp(lse_2w, torch.logsumexp(2 * head, 0))
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
    if grid:
        return log_mean, ess, at_grid
    return log_mean, ess


def progress_over_examples(starts, desc: str, total: int, batch_size: int, n: int):
    """A bar on a terminal; otherwise (a log file, a scheduler) a plain line every 10 seconds."""
    import sys
    import time

    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(starts, desc=desc, unit="batch", total=total)
        return
    began = last = time.perf_counter()
    every = line_every()
    for i, start in enumerate(starts):
        yield start
        now = time.perf_counter()
        if now - last >= every or (i + 1 == total and now - began >= every):  # quick jobs stay quiet
            last = now
            print(f"{desc}: {min(n, start + batch_size):,} of {n:,} examples, {now - began:.0f} s", flush=True)


def summarize_log_px(per_example: torch.Tensor, ess: torch.Tensor | None, k: int) -> LogLikelihoodEstimate:
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


def k_warning(estimate: LogLikelihoodEstimate) -> str | None:
    """Why K looks too small for this estimate, if it does: log p(x) still rising between the last two points of
    its curve by more than twice the Monte-Carlo s.e. (the estimate is then biased low), or a median effective
    sample size below 20 (where the delta-method s.e. is optimistic: about 3x too small at an ESS near 1.5)."""
    reasons = []
    curve = estimate.curve or []
    if len(curve) >= 2 and curve[-1]["k"] > 1:
        before, last = curve[-2], curve[-1]
        rise = last["log_px"] - before["log_px"]
        if math.isfinite(rise) and rise > max(2 * (last["mc_stderr"] or 0.0), 0.02):
            reasons.append(f"log p(x) still rises by {rise:.2f} nats from K = {before['k']:,} to K = {last['k']:,} "
                           "(the estimate is biased low)")
    if estimate.ess is not None and len(estimate.ess):
        median = float(estimate.ess.median())
        if median < 20:
            reasons.append(f"the median effective sample size is {median:.1f} of K = {estimate.k:,} (the Monte-Carlo "
                           "s.e. is then optimistic)")
    if not reasons:
        return None
    return "K is too small: " + "; ".join(reasons) + ". Raise --iw-samples (and read figures/is_diagnostics_*.png)"


def no_likelihood_error(model: nn.Module, cause: Exception) -> ElbolabError:
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
    batch = check_inputs(model, data, k, batch_size, chunk_size)
    log_weights = CompiledLogWeights(model) if compile else (lambda b, kc: model.importance_samples(b, kc)[1])
    grid = k_grid(k)
    try:
        log_mean, ess, at_grid = chunked_log_mean_exp(model, batch, log_weights, k=k, batch_size=batch_size,
                                                      chunk_size=chunk_size, progress=progress,
                                                      desc="log p(x) (IS)", grid=grid)
    except NotImplementedError as err:
        raise no_likelihood_error(model, err) from None
    curve = []
    for g, kk in enumerate(grid):  # the same examples and draws as the estimate itself
        head = summarize_log_px(at_grid[0, g] - math.log(kk), torch.exp(2 * at_grid[0, g] - at_grid[1, g]), kk)
        curve.append({"k": kk, "log_px": head.mean, "mc_stderr": head.mc_stderr})
    estimate = dataclasses.replace(summarize_log_px(log_mean, ess, k), ess=ess, curve=curve)
    if isinstance(log_weights, CompiledLogWeights) and log_weights.fallback is not None:
        estimate = dataclasses.replace(estimate, compile_fallback=log_weights.fallback)
    return estimate


def naive_log_px(model: nn.Module, data, *, k: int = 5000, batch_size: int | None = None,
                 chunk_size: int | None = None, progress: bool = False) -> LogLikelihoodEstimate:
    """log p(x) ~= log 1/K sum_k p(x | z_k), z_k ~ p(z) independently for every example (prior sampling)."""
    batch = check_inputs(model, data, k, batch_size, chunk_size)
    if not hasattr(model, "prior") or not hasattr(model, "decode"):
        raise no_likelihood_error(model, TypeError("no prior() or decode()"))

    def log_px_given_prior_z(b: Batch, k_chunk: int) -> torch.Tensor:
        prior = model.prior(b)
        z = prior.sample((k_chunk,) if prior.batch_shape else (k_chunk, len(b)))  # [k_chunk, B, d]
        return model.decode(z, b).log_prob(b.x)  # [k_chunk, B]

    log_mean, _ = chunked_log_mean_exp(model, batch, log_px_given_prior_z, k=k, batch_size=batch_size,
                                        chunk_size=chunk_size, progress=progress, desc="log p(x) (naive)")
    return summarize_log_px(log_mean, None, k)
