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

The ELBO's terms for a batch come from ``elbo_terms(q, decode, prior, x, mc_samples)``. It has two routes with the
same numbers:

* generic: ``q.rsample``, ``p(x|z).log_prob`` and ``kl_divergence`` (or a Monte-Carlo KL) from torch.distributions,
  for any encoder, prior and likelihood;
* fused (the only place where elbolab writes out densities that torch provides): taken automatically when every piece
  is standard, i.e. q(z|x) a diagonal Gaussian ``Independent(Normal, 1)`` (``networks.GaussianEncoder``), the prior
  N(0, I) (``networks.standard_normal_prior``, or constant zeros / ones), and p(x|z) an ``Independent(Bernoulli, 1)``
  or ``Independent(Normal, 1)`` (the ``bernoulli``, ``gaussian``, ``gaussian-learned`` and ``gaussian-decoder``
  heads). It skips the distribution objects' per-call work (argument broadcasting, a negation over every pixel, the
  divisions by the prior's unit scale, the full-size log of a Gaussian's shared sigma) and, with L = 1, decodes z as
  ``[B, d]`` (no reshapes around the decoder's linear layers):

      z = mu + sigma * eps,  eps drawn exactly as ``Normal.rsample`` draws it (the same random stream),
      log p(x|z) = -sum_d BCE-with-logits(f_d(z), x_d)                               (Bernoulli; bit-identical)
      log p(x|z) = -1/2 sum_d ((x_d - f_d(z)) / s_d)^2 - sum_d log s_d - D/2 log 2 pi  (Gaussian; to rounding)
      KL_j = 1/2 (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2)                             (bit-identical to torch's)

  Setting the environment variable ``ELBOLAB_FAST_PATH=0`` before import (or ``objectives.FAST_PATH = False``)
  switches it off, for benchmarks and comparisons; ``tests/test_fast_path.py`` checks the two routes agree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions import (
    Bernoulli,
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
    register_kl,
)
from torch.distributions.utils import _standard_normal
from torch.nn import functional as F

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
    log q(z) then carries gradients only through z.

    A ``TransformedDistribution`` (a flow) is rebuilt from its detached base and detached transforms: a transform
    with learned parameters must offer ``detached()`` (the same map with its parameters, amortised or global, cut
    from the graph and an empty cache, e.g. ``flows.PlanarTransform``, ``IAFTransform``); torch's
    ``AffineTransform``, ``ComposeTransform``, ``IndependentTransform``, inverses and the parameter-free
    elementwise transforms are handled here. The transforms are fresh, with empty caches, so log_prob(z) inverts z
    numerically (the caches of the original transforms hold pre-images whose graph reaches the parameters): the
    value is log q(z), and the gradient reaches z through the inverse and the log |det| terms only, which is the
    path derivative of STL (Roeder et al. 2017) and DReG for any reparameterised q.
    """
    if isinstance(dist, Independent):
        return Independent(detach_distribution(dist.base_dist), dist.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(dist, Normal):
        return Normal(dist.loc.detach(), dist.scale.detach(), validate_args=False)
    if isinstance(dist, MultivariateNormal):
        return MultivariateNormal(dist.loc.detach(), scale_tril=dist.scale_tril.detach(), validate_args=False)
    from torch.distributions import TransformedDistribution, transforms

    if isinstance(dist, TransformedDistribution):
        parameter_free = (transforms.ExpTransform, transforms.SigmoidTransform, transforms.TanhTransform,
                          transforms.SoftplusTransform, transforms.AbsTransform)

        def detach_transform(t: transforms.Transform) -> transforms.Transform:
            if callable(getattr(t, "detached", None)):
                return t.detached()
            if isinstance(t, transforms.ComposeTransform):
                return transforms.ComposeTransform([detach_transform(part) for part in t.parts])
            if isinstance(t, transforms.IndependentTransform):
                return transforms.IndependentTransform(detach_transform(t.base_transform),
                                                       t.reinterpreted_batch_ndims)
            if isinstance(t, transforms._InverseTransform):
                return detach_transform(t._inv).inv
            if isinstance(t, transforms.AffineTransform):
                def cut(v):
                    return v.detach() if isinstance(v, torch.Tensor) else v

                return transforms.AffineTransform(cut(t.loc), cut(t.scale), event_dim=t.event_dim)
            if type(t) in parameter_free:
                return type(t)()  # a fresh cache: the old one may hold a pre-image with a graph to parameters
            raise NotImplementedError(
                f"detach_distribution: no rule for the transform {type(t).__name__}; give it a detached() method "
                "returning the same map with its parameters cut from the graph (detach()) and an empty cache"
            )

        return TransformedDistribution(detach_distribution(dist.base_dist),
                                       [detach_transform(t) for t in dist.transforms], validate_args=False)
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


# ----- the ELBO's terms: generic route and fused fast path -----

FAST_PATH_ENV = "ELBOLAB_FAST_PATH"
# Whether elbo_terms may take the fused route (ELBOLAB_FAST_PATH=0 / false / off / no switches it off).
FAST_PATH = os.environ.get(FAST_PATH_ENV, "1").strip().lower() not in ("0", "false", "off", "no")

# Set on the N(0, I) that networks.standard_normal_prior builds: saves comparing its parameters with 0 and 1.
STANDARD_NORMAL_MARK = "_elbolab_standard_normal"

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class ElboTerms:
    """The terms of the ELBO for a batch: ``z`` ``[L, B, d]``, ``recon`` = 1/L sum_l log p(x|z_l) ``[B]``,
    ``kl`` = KL(q || p) ``[B]``, ``kl_per_dim`` ``[B, d]`` when asked for (else None), and ``fused``: whether the
    fused fast path computed them."""

    z: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor | None = None
    fused: bool = False


def _diagonal_normal(dist: Distribution) -> Normal | None:
    """The base Normal of an ``Independent(Normal, 1)`` (exactly these classes, not subclasses), else None."""
    if type(dist) is Independent and dist.reinterpreted_batch_ndims == 1 and type(dist.base_dist) is Normal:
        return dist.base_dist
    return None


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without growing it (``torch.broadcast_shapes`` costs
    tens of microseconds per call)."""
    if shape == target:
        return True
    if len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))


def is_standard_normal(prior: Distribution, q: Normal) -> bool:
    """Whether ``prior`` is N(0, I) over the event of the diagonal Gaussian ``q`` (base Normal, batch [..., d]),
    as a constant: the fused KL leaves out the prior's parameters, so a prior with a gradient is not standard."""
    base = _diagonal_normal(prior)
    if base is None or prior.event_shape != q.batch_shape[-1:] or not _broadcasts_to(prior.batch_shape,
                                                                                       q.batch_shape[:-1]):
        return False
    loc, scale = base.loc, base.scale
    if loc.dtype != q.loc.dtype or loc.device != q.loc.device or loc.requires_grad or scale.requires_grad:
        return False
    if getattr(prior, STANDARD_NORMAL_MARK, False):
        return True
    return bool((loc == 0).all()) and bool((scale == 1).all())


def _standard_likelihood(p: Distribution, x: torch.Tensor) -> Bernoulli | Normal | None:
    """The base of an ``Independent(Bernoulli, 1)`` / ``Independent(Normal, 1)`` p(x|z) without argument validation
    whose batch shape ``x`` broadcasts to, else None."""
    if type(p) is not Independent or p.reinterpreted_batch_ndims != 1:
        return None
    base = p.base_dist
    if type(base) not in (Bernoulli, Normal) or base._validate_args or not _broadcasts_to(x.shape, base.batch_shape):
        return None
    return base


def reparameterized_sample(loc: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` draws mu + sigma * eps, ``[n, *loc.shape]``: ``Normal(loc, scale).rsample((n,))`` bit for bit, with
    eps from the same generator call (``torch.distributions.utils._standard_normal``)."""
    eps = _standard_normal((n, *loc.shape), dtype=loc.dtype, device=loc.device)
    return loc + eps * scale


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d log Bernoulli(x_d; sigmoid(logits_d)) over the last dimension, ``[...]``: minus the summed
    cross-entropy with logits, equal bit for bit to ``Independent(Bernoulli(logits=logits), 1).log_prob(x)``
    (the sign is applied after the sum, one pass over the pixels fewer)."""
    if x.shape != logits.shape:
        x = x.expand(logits.shape)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """The tensor ``t`` was broadcast from (e.g. a Gaussian's sigma of shape [] or [D] seen as [L, B, D]) when
    ``t`` is exactly its expansion, else ``t``: per-pixel work on a shared sigma is then done once."""
    base = t._base
    if base is None or base.dim() > t.dim() or base.numel() >= t.numel() or not _broadcasts_to(base.shape, t.shape):
        return t
    candidate = base.expand(t.shape)
    same = (candidate.stride() == t.stride() and candidate.storage_offset() == t.storage_offset()
            and candidate.data_ptr() == t.data_ptr())
    return base if same else t


def gaussian_log_likelihood(loc: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d log N(x_d; loc_d, scale_d^2) over the last dimension, ``[...]`` (``loc`` gives the shape): equal to
    ``Independent(Normal(loc, scale), 1).log_prob(x)`` up to float rounding. A ``scale`` broadcast from a smaller
    tensor (a fixed or per-pixel sigma) has its logarithm taken once, not per example."""
    scale = _unexpanded(scale)
    d = loc.shape[-1]
    squares = ((x - loc) / scale).square().sum(-1)  # [...]
    log_scale = scale.log()
    if log_scale.dim() and log_scale.shape[-1] == d:
        log_scale = log_scale.sum(-1)
    else:  # one sigma shared by every pixel ([] or [..., 1])
        log_scale = (log_scale.squeeze(-1) if log_scale.dim() else log_scale) * d
    return -0.5 * squares - log_scale - d * _HALF_LOG_2PI


def standard_normal_kl_per_dim(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_j, sigma_j^2) || N(0, 1)) per dimension = 1/2 (sigma^2 + mu^2 - 1 - log sigma^2), ``loc.shape``;
    the operations of torch's Normal-Normal KL without the divisions by the unit scale (bit-identical)."""
    var = scale.pow(2)
    return 0.5 * (var + loc.pow(2) - 1 - var.log())


def elbo_terms(q: Distribution, decode: Callable[[torch.Tensor], Distribution], prior: Distribution,
               x: torch.Tensor, mc_samples: int = 1, *, per_dim: bool = False) -> ElboTerms:
    """The ELBO's terms for a batch ``x`` ``[B, ...]``: L = ``mc_samples`` reparameterised draws z_l ~ q(z|x)
    ``[L, B, d]``, ``recon`` = 1/L sum_l log p(x|z_l) with p(x|z) = ``decode(z)`` (batch = z's leading shape,
    event [D]), and KL(q || prior) per example (closed form, or Monte Carlo over the z_l when torch has none; with
    ``per_dim`` also the per-dimension Gaussian KLs ``[B, d]``, as ``kl_per_dim``).

    The fused route (module docstring) is taken when ``FAST_PATH`` is on and q(z|x), the prior and p(x|z) are all
    standard; otherwise the generic torch.distributions route. Both give the same values and gradients and draw the
    same random numbers. On the fused route with L = 1, ``decode`` gets z as ``[B, d]`` (decoders take latents
    ``[..., d]``): a linear layer then runs without reshaping, and p(x|z) has batch [B].
    """
    qn = _diagonal_normal(q) if FAST_PATH else None
    if qn is None or not is_standard_normal(prior, qn):
        return _generic_elbo_terms(q, decode, prior, x, mc_samples, per_dim)
    loc, scale = qn.loc, qn.scale  # [B, d]
    eps = _standard_normal((mc_samples, *loc.shape), dtype=loc.dtype, device=loc.device)  # as q.rsample draws it
    if mc_samples == 1:
        z_flat = loc + eps[0] * scale  # [B, d]: the values of q.rsample((1,))[0]
        z, p = z_flat.unsqueeze(0), decode(z_flat)
    else:
        z = loc + eps * scale  # [L, B, d]
        p = decode(z)
    lik = _standard_likelihood(p, x)
    if lik is None:  # e.g. a continuous Bernoulli: torch's log_prob and KL
        log_px = p.log_prob(x)  # [B] or [L, B]
        recon = log_px if mc_samples == 1 else log_px.mean(0)
        return _generic_kl(ElboTerms(z, recon, recon), q, prior, per_dim)
    if type(lik) is Bernoulli:
        log_px = bernoulli_log_likelihood(lik.logits, x)  # [B] or [L, B]
    else:
        log_px = gaussian_log_likelihood(lik.loc, lik.scale, x)
    recon = log_px if mc_samples == 1 else log_px.mean(0)  # [B]
    kl_bd = standard_normal_kl_per_dim(loc, scale)  # [B, d]
    return ElboTerms(z, recon, kl_bd.sum(-1), kl_bd if per_dim else None, fused=True)


def _generic_kl(terms: ElboTerms, q: Distribution, prior: Distribution, per_dim: bool) -> ElboTerms:
    """``terms`` with torch's KL(q || prior): kl_per_dim with ``per_dim``, else kl_term (Monte Carlo over terms.z
    when there is no closed form)."""
    if per_dim:
        terms.kl_per_dim = kl_per_dim(q, prior)  # [B, d]
        terms.kl = terms.kl_per_dim.sum(-1)
    else:
        terms.kl = kl_term(q, prior, terms.z)
    return terms


def _generic_elbo_terms(q, decode, prior, x, mc_samples: int, per_dim: bool) -> ElboTerms:
    """The torch.distributions route: q.rsample, p(x|z).log_prob and kl_divergence (or a Monte-Carlo KL)."""
    z = q.rsample((mc_samples,))  # [L, B, d]
    recon = decode(z).log_prob(x).mean(0)  # [B]
    return _generic_kl(ElboTerms(z, recon, recon), q, prior, per_dim)


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
