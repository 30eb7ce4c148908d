"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"), with a beta weight
(Higgins et al. 2017, beta-VAE).

Objective, per example (notes 000 eq. 5 and 10, notes 001 eq. 40-42, notes 003):

    L(x) = 1/L sum_{l=1}^{L} log p(x | z_l) - beta * KL(q(z|x) || p(z)),
    z_l = mu(x) + L(x) eps_l,  eps_l ~ N(0, I)   (reparameterisation, notes 000 eq. 9; L = sigma for a diagonal q)

The KL is the closed form  1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)  (notes 000 eq. 7, notes 001 eq. 37)
evaluated by ``torch.distributions.kl_divergence``; a Monte-Carlo estimate is used for priors without one.
The loss is the negative mean of L(x) over the batch.
"""

from __future__ import annotations

import torch

from elbolab.models.base import LatentVariableModel, LossOutput
from elbolab.models.registry import register_model
from elbolab.objectives import elbo, kl_term, log_importance_weights


@register_model("vae")
class VAE(LatentVariableModel):
    """Gaussian encoder (diagonal or full covariance), Bernoulli or Gaussian decoder, N(0, I) prior."""

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, mc_samples: int = 1) -> LossOutput:
        q = self.encode(x)  # batch [B], event [d]
        z = q.rsample((mc_samples,))  # [L, B, d]
        log_px_given_z = self.decode(z).log_prob(x)  # [L, B]
        kl = kl_term(q, self.prior(), z)  # [B]
        objective = elbo(log_px_given_z, kl, beta)  # [B]
        recon = log_px_given_z.mean(0)
        metrics = {"elbo": recon - kl, "kl": kl, "recon": recon}
        return LossOutput(-objective.mean(), metrics)

    def log_importance_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        q = self.encode(x)
        z = q.sample((k,))  # [k, B, d]
        return log_importance_weights(self.decode(z).log_prob(x), self.prior().log_prob(z), q.log_prob(z))
