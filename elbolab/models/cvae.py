"""Conditional VAE (Sohn, Lee & Yan 2015, "Learning Structured Output Representation using Deep Conditional
Generative Models"; notes 002 s4.1 note, notes 004 "Conditional VAE").

A condition c: a class label (one-hot of ``Batch.y``, ``condition="label"``) or the observed quadrants of an image
(``condition="quadrants"``: c = [x * m, m] with m the observed mask). Encoder q(z|x, c), decoder p(x|z, c), prior
p(z|c) = N(0, I) or, with ``conditional_prior``, a learned N(mu(c), diag sigma(c)^2) (the prior network of Sohn et
al. s3.1). Objective, per example (Sohn et al. eq. 4):

    L(x|c) = 1/L sum_l log p(x_t | z_l, c) - beta * KL(q(z|x, c) || p(z|c)),   z_l ~ q(z|x, c)  (reparameterised)

(notes 004 writes this KL with its arguments swapped; the bound has KL(q || p), as here.) x_t, the target, is the
whole image for labels and only the MISSING pixels for quadrants: p(x_t|z, c) sums the per-pixel log-likelihoods
where m is False (``MissingPixels``), so the observed pixels are conditioned on and never scored. Evaluation: the
importance weights log w_k = log p(x_t|z_k, c) + log p(z_k|c) - log q(z_k|x, c) give log p(x|y) (labels) or
log p(x_missing | x_observed) (quadrants), the conditional log-likelihood of Sohn et al. s4.

Quadrants follow Pyro's CVAE tutorial (examples/cvae/mnist.py): ``given_quadrants`` 1 = bottom-left, 2 = the left
half, 3 = all but the bottom-right. The mask is ``Batch.observed`` when the batch has one, else this one.
A learned conditional prior is an option, not forced, in both modes: the decoder already sees c, so a prior
N(mu(c), sigma(c)^2) is the reparameterisation z = mu(c) + sigma(c) eps of an N(0, I) model (Sohn et al. s3.1
also relax p(z|x) to p(z)); it changes the parameterisation and the optimisation, not the model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Distribution
from torch.nn import functional as F

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.figures.conditional import conditional_figures
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, check_options, option
from elbolab.models.registry import register_model
from elbolab.networks import GaussianEncoder, full_precision, mlp, standard_normal_prior
from elbolab.objectives import kl_term
from elbolab.schedules import StepContext

CONDITIONS = ("label", "quadrants")


@dataclass(frozen=True)
class CVAEConfig(ModelConfig):
    condition: str = option("label", "label (one-hot class) | quadrants (inpainting: observed quadrants given)")
    given_quadrants: int = option(1, "quadrants given with condition=quadrants: 1 bottom-left, 2 left half, "
                                     "3 all but bottom-right (as Pyro's CVAE tutorial)")
    conditional_prior: bool = option(False, "learned prior network p(z|c) instead of N(0, I)")
    n_classes: int = option(0, "classes of the labels (from the data; 0 with condition=quadrants)")

    data_fields = (*ModelConfig.data_fields, "n_classes")

    def __post_init__(self):
        super().__post_init__()
        if self.condition not in CONDITIONS:
            raise ElbolabError(f"cvae: expected condition in {', '.join(CONDITIONS)}, got {self.condition!r}; "
                               "try --set condition=quadrants")
        if self.architecture != "mlp":
            raise ElbolabError(f"cvae: expected architecture mlp, got {self.architecture!r}; use --arch mlp")
        if self.condition == "label" and self.n_classes < 2:
            raise ElbolabError(f"cvae: condition=label expected n_classes >= 2 (from the data's labels), got "
                               f"{self.n_classes}; train on labelled data or use --set condition=quadrants")
        if not 1 <= self.given_quadrants <= 3:  # checked whatever the condition: a wrong value is never silent
            raise ElbolabError(f"cvae: expected given_quadrants in 1, 2, 3, got {self.given_quadrants}")
        if self.condition == "quadrants":
            if self.image_shape is None or min(self.image_shape[1:]) < 2:
                raise ElbolabError(f"cvae: condition=quadrants expected images of at least 2x2 pixels, got "
                                   f"image_shape {self.image_shape}; use image data or --set condition=label")

    @classmethod
    def from_data(cls, data, **options) -> CVAEConfig:
        check_options(cls, options, exclude=cls.data_fields)
        n_classes = 0
        if options.get("condition", "label") == "label":
            if data.y is None or data.y.dim() != 1:
                got = "no labels" if data.y is None else f"labels of shape {tuple(data.y.shape)}"
                raise ElbolabError(f"cvae: condition=label expected class labels [N] with the data, got {got} in "
                                   f"{data.name}; use labelled data or --set condition=quadrants")
            names = data.meta.get("class_names") or []
            n_classes = max(len(names), int(data.y.max()) + 1 if len(data.y) else 0)
        return cls(input_dim=data.dim, image_shape=data.image_shape, n_classes=n_classes, **options)

    @property
    def condition_dim(self) -> int:
        return self.n_classes if self.condition == "label" else 2 * self.input_dim


def quadrant_mask(image_shape, given: int) -> torch.Tensor:
    """The observed pixels ``[C*H*W]`` (bool) when ``given`` quadrants are given, as Pyro's MaskImages."""
    c, h, w = image_shape
    mask = torch.zeros(c, h, w, dtype=torch.bool)
    mask[:, h // 2:, : w // 2] = True  # bottom-left
    if given >= 2:
        mask[:, :, : w // 2] = True  # the left half
    if given == 3:
        mask[:, : h // 2, :] = True  # and the top half: all but bottom-right
    return mask.flatten()


class MissingPixels(Distribution):
    """p(x|z, c) scored on the missing pixels only: log_prob sums the pixel model's per-pixel log-probabilities
    where ``observed`` [B, D] is False; mean and samples are those of the whole image."""

    arg_constraints: dict = {}

    def __init__(self, pixels: Distribution, observed: torch.Tensor):
        self.pixels, self.observed = pixels, observed
        super().__init__(pixels.batch_shape, pixels.event_shape, validate_args=False)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixels.base_dist.log_prob(x).masked_fill(self.observed, 0.0).sum(-1)  # [..., B]

    @property
    def mean(self) -> torch.Tensor:
        return self.pixels.mean

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.pixels.sample(sample_shape)


@register_model("cvae")
class CVAE(LatentVariableModel):
    """Conditional VAE: q(z|x,c), p(x|z,c), p(z|c); c a class label or the observed quadrants (inpainting)."""

    config_class = CVAEConfig
    scheduled_values = ("beta",)
    reads_mc_samples = True

    def __init__(self, config: CVAEConfig):
        super().__init__(config)
        if config.conditional_prior:
            body = mlp((config.condition_dim, *config.hidden), config.activation, final_activation=True)
            self.prior_net = GaussianEncoder(body, config.hidden[-1], config.latent_dim)
        if config.condition == "quadrants":
            self.register_buffer("default_observed", quadrant_mask(config.image_shape, config.given_quadrants),
                                 persistent=False)

    def build_encoder(self, config: CVAEConfig):
        body, width = self.encoder_body(config, config.input_dim + config.condition_dim)
        return GaussianEncoder(body, width, config.latent_dim, config.encoder_covariance)

    def build_decoder(self, config: CVAEConfig, input_dim: int):
        return super().build_decoder(config, input_dim + config.condition_dim)

    # ----- the condition -----
    def observed(self, batch: Batch) -> torch.Tensor:
        """The observed mask [B, D]: ``batch.observed``, else the configured quadrants."""
        if batch.observed is not None:
            return batch.observed.to(torch.bool)
        return self.default_observed.expand(len(batch), -1)

    def condition(self, batch: Batch | None) -> torch.Tensor:
        """c [B, C]: one-hot labels, or [x * m, m] for the observed quadrants."""
        if batch is None:
            raise ElbolabError("cvae: decode, prior and sample need the condition; pass a Batch with labels y "
                               "(condition=label) or images x (condition=quadrants)")
        batch = as_batch(batch)
        if self.config.condition == "quadrants":
            m = self.observed(batch).to(batch.x.dtype)
            return torch.cat([batch.x * m, m], -1)
        y = batch.y
        if y is None or y.dim() != 1 or y.is_floating_point() or len(y) and not 0 <= int(y.min()) <= int(
                y.max()) < self.config.n_classes:
            got = "no labels" if y is None else f"labels {tuple(y.shape)} {y.dtype}"
            raise ElbolabError(f"cvae: condition=label expected integer labels [B] in 0..{self.config.n_classes - 1}"
                               f", got {got}; give Batch(x, y)")
        return F.one_hot(y, self.config.n_classes).to(batch.x.dtype)

    # ----- the probabilistic interface -----
    def prior(self, batch: Batch | None = None):
        """p(z|c): N(0, I) (batch shape []) or the prior network's N(mu(c), sigma(c)^2) (batch shape [B])."""
        if not self.config.conditional_prior:
            return standard_normal_prior(self.config.latent_dim, next(self.parameters()))
        return self.prior_net(self.condition(batch))

    def encode(self, batch: Batch | torch.Tensor):
        batch = as_batch(batch)
        return self.encoder(torch.cat([batch.x, self.condition(batch)], -1))  # q(z|x, c), batch [B]

    def _decoder_out(self, z: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        c = self.condition(batch)  # [B, C]
        return full_precision(self.decoder(torch.cat([z, c.expand(*z.shape[:-1], -1)], -1)))  # [..., B, D * out]

    def decode(self, z: torch.Tensor, batch: Batch | None = None):
        """p(x_t|z, c), batch [..., B]: the whole image (labels) or its missing pixels (quadrants)."""
        pixels = self.likelihood_head(self._decoder_out(z, batch))
        return pixels if self.config.condition == "label" else MissingPixels(pixels, self.observed(as_batch(batch)))

    def decode_mean(self, z: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.likelihood_head.mean(self._decoder_out(z, batch))

    @torch.no_grad()
    def reconstruct(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """E[x|z, c] at z = E[q(z|x, c)]; with quadrants, the observed pixels pasted back (given, never modelled)."""
        batch = as_batch(batch)
        mean = super().reconstruct(batch)  # [B, D]
        return torch.where(self.observed(batch), batch.x, mean) if self.config.condition == "quadrants" else mean

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        q = self.encode(batch)  # batch [B], event [d]
        z = q.rsample((ctx.mc_samples,))  # [L, B, d]
        recon = self.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
        kl = kl_term(q, self.prior(batch), z)  # [B]
        loss = -(recon - ctx.value("beta", 1.0) * kl).mean()
        return LossOutput({"model": loss}, {"elbo": (recon - kl).detach(), "kl": kl.detach(),
                                            "recon": recon.detach()})

    @torch.no_grad()
    def sample(self, n: int, batch: Batch | None = None) -> torch.Tensor:
        """E[x|z, c] for z ~ p(z|c): ``[n, D]`` cycling through the classes when no batch is given (labels), else
        ``[n, B, D]``: n draws for each example's condition (its label, or its observed quadrants)."""
        if batch is None:
            if self.config.condition != "label":
                raise ElbolabError("cvae: condition=quadrants samples completions of given images; pass a Batch")
            like = next(self.parameters())
            y = torch.arange(n, device=like.device) % self.config.n_classes
            batch = Batch(like.new_zeros(n, self.config.input_dim), y)
            return self.decode_mean(self.prior(batch).sample(() if self.config.conditional_prior else (n,)), batch)
        batch = as_batch(batch)
        prior = self.prior(batch)
        z = prior.sample((n,) if prior.batch_shape else (n, len(batch)))  # [n, B, d]
        return self.decode_mean(z, batch)

    def figures(self, run_dir, splits) -> list:
        return conditional_figures(self, run_dir, splits)
