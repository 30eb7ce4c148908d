"""Objectives as small pure functions over log-probability tensors.

Shape convention: samples on dim 0, then batch: ``log_px_given_z`` is ``[L, B]``; results are per example ``[B]``
and are reduced only in a model's ``loss``.

ELBO (notes 000 eq. 5, notes 001 eq. 42-43, Kingma & Welling 2014 eq. 7), with a beta weight (Higgins et al. 2017):

    ELBO_beta(x) = 1/L sum_l log p(x | z_l) - beta * KL(q(z|x) || p(z)),   z_l = mu + sigma * eps_l

IWAE bound (Burda et al. 2016 eq. 8):  L_K(x) = log 1/K sum_k p(x, z_k) / q(z_k | x),  z_k ~ q(z|x).

Free bits (Kingma et al. 2016, "Improved variational inference with inverse autoregressive flow", eq. 15):
the KL penalty becomes  sum_j max(lambda, E_batch KL_j),  so no latent dimension is pushed below lambda nats.

DReG (Tucker et al. 2019, "Doubly reparameterized gradient estimators for Monte Carlo objectives", eq. 7): with
normalised weights w~_k, the encoder gradient of L_K is  E[sum_k w~_k^2 d log w_k / d z_k  d z_k / d phi]  where
log w_k is computed with q's parameters held fixed (only the path through z_k); the decoder gradient is unchanged,
sum_k w~_k grad_theta log w_k.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
    register_kl,
)

from elbolab.errors import ElbolabError


def kl_term(q: Distribution, p: Distribution, z: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q || p) per example, ``[B]``: closed form when torch knows the pair, else Monte Carlo over ``z``.

    ``z`` are samples from ``q`` (``[L, B, d]``), used only by the Monte-Carlo fallback
    ``1/L sum_l log q(z_l) - log p(z_l)`` (e.g. a mixture prior, VaDE; or an aggregated-posterior prior).
    """
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        if z is None:
            raise ValueError(
                f"no closed-form KL({type(q).__name__} || {type(p).__name__}); "
                "pass samples z for a Monte-Carlo estimate"
            ) from None
        return (q.log_prob(z) - p.log_prob(z)).mean(0)


def gaussian_marginals(dist: Distribution, what: str = "distribution") -> Normal:
    """The one-dimensional marginals N(mu_j, sigma_j^2) of a diagonal or full-covariance Gaussian, batch [..., d]."""
    if isinstance(dist, Independent) and isinstance(dist.base_dist, Normal) and dist.reinterpreted_batch_ndims == 1:
        return dist.base_dist
    if isinstance(dist, MultivariateNormal):
        return Normal(dist.loc, dist.variance.sqrt(), validate_args=False)
    raise ElbolabError(
        f"expected a Gaussian {what} (Independent Normal or MultivariateNormal) for a per-dimension KL, got "
        f"{type(dist).__name__}"
    )


def kl_per_dim(q: Distribution, p: Distribution) -> torch.Tensor:
    """KL(q(z_j|x) || p(z_j)) for each latent dimension, ``[B, d]``, from the Gaussian marginals.

    For a diagonal q and prior this sums to KL(q || p); for a full-covariance q it leaves out the correlation part.
    """
    qm, pm = gaussian_marginals(q, "q(z|x)"), gaussian_marginals(p, "prior p(z)")
    return kl_divergence(qm, pm)  # [B, d] (the prior's [d] broadcasts)


def free_bits_kl(kl_bd: torch.Tensor, free_bits: float) -> torch.Tensor:
    """sum_j max(lambda, mean_b KL_bj): a scalar KL penalty with lambda nats free per dimension (Kingma et al. 2016).

    Below lambda a dimension's KL gets no gradient, so the optimiser cannot switch it off entirely.
    """
    return kl_bd.mean(0).clamp_min(free_bits).sum()


def detach_distribution(dist: Distribution) -> Distribution:
    """The same distribution with its parameters cut from the graph (stop-gradient), for STL and DReG estimators:
    log q(z) then carries gradients only through z."""
    if isinstance(dist, Independent):
        return Independent(detach_distribution(dist.base_dist), dist.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(dist, Normal):
        return Normal(dist.loc.detach(), dist.scale.detach(), validate_args=False)
    if isinstance(dist, MultivariateNormal):
        return MultivariateNormal(dist.loc.detach(), scale_tril=dist.scale_tril.detach(), validate_args=False)
    raise NotImplementedError(f"detach_distribution: no rule for {type(dist).__name__}")


def dreg_surrogate(log_w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` log weights (computed with q's parameters detached) of reparameterised ``z`` ``[K, B, d]`` ->
    ``[B]`` surrogate whose value is the IWAE bound and whose gradient is the DReG estimator.

    sum_k w~_k log w_k gives the decoder sum_k w~_k grad log w_k; a hook scales the gradient reaching each z_k by
    w~_k once more, which gives the encoder sum_k w~_k^2 d log w_k/dz_k dz_k/dphi.
    """
    weights = torch.softmax(log_w.detach(), dim=0)  # [K, B] normalised weights w~
    if z.requires_grad:
        z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
    weighted = (weights * log_w).sum(0)  # [B]
    return iwae_bound(log_w.detach()) + weighted - weighted.detach()


def elbo(log_px_given_z: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``[L, B]`` reconstruction log-likelihoods and ``[B]`` KL -> ``[B]`` (beta-)ELBO."""
    return log_px_given_z.mean(0) - beta * kl


def log_importance_weights(log_px_given_z: torch.Tensor, log_pz: torch.Tensor, log_qz: torch.Tensor) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), all ``[K, B]``."""
    return log_px_given_z + log_pz - log_qz


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` log weights -> ``[B]`` bound log (1/K) sum_k w_k (a stable logsumexp)."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's ESS (sum w)^2 / sum w^2 per example, ``[K, B]`` -> ``[B]``; between 1 and K."""
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))


@register_kl(MultivariateNormal, Independent)
def _kl_full_gaussian_vs_diagonal(q: MultivariateNormal, p: Independent):
    """KL(full-covariance q || diagonal Gaussian p): lets a full-covariance encoder use the N(0, I) prior.

    Delegates to torch's own (MultivariateNormal, MultivariateNormal) KL after viewing p as a MultivariateNormal.
    """
    base = p.base_dist
    if not isinstance(base, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    loc, scale = torch.broadcast_tensors(base.loc, base.scale)
    return kl_divergence(q, MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))
