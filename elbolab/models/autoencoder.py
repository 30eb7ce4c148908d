"""Classical (deterministic) autoencoder: x -> z = f(x) -> x_hat = g(z)   (notes 003, notes 004 introduction).

Loss per example: cross-entropy  -sum_d [x_d log x_hat_d + (1 - x_d) log(1 - x_hat_d)]  for the ``bernoulli``
likelihood ("CE"), or the sum of squared errors  sum_d (x_d - x_hat_d)^2  for ``gaussian`` ("SSE").
There is no prior and no posterior, hence no ELBO: sampling decodes z ~ N(0, I), which shows why a plain
autoencoder is not a generative model (its codes need not fill that region).
"""

from __future__ import annotations

import torch
from torch import nn

from elbolab.errors import ElbolabError
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig
from elbolab.models.registry import register_model


@register_model("autoencoder")
class Autoencoder(LatentVariableModel):
    """Deterministic encoder and decoder; CE (bernoulli) or SSE (gaussian) reconstruction loss."""

    def build_encoder(self, config: ModelConfig) -> nn.Module:
        if config.likelihood not in ("bernoulli", "gaussian"):
            raise ElbolabError(
                "autoencoder: expected likelihood bernoulli (CE loss) or gaussian (SSE loss), "
                f"got {config.likelihood!r}"
            )
        body, width = self.encoder_body(config, config.input_dim)
        return nn.Sequential(body, nn.Linear(width, config.latent_dim))

    def encode(self, x):
        raise ElbolabError("autoencoder: there is no q(z|x); use latent_mean(x) for the code f(x)")

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def loss(self, x: torch.Tensor, **unused) -> LossOutput:
        out = self.decoder(self.encoder(x))  # [B, D]
        if self.config.likelihood == "bernoulli":
            per_example = -self.likelihood_head(out).log_prob(x)  # binary cross-entropy, summed over pixels
        else:
            per_example = (x - out).pow(2).sum(-1)
        return LossOutput(per_example.mean(), {"recon_error": per_example})

