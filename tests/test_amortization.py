"""The amortisation-gap split (Cremer, Li & Duvenaud 2018) on a linear-Gaussian model, where every term has a closed
form: p(z) = N(0, I), p(x|z) = N(Wz + b, sigma^2 I), so

    p(x) = N(b, W W^T + sigma^2 I),   p(z|x) = N(m(x), Lambda^-1),   Lambda = I + W^T W / sigma^2,
    m(x) = Lambda^-1 W^T (x - b) / sigma^2,

and the best diagonal Gaussian (mean field) has mean m(x) and precision diag(Lambda): its ELBO is
log p(x) - KL(q*_MF || p(z|x)) = log p(x) + 1/2 log(1 - rho^2) in two dimensions, the same for every x.

The posterior correlation is rho = -0.45: a visible approximation gap (0.11 nats), while q*_MF's variance along
the posterior's long axis, (1 - |rho|) times the posterior's, stays above half of it, so that importance weights
with q*_MF as the proposal have a finite variance (below one half they do not, and the ESS-based s.e. is
optimistic).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from elbolab.errors import ElbolabError
from elbolab.inference import amortization_gap, elbo_with_variance, importance_sampled_log_px_from

F64 = torch.float64
D, LATENT, SIGMA = 6, 2, 0.6

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


class LinearGaussian(nn.Module):
    """The model above with an encoder q_phi(z|x) = N(A x + c, diag s^2) whose parameters are set by hand; float64.
    Duck-typed: encode, decode, prior and config are all ``amortization_gap`` needs."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # W = Q L^T with orthonormal Q: W^T W = L L^T = sigma^2 (Lambda - I) for the chosen posterior precision
        # Lambda = [[4, 1.8], [1.8, 4]], whose inverse has correlation -0.45
        target = torch.tensor([[4.0, 1.8], [1.8, 4.0]], dtype=F64)
        q, _ = torch.linalg.qr(torch.randn(D, LATENT, generator=g, dtype=F64))  # [D, 2]
        self.W = q @ torch.linalg.cholesky(SIGMA**2 * (target - torch.eye(LATENT, dtype=F64))).T  # [D, 2]
        self.b = torch.randn(D, generator=g, dtype=F64)  # [D]
        self.config = SimpleNamespace(latent_dim=LATENT, input_dim=D)
        self.precision = torch.eye(LATENT, dtype=F64) + self.W.T @ self.W / SIGMA**2  # Lambda, [2, 2]
        self.post_cov = torch.linalg.inv(self.precision)
        # encoder parameters: by default the exact posterior mean and the mean-field variances
        self.enc_weight = nn.Parameter(self.post_cov @ self.W.T / SIGMA**2)  # [2, D]
        self.enc_bias = nn.Parameter(-self.enc_weight.detach() @ self.b)  # [2]
        self.enc_log_scale = nn.Parameter(-0.5 * self.precision.diagonal().log())  # [2]

    # ----- the model
    def prior(self, batch=None) -> Independent:
        return Independent(Normal(torch.zeros(LATENT, dtype=F64), torch.ones(LATENT, dtype=F64)), 1)

    def decode(self, z: torch.Tensor, batch=None) -> Independent:
        return Independent(Normal(z @ self.W.T + self.b, SIGMA), 1)  # batch [...], event [D]

    def encode(self, batch) -> Independent:
        x = batch.x if hasattr(batch, "x") else batch  # [B, D]
        loc = x @ self.enc_weight.T + self.enc_bias  # [B, 2]
        return Independent(Normal(loc, self.enc_log_scale.exp().expand_as(loc)), 1)

    # ----- closed forms
    def marginal(self) -> MultivariateNormal:
        return MultivariateNormal(self.b, self.W @ self.W.T + SIGMA**2 * torch.eye(D, dtype=F64))

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        mean = (x - self.b) @ (self.post_cov @ self.W.T / SIGMA**2).T  # [B, 2]
        return MultivariateNormal(mean, self.post_cov)

    def mean_field_optimum(self, x: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.posterior(x).mean, torch.diag(self.precision.diagonal().reciprocal()))

    def as_full(self, q: Independent) -> MultivariateNormal:
        return MultivariateNormal(q.mean, torch.diag_embed(q.variance))

    def sample_x(self, n: int, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return self.marginal().sample((n,))  # [n, D]


FIT = dict(steps=600, lr=0.05, mc_samples=16)


def test_the_model_is_as_intended():
    model = LinearGaussian()
    x = model.sample_x(5, seed=1)
    post = model.posterior(x)
    correlation = post.covariance_matrix[0, 0, 1] / post.variance[0].prod().sqrt()
    assert float(correlation) == pytest.approx(-0.45)
    kl_mf = kl_divergence(model.mean_field_optimum(x), post)  # [5]
    torch.testing.assert_close(kl_mf, torch.full((5,), -0.5 * math.log(1 - 0.45**2), dtype=F64))
    # Bayes' rule at one z: log p(x) = log p(z) + log p(x|z) - log p(z|x), for any z
    z = torch.randn(5, LATENT, dtype=F64)
    by_bayes = model.prior().log_prob(z) + model.decode(z).log_prob(x) - post.log_prob(z)
    torch.testing.assert_close(by_bayes, model.marginal().log_prob(x))
    # and the default encoder is the mean-field optimum
    torch.testing.assert_close(model.encode(x).mean.detach(), model.mean_field_optimum(x).mean)


def test_is_from_a_given_proposal_is_exact_with_the_posterior_and_checks_its_shape():
    model = LinearGaussian()
    x = model.sample_x(8, seed=2)
    exact = model.marginal().log_prob(x)  # [8]
    estimate = importance_sampled_log_px_from(model, x, model.posterior(x), k=50)
    torch.testing.assert_close(estimate.per_example, exact)  # the exact posterior: every weight is p(x)
    assert estimate.ess_min == pytest.approx(50)
    with pytest.raises(ElbolabError, match=r"batch shape \[8\].*got batch \[3\]"):
        importance_sampled_log_px_from(model, x, model.posterior(x[:3]), k=10)


def test_elbo_with_variance_matches_the_closed_form_within_its_error():
    model = LinearGaussian()
    x = model.sample_x(10, seed=3)
    with torch.no_grad():
        q = model.encode(x)
        elbo, variance = elbo_with_variance(model, x, q, 400)
        exact = model.marginal().log_prob(x) - kl_divergence(model.as_full(q), model.posterior(x))  # [10]
    z_scores = (elbo - exact) / variance.sqrt()
    assert z_scores.abs().max() < 4.5
    assert float(variance.mean()) > 0  # the reconstruction term is random


def test_approximation_gap_is_the_mean_field_kl():
    model = LinearGaussian()
    x = model.sample_x(12, seed=4)
    kl_mf = float(kl_divergence(model.mean_field_optimum(x), model.posterior(x)).mean())  # the exact gap
    torch.manual_seed(0)
    gaps = amortization_gap(model, x, k=2000, elbo_samples=4000, init="prior", **FIT)
    assert gaps["log_px_estimator"] == "IS with the fitted q* (K = 2000)"
    exact_log_px = float(model.marginal().log_prob(x).mean())
    assert abs(gaps["log_px"] - exact_log_px) < 4 * gaps["log_px_mc_stderr"] + 0.01
    # within the Monte-Carlo error, plus a little for the stochastic fit of q*
    assert abs(gaps["approximation_gap"] - kl_mf) < 4 * gaps["approximation_gap_mc_stderr"] + 0.02
    # the encoder is already the mean-field optimum: no amortisation gap
    assert abs(gaps["amortization_gap"]) < 4 * gaps["amortization_gap_mc_stderr"] + 0.02


def _bad_encoder(model: LinearGaussian) -> LinearGaussian:
    """q_phi far off: its mean 2 posterior sds away along the posterior's narrow direction, and too narrow."""
    with torch.no_grad():
        eigenvalues, eigenvectors = torch.linalg.eigh(model.post_cov)
        model.enc_bias += 2.0 * eigenvalues[0].sqrt() * eigenvectors[:, 0]
        model.enc_log_scale -= math.log(3.0)
    return model


def test_amortized_proposal_is_biased_when_q_is_bad_and_the_fitted_one_is_not():
    model = _bad_encoder(LinearGaussian())
    x = model.sample_x(12, seed=5)
    exact = model.marginal().log_prob(x)  # [12]
    torch.manual_seed(1)
    gaps = amortization_gap(model, x, k=1000, elbo_samples=2000, proposal="both", **FIT)
    old, new = gaps["log_px_candidates"]["is_amortized"], gaps["log_px_candidates"]["is_optimal"]
    shortfall = float(exact.mean()) - old["mean"]
    assert shortfall > 0.5 and shortfall > 10 * old["mc_stderr"]  # the old estimator: far below, beyond its s.e.
    assert abs(new["mean"] - float(exact.mean())) < 4 * new["mc_stderr"] + 0.01
    # the maximum per example picked the fitted proposal nearly everywhere, and stays at the exact value
    assert new["chosen"] >= 10 and new["chosen"] + old["chosen"] == 12
    assert abs(gaps["log_px"] - float(exact.mean())) < 4 * gaps["log_px_mc_stderr"] + 0.02
    per = gaps["per_example"]
    assert torch.equal(per["log_px"], torch.maximum(per["log_px_is_optimal"], per["log_px_is_amortized"]))

    # the split: against the closed forms, and the two gaps add up to log p(x) - ELBO(q_phi)
    with torch.no_grad():
        kl_phi = kl_divergence(model.as_full(model.encode(x)), model.posterior(x))  # [12], the whole gap
    kl_mf = kl_divergence(model.mean_field_optimum(x), model.posterior(x))  # [12], the approximation gap
    assert abs(gaps["approximation_gap"] - float(kl_mf.mean())) < 4 * gaps["approximation_gap_mc_stderr"] + 0.02
    amortization = float((kl_phi - kl_mf).mean())
    assert amortization > 2.0
    assert abs(gaps["amortization_gap"] - amortization) < 4 * gaps["amortization_gap_mc_stderr"] + 0.02
    total = gaps["approximation_gap"] + gaps["amortization_gap"]
    assert total == pytest.approx(gaps["log_px"] - gaps["elbo_amortized"], abs=1e-9)  # the split is exact
    assert abs(total - float(kl_phi.mean())) < 4 * math.hypot(gaps["log_px_mc_stderr"],
                                                             gaps["elbo_amortized_mc_stderr"]) + 0.02

    # with the amortised proposal alone, the shortfall comes off the approximation gap (here below zero); the
    # amortisation gap ELBO(q*) - ELBO(q_phi) does not involve log p(x)
    torch.manual_seed(1)
    old_split = amortization_gap(model, x, k=1000, elbo_samples=2000, proposal="amortized", **FIT)
    assert old_split["approximation_gap"] < 0 < float(kl_mf.mean())
    assert old_split["amortization_gap"] == pytest.approx(gaps["amortization_gap"], abs=0.05)


def test_ais_is_an_option_and_joins_the_maximum():
    model = _bad_encoder(LinearGaussian())
    x = model.sample_x(4, seed=6)
    torch.manual_seed(2)
    gaps = amortization_gap(model, x, k=200, elbo_samples=200, ais={"steps": 100, "chains": 8, "leapfrog_steps": 5},
                            steps=200, lr=0.05, mc_samples=8)
    assert set(gaps["log_px_candidates"]) == {"is_optimal", "ais"}
    assert gaps["log_px_estimator"].startswith("the larger per example of IS with the fitted q*")
    exact = float(model.marginal().log_prob(x).mean())
    ais = gaps["log_px_candidates"]["ais"]
    assert abs(ais["mean"] - exact) < 4 * ais["mc_stderr"] + 0.05
    assert gaps["log_px"] >= max(c["mean"] for c in gaps["log_px_candidates"].values()) - 1e-12


def test_amortization_gap_refuses_unknown_options():
    model = LinearGaussian()
    x = model.sample_x(3, seed=7)
    with pytest.raises(ElbolabError, match="expected proposal in optimal, amortized, both, got 'encoder'"):
        amortization_gap(model, x, proposal="encoder")
    with pytest.raises(ElbolabError, match="expected ais as a dict"):
        amortization_gap(model, x, ais=100)


def test_a_flow_posterior_starts_the_local_fit_at_its_sampled_moments():
    from elbolab.inference import fit_local_posterior
    from elbolab.models import build_model
    from elbolab.models.flow_vae import FlowVAEConfig

    torch.manual_seed(0)
    model = build_model("flow-vae", FlowVAEConfig(input_dim=6, latent_dim=2, hidden=(8,), flow="planar", flows=2))
    x = torch.rand(4, 6).round()
    with torch.no_grad():
        draws = model.encode(x).sample((20_000,))  # [S, B, d]
    fit = fit_local_posterior(model, x, steps=1, lr=1e-9, init="encoder")  # one negligible step: the start
    sd = draws.std(0)  # the start is the mean and s.d. of 1,024 draws: within 5 of their standard errors
    assert ((fit.loc - draws.mean(0)).abs() < 5 * sd / 32).all()
    assert ((fit.scale - sd).abs() < 5 * sd / (2 * 1024) ** 0.5).all()
