"""Objectives as small pure functions over log-probability tensors.

Shape convention: samples on dim 0, then batch: ``log_px_given_z`` is ``[L, B]``; results are per example ``[B]``
and are reduced only in a model's ``loss``.

ELBO (notes 000 eq. 5, notes 001 eq. 42-43, Kingma & Welling 2014 eq. 7), with a beta weight (Higgins et al. 2017):

    ELBO_beta(x) = 1/L sum_l log p(x | z_l) - beta * KL(q(z|x) || p(z)),   z_l = mu + sigma * eps_l

IWAE bound (Burda et al. 2016 eq. 8):  L_K(x) = log 1/K sum_k p(x, z_k) / q(z_k | x),  z_k ~ q(z|x).
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
