"""Importance-weighted Ladder VAE: the Ladder VAE trained on the IWAE bound (Sønderby, Raiko, Maaløe, Sønderby &
Winther 2016, "Ladder Variational Autoencoders", table 1: the best MNIST row, 5 layers + fine-tuning +
importance-weighted training with k = 10, -81.74, against -82.12 for the 5-layer ladder on the ELBO; the bound is
Burda, Grosse & Salakhutdinov 2016 eq. 8; notes 004 "Ladder VAE").

The generative model and the top-down q are ``ladder-vae``'s:

    p(x, z) = p(x|z_1) prod_{l<L} p(z_l|z_{l+1}) p(z_L),   q(z|x) = q(z_L|x) prod_{l<L} q(z_l|z_{l+1}, x),

q(z_l|z_{l+1}, x) the precision-weighted merge of the bottom-up N(mu_hat_l, var_hat_l) and p(z_l|z_{l+1}). The
training objective is the importance-weighted bound over k joint draws z^(i) = (z_L, ..., z_1)^(i) ~ q(z|x), drawn
top-down and reparameterised:

    L_k(x) = E [ log 1/k sum_{i=1}^{k} w_i ],
    log w_i = log p(x|z_1^(i)) + sum_{l<L} log p(z_l^(i)|z_{l+1}^(i)) + log p(z_L^(i))
              - sum_{l<L} log q(z_l^(i)|z_{l+1}^(i), x) - log q(z_L^(i)|x)

p(z_l|z_{l+1}) and q(z_l|z_{l+1}, x) of one draw share its parent z_{l+1}^(i). L_1 is the single-draw ELBO (the
ladder-vae's objective with its closed-form KLs replaced by one-draw estimates: the same expectation); L_k rises
with k toward log p(x). ``--set k=...`` (default 10, the paper's). Not here: the paper's fine-tuning, and KL warm-up
(L_k has no separate KL term to weight; warm up with ``ladder-vae`` and continue with ``--init-from``). How it compares
with the ladder at a short budget: BENCHMARKS.md, "Active units in a hierarchy" (benchmarks/bench_hierarchical.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.models.base import LossOutput, option
from elbolab.models.ladder_vae import LadderConfig, LadderVAE
from elbolab.models.registry import register_model
from elbolab.objectives import iwae_bound
from elbolab.schedules import StepContext


@dataclass(frozen=True)
class LadderIWAEConfig(LadderConfig):
    k: int = option(10, "importance samples (joint top-down draws of every layer) per example in the training "
                    "bound L_k (paper: 10)")

    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:  # its type is checked (an int) by the base config
            raise ElbolabError(f"ladder-iwae: expected k >= 1 importance samples (paper: 10), got {self.k}; "
                               "try --set k=10")

    def registry_label(self) -> str:
        return "ladder-iwae"


@register_model("ladder-iwae")
class LadderIWAE(LadderVAE):
    """The ladder's hierarchy and top-down q trained on the importance-weighted bound L_k (Sønderby et al. 2016)."""

    config_class = LadderIWAEConfig
    selection_metric = "iwae_bound"  # --keep-best keeps the best of the bound it trains
    scheduled_values = ()  # L_k has no KL term to weight
    reads_mc_samples = False  # k importance samples replace the L Monte-Carlo samples (--set k=...)
    compiles_faster = False  # unlike the ladder VAE it derives from (BENCHMARKS.md)

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        _, log_w = self.importance_samples(batch, self.config.k, reparameterize=True)  # [k, B]
        bound = iwae_bound(log_w)  # [B]
        return LossOutput({"model": -bound.mean()}, {"iwae_bound": bound.detach(), "elbo": log_w.mean(0).detach()})
