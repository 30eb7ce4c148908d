"""Importance-weighted autoencoder (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders").

Objective, per example (Burda et al. eq. 8; notes 004):

    L_k(x) = E_{z_1..z_k ~ q(z|x)} [ log 1/k sum_{i=1}^{k} w_i ],   w_i = p(x, z_i) / q(z_i | x)

L_1 is the ELBO; L_k rises with k and tends to log p(x). Gradients:

* ``plain``: reparameterised gradient of the estimate, as in the paper.
* ``dreg``: doubly reparameterised (Tucker, Lawson, Gu & Maddison 2019): the encoder gets
  sum_i w~_i^2 d log w_i / d z_i  d z_i / d phi with log q evaluated at detached parameters, whose signal-to-noise
  ratio does not vanish as k grows; the decoder's gradient is unchanged.

Set with ``--set k=50 --set gradient=dreg``.
"""

from __future__ import annotations

from dataclasses import dataclass

from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.models.base import LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.models.vae import VAE
from elbolab.objectives import dreg_surrogate, iwae_bound
from elbolab.schedules import StepContext

GRADIENTS = ("plain", "dreg", "stl")


@dataclass(frozen=True)
class IWAEConfig(ModelConfig):
    k: int = option(5, "importance samples per example in the training bound L_k")
    gradient: str = option("plain", "gradient estimator: plain | dreg | stl (sticking the landing: log q's "
                                    "parameters held fixed; unbiased at k = 1, biased for k > 1: use dreg)")

    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:
            raise ElbolabError(f"iwae: expected k >= 1 importance samples, got {self.k}")
        if self.gradient not in GRADIENTS:
            raise ElbolabError(f"iwae: expected gradient in {', '.join(GRADIENTS)}, got {self.gradient!r}")


@register_model("iwae")
class IWAE(VAE):
    """VAE trained on the importance-weighted bound L_k (plain or DReG gradients)."""

    config_class = IWAEConfig
    selection_metric = "iwae_bound"  # --keep-best keeps the best of the bound it trains
    scheduled_values = ()  # L_k has no KL term to weight
    reads_mc_samples = False  # k importance samples replace the L Monte-Carlo samples (--set k=...)

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        dreg = self.config.gradient == "dreg"
        z, log_w = self.importance_samples(batch, self.config.k, reparameterize=True,
                                           stop_q_grad=self.config.gradient != "plain")  # [k, B, d], [k, B]
        bound = dreg_surrogate(log_w, z) if dreg else iwae_bound(log_w)  # [B]
        return LossOutput({"model": -bound.mean()}, {"iwae_bound": bound.detach(), "elbo": log_w.mean(0).detach()})
