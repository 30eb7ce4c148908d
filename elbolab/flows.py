"""Normalizing flows for q(z|x): the planar flow (Rezende & Mohamed 2015, "Variational inference with normalizing
flows") and the inverse autoregressive flow with its MADE network (Kingma, Salimans, Jozefowicz, Chen, Sutskever &
Welling 2016; Germain et al. 2015), as ``torch.distributions.Transform`` objects over latents ``[..., d]``, and the
modules that build a K-step flow from an encoder's features. ``models/flow_vae.py`` states the objective and the
math of each step; this module is its networks, usable by any model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Transform, constraints
from torch.nn import functional as F

from elbolab.networks import activation, full_precision

IDENTITY_OFFSET = math.log(math.e - 1)  # m(a) = 0 at this a: u = a w / ||w||^2 gives u_hat = 0 (the identity)
IAF_S_INIT = 2.0  # initial s bias: sigma = sigmoid(2) ~ 0.88, z' close to z (Kingma et al. 2016: "+1 or +2")
BISECTION_STEPS = 64


# ----------------------------------------------------------------------------------------------- planar flow

def planar_u_hat(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u_hat = u + (m(w^T u) - w^T u) w / ||w||^2, m(a) = -1 + softplus(a): then w^T u_hat = m(w^T u) > -1
    (Rezende & Mohamed 2015, appendix A). ``u``, ``w`` ``[..., d]``."""
    wu = (w * u).sum(-1, keepdim=True)
    norm2 = w.pow(2).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return u + (F.softplus(wu) - 1 - wu) * w / norm2


class PlanarTransform(Transform):
    """f(z) = z + u_hat tanh(w^T z + b) on R^d, with u_hat from ``planar_u_hat`` (invertible).

    ``u``, ``w`` ``[..., d]`` and ``b`` ``[...]`` broadcast against z ``[..., d]`` (global parameters ``[d]``, or
    amortised ``[B, d]`` for z ``[L, B, d]``)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.u, self.w, self.b = u, w, b
        self.u_hat = planar_u_hat(u, w)
        # w^T u_hat = m(w^T u) = softplus(w^T u) - 1 >= -1, [...]: from m itself, which rounding cannot push below -1
        # (the dot product w^T u_hat can land an ulp under it when w^T u << -1)
        self.wu = F.softplus((w * u).sum(-1)) - 1

    def with_cache(self, cache_size: int = 1):
        return self if self._cache_size == cache_size else PlanarTransform(self.u, self.w, self.b, cache_size)

    def detached(self) -> PlanarTransform:
        """The same map with u, w, b cut from the graph and an empty cache (``objectives.detach_distribution``)."""
        return PlanarTransform(self.u.detach(), self.w.detach(), self.b.detach(), self._cache_size)

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.u_hat * torch.tanh((z * self.w).sum(-1) + self.b).unsqueeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Numerical: a = w^T z solves g(a) = a + (w^T u_hat) tanh(a + b) = w^T y, g increasing; bisection in
        [w^T y - |w^T u_hat|, w^T y + |w^T u_hat|], then one Newton step with the graph kept, so that gradients
        are the implicit function's (da/d(w^T y) = 1 / g'(a)); z = y - u_hat tanh(a + b)."""
        target = (y * self.w).sum(-1)
        wu, b = self.wu, self.b
        with torch.no_grad():
            lo, hi = target - wu.abs(), target + wu.abs()
            for _ in range(BISECTION_STEPS):
                mid = 0.5 * (lo + hi)
                below = mid + wu * torch.tanh(mid + b) < target
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            a = 0.5 * (lo + hi)
        t = torch.tanh(a + b)
        a = a - (a + wu * t - target) / (1 + wu * (1 - t.pow(2)))
        return y - self.u_hat * torch.tanh(a + b).unsqueeze(-1)

    def log_abs_det_jacobian(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log |1 + u_hat^T psi(z)| = log(1 + h'(w^T z + b) w^T u_hat) (positive as w^T u_hat >= -1), ``[...]``."""
        slope = 1 - torch.tanh((z * self.w).sum(-1) + self.b).pow(2)
        return torch.log1p(slope * self.wu)


class PlanarFlows(nn.Module):
    """K planar steps: parameters (u_k, w_k, b_k) global, or from the encoder's features by a linear layer."""

    def __init__(self, steps: int, latent_dim: int, feature_dim: int | None):
        super().__init__()
        self.steps, self.latent_dim = steps, latent_dim
        w = torch.randn(steps, latent_dim) / math.sqrt(latent_dim)
        u = IDENTITY_OFFSET * w / w.pow(2).sum(-1, keepdim=True)  # u_hat = 0: each step starts as the identity
        start = torch.cat([u, w, torch.zeros(steps, 1)], -1)  # [K, 2d + 1]
        if feature_dim is None:
            self.params = nn.Parameter(start)
            self.head = None
        else:
            self.head = nn.Linear(feature_dim, steps * (2 * latent_dim + 1))
            nn.init.zeros_(self.head.weight)
            with torch.no_grad():
                self.head.bias.copy_(start.reshape(-1))

    def transforms(self, features: torch.Tensor) -> list[Transform]:
        d = self.latent_dim
        if self.head is None:
            params = self.params  # [K, 2d + 1]
        else:
            params = full_precision(self.head(features)).unflatten(-1, (self.steps, 2 * d + 1))  # [B, K, 2d + 1]
            params = params.movedim(-2, 0)  # [K, B, 2d + 1]
        return [PlanarTransform(p[..., :d], p[..., d:2 * d], p[..., 2 * d]) for p in params]


# ------------------------------------------------------------------------------------------ inverse autoregressive

class MADE(nn.Module):
    """[..., d] (and a context [..., c]) -> (m, s), each [..., d], output i a function of the z_j earlier than i in
    the order only (Germain et al. 2015, "MADE"): one hidden layer, masked weights. ``reverse``: the order
    d-1, ..., 0 instead of 0, ..., d-1."""

    def __init__(self, latent_dim: int, hidden: int, context_dim: int | None, act: str, reverse: bool):
        super().__init__()
        rank = torch.arange(1, latent_dim + 1)  # the position of z_i in the order, 1..d
        if reverse:
            rank = rank.flip(0)
        hidden_rank = torch.arange(hidden) % max(latent_dim - 1, 1) + 1  # 1..d-1: each unit sees z of rank <= it
        self.register_buffer("mask_in", (hidden_rank[:, None] >= rank[None, :]).float(), persistent=False)
        self.register_buffer("mask_out", (rank[:, None] > hidden_rank[None, :]).float(), persistent=False)
        self.inner = nn.Linear(latent_dim, hidden)
        self.context = None if context_dim is None else nn.Linear(context_dim, hidden, bias=False)
        self.act = activation(act)
        self.m = nn.Linear(hidden, latent_dim)
        self.s = nn.Linear(hidden, latent_dim)
        nn.init.constant_(self.s.bias, IAF_S_INIT)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None,
                detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, s) at z ``[..., d]``; ``detach``: with the weights cut from the graph (gradients reach z and the
        context only)."""
        def weight(p: torch.Tensor) -> torch.Tensor:
            return p.detach() if detach else p

        h = F.linear(z, weight(self.inner.weight) * self.mask_in, weight(self.inner.bias))
        if self.context is not None:
            h = h + F.linear(context, weight(self.context.weight))
        h = self.act(h)
        m = F.linear(h, weight(self.m.weight) * self.mask_out, weight(self.m.bias))
        s = F.linear(h, weight(self.s.weight) * self.mask_out, weight(self.s.bias))
        return full_precision(m), full_precision(s)


class IAFTransform(Transform):
    """z' = sigma * z + (1 - sigma) * m, sigma = sigmoid(s), [m, s] = made(z, context): one IAF step."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, made: MADE, context: torch.Tensor | None = None, cache_size: int = 1,
                 detach_parameters: bool = False):
        super().__init__(cache_size=cache_size)
        self.made, self.context = made, context
        self.detach_parameters = detach_parameters  # the MADE's weights cut from the graph (see ``detached``)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (z, log sigma) of the last forward call

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return IAFTransform(self.made, self.context, cache_size, self.detach_parameters)

    def detached(self) -> IAFTransform:
        """The same map with the MADE's weights and the context cut from the graph and an empty cache
        (``objectives.detach_distribution``)."""
        context = None if self.context is None else self.context.detach()
        return IAFTransform(self.made, context, self._cache_size, detach_parameters=True)

    def _made(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.made(z, self.context, detach=self.detach_parameters)

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        m, s = self._made(z)
        self._last = (z, F.logsigmoid(s))
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * m

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        """d passes of z <- (y - (1 - sigma(z)) m(z)) / sigma(z): pass t fixes the t-th variable of the order."""
        z = torch.zeros_like(y)
        for _ in range(y.shape[-1]):
            m, s = self._made(z)
            sigma = torch.sigmoid(s)
            z = (y - (1 - sigma) * m) / sigma
        return z

    def log_abs_det_jacobian(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum_i log sigma_i(z): the Jacobian is triangular in the order with diagonal sigma, ``[...]``."""
        if self._last is not None and self._last[0] is z and (self._last[1].requires_grad
                                                              or not torch.is_grad_enabled()):
            return self._last[1].sum(-1)  # the forward pass's sigma (not one drawn under no_grad into a graph)
        return F.logsigmoid(self._made(z)[1]).sum(-1)


class IAFFlows(nn.Module):
    """K IAF steps, alternating the natural and the reversed order; the context is the encoder's features."""

    def __init__(self, steps: int, latent_dim: int, hidden: int, feature_dim: int | None, act: str):
        super().__init__()
        self.amortized = feature_dim is not None
        self.made = nn.ModuleList(MADE(latent_dim, hidden, feature_dim, act, reverse=k % 2 == 1)
                                  for k in range(steps))

    def transforms(self, features: torch.Tensor) -> list[Transform]:
        context = features if self.amortized else None
        return [IAFTransform(made, context) for made in self.made]


# ------------------------------------------------------------------------------------------------------- model
