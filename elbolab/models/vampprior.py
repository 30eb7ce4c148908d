"""VAE with a VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior"): the prior is the variational mixture of
posteriors at K learnable pseudo-inputs u_k,

    p_lambda(z) = 1/K sum_{k=1}^{K} q(z | u_k)

a ``MixtureSameFamily`` of the encoder's own Gaussians q(z|u_k) with equal weights, so the prior moves with the
encoder (the prior maximising the ELBO summed over the data is the aggregated posterior 1/N sum_n q(z|x_n); the
pseudo-inputs are a learned summary of the data). Objective, per example (the ELBO with this prior; the VAE's loss,
with beta):

    L(x) = E_{q(z|x)} [log p(x|z)] - beta KL(q(z|x) || p_lambda(z)),
    KL ~= 1/L sum_l [log q(z_l|x) - log p_lambda(z_l)],   z_l ~ q(z|x)

the KL by Monte Carlo (``objectives.kl_term``: torch has no closed form against a mixture). Gradients reach the
pseudo-inputs and the encoder through log p_lambda. No per-dimension KL (``kl_terms`` is None): the prior does not
factorise over dimensions.

Pseudo-inputs live in the data's range: u_k = sigmoid(a_k) for data in [0, 1] (a Bernoulli or continuous Bernoulli
likelihood; the paper clips with a hardtanh, whose zero gradient at and beyond 0 and 1 would freeze every black pixel
of a data start), u_k = a_k for real-valued data. Initialisation (``pseudo_init``): ``data`` (default) K random
training examples before the first epoch, moved into [0.05, 0.95] (u = 0.05 + 0.9 x) where the sigmoid still has
a gradient; ``random`` N(0.5, 0.1^2) values (N(0, 1) for real data) set at construction.

Set with ``--set pseudo_inputs=500``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Categorical, MixtureSameFamily

from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.models.base import option
from elbolab.models.registry import register_model
from elbolab.models.vae import VAE, VAEConfig
from elbolab.schedules import StepContext

PSEUDO_INITS = ("data", "random")
UNIT_INTERVAL = ("binary", "unit-interval")  # likelihood supports whose data lie in [0, 1]
DATA_MARGIN = 0.05  # a data start u = margin + (1 - 2 margin) x keeps sigmoid's gradient away from zero


@dataclass(frozen=True)
class VampPriorConfig(VAEConfig):
    pseudo_inputs: int = option(500, "pseudo-inputs K: components of the prior p(z) = 1/K sum_k q(z|u_k)")
    pseudo_init: str = option("data", "pseudo-inputs start as data (random training examples) | random")

    def __post_init__(self):
        super().__post_init__()
        if self.pseudo_inputs < 1:
            raise ElbolabError(f"vampprior: expected pseudo_inputs >= 1, got {self.pseudo_inputs}")
        if self.pseudo_init not in PSEUDO_INITS:
            raise ElbolabError(f"vampprior: expected pseudo_init in {', '.join(PSEUDO_INITS)}, got "
                               f"{self.pseudo_init!r}")


@register_model("vampprior")
class VampPrior(VAE):
    """VAE whose prior is a mixture of the encoder's posteriors at K learned pseudo-inputs."""

    config_class = VampPriorConfig
    scheduled_values = ("beta", "capacity")  # no free bits: there is no per-dimension KL to a mixture
    compiles_faster = True

    def __init__(self, config: VampPriorConfig):
        super().__init__(config)
        self.unit_interval = self.likelihood_head.support in UNIT_INTERVAL
        start = torch.randn(config.pseudo_inputs, config.input_dim)  # [K, D]
        self.pseudo = nn.Parameter(self._unsquash(0.5 + 0.1 * start) if self.unit_interval else start)

    def _unsquash(self, u: torch.Tensor) -> torch.Tensor:
        return torch.logit(u.clamp(DATA_MARGIN, 1 - DATA_MARGIN)) if self.unit_interval else u

    def pseudo_inputs(self) -> torch.Tensor:
        """u_k in the data's range, ``[K, D]``."""
        return torch.sigmoid(self.pseudo) if self.unit_interval else self.pseudo

    def prior(self, batch: Batch | None = None) -> MixtureSameFamily:
        """1/K sum_k q(z|u_k): batch [], event [d]; components the encoder's Gaussians at the pseudo-inputs."""
        components = self.encoder(self.pseudo_inputs())  # batch [K], event [d]
        weights = Categorical(logits=self.pseudo.new_zeros(self.config.pseudo_inputs), validate_args=False)
        return MixtureSameFamily(weights, components, validate_args=False)

    @torch.no_grad()
    def prepare(self, train, ctx: StepContext) -> None:
        """pseudo_init=data: K random training examples (with replacement when K exceeds the split), drawn from
        torch's generator (seeded by the trainer: deterministic)."""
        if self.config.pseudo_init != "data":
            return
        k, n = self.config.pseudo_inputs, len(train)
        rows = torch.randperm(n)[:k] if k <= n else torch.randint(n, (k,))
        x = train.batch(rows).x.to(self.pseudo)  # [K, D]
        if self.unit_interval:
            x = DATA_MARGIN + (1 - 2 * DATA_MARGIN) * x.clamp(0, 1)
        self.pseudo.copy_(self._unsquash(x))
