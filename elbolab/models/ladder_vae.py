"""Ladder VAE (Sønderby, Raiko, Maaløe, Sønderby & Winther 2016, "Ladder Variational Autoencoders"; notes 004
"Ladder VAE").

The generative model is the ``hvae``'s: p(x|z_1) prod_{l<L} p(z_l|z_{l+1}) p(z_L), Gaussian layers, p(z_L) = N(0, I).
Only inference changes. A deterministic bottom-up pass d_l = MLP(d_{l-1}), d_0 = x, gives per layer an estimate

    mu_hat_l = Linear(d_l),   var_hat_l = softplus(Linear(d_l))                         (notes 004; paper eq. 15-16)

and q runs top-down with the generative networks, correcting each top-down prior by the data:

    q(z|x) = q(z_L|x) prod_{l<L} q(z_l | z_{l+1}, x),   q(z_L|x) = N(mu_hat_L, var_hat_L),
    q(z_l | z_{l+1}, x) = N(mu_q,l, var_q,l),   the precision-weighted merge of N(mu_hat_l, var_hat_l) and
                                                p(z_l|z_{l+1}) = N(mu_p,l, var_p,l)       (paper eq. 17-19):
    var_q = 1 / (1/var_hat + 1/var_p),   mu_q = var_q (mu_hat / var_hat + mu_p / var_p)

(``elbolab.networks.precision_weighted_merge``; notes 004 write this variance as sigma, it is a variance).
Because q and p of layer l share the parent z_{l+1}, every KL of the ELBO is in closed form given the sampled parent:

    ELBO(x) = E_q[log p(x|z_1)] - KL(q(z_L|x) || p(z_L)) - sum_{l<L} E_q[KL(q(z_l|z_{l+1},x) || p(z_l|z_{l+1}))]

(notes 004 write "+ KL"; the KLs are subtracted), each by torch ``kl_divergence``. KL warm-up (the paper's
"deterministic warm-up") is the ``beta`` schedule, ``--kl-warmup E``; batch normalisation is ``batch_norm``.
Defaults follow the paper's MNIST model: latent 64-32-16-8-4, MLP widths 512-256-128-64-32, two deterministic layers
per block, batch norm (the paper's leaky rectifiers are replaced by ``activation``, relu by default).
The paper's claim checked in benchmarks/bench_hierarchical.py: more active units than the bottom-up hierarchy.
The same hierarchy trained on the importance-weighted bound L_k (the paper's best MNIST row) is ``ladder-iwae``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import kl_divergence

from elbolab.hierarchy import GaussianHead, diagonal_normal
from elbolab.models.base import option
from elbolab.models.hvae import HierarchicalConfig, HierarchicalVAE
from elbolab.models.registry import register_model
from elbolab.networks import precision_weighted_merge


@dataclass(frozen=True)
class LadderConfig(HierarchicalConfig):
    hidden: tuple[int, ...] = option((512, 256, 128, 64, 32), "MLP width under each stochastic layer, bottom first "
                                     "(or one; paper: 512,256,128,64,32)")
    activation: str = option("relu", "relu | tanh | elu | softplus | gelu")
    latent_dims: tuple[int, ...] = option((64, 32, 16, 8, 4), "stochastic layer sizes z1..zL, bottom first "
                                          "(paper: 64,32,16,8,4)")
    batch_norm: bool = option(True, "batch normalisation after each deterministic linear layer (paper: on)")

    def registry_label(self) -> str:
        return "ladder-vae"


@register_model("ladder-vae")
class LadderVAE(HierarchicalVAE):
    """Ladder VAE: the hvae's generative model, top-down q by precision-weighted merges, closed-form KL per layer."""

    config_class = LadderConfig

    def build_encoder(self, config: LadderConfig) -> nn.Module:
        heads, n_in = [], config.input_dim
        for width, d in zip(config.widths(), config.latent_dims):  # the deterministic chain d_1, d_2, ...
            heads.append(GaussianHead(n_in, width, d, config))
            n_in = heads[-1].block.out_dim
        return nn.ModuleList(heads)

    def bottom_up(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mu_hat_l, var_hat_l) per layer, each ``[B, d_l]``, bottom first."""
        hats, h = [], x  # [B, D]
        for head in self.encoder:
            h, mu_hat, var_hat = head(h)
            hats.append((mu_hat, var_hat))
        return hats

    def infer(self, x: torch.Tensor, draw):
        hats = self.bottom_up(x)
        top = diagonal_normal(*hats[-1])  # q(z_L|x), batch [B]
        zs, qs, ps = [draw(top)], [top], [self.top_prior()]
        for i in reversed(range(len(self.top_down))):
            _, mu_p, var_p = self.top_down[i](zs[0])  # p(z_i|z_{i+1}): [k, B, d_i]
            q = diagonal_normal(*precision_weighted_merge(*hats[i], mu_p, var_p))
            zs.insert(0, draw(q))
            qs.insert(0, q)
            ps.insert(0, diagonal_normal(mu_p, var_p))
        return zs, qs, ps

    def layer_kl(self, i: int, zs, qs, ps) -> torch.Tensor:
        """KL(q(z_i|z_{i+1}, x) || p(z_i|z_{i+1})) per dimension given the sampled parent, ``[k, B, d_i]``."""
        return kl_divergence(qs[i].base_dist, ps[i].base_dist).expand_as(zs[i])
