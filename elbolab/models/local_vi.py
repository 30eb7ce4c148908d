"""Non-amortised variational inference: a decoder trained with one free Gaussian q_i(z) per training row, no encoder
(notes 001 s2.2; notes 004 "Amortized inference": the per-example variational parameters that an encoder amortises;
the "VAE without an encoder" baseline of Cremer, Li & Duvenaud 2018, and stochastic VI, Hoffman et al. 2013).

Objective, per training row i with its own lambda_i = (mu_i, log sigma_i^2) (notes 001 eq. 42):

    L_i(theta, lambda_i) = 1/L sum_l log p_theta(x_i | z_l) - beta * KL(N(mu_i, diag sigma_i^2) || N(0, I)),
    z_l = mu_i + sigma_i eps_l,   max over theta and every lambda_i jointly.

``local`` is an nn.Parameter [N, 2d] indexed by ``Batch.index`` (the row numbers in the training split; N reaches
the config as the data field ``n_train``). Two parameter groups: ``model`` (the decoder, the batch-mean loss, the
trainer's Adam and --lr) and ``local`` (the per-row parameters, the batch-sum loss, so each row gets the gradient
of its own L_i whatever the batch size).

Optimiser of the local group. The trainer steps whole tensors with Adam, and a row outside the batch gets a zero
gradient: Adam's momentum would still move it, and its step count and second moment would be the global ones, not
the row's. The local group's Adam therefore runs with betas (0, 0) and eps 1, i.e. the stateless update

    lambda <- lambda - local_lr * g / (|g| + 1)      (elementwise)

which is SGD with step local_lr * g for small gradients and a step bounded by local_lr for large ones (a soft
clip), and exactly zero for the rows not in the batch. Consequence: every row moves only when its batch comes, once
per epoch, so the local parameters converge in epochs (not steps) and need many more epochs than an encoder; an
``lr`` schedule (--schedule lr=...) scales local_lr with --lr and lets the Monte-Carlo noise average out.

Unseen data (validation, ``elbolab eval``, figures): in eval mode q(z|x) is always fitted afresh per example by
``elbolab.inference.fit_local_posterior`` (Adam on mu and log sigma from N(0, I), ``fit_steps`` steps of
``fit_mc_samples`` draws, the decoder fixed) and cached per row until the decoder's weights change. Cost: fit_steps
x fit_mc_samples decoder passes, forward and backward, per example (800 with the defaults: about what importance
sampling with K = 2000 costs), paid for every validation epoch too: validation scores the first ``val_rows`` (1000)
rows only, and progress is shown while the fits run. The stored rows are used in training mode only, since a batch
does not say which split its row numbers refer to. """

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Independent, Normal

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.inference import fit_local_posterior
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, check_options, option
from elbolab.models.registry import register_model
from elbolab.objectives import kl_term
from elbolab.progress import Progress
from elbolab.schedules import StepContext

FIT_CHUNK = 250  # examples fitted together (progress is reported between chunks)
# the local group's Adam: no momentum, no second-moment memory, eps 1 (see the module docstring)
LOCAL_ADAM = {"betas": (0.0, 0.0), "eps": 1.0}


@dataclass(frozen=True)
class LocalVIConfig(ModelConfig):
    n_train: int = option(1, "training rows, one variational mean and log-variance each (from the data)")
    local_lr: float = option(0.2, "step bound of the per-row parameters: lambda -= local_lr * g / (|g| + 1)")
    fit_steps: int = option(200, "Adam steps of the per-example fit on unseen data (eval mode)")
    fit_lr: float = option(0.05, "learning rate of that fit (decays linearly to 1/20 of it)")
    fit_mc_samples: int = option(4, "Monte-Carlo draws per step of that fit")
    val_rows: int = option(1000, "validation rows scored after each epoch (each needs its own fit of q); 0: all")

    data_fields: typing.ClassVar[tuple[str, ...]] = ("input_dim", "image_shape", "n_train")

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.n_train >= 1, "n_train >= 1 training rows", self.n_train),
            (self.local_lr > 0, "local_lr > 0, e.g. 0.2", self.local_lr),
            (self.fit_steps >= 1, "fit_steps >= 1", self.fit_steps),
            (self.fit_lr > 0, "fit_lr > 0, e.g. 0.05", self.fit_lr),
            (self.fit_mc_samples >= 1, "fit_mc_samples >= 1", self.fit_mc_samples),
            (self.val_rows >= 0, "val_rows >= 0 (0: the whole validation split)", self.val_rows),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"local-vi: expected {expected}, got {got!r}")

    @classmethod
    def from_data(cls, data, **options) -> LocalVIConfig:
        check_options(cls, options, exclude=cls.data_fields)
        return cls(input_dim=data.dim, image_shape=data.image_shape, n_train=len(data), **options)


@register_model("local-vi")
class LocalVI(LatentVariableModel):
    """A decoder and N free diagonal Gaussians q_i(z), one per training row; fitted q on unseen data."""

    config_class = LocalVIConfig
    scheduled_values = ("beta",)
    reads_mc_samples = True

    def __init__(self, config: LocalVIConfig):
        super().__init__(config)
        # [N, 2d]: means, then log-variances; q_i starts at the prior N(0, I)
        self.local = nn.Parameter(torch.zeros(config.n_train, 2 * config.latent_dim))
        self._fitted: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (loc [d], scale [d]), eval mode
        self._fitted_version: tuple[int, ...] = ()  # the decoder's in-place version counters when they were fitted

    def build_encoder(self, config: ModelConfig) -> None:
        return None  # no encoder: q is free per row

    # ----- q(z) per example -----
    def encode(self, batch: Batch | torch.Tensor):
        """The stored q_i of the batch's training rows (training mode), else a per-example fit (batch [B], event
        [d])."""
        batch = as_batch(batch)
        if not self.training:
            return self.fitted_posterior(batch)
        index = batch.index
        if index is None:
            raise ElbolabError("local-vi: expected training batches with their row numbers (Batch.index), got none; "
                               "call model.eval() to fit q(z) for data without stored parameters")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.config.n_train):
            raise ElbolabError(f"local-vi: expected row numbers in [0, {self.config.n_train}), got "
                               f"[{int(index.min())}, {int(index.max())}]; the model stores the training split only")
        loc, log_var = self.local[index.to(self.local.device)].chunk(2, dim=-1)  # [B, d] each
        return Independent(Normal(loc, torch.exp(0.5 * log_var), validate_args=False), 1)

    def fitted_posterior(self, batch: Batch) -> Independent:
        """q(z) fitted per example by ``fit_local_posterior`` (rows already fitted since the last training step
        are reused)."""
        version = tuple(p._version for p in self.parameters() if p is not self.local)  # bumped by every update
        if version != self._fitted_version:
            self._fitted, self._fitted_version = {}, version  # the decoder changed: earlier fits are stale
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest()
                for row in batch.x.detach().float().cpu()]
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)  # identical rows are fitted once
        todo = [i for key, i in first.items() if key not in self._fitted]
        cfg = self.config
        with Progress(f"local-vi: fitting q(z) for {len(todo):,} examples ({cfg.fit_steps} steps each)",
                      total=len(todo), unit="examples", enabled=len(todo) > FIT_CHUNK) as bar:
            for part in (todo[i:i + FIT_CHUNK] for i in range(0, len(todo), FIT_CHUNK)):
                with torch.enable_grad():
                    fit = fit_local_posterior(self, batch[torch.tensor(part)], steps=cfg.fit_steps, lr=cfg.fit_lr,
                                              mc_samples=cfg.fit_mc_samples, init="prior", seed=0)
                for i, loc, scale in zip(part, fit.loc, fit.scale):
                    self._fitted[keys[i]] = (loc, scale)
                bar.update(len(part))
        loc = torch.stack([self._fitted[key][0] for key in keys])  # [B, d]
        scale = torch.stack([self._fitted[key][1] for key in keys])  # [B, d]
        return Independent(Normal(loc, scale, validate_args=False), 1)

    # ----- training -----
    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        q = self.encode(batch)  # batch [B], event [d]
        z = q.rsample((ctx.mc_samples,))  # [L, B, d]
        recon = self.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
        kl = kl_term(q, self.prior(batch), z)  # [B]
        objective = recon - ctx.value("beta", 1.0) * kl  # [B]
        losses = {"model": -objective.mean(), "local": -objective.sum() if self.training else None}
        return LossOutput(losses, {"elbo": (recon - kl).detach(), "kl": kl.detach(), "recon": recon.detach()})

    def collapse_remedies(self) -> list[str]:
        return [f"a larger --set local_lr (now {self.config.local_lr:g}): each q_i moves only when its row's batch "
                "comes, once per epoch"]

    def validation_rows(self, val):
        """The first ``val_rows`` validation rows: each needs ``fit_steps`` decoder passes of its own."""
        return val.head(min(self.config.val_rows, len(val))) if self.config.val_rows else val

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``model``: the decoder (and a learned likelihood scale); ``local``: the per-row parameters. A frozen
        decoder (requires_grad False) leaves ``model`` out: the local parameters are then fitted alone."""
        shared = [p for p in self.parameters() if p is not self.local and p.requires_grad]
        return {name: params for name, params in (("model", shared), ("local", [self.local])) if params}

    def optimizer_options(self) -> dict[str, dict]:
        return {"local": {"lr": self.config.local_lr, **LOCAL_ADAM}}

    def figures(self, run_dir, splits) -> list:
        self.eval()  # figures show test images: their q is fitted, never looked up by row number
        return super().figures(run_dir, splits)
