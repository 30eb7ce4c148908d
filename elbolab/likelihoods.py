"""Likelihood heads: turn decoder outputs into p(x|z) as a torch.distributions object.

Every head returns an ``Independent`` distribution with one event dimension, so ``log_prob(x)`` gives one value
per example (summed over pixels), shape ``[..., B]``.

* ``bernoulli``         p(x|z) = prod_d Bernoulli(x_d; sigmoid(f_d(z)))           (Kingma & Welling 2014, App. C.1)
* ``gaussian``          p(x|z) = N(x; f(z), sigma^2 I), sigma fixed              (notes 000 eq. 3, notes 001 eq. 29)
* ``gaussian-learned``  p(x|z) = N(x; f(z), diag(s^2)), s one learned value per pixel
* ``gaussian-decoder``  p(x|z) = N(x; f(z), Sigma(z)), Sigma(z) = diag(s(z)^2) output by the decoder
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal
from torch.nn import functional as F

from elbolab.errors import ElbolabError

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned", "gaussian-decoder")

# Smallest standard deviation a learned Gaussian may reach: without a floor the likelihood of a pixel that is
# always 0 (MNIST borders) grows without bound as its variance shrinks.
MIN_SCALE = 1e-3


class LikelihoodHead(nn.Module):
    """Maps decoder features ``[..., D * outputs_per_dim]`` to ``p(x|z)`` over ``D`` dimensions."""

    outputs_per_dim = 1

    def __init__(self, data_dim: int):
        super().__init__()
        self.data_dim = data_dim

    def forward(self, out: torch.Tensor) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z), used for pictures (reconstructions, samples, manifolds)."""
        return self(out).mean


class BernoulliHead(LikelihoodHead):
    def forward(self, out):
        # validate_args=False: grey-level targets in [0, 1] are allowed (the usual cross-entropy loss) and the
        # per-call support check costs time in the training loop.
        return Independent(Bernoulli(logits=out, validate_args=False), 1)

    def mean(self, out):
        return torch.sigmoid(out)


class GaussianFixedHead(LikelihoodHead):
    def __init__(self, data_dim: int, sigma: float = 1.0):
        super().__init__(data_dim)
        if not sigma > 0:
            raise ElbolabError(f"expected a positive Gaussian sigma, got {sigma}; try --sigma 1.0")
        self.sigma = float(sigma)

    def forward(self, out):
        return Independent(Normal(out, self.sigma, validate_args=False), 1)

    def mean(self, out):
        return out


class GaussianPerPixelHead(LikelihoodHead):
    def __init__(self, data_dim: int, sigma: float = 1.0):
        super().__init__(data_dim)
        self.log_scale = nn.Parameter(torch.full((data_dim,), math.log(sigma)))

    def forward(self, out):
        scale = self.log_scale.exp().clamp_min(MIN_SCALE)  # [D]
        return Independent(Normal(out, scale, validate_args=False), 1)

    def mean(self, out):
        return out


class GaussianDecoderVarianceHead(LikelihoodHead):
    """The decoder outputs mean and a raw scale per pixel: Sigma(z) = diag(softplus(raw)^2)."""

    outputs_per_dim = 2

    def forward(self, out):
        loc, raw = out.chunk(2, dim=-1)  # [..., D] each
        scale = F.softplus(raw) + MIN_SCALE
        return Independent(Normal(loc, scale, validate_args=False), 1)

    def mean(self, out):
        return out[..., : self.data_dim]


def build_likelihood(name: str, data_dim: int, sigma: float = 1.0) -> LikelihoodHead:
    if name == "bernoulli":
        return BernoulliHead(data_dim)
    if name == "gaussian":
        return GaussianFixedHead(data_dim, sigma)
    if name == "gaussian-learned":
        return GaussianPerPixelHead(data_dim, sigma)
    if name == "gaussian-decoder":
        return GaussianDecoderVarianceHead(data_dim)
    raise ElbolabError(f"expected a likelihood in {', '.join(LIKELIHOODS)}, got {name!r}")
