"""beta-VAE (Higgins et al. 2017, "beta-VAE: Learning Basic Visual Concepts with a Constrained Variational
Framework"), and its capacity-controlled variant (Burgess et al. 2018, "Understanding disentangling in beta-VAE").

Notes 004 derive beta-VAE as the Lagrangian of an autoencoder with a KL constraint,

    max E_q(z|x)[log p(x|z)]  s.t.  KL(q(z|x) || p(z)) < eps
    ->  F = E_q(z|x)[log p(x|z)] - beta (KL(q(z|x) || p(z)) - eps)  >=  E_q(z|x)[log p(x|z)] - beta KL(q(z|x) || p(z)),

and beta > 1 presses q(z|x) harder towards the factorised N(0, I) prior (disentanglement, at a cost in
reconstruction). This preset is the ``vae`` model with ``beta`` (default 4) as the default of the scheduled value
``beta``: a schedule the user gives (``--beta``, ``--kl-warmup``, ``--schedule beta=...``) takes precedence.

Capacity control (Burgess et al. 2018, eq. 8): minimise -E_q[log p(x|z)] + gamma |KL(q(z|x) || p(z)) - C| with the
target C raised linearly during training. The ``vae`` loss implements it with beta in the role of gamma; the
paper's setting (gamma = 1000, C from 0 to 25 nats) is

    elbolab train beta-vae --beta 1000 --schedule capacity=linear:0:25:EPOCHS

(or, equivalently, ``elbolab train vae --beta 1000 --schedule capacity=linear:0:25:EPOCHS``). The ``elbo`` metric
stays the plain ELBO (beta = 1), comparable with every other model.
"""

from __future__ import annotations

import dataclasses

from elbolab.data.core import Batch
from elbolab.models.base import LossOutput, ModelConfig
from elbolab.models.registry import register_model
from elbolab.models.vae import VAE
from elbolab.schedules import StepContext

DEFAULT_BETA = 4.0


@register_model("beta-vae")
class BetaVAE(VAE):
    """The vae with a KL weight beta (default 4); with a capacity schedule, Burgess et al.'s gamma |KL - C|."""

    config_class = ModelConfig

    def scheduled_defaults(self) -> dict[str, float]:
        """Defaults of the scheduled values this model reads, for the trainer (a user's schedule wins)."""
        return {"beta": DEFAULT_BETA}

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        return super().loss(batch, dataclasses.replace(ctx, values={**self.scheduled_defaults(), **ctx.values}))
