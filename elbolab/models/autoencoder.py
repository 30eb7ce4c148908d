"""Classical (deterministic) autoencoder: x -> z = f(x) -> x_hat = g(z)   (notes 003, notes 004 introduction).

Loss per example: cross-entropy  -sum_d [x_d log x_hat_d + (1 - x_d) log(1 - x_hat_d)]  for the ``bernoulli``
likelihood ("CE"), or the sum of squared errors  1/2 sum_d (x_d - x_hat_d)^2  for ``gaussian`` ("SSE", notes 004).
There is no prior and no posterior, hence no ELBO: sampling decodes z ~ N(0, I), which shows why a plain
autoencoder is not a generative model (its codes need not fill that region).

``input_dropout`` > 0 makes it a denoising autoencoder (Vincent et al. 2010): in training the encoder sees x with
that fraction of its features zeroed (dropout, survivors scaled by 1 / (1 - p)) and the loss reconstructs the clean
x. DEC's pretraining (Xie et al. 2016), which VaDE's authors reused, corrupted with dropout 0.2. The code f(x) and
every evaluation use the clean x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.schedules import StepContext


@dataclass(frozen=True)
class AutoencoderConfig(ModelConfig):
    input_dropout: float = option(0.0, "denoising: the fraction of input features dropped in training (DEC: 0.2)")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.input_dropout < 1.0:
            raise ElbolabError(f"autoencoder: expected 0 <= input_dropout < 1 (e.g. 0.2), got {self.input_dropout!r}")


@register_model("autoencoder")
class Autoencoder(LatentVariableModel):
    """Deterministic encoder and decoder; CE (bernoulli) or SSE (gaussian) reconstruction loss."""

    config_class = AutoencoderConfig
    has_posterior = False

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
        x_in = F.dropout(batch.x, self.config.input_dropout, training=self.training)  # clean x outside training
        out = self.decoder(self.encoder(x_in))  # [B, D]
        if self.config.likelihood == "bernoulli":
            per_example = -self.likelihood_head(out).log_prob(batch.x)  # binary cross-entropy, summed over pixels
        else:
            per_example = 0.5 * (batch.x - out).pow(2).sum(-1)
        return LossOutput({"model": per_example.mean()}, {"recon_error": per_example})
