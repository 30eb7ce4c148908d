"""The contracts every latent-variable model meets: configuration, the probabilistic interface, the loss, hooks.

A model exposes distributions, not tensors: ``encode(batch) -> q(z|x)``, ``decode(z, batch) -> p(x|z)``,
``prior(batch) -> p(z)`` (``batch`` carries labels or masks for conditional models). On top of these:

* ``loss(batch, ctx) -> LossOutput``: one scalar per parameter group (``losses``), metrics per example [B] or per
  batch (scalars). ``ctx`` (a StepContext) carries the step and the scheduled values (beta, free bits, ...).
* ``importance_samples(batch, k, reparameterize=, stop_q_grad=) -> (z, log_w)``: the one thing the evaluator
  needs for log p(x); models without a single q(z|x) (a hierarchy) override it.
* optional hooks: ``latent_means`` / ``kl_terms`` (diagnostics per latent group), ``eval_metrics`` (model metrics in
  eval.json), ``log_px_is_exact_estimate`` (False when log p(x) is only approximate), ``prepare`` (once before the
  first epoch), ``parameter_groups`` / ``optimizer_options`` (several optimisers), ``figures``.

Models know nothing about training: schedules, epochs and optimisers stay in the trainer.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import torch
from torch import nn

from elbolab.config import check_options, coerce_fields, option
from elbolab.data.core import Batch, as_batch, image_chw
from elbolab.errors import ElbolabError
from elbolab.figures.standard import standard_figures
from elbolab.likelihoods import LIKELIHOODS, build_likelihood
from elbolab.networks import (
    ACTIVATIONS,
    COVARIANCES,
    ConvDecoder,
    GaussianEncoder,
    conv_encoder_body,
    full_precision,
    mlp,
    standard_normal_prior,
)
from elbolab.objectives import detach_distribution, kl_per_dim, log_importance_weights
from elbolab.schedules import StepContext

ARCHITECTURES = ("mlp", "conv")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a model. Validated on creation; serialised to ``config.json``.

    ``input_dim`` and ``image_shape`` come from the data (``from_data``); the rest are options, settable from the
    Python API (``pipeline.train(..., latent_dim=2)``) and the CLI (``--set latent_dim=2``).
    """

    input_dim: int = option(1, "features per example (from the data)")
    latent_dim: int = option(20, "dimensions of z")
    hidden: tuple[int, ...] = option((400,), "hidden layer sizes of the encoder (the decoder mirrors them)")
    activation: str = option("relu", f"one of {', '.join(ACTIVATIONS)}")
    architecture: str = option("mlp", "mlp | conv")
    likelihood: str = option("bernoulli", "p(x|z): " + " | ".join(LIKELIHOODS))
    sigma: float = option(1.0, "fixed (or initial, for gaussian-learned) standard deviation of a Gaussian p(x|z)")
    encoder_covariance: str = option("diag", "q(z|x) covariance: diag | full")
    image_shape: tuple[int, ...] | None = option(None, "(C, H, W) for images (from the data)")

    data_fields: typing.ClassVar[tuple[str, ...]] = ("input_dim", "image_shape")

    def __post_init__(self):
        coerce_fields(self)
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", image_chw(self.image_shape))
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
        if self.image_shape is not None and self.image_shape[0] * self.image_shape[1] * self.image_shape[2] \
                != self.input_dim:
            raise ElbolabError(
                f"model config: image_shape {self.image_shape} does not match input_dim {self.input_dim}"
            )

    @classmethod
    def from_data(cls, data, **options) -> ModelConfig:
        """The config for a data split (its size and image shape) and the user's options.

        A model whose config needs more from the data (classes, vocabulary) overrides this and extends
        ``data_fields``."""
        check_options(cls, options, exclude=cls.data_fields)
        return cls(input_dim=data.dim, image_shape=data.image_shape, **options)

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name not in cls.data_fields]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ElbolabError(f"model config: unknown keys {sorted(unknown)}; expected some of {sorted(names)}")
        return cls(**d)


@dataclass
class LossOutput:
    """What ``loss`` returns: one scalar to minimise per parameter group, and metrics to log.

    ``losses["model"]`` is the main objective; a model with several optimisers adds one entry per extra group
    (e.g. ``"discriminator"``), each backed into its own group's parameters only. Metrics are per example [B]
    or per batch (0-d) tensors; the trainer averages both correctly.
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return self.losses["model"]


class LatentVariableModel(nn.Module):
    """Encoder q(z|x), decoder p(x|z) and prior p(z) built from a ``ModelConfig``."""

    registry_name = "base"
    config_class = ModelConfig
    log_px_is_exact_estimate = True  # False when importance_samples uses an approximate density (e.g. a learned ratio)
    # False when encode(batch) is not the whole q(z|x) (e.g. the base Gaussian of a flow): the default latent_means
    # and kl_terms would then describe the wrong distribution, so they refuse and the model must override them
    encode_is_q = True
    # False for a model with no q(z|x) (the autoencoder): no importance weights, log p(x) or prior holes
    has_posterior = True
    # the validation metric --keep-best maximises: the bound the model trains (iwae_bound for the IWAE family)
    selection_metric = "elbo"
    scheduled_values: tuple[str, ...] = ()  # the StepContext values loss() reads; the trainer refuses any other
    reads_mc_samples = False  # whether loss() uses ctx.mc_samples (L); the trainer refuses L > 1 otherwise
    # whether torch.compile made this model's training step faster than eager when measured
    # (benchmarks/bench_compile_models.py, BENCHMARKS.md); train --compile says so for the others
    compiles_faster = False

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
    def prior(self, batch: Batch | None = None):
        """p(z); batch shape [] (or [B] for a prior conditioned on the batch), event shape [d]."""
        return standard_normal_prior(self.config.latent_dim, next(self.parameters()))

    def encode(self, batch: Batch | torch.Tensor):
        """q(z|x) for a batch; batch shape [B], event shape [d]."""
        return self.encoder(self.check_input(as_batch(batch)).x)

    def check_input(self, batch: Batch) -> Batch:
        """The batch, if its rows have this model's input_dim features; else one clear error."""
        x = batch.x
        if x.dim() != 2 or x.shape[-1] != self.config.input_dim:
            raise ElbolabError(f"{type(self).__name__}: expected inputs of shape [B, {self.config.input_dim}] (rows "
                               f"of {self.config.input_dim} features, as trained), got {list(x.shape)}; flatten "
                               "images to rows (x.reshape(len(x), -1))")
        return batch

    def decode(self, z: torch.Tensor, batch: Batch | None = None):
        """p(x|z) for latents ``[..., d]``; batch shape [...], event shape [D]."""
        return self.likelihood_head(full_precision(self.decoder(z)))  # float32 log-likelihoods under autocast

    def decode_mean(self, z: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """E[x|z], ``[..., D]``: what the pictures show."""
        return self.likelihood_head.mean(full_precision(self.decoder(z)))

    def importance_samples(self, batch: Batch | torch.Tensor, k: int, *, reparameterize: bool = False,
                           stop_q_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """k draws z_k ~ q(z|x) and their log weights log p(x, z_k) - log q(z_k|x): ``([k, B, d], [k, B])``.

        ``reparameterize`` draws with rsample (gradients through z); ``stop_q_grad`` evaluates log q with its
        parameters detached (the STL / DReG estimators). The evaluator's log p(x) relies on this method alone.
        """
        batch = as_batch(batch)
        q = self.encode(batch)
        z = q.rsample((k,)) if reparameterize else q.sample((k,))  # [k, B, d]
        log_q = (detach_distribution(q) if stop_q_grad else q).log_prob(z)  # [k, B]
        log_px_given_z = self.decode(z, batch).log_prob(batch.x)  # [k, B]
        return z, log_importance_weights(log_px_given_z, self.prior(batch).log_prob(z), log_q)

    def log_importance_weights(self, batch: Batch | torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k|x) for k draws z_k ~ q(z|x): ``[k, B]``."""
        return self.importance_samples(batch, k)[1]

    # ----- training -----
    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: Batch | torch.Tensor, ctx: StepContext | None = None) -> LossOutput:
        # The trainer calls the module (not .loss) so that DistributedDataParallel sees the forward pass.
        return self.loss(as_batch(batch), ctx if ctx is not None else StepContext())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimiser, in stepping order; each group's loss is ``LossOutput.losses[group]``."""
        return {"model": list(self.parameters())}

    def q_parameters(self) -> list[nn.Parameter]:
        """The parameters of q(z|x) (phi): the encoder's. A model whose q has parameters outside ``self.encoder``
        (a flow after it) extends this, so that a split into encoder and decoder groups keeps all of q together."""
        return list(self.encoder.parameters())

    def scheduled_defaults(self) -> dict[str, float]:
        """This model's defaults for scheduled values it reads (beta-vae: ``{"beta": 4.0}``); the trainer uses them
        for the names the user gives no schedule for, and logs them with the other values."""
        return {}

    def epoch_end(self, epoch: int, run_dir, val) -> None:
        """Called after each epoch's validation (rank 0, eval mode, no gradients), e.g. to save a snapshot of the
        latent space for a figure of training progress. ``val`` may be None."""

    def optimizer_options(self) -> dict[str, dict]:
        """Per-group Adam settings that override the trainer's (e.g. ``{"discriminator": {"betas": (0.5, 0.9)}}``)."""
        return {}

    def validation_rows(self, val):
        """The part of the validation split scored after each epoch: all of it. A model whose evaluation is
        expensive per example (local-vi fits a q for each) may take the first rows only."""
        return val

    def prepare(self, train, ctx: StepContext) -> None:
        """Called once before the first epoch (not on resume), e.g. to fit a mixture prior on encoder means.

        Under torchrun every process calls it on the same data: it must be deterministic."""

    # ----- diagnostics and pictures -----
    def latent_means(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor]:
        """E_q[z] per latent group, ``{group: [B, d_g]}`` (active units are counted per group)."""
        self._require_encode_is_q("latent_means")
        return {"z": self.encode(batch).mean}

    def kl_terms(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor] | None:
        """KL(q(z_j|x) || p(z_j)) per latent group and dimension, ``{group: [B, d_g]}``; None when not defined."""
        if not self.encode_is_q:  # no per-dimension KL of the whole q unless the model provides one
            return None
        batch = as_batch(batch)
        try:
            return {"z": kl_per_dim(self.encode(batch), self.prior(batch))}
        except ElbolabError:  # a non-Gaussian q or prior (a mixture): no per-dimension KL
            return None

    def _require_encode_is_q(self, hook: str) -> None:
        if not self.encode_is_q:
            raise NotImplementedError(
                f"{type(self).__name__}.encode is not its whole q(z|x) (encode_is_q = False): override {hook}")

    def collapse_remedies(self) -> list[str]:
        """This model's own remedies for posterior collapse, added to the generic ones (KL warm-up, free bits)."""
        return []

    def training_warnings(self, val) -> list[str]:
        """Model-specific warnings after training (VaDE: collapsed clusters), each with its remedies; shown by the
        CLI, kept in the manifest's summary and shown in the report. ``val`` may be None."""
        return []

    def eval_metrics(self, data, per_example_log_px: torch.Tensor) -> dict:
        """Model-specific numbers for eval.json (clustering accuracy, perplexity, ...)."""
        return {}

    @torch.no_grad()
    def reconstruct(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        batch = as_batch(batch)
        return self.decode_mean(self.latent_means(batch)["z"], batch)

    @torch.no_grad()
    def sample(self, n: int, batch: Batch | None = None) -> torch.Tensor:
        """Means of p(x|z) for n draws z ~ p(z), ``[n, D]``."""
        return self.decode_mean(self.prior(batch).sample((n,)), batch)

    def figures(self, run_dir, splits) -> list:
        """Write this model's figures into run_dir/figures; the default draws the image figures."""
        return standard_figures(self, run_dir, splits)

    def load_pretrained(self, weights: dict[str, torch.Tensor], partial: bool = False) -> CopiedTensors:
        """Copy the tensors whose names and shapes match (``init_from`` a trained run); returns their names (a
        sorted list) with the count of this model's tensors (``.copied`` of ``.total``, ``.summary()``).

        Refuses when fewer than half of this model's tensors match and neither its whole encoder nor its whole
        decoder does (the architectures differ: an mlp run into a conv model, another --hidden), unless
        ``partial=True`` (the CLI's --init-partial); refuses always when none match. A whole sub-network is a
        meaningful transfer however small a share it is (an autoencoder's decoder into a VAE, a VAE into a
        FactorVAE, whose discriminator has no counterpart). Nothing is copied when it refuses."""
        own = self.state_dict()
        matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        if not matched:
            raise ElbolabError(
                f"init_from: none of the {len(weights)} tensors of that run match {type(self).__name__}'s "
                "parameters by name and shape; use a run with the same architecture"
            )
        copied = CopiedTensors(sorted(matched), total=len(own))
        whole = [part for part in ("encoder", "decoder")
                 if any(k.startswith(f"{part}.") for k in own)
                 and all(k in matched for k in own if k.startswith(f"{part}."))]
        if 2 * copied.copied < copied.total and not whole and not partial:
            others = [k for k in own if k not in matched]
            raise ElbolabError(
                f"init_from: only {copied.copied} of {type(self).__name__}'s {copied.total} tensors match that run's "
                f"by name and shape ({', '.join(copied[:3])}{', ...' if copied.copied > 3 else ''}; not e.g. "
                f"{', '.join(others[:2])}), and neither the whole encoder nor the whole decoder: the architectures "
                "differ (--architecture, --hidden, --latent-dim or the data); use a run with the same architecture, "
                "or pass --init-partial (partial=True from Python) to copy them anyway"
            )
        self.load_state_dict(matched, strict=False)
        return copied


class CopiedTensors(list):
    """What ``load_pretrained`` copied: the tensor names (a sorted list, as config.json's ``init_from.tensors``
    keeps them) and how many tensors the model has (``total``)."""

    def __init__(self, names, total: int):
        super().__init__(names)
        self.total = total

    @property
    def copied(self) -> int:
        return len(self)

    def summary(self) -> str:
        """'init-from: copied 7 of 10 tensors (encoder.body.0.weight, ...)', a line for the terminal."""
        shown = ", ".join(self[:4]) + (", ..." if len(self) > 4 else "")
        return f"init-from: copied {self.copied} of {self.total} tensors ({shown})"


def check_parameter_groups(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    """Every trainable parameter in exactly one group (the trainer refuses a model that breaks this)."""
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise ElbolabError(f"a parameter is in both groups {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if orphans:
        raise ElbolabError(f"parameters {orphans[:3]} are in no parameter group; no optimiser would train them")
