"""Per-datapoint (non-amortised) variational inference and the amortisation gap.

Non-amortised VI (notes 001 s2.2; notes 004 "amortized inference") gives every data point its own variational
parameters lambda_i = (mu_i, log sigma_i^2) and maximises its ELBO directly:

    lambda_i* = argmax_lambda  E_{q_lambda(z)} [log p(x_i | z) + log p(z)] - H-term,   q_lambda = N(mu, diag sigma^2)

An encoder instead predicts lambda_i = f_phi(x_i). Cremer, Li & Duvenaud (2018, "Inference suboptimality in
variational autoencoders") split the gap between log p(x) and the amortised ELBO in two:

    log p(x) - ELBO(q_phi)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q_phi)]
                            =   approximation gap     +   amortisation gap

where q* is the best member of the variational family for x, found here by fitting lambda_i at test time.
Works for any model with ``decode(z, batch)`` and ``prior(batch)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Independent, Normal

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.estimators import importance_sampled_log_px
from elbolab.objectives import kl_term


@dataclass
class LocalPosterior:
    """The fitted per-datapoint q(z) = N(loc, diag scale^2) (batch [B], event [d]) and its ELBO trace."""

    loc: torch.Tensor  # [B, d]
    scale: torch.Tensor  # [B, d]
    elbo_history: list[float]  # mean ELBO over the batch, per step

    def distribution(self) -> Independent:
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1)


def local_elbo(model, batch: Batch, q, mc_samples: int) -> torch.Tensor:
    """ELBO per example ``[B]`` of an arbitrary q(z) (batch [B]) under the model's decoder and prior."""
    z = q.rsample((mc_samples,))  # [L, B, d]
    recon = model.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
    return recon - kl_term(q, model.prior(batch), z)


def fit_local_posterior(model, batch, *, steps: int = 500, lr: float = 0.05, mc_samples: int = 8,
                        init: str = "encoder", seed: int = 0) -> LocalPosterior:
    """Maximise each example's ELBO over its own Gaussian q(z) (Adam on loc and log scale, the learning rate
    decaying linearly to lr/20; model weights fixed).

    ``init="encoder"`` starts from the model's q(z|x) (its diagonal), ``"prior"`` from N(0, I).
    """
    if steps < 1 or lr <= 0 or mc_samples < 1:
        raise ElbolabError(f"expected steps >= 1, lr > 0, mc_samples >= 1; got {steps}, {lr}, {mc_samples}")
    batch = as_batch(batch)
    param = next(model.parameters())
    batch = batch.to(param)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if init == "encoder":
            q0 = model.encode(batch)
            loc0, scale0 = q0.mean, q0.variance.sqrt()
        elif init == "prior":
            loc0 = torch.zeros(len(batch), model.config.latent_dim, dtype=param.dtype, device=param.device)
            scale0 = torch.ones_like(loc0)
        else:
            raise ElbolabError(f"expected init 'encoder' or 'prior', got {init!r}")
    loc = loc0.clone().requires_grad_(True)  # [B, d]
    log_scale = scale0.log().clone().requires_grad_(True)  # [B, d]
    optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
    # a linear decay to lr/20 lets the Monte-Carlo noise of the last steps average out
    decay = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.05, total_iters=steps)
    history = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(steps):
                q = Independent(Normal(loc, log_scale.exp(), validate_args=False), 1)
                elbo = local_elbo(model, batch, q, mc_samples)  # [B]
                optimizer.zero_grad(set_to_none=True)
                (-elbo.sum()).backward()  # each example's parameters get only its own gradient
                optimizer.step()
                decay.step()
                history.append(float(elbo.detach().mean()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return LocalPosterior(loc.detach(), log_scale.detach().exp(), history)


@torch.no_grad()
def amortization_gap(model, batch, *, k: int = 1000, elbo_samples: int = 1000, **fit_options) -> dict:
    """Cremer et al. 2018's decomposition, averaged over the batch, in nats:
    {log_px, elbo_amortized, elbo_optimal, approximation_gap, amortization_gap}.

    log p(x) is the importance-sampled estimate with K = k (a lower bound in expectation); the ELBOs are
    Monte-Carlo estimates with ``elbo_samples`` draws."""
    batch = as_batch(batch).to(next(model.parameters()))
    with torch.enable_grad():
        local = fit_local_posterior(model, batch, **fit_options)
    was_training = model.training
    model.eval()
    try:
        log_px = importance_sampled_log_px(model, batch, k=k).mean
        amortized = float(local_elbo(model, batch, model.encode(batch), elbo_samples).mean())
        optimal = float(local_elbo(model, batch, local.distribution(), elbo_samples).mean())
    finally:
        model.train(was_training)
    return {"log_px": log_px, "elbo_amortized": amortized, "elbo_optimal": optimal,
            "approximation_gap": log_px - optimal, "amortization_gap": optimal - amortized}
