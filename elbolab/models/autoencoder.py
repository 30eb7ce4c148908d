"""Classical (deterministic) autoencoder: x -> z = f(x) -> x_hat = g(z)   (notes 003, notes 004 introduction).

Loss per example: cross-entropy  -sum_d [x_d log x_hat_d + (1 - x_d) log(1 - x_hat_d)]  for the ``bernoulli``
likelihood ("CE"), or the sum of squared errors  1/2 sum_d (x_d - x_hat_d)^2  for ``gaussian`` ("SSE", notes 004).
There is no prior and no posterior, hence no ELBO: sampling decodes z ~ N(0, I), which shows why a plain
autoencoder is not a generative model (its codes need not fill that region).
"""

from __future__ import annotations

import torch
from torch import nn

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig
from elbolab.models.registry import register_model
from elbolab.schedules import StepContext


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

    def encode(self, batch):
        raise NotImplementedError("autoencoder: there is no q(z|x); use latent_means(x) for the code f(x)")

    def latent_means(self, batch) -> dict[str, torch.Tensor]:
        return {"z": self.encoder(as_batch(batch).x)}

    def kl_terms(self, batch):
        return None

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        out = self.decoder(self.encoder(batch.x))  # [B, D]
        if self.config.likelihood == "bernoulli":
            per_example = -self.likelihood_head(out).log_prob(batch.x)  # binary cross-entropy, summed over pixels
        else:
            per_example = 0.5 * (batch.x - out).pow(2).sum(-1)
        return LossOutput({"model": per_example.mean()}, {"recon_error": per_example})
