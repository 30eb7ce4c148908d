"""The anatomy of the ELBO's KL term over a data set (Hoffman & Johnson 2016, "ELBO surgery: yet another way to carve
up the variational evidence lower bound"; Chen, Li, Grosse & Duvenaud 2018, "Isolating sources of disentanglement in
variational autoencoders", s. 3 and 4.1).

With n uniform over the N data points, q(z|n) = q(z|x_n) = N(mu_n, diag sigma_n^2), the aggregate posterior
q(z) = 1/N sum_n q(z|x_n), its marginals q(z_j) = 1/N sum_n q(z_j|x_n) and a factorised prior p(z) = prod_j p(z_j):

    E_p(n) KL(q(z|n) || p(z)) = I_q(n; z) + KL(q(z) || p(z))                            (Hoffman & Johnson)
                              = I_q(n; z) + TC(q(z)) + sum_j KL(q(z_j) || p(z_j))       (Chen et al. s. 3)

    I_q(n; z) = E_q(z,n)[log q(z|n) - log q(z)]         index-code mutual information, 0 <= I <= log N
    TC(q(z))  = E_q(z)[log q(z) - sum_j log q(z_j)]     total correlation KL(q(z) || prod_j q(z_j)) >= 0
    dim-wise  = sum_j E_q(z_j)[log q(z_j) - log p(z_j)]  >= 0

I(n; z) <= log N always (q(z) >= q(z|n)/N): a large data set is needed before I can reach what the encoder transmits
about x; nothing is clamped (each per-sample value log q(z|n) - log q(z) is itself <= log N). Every estimate is the
mean over z ~ q(z|x_n) of per-sample log ratios; per sample the three sum to log q(z|n) - log p(z) whatever the
estimate of log q(z) and log q(z_j), so their sum estimates the average KL (closed form here) without bias; that
check tests the sampling and the densities of q(z|n) and p(z), not the estimates of log q(z), which cancel.

Estimators (``kl_anatomy(..., estimator=)``):

* ``exact-aggregate``: S draws z ~ q(z|x_n) for every n; log q(z) = logsumexp_m log q(z|x_m) - log N over all N
  components (the point's own component included, as the definition of q(z) has it), and the same per dimension
  for log q(z_j), streamed over blocks of ``BLOCK_ELEMENTS`` entries (memory O(block), time O(N^2 S d)). For the data
  set's aggregate this is unbiased (plain Monte Carlo over z). Read as an estimate for the population's aggregate
  E_pdata q(z|x), log q(z) carries an O(1/N) bias: the own component adds about R/N, the others' total weight
  (N - 1)/N about -1/N and Jensen over them about -(R - 1)/(2N) (R = E_n E_q(z|n)[q(z|n)/q(z)]; |C|/|S| = exp(2 I)
  for q(z|x) = N(Ax, S) and q(z) = N(0, C)), so I is about (R - 1)/(2N) low; likewise per dimension with R_j.
* ``mws``: minibatch-weighted sampling over a random partition of the data set into minibatches of M, as a training
  step sees it (``minibatch_weighted_sampling``): q(z_i) is estimated from the M posteriors of z_i's own batch. The
  log of that estimate is biased low for finite M (Jensen), so I is biased high (by O(1/M): to first order
  (R - 1)/(2(M - 1)), which overstates it unless M >> R) and never above log N; the dimension-wise KL is biased low;
  the biases shrink as M grows and vanish at M = N (the exact aggregate, with the normalised weights).
  ``weights="paper"`` uses Chen et al.'s weights (s. 4.1; the authors' code: log q(z) ~ log 1/(NM) sum_m
  q(z|x_m)), 1/(NM) for every component: they sum to 1/N rather than 1, so log q(z) comes out between log M and
  log N too low (log M when the posteriors do not overlap, log N when they coincide); I is then that much too high
  (it can pass log N), TC about (d - 1) times that, the dimension-wise KL about d times that too low. Fine for
  gradients where the offset is nearly constant, not as the decomposition.

Monte-Carlo standard errors are those of the mean over data points of each point's average over its S draws
(``std / sqrt(N)``): they include the spread between data points, so they are the errors for the population's
quantities when the data are an i.i.d. sample, and conservative for the data set's own. With the exact aggregate the
per-sample values of different points share the N components, a dependence whose variance is O(1/N^2), not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Distribution, Independent, Normal

from elbolab.errors import ElbolabError

ESTIMATORS = ("exact-aggregate", "mws")
MWS_WEIGHTS = ("normalised", "paper")
BLOCK_ELEMENTS = 1 << 19  # entries of one [queries, d, components] block: 4 MB in float64
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_SIGMAS = 4.0  # the sum check passes within this many standard errors


# --------------------------------------------------------------------------------------------- validation
def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, Independent):
        return (f"Independent({type(value.base_dist).__name__}) with batch shape {tuple(value.batch_shape)} and event "
                f"shape {tuple(value.event_shape)}")
    return type(value).__name__


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            raise ElbolabError(f"kl_anatomy: expected {name} as a tensor or array [N, d] of numbers, got "
                               f"{_describe(value)}") from None
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise ElbolabError(f"kl_anatomy: expected {name} as real numbers [N, d], got {_describe(value)}")
    return tensor if tensor.is_floating_point() else tensor.double()


def _posterior_parameters(means, stds, *, check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [N, d], stds [N, d]) of diagonal-Gaussian posteriors given as tensors or an Independent(Normal)."""
    if isinstance(means, Distribution):
        if stds is not None:
            raise ElbolabError("kl_anatomy: expected either a distribution q(z|x_n) or means and stds, got both; "
                               "pass kl_anatomy(q) or kl_anatomy(means, stds)")
        if not (isinstance(means, Independent) and isinstance(means.base_dist, Normal)
                and means.reinterpreted_batch_ndims == 1 and len(means.batch_shape) == 1):
            raise ElbolabError(
                f"kl_anatomy: expected diagonal-Gaussian posteriors Independent(Normal(loc [N, d], scale [N, d]), 1), "
                f"got {_describe(means)}; a full-covariance q(z|x) is not supported (train with "
                "--encoder-covariance diag), and samples of z are not enough: the terms need the densities q(z|x_n)"
            )
        means, stds = torch.broadcast_tensors(means.base_dist.loc, means.base_dist.scale)
    elif stds is None:
        raise ElbolabError(f"kl_anatomy: expected stds [N, d] with the means {_describe(means)}, got None; pass "
                           "kl_anatomy(means, stds) or a torch Independent(Normal) distribution")
    means, stds = _as_tensor(means, "means"), _as_tensor(stds, "stds")
    if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
        raise ElbolabError(f"kl_anatomy: expected means of shape [N, d] (one row per data point), got "
                           f"{_describe(means)}; reshape a single point to [1, d]")
    if stds.shape != means.shape:
        raise ElbolabError(f"kl_anatomy: expected stds of the means' shape {tuple(means.shape)}, got "
                           f"{tuple(stds.shape)}; standard deviations, not variances or log-variances, one per entry")
    if check_values:
        bad = int((~torch.isfinite(means)).sum()) + int((~torch.isfinite(stds)).sum())
        if bad:
            raise ElbolabError(f"kl_anatomy: expected finite means and stds, got {bad} NaN or infinite values")
        if not bool((stds > 0).all()):
            raise ElbolabError(f"kl_anatomy: expected standard deviations > 0, got a minimum of {float(stds.min()):g}; "
                               "pass exp(0.5 * log_var) if you have log-variances")
    return means, stds


def _prior_parameters(prior, d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc [d], scale [d]) of a factorised Gaussian prior; N(0, I) for None."""
    if prior is None:
        zeros = like.new_zeros(d)
        return zeros, torch.ones_like(zeros)
    if not (isinstance(prior, Independent) and isinstance(prior.base_dist, Normal)
            and prior.reinterpreted_batch_ndims == 1 and tuple(prior.event_shape) == (d,)
            and len(prior.batch_shape) == 0):
        raise ElbolabError(
            f"kl_anatomy: expected a factorised Gaussian prior Independent(Normal(loc [{d}], scale [{d}]), 1) without "
            f"batch dimensions, got {_describe(prior)}; pass prior=None for N(0, I) (the dimension-wise term needs a "
            "prior that factorises over the d latent dimensions)"
        )
    loc, scale = torch.broadcast_tensors(prior.base_dist.loc, prior.base_dist.scale)
    return loc.to(like), scale.to(like)


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ElbolabError(f"kl_anatomy: expected {name} as an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------- densities
def _log_normal(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, scale^2) elementwise."""
    return -0.5 * ((z - loc) / scale) ** 2 - scale.log() - _HALF_LOG_2PI


def _mixture_log_densities(z: torch.Tensor, owner: torch.Tensor, means: torch.Tensor, stds: torch.Tensor,
                           log_w_own: float, log_w_other: float,
                           progress: Callable[[int], None] | None = None):
    """Log densities of the mixture sum_m w_m N(mu_m, diag sigma_m^2) at queries z [Q, d], where each query's own
    component ``owner[q]`` has weight exp(log_w_own) and every other component exp(log_w_other).

    Returns (log q(z) [Q], log q(z_j) [Q, d], log q(z_j | own component) [Q, d]). The components are streamed in
    [queries, d, components] blocks of at most BLOCK_ELEMENTS entries; differentiable.
    """
    n_queries, d = z.shape
    n_components = means.shape[0]
    own = _log_normal(z, means[owner], stds[owner])  # [Q, d]
    own_joint = own.sum(-1) + log_w_own  # [Q]
    own_marginal = own + log_w_own  # [Q, d]
    if n_components == 1 or log_w_other == -math.inf:  # nothing but the own component
        if progress is not None:
            progress(n_queries)
        return own_joint, own_marginal, own
    # components on the last axis: [queries, d, components] blocks reduce over contiguous memory (twice as fast)
    means_t, inv_stds_t = means.T, stds.reciprocal().T  # [d, C]
    log_norm_t = (stds.log() + _HALF_LOG_2PI).T  # [d, C]
    separate_own = log_w_own != log_w_other  # equal weights: the own component stays in the sum over all
    chunk = max(1, min(n_components, BLOCK_ELEMENTS // d))  # components per block
    rows = max(1, BLOCK_ELEMENTS // (chunk * d))  # queries per block
    joints, marginals = [], []
    for start in range(0, n_queries, rows):
        zq, oq = z[start:start + rows], owner[start:start + rows]
        joint = marginal = None
        for first in range(0, n_components, chunk):
            last = min(first + chunk, n_components)
            t = (zq[:, :, None] - means_t[None, :, first:last]) * inv_stds_t[None, :, first:last]
            lp = -0.5 * t * t - log_norm_t[None, :, first:last]  # [b, d, c]
            if separate_own:  # the own component is added with its own weight below; where() passes it no gradient
                is_own = oq[:, None] == torch.arange(first, last, device=oq.device)[None]  # [b, c]
                lp = torch.where(is_own[:, None, :], -math.inf, lp)
            block_joint, block_marginal = torch.logsumexp(lp.sum(1), -1), torch.logsumexp(lp, -1)  # [b], [b, d]
            joint = block_joint if joint is None else torch.logaddexp(joint, block_joint)
            marginal = block_marginal if marginal is None else torch.logaddexp(marginal, block_marginal)
        joints.append(joint)
        marginals.append(marginal)
        if progress is not None:
            progress(len(zq))
    log_qz, log_qzj = torch.cat(joints) + log_w_other, torch.cat(marginals) + log_w_other
    if separate_own:
        log_qz, log_qzj = torch.logaddexp(own_joint, log_qz), torch.logaddexp(own_marginal, log_qzj)
    return log_qz, log_qzj, own


def mws_log_weights(batch_size: int, dataset_size: int, weights: str = "normalised") -> tuple[float, float]:
    """(log w_own, log w_other): the weights of a query's own component and of each other component of its batch.

    ``normalised``: 1/N and (N - 1)/(N (M - 1)); they sum to one, and with the M - 1 others a uniform draw from the
    other N - 1 points the mixture is an unbiased estimate of q(z) (exact at M = N). ``paper``: 1/(N M) for all, as
    Chen et al. (s. 4.1) and their code have it (sums to 1/N)."""
    n, m = dataset_size, batch_size
    if weights == "paper":
        return -math.log(n * m), -math.log(n * m)
    if weights != "normalised":
        raise ElbolabError(f"kl_anatomy: expected weights in {', '.join(MWS_WEIGHTS)}, got {weights!r}")
    other = math.log(n - 1) - math.log(n) - math.log(m - 1) if m > 1 and n > 1 else -math.inf
    return -math.log(n), other


@dataclass(frozen=True)
class MinibatchDensities:
    """Per-example log densities at z_i ~ q(z|x_i) for the examples of a minibatch: [..., M] or, per latent
    dimension, [..., M, d]. The properties give the per-example terms of the decomposition, whose batch means
    estimate I, TC and the dimension-wise KL; with any estimate of log q(z) they sum to log q(z|x) - log p(z)."""

    log_qz_given_x_per_dim: torch.Tensor  # log q(z_ij | x_i)
    log_qz: torch.Tensor  # log q^(z_i), the minibatch estimate of the aggregate posterior
    log_qz_per_dim: torch.Tensor  # log q^(z_ij), the same for each marginal
    log_pz_per_dim: torch.Tensor  # log p(z_ij)

    @property
    def log_qz_given_x(self) -> torch.Tensor:
        return self.log_qz_given_x_per_dim.sum(-1)

    @property
    def log_prod_qzj(self) -> torch.Tensor:
        return self.log_qz_per_dim.sum(-1)

    @property
    def log_pz(self) -> torch.Tensor:
        return self.log_pz_per_dim.sum(-1)

    @property
    def mutual_information(self) -> torch.Tensor:
        """log q(z|x) - log q(z)."""
        return self.log_qz_given_x - self.log_qz

    @property
    def total_correlation(self) -> torch.Tensor:
        """log q(z) - sum_j log q(z_j)."""
        return self.log_qz - self.log_prod_qzj

    @property
    def dimension_wise_kl_per_dim(self) -> torch.Tensor:
        """log q(z_j) - log p(z_j), [..., M, d]."""
        return self.log_qz_per_dim - self.log_pz_per_dim

    @property
    def dimension_wise_kl(self) -> torch.Tensor:
        """sum_j log q(z_j) - log p(z_j)."""
        return self.log_prod_qzj - self.log_pz


def minibatch_weighted_sampling(z: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, dataset_size: int,
                                prior: Distribution | None = None, *,
                                weights: str = "normalised") -> MinibatchDensities:
    """Minibatch-weighted sampling (Chen et al. 2018, s. 4.1) for a batch of M examples of a data set of N.

    ``z`` ``[M, d]`` or ``[L, M, d]`` are draws z_i ~ q(z|x_i) of the batch's posteriors N(means_i, diag stds_i^2)
    (``[M, d]`` each). The aggregate posterior at z_i is estimated from the batch's own posteriors,

        q^(z_i) = w_own q(z_i|x_i) + w_other sum_{k != i} q(z_i|x_k)      (and the same per dimension for q(z_ij))

    with the weights of ``mws_log_weights`` (``normalised``: 1/N and (N - 1)/(N (M - 1)), default; ``paper``:
    1/(NM) for all). log q^ is biased low for finite M (Jensen; see the module docstring), exact at M = N with the
    normalised weights. A pure, differentiable function for a training loss; it checks shapes only (no device
    synchronisation). M > N is allowed (a validation batch larger than the training set); with N = 1 the other
    components get no weight. ``prior`` is a factorised Gaussian (Independent Normal), N(0, I) by default.
    """
    if not isinstance(z, torch.Tensor) or z.dim() not in (2, 3):
        raise ElbolabError(f"minibatch_weighted_sampling: expected z as a tensor [M, d] or [L, M, d], got "
                           f"{_describe(z)}")
    means, stds = _posterior_parameters(means, stds, check_values=False)
    if tuple(z.shape[-2:]) != tuple(means.shape):
        raise ElbolabError(f"minibatch_weighted_sampling: expected z of shape [..., {means.shape[0]}, "
                           f"{means.shape[1]}] (draws of the batch's posteriors), got {tuple(z.shape)}")
    n = _positive_int(dataset_size, "dataset_size N (the training-set size)")
    batch, d = means.shape
    log_w_own, log_w_other = mws_log_weights(batch, n, weights)
    leading = z.shape[:-2]
    flat = z.reshape(-1, d)  # [L M, d]
    owner = torch.arange(batch, device=z.device).repeat(flat.shape[0] // batch)
    log_qz, log_qzj, own = _mixture_log_densities(flat, owner, means, stds, log_w_own, log_w_other)
    loc, scale = _prior_parameters(prior, d, means)
    log_pzj = _log_normal(flat, loc, scale)
    shape = (*leading, batch)
    return MinibatchDensities(own.reshape(*shape, d), log_qz.reshape(shape), log_qzj.reshape(*shape, d),
                              log_pzj.reshape(*shape, d))


# --------------------------------------------------------------------------------------------- the report
def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean over data points [N] (or [N, d]) and its standard error std / sqrt(N)."""
    n = values.shape[0]
    return values.mean(0).tolist(), (values.std(0, unbiased=True) / math.sqrt(n)).tolist()


def kl_anatomy(means, stds=None, prior: Distribution | None = None, *, samples_per_point: int = 1, seed: int = 0,
               progress: Callable[[int, int], None] | None = None, estimator: str = "exact-aggregate",
               batch_size: int = 256, weights: str = "normalised") -> dict:
    """I_q(n; z), TC(q(z)) and the dimension-wise KL of a data set's posteriors, with Monte-Carlo standard errors.

    ``means``, ``stds``: ``[N, d]`` diagonal-Gaussian posteriors q(z|x_n) (tensors or arrays), or ``means`` a torch
    ``Independent(Normal)`` with batch shape [N] and ``stds`` None. ``prior``: a factorised Gaussian
    ``Independent(Normal(loc [d], scale [d]), 1)``; None is N(0, I). ``samples_per_point`` S draws of z per point,
    all from ``torch.Generator().manual_seed(seed)``: the same seed gives the same numbers, and the same draws for
    both estimators (their difference is then the estimators', not Monte-Carlo noise). ``progress(done,
    total)`` is called as the draws are processed. ``estimator``: ``exact-aggregate`` (every draw against all N
    posteriors) or ``mws`` (against the posteriors of its own minibatch of ``batch_size``, minibatch-weighted
    sampling with ``weights``); see the module docstring for the bias of each. Computed in float64.

    Returns a JSON-ready dict: ``mutual_information``, ``total_correlation``, ``dimension_wise_kl`` and
    ``dimension_wise_kl_per_dim`` (list), each with a ``*_se``; ``average_kl`` (the closed-form mean of
    KL(q(z|x_n) || p(z))) and ``average_kl_per_dim``; ``mutual_information_bound`` (log N: I(n; z) cannot exceed
    it); the check ``sum_of_terms``, ``sum_minus_average_kl`` with its ``sum_minus_average_kl_se`` and
    ``sum_matches_average_kl`` (within 4 standard errors); ``estimator``, ``weights`` and ``batch_size`` (mws
    only), ``n_points``, ``latent_dim``, ``samples_per_point``, ``seed``.
    """
    means, stds = _posterior_parameters(means, stds)
    n, d = means.shape
    if n < 2:
        raise ElbolabError(f"kl_anatomy: expected at least 2 data points (I(n; z) <= log N is 0 for one), got {n}")
    samples = _positive_int(samples_per_point, "samples_per_point")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ElbolabError(f"kl_anatomy: expected an integer seed, got {seed!r}")
    if estimator not in ESTIMATORS:
        raise ElbolabError(f"kl_anatomy: expected estimator in {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator == "mws":
        batch_size = _positive_int(batch_size, "batch_size")
        if batch_size > n:
            raise ElbolabError(f"kl_anatomy: expected batch_size <= N = {n} data points for mws, got {batch_size}; "
                               "at batch_size = N mws is the exact aggregate (estimator='exact-aggregate')")
        mws_log_weights(batch_size, n, weights)  # checks the name
    dtype = torch.float32 if means.device.type == "mps" else torch.float64
    means, stds = means.detach().to(dtype), stds.detach().to(dtype)
    loc, scale = _prior_parameters(prior, d, means)
    loc, scale = loc.detach(), scale.detach()

    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)  # drawn for both estimators: one seed, the same z for both
    eps = torch.randn(n, samples, d, generator=generator, dtype=torch.float64).to(means)
    z = means[:, None, :] + stds[:, None, :] * eps  # [N, S, d]
    total, done = n * samples, [0]

    def advance(count: int) -> None:
        done[0] += count
        if progress is not None:
            progress(done[0], total)

    with torch.no_grad():
        if estimator == "exact-aggregate":
            owner = torch.arange(n, device=means.device).repeat_interleave(samples)
            log_qz, log_qzj, own = _mixture_log_densities(z.reshape(-1, d), owner, means, stds, -math.log(n),
                                                          -math.log(n), advance)
            log_qz, log_qzj, own = log_qz.reshape(n, samples), log_qzj.reshape(n, samples, d), \
                own.reshape(n, samples, d)
        else:
            log_qz, log_qzj, own = z.new_empty(n, samples), torch.empty_like(z), torch.empty_like(z)
            for rows in torch.tensor_split(order.to(means.device), math.ceil(n / batch_size)):
                m = len(rows)
                log_w_own, log_w_other = mws_log_weights(m, n, weights)
                owner = torch.arange(m, device=means.device).repeat_interleave(samples)
                q, qj, o = _mixture_log_densities(z[rows].reshape(-1, d), owner, means[rows], stds[rows], log_w_own,
                                                  log_w_other)
                log_qz[rows], log_qzj[rows], own[rows] = q.reshape(m, samples), qj.reshape(m, samples, d), \
                    o.reshape(m, samples, d)
                advance(m * samples)
        log_pzj = _log_normal(z, loc, scale)  # [N, S, d]
        # per-sample log ratios, averaged over each point's S draws
        mi = (own.sum(-1) - log_qz).mean(1)  # [N]
        tc = (log_qz - log_qzj.sum(-1)).mean(1)  # [N]
        dwkl_per_dim = (log_qzj - log_pzj).mean(1)  # [N, d]
        one_sample_kl = (own - log_pzj).sum(-1).mean(1)  # [N]: log q(z|x_n) - log p(z), = mi + tc + dwkl
        kl_per_dim = torch.log(scale / stds) + (stds**2 + (means - loc) ** 2) / (2 * scale**2) - 0.5  # [N, d]
        kl = kl_per_dim.sum(-1)  # [N]

    out = {"estimator": estimator}
    if estimator == "mws":
        out.update(weights=weights, batch_size=batch_size)
    for name, values in (("mutual_information", mi), ("total_correlation", tc),
                         ("dimension_wise_kl", dwkl_per_dim.sum(-1)), ("dimension_wise_kl_per_dim", dwkl_per_dim)):
        out[name], out[f"{name}_se"] = _mean_se(values)
    difference, difference_se = _mean_se(one_sample_kl - kl)  # zero mean for each point: only the draws vary
    out.update(
        average_kl=float(kl.mean()), average_kl_per_dim=kl_per_dim.mean(0).tolist(),
        mutual_information_bound=math.log(n),
        sum_of_terms=out["mutual_information"] + out["total_correlation"] + out["dimension_wise_kl"],
        sum_minus_average_kl=difference, sum_minus_average_kl_se=difference_se,
        sum_matches_average_kl=bool(abs(difference) <= _SIGMAS * difference_se + 1e-9 * (1 + float(kl.mean()))),
        n_points=n, latent_dim=d, samples_per_point=samples, seed=int(seed),
    )
    return out
