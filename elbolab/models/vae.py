"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"), with a beta weight
(Higgins et al. 2017, beta-VAE), free bits (Kingma et al. 2016) and a capacity target (Burgess et al. 2018).

Objective, per example (notes 000 eq. 5 and 10, notes 001 eq. 40-42, notes 003):

    L(x) = 1/L sum_{l=1}^{L} log p(x | z_l) - beta * KL(q(z|x) || p(z)),
    z_l = mu(x) + L(x) eps_l,  eps_l ~ N(0, I)   (reparameterisation, notes 000 eq. 9; L = sigma for a diagonal q)

The KL is the closed form  1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)  (notes 000 eq. 7, notes 001 eq. 37)
evaluated by ``torch.distributions.kl_divergence``; a Monte-Carlo estimate is used for priors without one.
The loss is the negative mean of L(x) over the batch. Scheduled values read from the step context:

* ``beta`` (default 1): the KL weight; a linear schedule from 0 is KL warm-up.
* ``free_bits`` lambda (default 0): the batch KL penalty becomes sum_j max(lambda, mean_b KL_j).
* ``capacity`` C (default: none): the penalty becomes beta * |mean_b KL - C| (Burgess et al. 2018, gamma = beta).

The reported ``elbo`` metric is always the plain ELBO (beta = 1, no free bits), comparable across settings.

VAE as EM (notes 001 s3 eq. 43-45, notes 003 "VAE vs EM algorithm", notes 004): ``updates="alternate"`` splits the
parameters into an ``encoder`` group (phi: the E-like step, raising the ELBO by moving q(z|x) towards p(z|x)) and a
``decoder`` group (theta and the likelihood's own parameters: the M-like step, raising E_q[log p(x, z)] with q fixed)
and steps one of them per step, ``alternate_every`` steps each, encoder first (NVDM, Miao et al. 2016, alternates too).
Both steps descend the same loss; the trainer rests the group whose loss is None. ``updates="joint"`` (default) is
the usual simultaneous update of all parameters with one optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.objectives import detach_distribution, elbo_terms, free_bits_kl, kl_term
from elbolab.schedules import StepContext

UPDATES = ("joint", "alternate")


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    updates: str = option("joint", "joint | alternate (encoder and decoder groups stepped in turn, encoder first)")
    alternate_every: int = option(1, "steps per phase with updates=alternate")
    gradient: str = option("plain", "plain (the closed-form KL) | stl (sticking the landing, Roeder et al. 2017: a "
                                    "Monte-Carlo KL with log q's parameters held fixed, zero variance at the "
                                    "exact posterior)")

    def __post_init__(self):
        super().__post_init__()
        if self.updates not in UPDATES:
            raise ElbolabError(f"vae: expected updates in {', '.join(UPDATES)}, got {self.updates!r}; "
                               "try --set updates=alternate")
        if self.gradient not in ("plain", "stl"):
            raise ElbolabError(f"vae: expected gradient plain or stl, got {self.gradient!r}")
        if self.alternate_every < 1:
            raise ElbolabError(f"vae: expected alternate_every >= 1 steps, got {self.alternate_every!r}")


@register_model("vae")
class VAE(LatentVariableModel):
    """Gaussian encoder (diagonal or full covariance), Bernoulli or Gaussian decoder, N(0, I) prior."""

    config_class = VAEConfig
    scheduled_values = ("beta", "free_bits", "capacity")
    reads_mc_samples = True

    def update_mode(self) -> str:
        """"joint" or "alternate"; subclasses whose config is not a VAEConfig always train jointly."""
        return self.config.updates if isinstance(self.config, VAEConfig) else "joint"

    def phase(self, step: int) -> str:
        """The group stepped at ``step`` with updates=alternate: "encoder" (E-like) or "decoder" (M-like)."""
        return "encoder" if (step // self.config.alternate_every) % 2 == 0 else "decoder"

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        if self.update_mode() == "joint":
            return super().parameter_groups()
        encoder = self.q_parameters()
        mine = {id(p) for p in encoder}
        # the decoder group: the decoder, the likelihood head (e.g. a learned sigma) and anything else
        return {"encoder": encoder, "decoder": [p for p in self.parameters() if id(p) not in mine]}

    def route_loss(self, loss: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor | None]:
        """The losses per parameter group: {"model": loss}, or the alternating {"encoder", "decoder"} pair."""
        if self.update_mode() == "joint":
            return {"model": loss}
        active = self.phase(ctx.step)
        return {name: loss if name == active else None for name in ("encoder", "decoder")}

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        if getattr(self.config, "gradient", "plain") == "stl":
            return self.sticking_the_landing_loss(batch, ctx)
        q = self.encode(batch)  # batch [B], event [d]
        beta, free_bits = ctx.value("beta", 1.0), ctx.value("free_bits", 0.0)
        if free_bits > 0 and self.config.encoder_covariance != "diag":
            raise ElbolabError("free bits need a diagonal q(z|x); use --encoder-covariance diag")
        # z ~ q [L, B, d], recon = 1/L sum_l log p(x|z_l) [B], KL [B] (and [B, d] for free bits); the fused fast
        # path when the encoder, prior and likelihood are the standard ones (objectives.elbo_terms)
        terms = elbo_terms(q, lambda z: self.decode(z, batch), self.prior(batch), batch.x, ctx.mc_samples,
                           per_dim=free_bits > 0)
        recon, kl = terms.recon, terms.kl
        metrics = {}
        if free_bits > 0:
            penalty = free_bits_kl(terms.kl_per_dim, free_bits)
            metrics["dims_above_free_bits"] = (terms.kl_per_dim.mean(0) > free_bits).sum().float()  # per batch
        else:
            penalty = kl.mean()
        if "capacity" in ctx.values:
            penalty = (penalty - ctx.value("capacity", 0.0)).abs()
        loss = (penalty if beta == 1 else beta * penalty) - recon.mean()  # the same value, fewer autograd nodes
        metrics.update(elbo=recon - kl, kl=kl, recon=recon)
        return LossOutput(self.route_loss(loss, ctx), metrics)

    def sticking_the_landing_loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        """Roeder, Wu & Duvenaud 2017: the ELBO as 1/L sum_l [log p(x|z_l) - beta (log q_stop(z_l) - log p(z_l))]
        with reparameterised z_l and q's parameters detached inside log q (the path derivative alone); its expected
        gradient is the ELBO's, and at the exact posterior every draw's encoder gradient is zero."""
        q = self.encode(batch)  # batch [B], event [d]
        z = q.rsample((ctx.mc_samples,))  # [L, B, d]
        recon = self.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
        kl_path = (detach_distribution(q).log_prob(z) - self.prior(batch).log_prob(z)).mean(0)  # [B]
        with torch.no_grad():
            kl = kl_term(q, self.prior(batch), z)  # [B], the reported KL (closed form when there is one)
        loss = ctx.value("beta", 1.0) * kl_path.mean() - recon.mean()
        return LossOutput(self.route_loss(loss, ctx), {"elbo": (recon - kl).detach(), "kl": kl,
                                                        "recon": recon.detach()})
