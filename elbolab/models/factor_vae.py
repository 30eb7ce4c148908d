"""FactorVAE (Kim & Mnih 2018, "Disentangling by Factorising"): the VAE with a total-correlation penalty estimated
by a discriminator (notes 004, the total-correlation section).

Objective, per batch (Kim & Mnih eq. 2; the density-ratio trick of notes 004):

    L = 1/B sum_i [ E_q(z|x_i)[log p(x_i|z)] - KL(q(z|x_i) || p(z)) ]  -  gamma * TC(z),
    TC(z) = KL(q(z) || prod_j q(z_j)) = E_q(z)[log q(z) / prod_j q(z_j)] ~ E_q(z)[log D(z)/(1 - D(z))] = E_q(z)[T(z)]

with q(z) = E_pdata q(z|x) and T(z) the logit of a discriminator D(z) = sigmoid(T(z)) (``elbolab.density_ratio``).
The TC term is averaged over the reparameterised samples z ~ q(z|x_i) of the batch, so the encoder gets the
gradient of T through z; the discriminator's weights are not changed by this loss (its own group, below).

The discriminator is trained, in its own parameter group with its own Adam, on the balanced binary
cross-entropy between samples of q(z) (the batch's z, detached, label 1) and samples of prod_j q(z_j) (the same z
with every dimension permuted independently across the batch, Alg. 1, label 0); at its optimum T = log q(z) / prod_j
q(z_j). (Kim & Mnih draw the permuted samples from a second batch; one batch gives samples of the same two
distributions.) The paper's settings: discriminator MLP of 6 x 1000 units with leaky ReLU 0.2 (the defaults here),
discriminator Adam lr 1e-4 with betas (0.5, 0.9) (``discriminator_lr``; the betas are fixed), VAE Adam lr 1e-4 with
betas (0.9, 0.999) (the trainer's Adam: pass ``--lr 1e-4``). The prior is N(0, I), so log p(x) is evaluated exactly
as for the vae. ``gamma`` is a config field and the default of the scheduled value ``gamma`` (``--schedule
gamma=linear:0:10:5`` anneals it). Metrics: elbo, recon, kl, tc_estimate (E_q[T(z)], per example) and
discriminator_accuracy (balanced, per batch; 0.5 means q(z) already looks factorised to it).

In evaluation mode (validation after each epoch, ``elbolab eval``'s ELBO pass) the loss also reports
``tc_kl_anatomy``: the non-adversarial TC of the batch's posteriors, ``kl_anatomy(...)["total_correlation"]`` with
the exact aggregate over the B posteriors of the batch (one z per example from a fixed-seed generator of its own,
so the global RNG and the training trajectory are untouched; O(B^2 d), about 0.1 s for B = 1000, d = 10). It is the
TC of the aggregate of those B posteriors without bias; read as the TC of the population's aggregate posterior it is
biased, high as a rule: log q(z) is about (R - 1)/(2B) too high (R = E q(z|x)/q(z), of the order exp(I(x; z)),
see ``elbolab.kl_anatomy``), the one-dimensional marginals far less, and once I(x; z) nears log B the aggregate is
B separate bumps in d dimensions while the marginals still overlap, so TC is overstated. The trainer's validation
batches are 1000 rows: compare it with tc_estimate (the discriminator's) as a trend, not as an exact value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Independent, Normal

from elbolab.data.core import Batch
from elbolab.density_ratio import (
    DensityRatioEstimator,
    permute_dims,
    ratio_accuracy,
    ratio_loss,
    split_parameter_groups,
)
from elbolab.errors import ElbolabError
from elbolab.kl_anatomy import kl_anatomy
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.objectives import kl_term
from elbolab.schedules import StepContext

DISCRIMINATOR_BETAS = (0.5, 0.9)  # Kim & Mnih 2018, appendix
ANATOMY_SEED = 0  # the generator of the z draws of the tc_kl_anatomy metric (the same every batch and epoch)


@dataclass(frozen=True)
class FactorVAEConfig(ModelConfig):
    gamma: float = option(10.0, "weight of the total-correlation penalty (unless a gamma schedule is given)")
    discriminator_width: int = option(1000, "hidden units per discriminator layer (paper: 1000)")
    discriminator_depth: int = option(6, "hidden layers of the discriminator (paper: 6)")
    discriminator_lr: float = option(1e-4, "Adam learning rate of the discriminator (paper: 1e-4, betas 0.5, 0.9)")

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.gamma >= 0, "gamma >= 0", self.gamma),
            (self.discriminator_width >= 1, "discriminator_width >= 1", self.discriminator_width),
            (self.discriminator_depth >= 1, "discriminator_depth >= 1", self.discriminator_depth),
            (self.discriminator_lr > 0, "discriminator_lr > 0, e.g. 1e-4", self.discriminator_lr),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"factor-vae: expected {expected}, got {got!r}")


@register_model("factor-vae")
class FactorVAE(LatentVariableModel):
    """VAE + gamma * total correlation of q(z), estimated by a discriminator on dimension-wise permuted codes."""

    config_class = FactorVAEConfig
    scheduled_values = ("gamma",)

    def __init__(self, config: FactorVAEConfig):
        super().__init__(config)
        self.discriminator = DensityRatioEstimator(config.latent_dim, config.discriminator_width,
                                                   config.discriminator_depth)

    def scheduled_defaults(self) -> dict[str, float]:
        """Defaults of the scheduled values this model reads, for the trainer (a user's schedule wins)."""
        return {"gamma": self.config.gamma}

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        q = self.encode(batch)  # batch [B], event [d]
        z = q.rsample((ctx.mc_samples,))  # [L, B, d]
        recon = self.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
        kl = kl_term(q, self.prior(batch), z)  # [B]
        tc = self.discriminator(z).mean(0)  # [B]: T(z) ~ log q(z) / prod_j q(z_j) at each example's codes
        elbo = recon - kl  # [B]
        gamma = ctx.value("gamma", self.config.gamma)
        model_loss = -elbo.mean() + gamma * tc.mean()

        codes = z[0].detach()  # [B, d] draws of q(z)
        logits = self.discriminator(torch.cat([codes, permute_dims(codes)]))  # [2B]
        logit_q, logit_factorised = logits.split(len(codes))  # [B] each
        metrics = {"elbo": elbo.detach(), "recon": recon.detach(), "kl": kl.detach(), "tc_estimate": tc.detach(),
                   "discriminator_accuracy": ratio_accuracy(logit_q, logit_factorised)}
        diagonal = isinstance(q, Independent) and isinstance(q.base_dist, Normal)  # not for --encoder-covariance full
        if not self.training and diagonal and len(codes) >= 2:  # validation / evaluation: the non-adversarial TC
            metrics["tc_kl_anatomy"] = self.anatomy_tc(q)
        return LossOutput({"model": model_loss, "discriminator": ratio_loss(logit_q, logit_factorised)}, metrics)

    def anatomy_tc(self, q) -> torch.Tensor:
        """TC of the aggregate of the batch's posteriors q(z|x_i) by ``kl_anatomy`` (exact aggregate over the batch,
        one draw per example, seed ``ANATOMY_SEED``): a 0-d float32 tensor (a per-batch metric)."""
        with torch.no_grad():
            anatomy = kl_anatomy(q.base_dist.loc.detach(), q.base_dist.scale.detach(), None,
                                 seed=ANATOMY_SEED)  # the prior (N(0, I)) does not enter the TC
        return torch.tensor(anatomy["total_correlation"], dtype=torch.float32, device=q.base_dist.loc.device)

    def parameter_groups(self) -> dict[str, list]:
        return split_parameter_groups(self, self.discriminator)

    def optimizer_options(self) -> dict[str, dict]:
        return {"discriminator": {"lr": self.config.discriminator_lr, "betas": DISCRIMINATOR_BETAS}}
