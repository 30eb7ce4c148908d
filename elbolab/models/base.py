"""Shared pieces of every latent-variable model: configuration, networks, prior and the model interface.

A model exposes distributions, not tensors:  ``encode(x) -> q(z|x)``, ``decode(z) -> p(x|z)``, ``prior() -> p(z)``.
Training objectives live in ``loss`` (one method that a variant overrides) and importance weights in
``log_importance_weights`` (used by the IWAE bound and by the log p(x) evaluator). Models know nothing about
training: beta, the number of Monte-Carlo samples and any schedule arrive as arguments to ``loss``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from elbolab.errors import ElbolabError
from elbolab.likelihoods import LIKELIHOODS, build_likelihood
from elbolab.networks import (
    ACTIVATIONS,
    COVARIANCES,
    ConvDecoder,
    GaussianEncoder,
    conv_encoder_body,
    mlp,
    standard_normal_prior,
)

ARCHITECTURES = ("mlp", "conv")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a model. Validated on creation; serialised to ``config.json``."""

    input_dim: int
    latent_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    activation: str = "relu"
    architecture: str = "mlp"
    likelihood: str = "bernoulli"
    sigma: float = 1.0  # fixed (or initial, for gaussian-learned) standard deviation of a Gaussian p(x|z)
    encoder_covariance: str = "diag"
    image_shape: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # model-specific settings (documented by each model)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        checks = [
            (self.input_dim >= 1, "input_dim >= 1", self.input_dim),
            (self.latent_dim >= 1, "latent_dim >= 1 (try --latent-dim 2 or 20)", self.latent_dim),
            (len(self.hidden) >= 1 and min(self.hidden) >= 1, "hidden sizes >= 1, e.g. --hidden 400,400", self.hidden),
            (self.activation in ACTIVATIONS, f"activation in {list(ACTIVATIONS)}", self.activation),
            (self.architecture in ARCHITECTURES, f"architecture in {list(ARCHITECTURES)}", self.architecture),
            (self.likelihood in LIKELIHOODS, f"likelihood in {list(LIKELIHOODS)}", self.likelihood),
            (self.sigma > 0, "sigma > 0", self.sigma),
            (self.encoder_covariance in COVARIANCES, f"encoder_covariance in {list(COVARIANCES)}",
             self.encoder_covariance),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"model config: expected {expected}, got {got!r}")
        if self.image_shape is not None and self.image_shape[0] * self.image_shape[1] != self.input_dim:
            raise ElbolabError(
                f"model config: image_shape {self.image_shape} does not match input_dim {self.input_dim}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ElbolabError(f"model config: unknown keys {sorted(unknown)}; expected some of {sorted(names)}")
        return cls(**d)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to minimise (mean over the batch)
    metrics: dict[str, torch.Tensor]  # per-example values [B], e.g. elbo, kl, recon


class LatentVariableModel(nn.Module):
    """Encoder q(z|x), decoder p(x|z) and prior p(z) built from a ``ModelConfig``."""

    registry_name = "base"
    config_class = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.likelihood_head = build_likelihood(config.likelihood, config.input_dim, config.sigma)
        self.encoder = self.build_encoder(config)
        self.decoder = self.build_decoder(config, config.latent_dim)

    # ----- construction: a variant changes the network by overriding one of these -----
    def encoder_body(self, config: ModelConfig, input_dim: int) -> tuple[nn.Module, int]:
        if config.architecture == "conv":
            return conv_encoder_body(config.image_shape, config.activation)
        return mlp((input_dim, *config.hidden), config.activation, final_activation=True), config.hidden[-1]

    def build_encoder(self, config: ModelConfig) -> nn.Module:
        body, width = self.encoder_body(config, config.input_dim)
        return GaussianEncoder(body, width, config.latent_dim, config.encoder_covariance)

    def build_decoder(self, config: ModelConfig, input_dim: int) -> nn.Module:
        outputs = self.likelihood_head.outputs_per_dim
        if config.architecture == "conv":
            return ConvDecoder(input_dim, config.image_shape, outputs, config.activation)
        return mlp((input_dim, *reversed(config.hidden), outputs * config.input_dim), config.activation)

    # ----- the probabilistic interface -----
    def prior(self):
        return standard_normal_prior(self.config.latent_dim, next(self.parameters()))

    def encode(self, x: torch.Tensor):
        """q(z|x) for a batch ``[B, D]``; batch shape [B], event shape [d]."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor):
        """p(x|z) for latents ``[..., d]``; batch shape [...], event shape [D]."""
        return self.likelihood_head(self.decoder(z))

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z], ``[..., D]``: what the pictures show."""
        return self.likelihood_head.mean(self.decoder(z))

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_mean(self.latent_mean(x))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Means of p(x|z) for n draws z ~ p(z), ``[n, D]``."""
        return self.decode_mean(self.prior().sample((n,)))

    def log_importance_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k|x) for k draws z_k ~ q(z|x): ``[k, B]``."""
        raise NotImplementedError(f"{type(self).__name__} defines no importance weights")

    def loss(self, x: torch.Tensor, **kwargs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **kwargs) -> LossOutput:
        # The trainer calls the module (not .loss) so that DistributedDataParallel sees the forward pass.
        return self.loss(x, **kwargs)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimiser; models trained with several optimisers return several groups."""
        return {"model": list(self.parameters())}
