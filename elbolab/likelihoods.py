"""Likelihood heads: turn decoder outputs into p(x|z) as a torch.distributions object.

Every head returns an ``Independent`` distribution with one event dimension, so ``log_prob(x)`` gives one value
per example (summed over pixels), shape ``[..., B]``.

* ``bernoulli``             p(x|z) = prod_d Bernoulli(x_d; sigmoid(f_d(z)))      (Kingma & Welling 2014, App. C.1)
* ``continuous-bernoulli``  p(x|z) = prod_d CB(x_d; sigmoid(f_d(z)))             (Loaiza-Ganem & Cunningham 2019)
* ``gaussian``              p(x|z) = N(x; f(z), sigma^2 I), sigma fixed         (notes 000 eq. 3, notes 001 eq. 29)
* ``gaussian-learned``      p(x|z) = N(x; f(z), diag(s^2)), s one learned value per pixel
* ``gaussian-decoder``      p(x|z) = N(x; f(z), Sigma(z)), Sigma(z) = diag(s(z)^2) output by the decoder

Heads are found by name in the registry ``LIKELIHOODS`` (a read-only mapping name -> head class, in registration
order); a new head is added with the ``@register_likelihood("name")`` class decorator and built with
``build_likelihood(name, data_dim, sigma)``.

Each head class declares its ``support``, the data on which ``log_prob`` is a true log-density (or log-mass):

* ``"binary"``         x in {0, 1}^D (a probability mass function; on grey levels ``log_prob`` is only a score,
                       the negative cross-entropy, whose integral over [0, 1]^D is below 1);
* ``"unit-interval"``  x in [0, 1]^D;
* ``"real"``           x in R^D.

``head.scores_density(x)`` tells whether ``log_prob`` on the data ``x`` is a true log-density / log-mass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch
from torch import nn
from torch.distributions import Bernoulli, ContinuousBernoulli, Distribution, Independent, Normal
from torch.nn import functional as F

from elbolab.errors import ElbolabError

# Smallest standard deviation a learned Gaussian may reach: without a floor the likelihood of a pixel that is
# always 0 (MNIST borders) grows without bound as its variance shrinks.
MIN_SCALE = 1e-3

# The values a head's ``support`` may take (see the module docstring).
SUPPORTS = ("binary", "unit-interval", "real")


class LikelihoodHead(nn.Module):
    """Maps decoder features ``[..., D * outputs_per_dim]`` to ``p(x|z)`` over ``D`` dimensions.

    Subclasses set ``support`` (one of ``SUPPORTS``) and, when they need more than one decoder output per
    dimension, ``outputs_per_dim``.
    """

    outputs_per_dim = 1
    support = "real"

    def __init__(self, data_dim: int):
        super().__init__()
        self.data_dim = data_dim

    @classmethod
    def build(cls, data_dim: int, sigma: float = 1.0) -> LikelihoodHead:
        """The head for ``build_likelihood``; heads that use the ``sigma`` option override this."""
        return cls(data_dim)

    def forward(self, out: torch.Tensor) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z), used for pictures (reconstructions, samples, manifolds)."""
        return self(out).mean

    def scores_density(self, x: torch.Tensor) -> bool:
        """Whether ``log_prob`` on the data ``x`` is a true log-density (log-mass for ``"binary"``).

        False when some value of ``x`` lies outside ``support`` (grey levels for ``"binary"``, values outside
        [0, 1] for ``"unit-interval"``) or is NaN / infinite.
        """
        x = torch.as_tensor(x)
        if self.support == "binary":
            inside = (x == 0) | (x == 1)
        elif self.support == "unit-interval":
            inside = (x >= 0) & (x <= 1)
        else:
            inside = torch.isfinite(x)
        return bool(inside.all())


Head = TypeVar("Head", bound=type[LikelihoodHead])


class LikelihoodRegistry(Mapping[str, type[LikelihoodHead]]):
    """Read-only mapping likelihood name -> head class, in registration order.

    ``name in registry``, ``list(registry)`` and ``", ".join(registry)`` give the names; ``register(name)`` is the
    class decorator that adds a head and ``build(name, data_dim, sigma)`` makes one.
    """

    def __init__(self) -> None:
        self._heads: dict[str, type[LikelihoodHead]] = {}

    def __getitem__(self, name: str) -> type[LikelihoodHead]:
        return self._heads[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._heads)

    def __len__(self) -> int:
        return len(self._heads)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._heads)})"

    def register(self, name: str) -> Callable[[Head], Head]:
        """Class decorator: ``@registry.register("name")`` on a ``LikelihoodHead`` subclass."""
        if not isinstance(name, str) or not name:
            raise ElbolabError(f"expected a likelihood name as a non-empty string, got {name!r}")

        def decorator(cls: Head) -> Head:
            if not (isinstance(cls, type) and issubclass(cls, LikelihoodHead)):
                raise ElbolabError(f"expected a LikelihoodHead subclass for likelihood {name!r}, got {cls!r}")
            if cls.support not in SUPPORTS:
                raise ElbolabError(
                    f"expected the support of likelihood {name!r} in {', '.join(SUPPORTS)}, got {cls.support!r}"
                )
            if name in self._heads:
                raise ElbolabError(
                    f"expected a new likelihood name, got {name!r}, already registered by "
                    f"{self._heads[name].__qualname__}; choose another name"
                )
            self._heads[name] = cls
            return cls

        return decorator

    def build(self, name: str, data_dim: int, sigma: float = 1.0) -> LikelihoodHead:
        """The head registered as ``name`` over ``data_dim`` dimensions (``sigma`` for Gaussian heads)."""
        cls = self._heads.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ElbolabError(f"expected a likelihood in {', '.join(self._heads)}, got {name!r}")
        return cls.build(data_dim, sigma)


LIKELIHOODS = LikelihoodRegistry()


def register_likelihood(name: str) -> Callable[[Head], Head]:
    """Class decorator adding a head to ``LIKELIHOODS``; a name already registered raises ``ElbolabError``."""
    return LIKELIHOODS.register(name)


def build_likelihood(name: str, data_dim: int, sigma: float = 1.0) -> LikelihoodHead:
    """The head registered as ``name``; an unknown name raises ``ElbolabError`` listing the known ones."""
    return LIKELIHOODS.build(name, data_dim, sigma)


def _check_sigma(sigma: float) -> float:
    if not sigma > 0:
        raise ElbolabError(f"expected a positive Gaussian sigma, got {sigma}; try --sigma 1.0")
    return float(sigma)


@register_likelihood("bernoulli")
class BernoulliHead(LikelihoodHead):
    """p(x|z) = prod_d lambda_d^x_d (1 - lambda_d)^(1 - x_d), lambda = sigmoid(logits): a mass function on {0,1}^D.

    On grey levels ``log_prob`` is the negative binary cross-entropy, a score but not a log-density: its integral
    over [0, 1] is 1/C(lambda) <= 1/2 per pixel (C as in ``ContinuousBernoulliHead``).
    """

    support = "binary"

    def forward(self, out):
        # validate_args=False: grey-level targets in [0, 1] are allowed (the usual cross-entropy loss) and the
        # per-call support check costs time in the training loop.
        return Independent(Bernoulli(logits=out, validate_args=False), 1)

    def mean(self, out):
        return torch.sigmoid(out)


@register_likelihood("continuous-bernoulli")
class ContinuousBernoulliHead(LikelihoodHead):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), a true density on [0, 1]^D:

        p(x|z) = prod_d C(lambda_d) lambda_d^x_d (1 - lambda_d)^(1 - x_d),   lambda = sigmoid(logits),
        C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda)  for lambda != 1/2,   C(1/2) = 2,

    i.e. the Bernoulli cross-entropy plus the log-normaliser log C(lambda). The normaliser, its Taylor expansion
    near lambda = 1/2 and the mean come from ``torch.distributions.ContinuousBernoulli``. The mean,

        E[x] = lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda))   (1/2 at lambda = 1/2),

    is not sigmoid(logits): it is pulled toward 1/2. ``mean`` evaluates it in float64, because torch's formula
    loses about 3e-3 to cancellation in float32 just outside its Taylor region (|lambda - 1/2| ~ 1e-3).

    A limit of torch's parametrisation by lambda: torch clamps lambda to [eps, 1 - eps], so beyond |logits| of
    about 16 in float32 (36 in float64) the normaliser stops growing: ``log_prob`` then falls short by about
    log(|logits| / 16) nats per such pixel in float32, and ``mean`` stays 1/36 away from 0 or 1 (float64).
    """

    support = "unit-interval"

    def forward(self, out):
        # validate_args=False: the per-call support check costs time; scores_density tells when x is outside.
        return Independent(ContinuousBernoulli(logits=out, validate_args=False), 1)

    def mean(self, out):
        wide = out if out.device.type == "mps" else out.double()  # MPS has no float64
        return self(wide).mean.to(out.dtype)


@register_likelihood("gaussian")
class GaussianFixedHead(LikelihoodHead):
    def __init__(self, data_dim: int, sigma: float = 1.0):
        super().__init__(data_dim)
        self.sigma = _check_sigma(sigma)

    @classmethod
    def build(cls, data_dim: int, sigma: float = 1.0) -> LikelihoodHead:
        return cls(data_dim, sigma)

    def forward(self, out):
        return Independent(Normal(out, self.sigma, validate_args=False), 1)

    def mean(self, out):
        return out


@register_likelihood("gaussian-learned")
class GaussianPerPixelHead(LikelihoodHead):
    """N(x; f(z), diag(s^2)) with s = exp(log_scale) floored at ``MIN_SCALE``; log_scale starts at log(sigma)."""

    def __init__(self, data_dim: int, sigma: float = 1.0):
        super().__init__(data_dim)
        self.log_scale = nn.Parameter(torch.full((data_dim,), math.log(_check_sigma(sigma))))

    @classmethod
    def build(cls, data_dim: int, sigma: float = 1.0) -> LikelihoodHead:
        return cls(data_dim, sigma)

    def forward(self, out):
        scale = self.log_scale.exp().clamp_min(MIN_SCALE)  # [D]
        return Independent(Normal(out, scale, validate_args=False), 1)

    def mean(self, out):
        return out


@register_likelihood("gaussian-decoder")
class GaussianDecoderVarianceHead(LikelihoodHead):
    """The decoder outputs [loc, raw] per pixel (loc first): Sigma(z) = diag(s^2), s = softplus(raw) + MIN_SCALE."""

    outputs_per_dim = 2

    def forward(self, out):
        loc, raw = out.chunk(2, dim=-1)  # [..., D] each
        scale = F.softplus(raw) + MIN_SCALE
        return Independent(Normal(loc, scale, validate_args=False), 1)

    def mean(self, out):
        return out[..., : self.data_dim]
