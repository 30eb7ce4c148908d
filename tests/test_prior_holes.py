"""Prior holes: the Monte-Carlo hole mass against numerical integration on a grid for a known aggregated
posterior, the plane of a many-dimensional latent space, and the analysis of a trained run with its figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from elbolab import pipeline
from elbolab.errors import ElbolabError
from elbolab.prior_holes import aggregated_posterior, hole_mass, principal_plane, prior_holes

FAST = dict(hidden=(16,), batch_size=64, progress=False, tensorboard=False, figures=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def _known_mixture() -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussians (one correlated) that leave a large part of N(0, I) uncovered."""
    means = torch.tensor([[1.0, 0.5], [-0.5, 1.5], [0.8, -1.0]], dtype=torch.float64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.05], [-0.05, 0.15]]],
                        dtype=torch.float64)
    return means, covs


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_hole_mass_matches_grid_integration(threshold):
    means, covs = _known_mixture()
    q = aggregated_posterior(means, covs)
    p = Independent(Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)), 1)
    # reference: integral of p(z) 1[q(z)/p(z) < t] on a 1000 x 1000 grid over [-8, 8]^2 (midpoint rule)
    edges = np.linspace(-8, 8, 1001)
    mid = torch.from_numpy((edges[:-1] + edges[1:]) / 2)
    gx, gy = torch.meshgrid(mid, mid, indexing="ij")
    z = torch.stack([gx.ravel(), gy.ravel()], -1)  # [1000^2, 2]
    log_q = torch.cat([q.log_prob(part) for part in z.split(200_000)])
    log_p = p.log_prob(z)
    cell = (edges[1] - edges[0]) ** 2
    exact = float((log_p.exp() * (log_q - log_p < math.log(threshold))).sum() * cell)
    assert 0.05 < exact < 0.95  # a case with holes and coverage, so the test can fail either way
    estimate = hole_mass(q, p, threshold=threshold, n_samples=100_000, seed=1)
    assert estimate["se"] == pytest.approx(math.sqrt(estimate["mass"] * (1 - estimate["mass"]) / 100_000))
    assert abs(estimate["mass"] - exact) < 4 * estimate["se"] + 2e-3  # MC error + grid error
    # a lower threshold leaves fewer holes, on the same draws
    lower = hole_mass(q, p, threshold=threshold / 10, n_samples=100_000, seed=1)
    assert lower["mass"] < estimate["mass"]
    with pytest.raises(ElbolabError, match="threshold > 0"):
        hole_mass(q, p, threshold=0.0)


def test_the_plane_holds_the_exact_marginals_of_the_aggregated_posterior():
    g = torch.Generator().manual_seed(0)
    n, d = 50, 5
    means = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 0.3, 0.2, 0.1],
                                                                                dtype=torch.float64)
    a = torch.randn(n, d, d, generator=g, dtype=torch.float64) * 0.3
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(d, dtype=torch.float64)
    basis, how = principal_plane(means)
    assert "principal" in how
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64))  # orthonormal: p stays N(0, I)
    # the two leading principal axes of these means are (close to) the first two coordinates
    assert abs(float(basis[0].norm())) > 0.95 and abs(float(basis[1].norm())) > 0.95
    plane = aggregated_posterior(means, covs, basis)
    # the mixture's moments by hand: mean of mu_i; covariance mean(Sigma_i + mu_i mu_i^T) - mean mean^T
    full_mean = means.mean(0)
    full_cov = (covs + means[:, :, None] * means[:, None, :]).mean(0) - torch.outer(full_mean, full_mean)
    torch.testing.assert_close(plane.mean, basis.T @ full_mean)
    torch.testing.assert_close(plane.variance, (basis.T @ full_cov @ basis).diagonal())
    with pytest.raises(ElbolabError, match="2 or more"):
        principal_plane(torch.zeros(4, 1))


@pytest.mark.parametrize("latent_dim", [2, 3])
def test_prior_holes_of_a_trained_run(tmp_path, latent_dim):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=3, latent_dim=latent_dim, **FAST)
    result = prior_holes(run, n_points=300, n_samples=20_000, n_images=12)
    assert 0.0 <= result["mass"] <= 1.0 and result["se"] > 0
    assert result["mass"] + result["covered_mass"] <= 1.0
    assert ("full_space" in result) == (latent_dim > 2)
    if latent_dim > 2:  # more dimensions to miss: at least as much of the prior lies in holes (up to MC noise)
        assert result["full_space"]["mass"] > result["mass"] - 0.05
    assert len(result["figures"]) == 1 and (run / "figures" / "prior_holes.png").stat().st_size > 10_000
    assert result["plane"].startswith("latent" if latent_dim == 2 else "first two principal")


def test_a_mixture_prior_projects_to_the_mixture_of_projected_components():
    from torch.distributions import Categorical, MixtureSameFamily

    from elbolab.prior_holes import prior_in_plane

    torch.manual_seed(0)
    d, k = 5, 3
    prior = MixtureSameFamily(Categorical(logits=torch.randn(k)),
                              Independent(Normal(2 * torch.randn(k, d), torch.rand(k, d) + 0.3), 1))
    basis, _ = torch.linalg.qr(torch.randn(d, 2))  # [d, 2] orthonormal
    plane, name = prior_in_plane(prior, basis)
    assert name == "a mixture of 3 Gaussians"
    projected = prior.sample((200_000,)) @ basis  # draws of the prior, projected: [S, 2]
    sample_mean, sample_var = projected.mean(0), projected.var(0)
    se_mean = (sample_var / 200_000).sqrt()
    assert ((plane.mean - sample_mean).abs() < 5 * se_mean).all()
    assert ((plane.variance / sample_var - 1).abs() < 0.03).all()
    # the density integrates to one over a grid of the plane, as a 2-D density must
    g = torch.linspace(-12, 12, 401)
    x, y = torch.meshgrid(g, g, indexing="ij")
    mass = plane.log_prob(torch.stack([x.flatten(), y.flatten()], 1)).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3


def test_prior_holes_of_a_vampprior_run_use_its_own_prior(tmp_path):
    run = pipeline.train("vampprior", "digits", out=tmp_path / "v", epochs=2, latent_dim=3, **FAST)
    result = prior_holes(run, n_points=200, n_samples=5_000, n_images=6)
    assert result["prior_name"].startswith("a mixture of") and 0.0 <= result["mass"] <= 1.0
    assert (run / "figures" / "prior_holes.png").stat().st_size > 10_000
