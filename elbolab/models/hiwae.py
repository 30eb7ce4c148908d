"""Importance-weighted hierarchy: the IWAE paper's two-stochastic-layer IWAE (Burda, Grosse & Salakhutdinov 2016,
table 1, "2 stochastic layers", k = 5 and 50; notes 004).

The generative model and the bottom-up q are ``hvae``'s; the training objective is the importance-weighted bound
over k joint draws z^(i) = (z_1, ..., z_L)^(i) ~ q(z|x), reparameterised (Burda et al. eq. 8):

    L_k(x) = E [ log 1/k sum_{i=1}^{k} w_i ],
    w_i = p(x|z_1^(i)) prod_{l<L} p(z_l^(i)|z_{l+1}^(i)) p(z_L^(i)) / prod_l q(z_l^(i)|z_{l-1}^(i))

L_1 is the single-draw ELBO; L_k rises with k toward log p(x). ``--set k=50``; the defaults (latent 100-50, MLP
blocks 200 and 100 wide, tanh) are the paper's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.models.base import LossOutput, option
from elbolab.models.hvae import HierarchicalConfig, HierarchicalVAE
from elbolab.models.registry import register_model
from elbolab.objectives import iwae_bound
from elbolab.schedules import StepContext


@dataclass(frozen=True)
class HierarchicalIWAEConfig(HierarchicalConfig):
    k: int = option(5, "importance samples (joint draws of every layer) per example in the training bound L_k")

    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:
            raise ElbolabError(f"hiwae: expected k >= 1 importance samples, got {self.k}")

    def registry_label(self) -> str:
        return "hiwae"


@register_model("hiwae")
class HierarchicalIWAE(HierarchicalVAE):
    """hvae's hierarchy trained on the importance-weighted bound L_k (the IWAE paper's two-layer IWAE)."""

    config_class = HierarchicalIWAEConfig
    selection_metric = "iwae_bound"  # --keep-best keeps the best of the bound it trains
    scheduled_values = ()  # L_k has no KL term to weight
    reads_mc_samples = False  # k importance samples replace the L Monte-Carlo samples (--set k=...)

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        _, log_w = self.importance_samples(batch, self.config.k, reparameterize=True)  # [k, B]
        bound = iwae_bound(log_w)  # [B]
        return LossOutput({"model": -bound.mean()}, {"iwae_bound": bound.detach(), "elbo": log_w.mean(0).detach()})
