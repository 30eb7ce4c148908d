"""Math checks of the objectives: KL terms, ELBO, IWAE bound, ESS, reparameterisation and VAE.loss.

Every closed form is checked against an independently written formula and against Monte Carlo, with tolerances
taken from the Monte-Carlo standard error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Independent, Laplace, MixtureSameFamily, MultivariateNormal, Normal

from elbolab.models import ModelConfig, build_model
from elbolab.networks import GaussianEncoder, standard_normal_prior
from elbolab.objectives import effective_sample_size, iwae_bound, kl_term
from elbolab.schedules import StepContext

Z_TOL = 5.0  # allowed deviation in Monte-Carlo standard errors


def textbook_kl_diag(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1)  (notes 001 eq. 37)."""
    return 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1).sum(-1)


def textbook_kl_full(mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, Sigma) || N(0, I)) = 1/2 (tr Sigma + mu^T mu - d - log det Sigma)."""
    d = mu.shape[-1]
    return 0.5 * (cov.diagonal(dim1=-2, dim2=-1).sum(-1) + (mu**2).sum(-1) - d - torch.logdet(cov))


def monte_carlo_kl(q, p, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of log q(z) - log p(z), z ~ q, per example."""
    z = q.sample((n,))
    diff = q.log_prob(z) - p.log_prob(z)  # [n, B]
    return diff.mean(0), diff.std(0) / math.sqrt(n)


def random_lower_triangular(g: torch.Generator, batch: int, d: int) -> torch.Tensor:
    tril = torch.randn(batch, d, d, generator=g, dtype=torch.float64).tril(-1)
    return tril + torch.diag_embed(0.3 + torch.rand(batch, d, generator=g, dtype=torch.float64))


# ----- KL terms -----

def test_kl_diagonal_gaussian_matches_textbook_formula_and_monte_carlo():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64) * 1.5
    sigma = 0.2 + 2 * torch.rand(4, 3, generator=g, dtype=torch.float64)
    q = Independent(Normal(mu, sigma), 1)
    p = standard_normal_prior(3, mu)
    kl = kl_term(q, p)
    assert kl.shape == (4,)
    torch.testing.assert_close(kl, textbook_kl_diag(mu, sigma), rtol=1e-12, atol=1e-12)
    mc, se = monte_carlo_kl(q, p, 200_000)
    assert ((kl - mc).abs() < Z_TOL * se).all(), (kl, mc, se)


def test_kl_full_covariance_vs_independent_prior_uses_registered_kl():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    d = 3
    mu = torch.randn(5, d, generator=g, dtype=torch.float64)
    tril = random_lower_triangular(g, 5, d)
    cov = tril @ tril.transpose(-1, -2)
    q = MultivariateNormal(mu, scale_tril=tril)
    p = standard_normal_prior(d, mu)  # Independent(Normal): only the register_kl in objectives covers this pair
    kl = kl_term(q, p)
    assert kl.shape == (5,)
    torch.testing.assert_close(kl, textbook_kl_full(mu, cov), rtol=1e-10, atol=1e-10)
    mc, se = monte_carlo_kl(q, p, 200_000)
    assert ((kl - mc).abs() < Z_TOL * se).all(), (kl, mc, se)


def test_kl_full_covariance_vs_non_normal_independent_prior_falls_back_to_monte_carlo():
    torch.manual_seed(0)
    q = MultivariateNormal(torch.zeros(2, 2, dtype=torch.float64), scale_tril=torch.eye(2, dtype=torch.float64))
    p = Independent(Laplace(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)), 1)
    with pytest.raises(ValueError, match="Monte-Carlo"):
        kl_term(q, p)
    z = q.sample((100_000,))
    # KL(N(0,1) || Laplace(0,1)) per dim = -1/2 log(2 pi e) + log 2 + E|z| with E|z| = sqrt(2/pi)
    exact = 2 * (-0.5 * math.log(2 * math.pi * math.e) + math.log(2) + math.sqrt(2 / math.pi))
    diff = q.log_prob(z) - p.log_prob(z)
    se = float(diff.std(0).max()) / math.sqrt(len(z))
    assert (kl_term(q, p, z) - exact).abs().max() < Z_TOL * se


def test_kl_mixture_prior_uses_monte_carlo_and_agrees_with_quadrature():
    torch.manual_seed(0)
    dt = torch.float64
    prior = MixtureSameFamily(
        Categorical(probs=torch.tensor([0.3, 0.7], dtype=dt)),
        Independent(Normal(torch.tensor([[-2.0], [1.5]], dtype=dt), torch.tensor([[0.5], [1.0]], dtype=dt)), 1),
    )
    mu = torch.tensor([[-1.0], [0.0], [2.0]], dtype=dt)
    sigma = torch.tensor([[0.4], [1.0], [0.7]], dtype=dt)
    q = Independent(Normal(mu, sigma), 1)
    with pytest.raises(ValueError, match="pass samples z"):
        kl_term(q, prior)
    z = q.sample((100_000,))  # [L, B, 1]
    kl = kl_term(q, prior, z)
    assert kl.shape == (3,)
    # independent reference: the 1-D integral of q log(q/p) on a fine grid
    grid = torch.linspace(-12, 12, 200_001, dtype=dt)
    log_q = Normal(mu, sigma).log_prob(grid)  # [3, G]
    log_p = prior.log_prob(grid[:, None])  # [G]
    exact = torch.trapezoid(log_q.exp() * (log_q - log_p), grid, dim=-1)
    diff = q.log_prob(z) - prior.log_prob(z)
    se = diff.std(0) / math.sqrt(len(z))
    assert ((kl - exact).abs() < Z_TOL * se).all(), (kl, exact, se)


# ----- the full-covariance encoder -----

def test_full_covariance_encoder_log_density_is_change_of_variables():
    torch.manual_seed(0)
    d, features = 3, 4
    encoder = GaussianEncoder(nn.Identity(), features, d, covariance="full").double()
    with torch.no_grad():  # correlations switched on (they start at zero)
        encoder.off_diagonal.weight.normal_()
        encoder.off_diagonal.bias.normal_()
    x = torch.randn(2, features, dtype=torch.float64)
    q = encoder(x)
    assert isinstance(q, MultivariateNormal)
    tril = q.scale_tril
    assert torch.equal(tril, tril.tril()) and (tril.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert tril[..., 1, 0].abs().min() > 0  # the off-diagonal head reaches L
    for b in range(2):
        eps = torch.randn(d, dtype=torch.float64)

        def z_of_eps(e, b=b):
            return q.loc[b] + tril[b] @ e

        jac = torch.autograd.functional.jacobian(z_of_eps, eps)  # [d, d]
        sign, log_abs_det = torch.linalg.slogdet(jac)
        assert sign != 0
        expected = Normal(0.0, 1.0).log_prob(eps).sum() - log_abs_det
        torch.testing.assert_close(q.log_prob(z_of_eps(eps))[b], expected, rtol=1e-10, atol=1e-10)


def test_full_covariance_encoder_samples_have_covariance_l_lt_and_carry_gradients():
    torch.manual_seed(0)
    encoder = GaussianEncoder(nn.Identity(), 2, 2, covariance="full").double()
    with torch.no_grad():
        encoder.off_diagonal.bias.fill_(0.8)
    q = encoder(torch.zeros(1, 2, dtype=torch.float64))
    z = q.rsample((50_000,))[:, 0]  # [L, d]
    cov = torch.cov(z.T)
    target = (q.scale_tril @ q.scale_tril.mT)[0]
    assert (cov - target).abs().max() < 0.05  # sample covariance SE ~ 1.4 * sqrt(2/L) ~ 0.01 here
    z.sum().backward()  # E[sum z] does not depend on L, but each draw does
    assert encoder.off_diagonal.bias.grad.abs().sum() > 0


# ----- IWAE bound and ESS -----

def test_iwae_bound_is_a_stable_log_mean_exp():
    g = torch.Generator().manual_seed(4)
    offsets = torch.tensor([0.0, 1e4, 1e6], dtype=torch.float64)
    log_w = torch.randn(50, 3, generator=g, dtype=torch.float64) * 5 - offsets  # [K, B]
    assert torch.isinf(torch.log(log_w.exp().mean(0))[1:]).all()  # the naive formula underflows
    ref = []
    for column in log_w.T.numpy():  # shift by the max by hand, in NumPy
        m = column.max()
        ref.append(m + np.log(np.mean(np.exp(column - m))))
    torch.testing.assert_close(iwae_bound(log_w), torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-9)


def test_iwae_bound_increases_with_k_on_average():
    # E[L_1] <= E[L_5]: average many bounds of log-normal weights (strictly increasing for non-constant weights)
    torch.manual_seed(0)
    log_w = torch.randn(40_000, 50, dtype=torch.float64)  # 40 000 groups of 50
    l1 = iwae_bound(log_w[:, :1].T).mean()
    l5 = iwae_bound(log_w[:, :5].T).mean()
    l50 = iwae_bound(log_w.T).mean()
    assert l1 + 0.1 < l5 < l50 - 0.1 < 0.5  # log E[w] = 1/2 for log w ~ N(0, 1)


def test_effective_sample_size_limits_and_formula():
    k = 64
    assert torch.allclose(effective_sample_size(torch.full((k, 2), -3.0, dtype=torch.float64)),
                          torch.tensor([k, k], dtype=torch.float64))
    dominant = torch.full((k, 1), -60.0, dtype=torch.float64)
    dominant[5] = 0.0
    assert abs(float(effective_sample_size(dominant)) - 1.0) < 1e-9
    g = torch.Generator().manual_seed(5)
    log_w = torch.randn(k, 3, generator=g, dtype=torch.float64) * 2 - 500
    w = np.exp(log_w.numpy() + 500)
    ref = w.sum(0) ** 2 / (w**2).sum(0)
    torch.testing.assert_close(effective_sample_size(log_w), torch.tensor(ref), rtol=1e-10, atol=0)
    assert ((effective_sample_size(log_w) >= 1) & (effective_sample_size(log_w) <= k)).all()


# ----- VAE.loss -----

def small_vae(likelihood="bernoulli", covariance="diag"):
    torch.manual_seed(7)
    return build_model("vae", ModelConfig(input_dim=6, latent_dim=3, hidden=(8,), likelihood=likelihood,
                                          encoder_covariance=covariance))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_elbo_with_l_samples_is_mean_of_single_sample_elbos(likelihood):
    model = small_vae(likelihood)
    x = torch.bernoulli(torch.full((5, 6), 0.4, dtype=torch.float32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    out = model(x, StepContext(mc_samples=7))
    torch.manual_seed(11)  # the same noise, by hand
    q = model.encode(x)
    z = q.rsample((7,))  # [L, B, d]
    kl = textbook_kl_diag(q.base_dist.loc, q.base_dist.scale)
    single = model.decode(z).log_prob(x) - kl  # [L, B] one ELBO per draw
    torch.testing.assert_close(out.metrics["elbo"], single.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["kl"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, -single.mean(), rtol=1e-5, atol=1e-5)


def test_vae_beta_scales_only_the_kl_term():
    model = small_vae()
    x = torch.rand(8, 6)
    torch.manual_seed(3)
    one = model(x, StepContext(values={"beta": 1.0}, mc_samples=2))
    torch.manual_seed(3)
    two = model(x, StepContext(values={"beta": 2.0}, mc_samples=2))
    with torch.no_grad():
        q = model.encode(x)
        mean_kl = textbook_kl_diag(q.base_dist.loc, q.base_dist.scale).mean()
    torch.testing.assert_close((two.loss - one.loss).detach(), mean_kl, rtol=1e-5, atol=1e-5)
    # the reported ELBO has beta = 1
    torch.testing.assert_close(two.metrics["elbo"].detach(), one.metrics["elbo"].detach())
    assert float(mean_kl) > 1e-3  # the check above is not vacuous


def test_vae_full_covariance_kl_metric_is_textbook_formula():
    model = small_vae(covariance="full")
    with torch.no_grad():
        model.encoder.off_diagonal.bias.normal_()
    x = torch.rand(4, 6)
    out = model(x)
    q = model.encode(x)
    torch.testing.assert_close(out.metrics["kl"], textbook_kl_full(q.loc, q.covariance_matrix), rtol=1e-4, atol=1e-5)
