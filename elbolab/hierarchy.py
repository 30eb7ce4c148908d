"""The building blocks of the hierarchical VAEs (models/hvae.py, ladder_vae.py and their importance-weighted
variants): deterministic blocks, the Gaussian heads of q(z_l | .) and p(z_l | z_{l+1}) with softplus variances,
and the top-down prior over the joint z as a ``torch.distributions.Distribution``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints

from elbolab.networks import activation, full_precision

MIN_VAR = 1e-6  # floor of every softplus variance (keeps 1/var finite)


class Block(nn.Module):
    """``depth`` x (Linear, optional BatchNorm, activation) on inputs ``[..., n_in]`` (any leading dims)."""

    def __init__(self, n_in: int, width: int, depth: int, act: str, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(n_in if i == 0 else width, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(activation(act))
        self.net, self.out_dim = nn.Sequential(*layers), width if depth else n_in

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]  # e.g. [k, B]: batch norm sees k * B rows
        return self.net(h.reshape(-1, h.shape[-1])).reshape(*lead, self.out_dim)


class GaussianHead(nn.Module):
    """h -> (features, mean, variance) of a diagonal Gaussian: mean = Linear(f), var = softplus(Linear(f)), f = block(h)
    (notes 004: mu_hat = Linear(d), sigma_hat^2 = Softplus(Linear(d))). ``config``: a HierarchicalConfig (depth,
    activation, batch_norm)."""

    def __init__(self, n_in: int, width: int, d: int, config):
        super().__init__()
        self.block = Block(n_in, width, config.depth, config.activation, config.batch_norm)
        self.loc, self.raw_var = nn.Linear(self.block.out_dim, d), nn.Linear(self.block.out_dim, d)

    def forward(self, h: torch.Tensor):
        f = self.block(h)
        return f, full_precision(self.loc(f)), F.softplus(full_precision(self.raw_var(f))) + MIN_VAR


def diagonal_normal(mean: torch.Tensor, var: torch.Tensor) -> Independent:
    return Independent(Normal(mean, var.sqrt(), validate_args=False), 1)


class HierarchicalPrior(Distribution):
    """p(z) = p(z_L) prod_l p(z_l | z_{l+1}) over the joint z = cat(z_1..z_L) ``[..., sum d_l]``; draws top-down."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, model):
        self.model = model  # a HierarchicalVAE: top_prior, top_down, split, conditional_priors
        super().__init__(torch.Size(), torch.Size([model.config.latent_dim]), validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        zs = [self.model.top_prior().rsample(torch.Size(sample_shape))]  # z_L [*S, d_L]
        for net in reversed(self.model.top_down):
            zs.insert(0, diagonal_normal(*net(zs[0])[1:]).rsample())  # z_l ~ p(z_l | z_{l+1})
        return torch.cat(zs, -1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        zs = self.model.split(z)
        return sum(p.log_prob(z_l) for p, z_l in zip(self.model.conditional_priors(zs), zs))
