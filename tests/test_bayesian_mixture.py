"""Variational Bayesian Gaussian mixture (mean-field CAVI, notes 000 eq. 19): monotone complete ELBO, agreement
with scikit-learn, the closed-form ELBO and predictive density against Monte Carlo over q, stationarity of the
CAVI updates, and switching off superfluous components."""

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture as SkBayesianGaussianMixture
from torch.distributions import Dirichlet, Gamma, MultivariateNormal, Normal, Wishart

from elbolab.classical import BayesianGaussianMixture
from elbolab.classical._mixture_common import moments, precision_cholesky, sweep
from elbolab.errors import ElbolabError

COV_TYPES = ["full", "tied", "diag", "spherical"]
PRIOR_TYPES = ["dirichlet_distribution", "dirichlet_process"]
FITTED = ["weights_", "mean_precision_", "means_", "degrees_of_freedom_", "covariances_", "precisions_cholesky_"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def blobs(n_per=100, dim=3, seed=0, spread=3.0, offset=10.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(3, dim))
    parts = [rng.normal(size=(n_per, dim)) @ rng.normal(scale=0.6, size=(dim, dim)) + c for c in centres]
    return np.concatenate(parts) + offset


def fit_quietly(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X)


def assert_close(actual, expected, rtol=1e-6, what=""):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    scale = np.maximum(np.abs(expected), 1e-3 * np.abs(expected).max())
    worst = np.max(np.abs(actual - expected) / scale)
    assert worst < rtol, f"{what}: worst relative difference {worst:.2e}"


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_elbo_never_decreases(cov_type, prior_type):
    X = blobs(seed=1)
    model = fit_quietly(BayesianGaussianMixture(n_components=5, covariance_type=cov_type, init_params="random",
                                                weight_concentration_prior_type=prior_type, reg_covar=0.0,
                                                tol=0.0, max_iter=40, random_state=0), X)
    history = np.asarray(model.lower_bound_history_)
    assert np.all(np.diff(history) >= -1e-10 * np.abs(history[:-1])), np.diff(history).min()
    assert history[-1] > history[0]
    # one more E-step (q(z) optimal for the final q(theta)) can only raise it
    assert model.elbo(X) >= model.lower_bound_ - 1e-9 * abs(model.lower_bound_)


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize(("cov_type", "dim"), [("full", 3), ("tied", 3), ("diag", 1), ("spherical", 1)])
def test_matches_sklearn_from_the_same_initialisation(cov_type, dim, prior_type):
    """Same priors, same seeded k-means start, same number of sweeps. (diag / spherical: D = 1, where
    scikit-learn's Wishart-style E ln(lambda) coincides with the exact Gamma one; see the module docstring.)"""
    X = blobs(seed=2, dim=dim)
    settings = dict(n_components=4, covariance_type=cov_type, weight_concentration_prior_type=prior_type,
                    weight_concentration_prior=0.1, mean_precision_prior=0.5, degrees_of_freedom_prior=dim + 1.5,
                    init_params="kmeans", random_state=3, max_iter=30, tol=0.0, reg_covar=0.0)
    ours = fit_quietly(BayesianGaussianMixture(**settings), X)
    ref = fit_quietly(SkBayesianGaussianMixture(**settings), X)
    for name in FITTED:
        assert_close(getattr(ours, name), getattr(ref, name), what=name)
    for ours_c, ref_c in zip(np.atleast_2d(ours.weight_concentration_), np.atleast_2d(ref.weight_concentration_)):
        assert_close(ours_c, ref_c, what="weight_concentration_")
    assert_close(ours.predict_proba(X), ref.predict_proba(X), rtol=1e-5, what="predict_proba")
    if cov_type == "full":  # scikit-learn drops constants from its bound: the difference must be one constant
        offset = np.asarray(ours.lower_bound_history_) - np.asarray(ref.lower_bounds_)
        assert np.ptp(offset) < 1e-7 * np.abs(ours.lower_bound_)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_cavi_update_is_a_stationary_point_of_the_elbo(cov_type):
    """After the q(theta) update for fixed q(z), every derivative of the complete ELBO with respect to the
    parameters of q(pi), q(mu, Lambda) vanishes (checked by autograd); one sweep earlier it does not."""
    X = blobs(seed=4)
    model = fit_quietly(BayesianGaussianMixture(n_components=3, covariance_type=cov_type, reg_covar=0.0,
                                                max_iter=3, tol=0.0, random_state=0), X)
    Xc = torch.as_tensor(X) - model._shift

    def largest_elbo_gradient(update_first: bool) -> float:
        with torch.no_grad():
            comps, log_const = model._components()
            stats = sweep(Xc, comps, log_const)  # E-step: new q(z)
            nk, xbar, scatter = moments(stats, comps)
            if update_first:
                model._update(nk, xbar, scatter, dtype=torch.float64)  # CAVI step for q(pi), q(mu, Lambda)
        state = model._state
        leaves = {k: state[k].detach().clone().requires_grad_() for k in ("conc", "beta", "means", "nu", "cov")}
        state.update(leaves, prec_chol=precision_cholesky(leaves["cov"], cov_type, reg_covar=0.0, n_components=3))
        grads = torch.autograd.grad(model._elbo(stats.nk, xbar, scatter, stats.r_log_r), list(leaves.values()))
        state.update({k: v.detach() for k, v in state.items()})
        return max(float(g.abs().max()) for g in grads)

    stale = largest_elbo_gradient(update_first=False)  # q(theta) of the previous sweep, q(z) of this one
    updated = largest_elbo_gradient(update_first=True)
    assert stale > 1e-3, stale
    assert updated < 1e-8 * len(X), updated


def sample_q(model, S, gen_seed=0):
    """S draws of (log pi [S, K], mu [S, K, D], Lambda) from the fitted q, and log p(theta) - log q(theta) [S]."""
    torch.manual_seed(gen_seed)
    s, K = model._state, model.n_components
    D = s["means"].shape[1]
    conc, beta, nu, cov = s["conc"], s["beta"], s["nu"], s["cov"]
    m, m0, b0 = s["means"] + model._shift, model._m0 + model._shift, model._beta0
    pi = Dirichlet(conc).sample((S,))
    log_ratio = Dirichlet(torch.full_like(conc, model._alpha0)).log_prob(pi) - Dirichlet(conc).log_prob(pi)
    if model.covariance_type in ("full", "tied"):
        nu_q = nu if model.covariance_type == "full" else K * nu
        scale = 1.0 if model.covariance_type == "full" else K
        q_lam = Wishart(df=nu_q, covariance_matrix=torch.linalg.inv(cov * (nu_q[..., None, None]
                                                                        if nu_q.ndim else nu_q)))
        p_lam = Wishart(df=torch.full_like(nu_q, scale * model._nu0),
                        covariance_matrix=torch.linalg.inv(scale * model._psi0).expand(q_lam.batch_shape + (D, D)))
        lam = q_lam.sample((S,))
        log_ratio += (p_lam.log_prob(lam) - q_lam.log_prob(lam)).reshape(S, -1).sum(1)
        lam = lam if model.covariance_type == "full" else lam[:, None].expand(S, K, D, D)
        q_mu = MultivariateNormal(m, precision_matrix=beta[:, None, None] * lam)
        mu = q_mu.sample()
        log_ratio += (MultivariateNormal(m0.expand(K, D), precision_matrix=b0 * lam).log_prob(mu)
                      - q_mu.log_prob(mu)).sum(1)
        return torch.log(pi), mu, ("matrix", lam), log_ratio
    width = 1.0 if model.covariance_type == "diag" else float(D)
    cov_kd = cov if model.covariance_type == "diag" else cov[:, None]
    q_lam = Gamma(0.5 * width * nu[:, None].expand_as(cov_kd), 0.5 * width * nu[:, None] * cov_kd)
    p_lam = Gamma(torch.full_like(cov_kd, 0.5 * width * model._nu0), (0.5 * width * model._psi0).expand_as(cov_kd))
    lam = q_lam.sample((S,))
    log_ratio += (p_lam.log_prob(lam) - q_lam.log_prob(lam)).sum((1, 2))
    lam = lam.expand(S, K, D)
    q_mu = Normal(m, (beta[:, None] * lam).rsqrt())
    mu = q_mu.sample()
    log_ratio += (Normal(m0, (b0 * lam).rsqrt()).log_prob(mu) - q_mu.log_prob(mu)).sum((1, 2))
    return torch.log(pi), mu, ("diagonal", lam), log_ratio


def component_log_density(x, mu, lam):
    """log N(x_n | mu_k, Lambda_k^{-1}) for draws [S, N, K] with torch.distributions."""
    kind, lam = lam
    if kind == "matrix":
        return MultivariateNormal(mu[:, None], precision_matrix=lam[:, None]).log_prob(x[None, :, None, :])
    return Normal(mu[:, None], lam[:, None].rsqrt()).log_prob(x[None, :, None, :]).sum(-1)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_closed_form_elbo_and_predictive_match_monte_carlo_over_q(cov_type):
    X = blobs(n_per=40, dim=2, seed=5)
    model = fit_quietly(BayesianGaussianMixture(n_components=3, covariance_type=cov_type, max_iter=4, tol=0.0,
                                                reg_covar=0.0, random_state=0), X)
    S = 6000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's Wishart sampler warns on near-singular draws
        log_pi, mu, lam, log_ratio = sample_q(model, S)
    x = torch.as_tensor(X)
    r = torch.as_tensor(model.predict_proba(X))
    log_joint = log_pi[:, None, :] + component_log_density(x, mu, lam)  # [S, N, K]
    draws = (r * log_joint).sum((1, 2)) - torch.special.xlogy(r, r).sum() + log_ratio
    standard_error = float(draws.std()) / math.sqrt(S)
    assert abs(float(draws.mean()) - model.elbo(X)) < 5 * standard_error + 1e-6
    # posterior predictive: E_q[sum_k pi_k N(x | mu_k, Lambda_k)] (pi is independent of the components under q)
    points = x[::20]
    log_pred = torch.logsumexp(log_pi[:, None, :] + component_log_density(points, mu, lam), 2)
    monte_carlo = torch.logsumexp(log_pred, 0) - math.log(S)
    np.testing.assert_allclose(model.score_samples(points.numpy()), monte_carlo.numpy(), atol=0.02)


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_superfluous_components_switch_off(cov_type, prior_type):
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(scale=0.5, size=(120, 2)) + c for c in ([0, 0], [6, 0], [0, 6])])
    model = BayesianGaussianMixture(n_components=8, covariance_type=cov_type, weight_concentration_prior=1e-3,
                                    weight_concentration_prior_type=prior_type, max_iter=1000, tol=1e-8,
                                    random_state=0).fit(X)
    active = model.weights_ > 0.02
    assert active.sum() == 3, model.weights_
    # the switched-off components fall back to their priors
    np.testing.assert_allclose(model.mean_precision_[~active], model.mean_precision_prior_, atol=0.05)
    if cov_type != "tied":
        np.testing.assert_allclose(model.degrees_of_freedom_[~active], model.degrees_of_freedom_prior_, atol=0.05)
    labels = model.predict(X)
    truth = np.repeat(np.arange(3), 120)
    assert all(len(set(labels[truth == c])) == 1 for c in range(3))
    assert len(set(labels)) == 3


def test_bad_priors_are_one_clear_error():
    X = blobs(dim=2)
    for settings, match in [
        (dict(weight_concentration_prior_type="pitman_yor"), "weight_concentration_prior_type"),
        (dict(degrees_of_freedom_prior=0.5), "degrees_of_freedom_prior"),
        (dict(mean_prior=[0.0, 0.0, 0.0]), "mean_prior of shape"),
        (dict(covariance_prior=-np.eye(2)), "positive-definite"),
        (dict(covariance_type="diag", covariance_prior=[1.0, -1.0]), "covariance_prior > 0"),
        (dict(mean_precision_prior=0.0), "mean_precision_prior"),
    ]:
        with pytest.raises(ElbolabError, match=match):
            BayesianGaussianMixture(n_components=2, **settings).fit(X)


def test_fit_figures_draw_pruned_components_faint_and_unmarked(tmp_path):
    """``gmm fit --method vb``: a pruned component (weight < PRUNED_WEIGHT) gets no mean marker (a red or black x
    reads as a data point or an error) in components.png or contours.png, a faint dotted grey ellipse in
    components.png, and one legend entry naming the pruned components and the threshold."""
    import json

    from matplotlib.colors import to_rgba
    from typer.testing import CliRunner

    from elbolab.classical.gmm_cli import (
        PRUNED_COLOUR,
        PRUNED_WEIGHT,
        app,
        components_figure,
        contours_figure,
        full_covariances,
        pruned_components,
    )

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal([0, 0], 0.5, (120, 2)), rng.normal([6, 3], 0.5, (120, 2))])
    np.savetxt(tmp_path / "x.csv", X, delimiter=",", header="x,y", comments="")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "x.csv"), "-k", "5", "--method", "vb", "--out", str(out)])
    assert result.exit_code == 0, result.output
    params = json.loads((out / "params.json").read_text())
    weights = np.asarray(params["weights"])
    pruned = pruned_components(weights, "vb")
    assert 2 <= pruned.sum() <= 3
    means = np.asarray(params["means"])
    covs = full_covariances(params["covariances"], "full", 5, 2)
    labels = np.load(out / "labels.npy")
    expected_entry = (f"pruned (weight < {PRUNED_WEIGHT:g}): components "
                      + ", ".join(str(k + 1) for k in np.flatnonzero(pruned)))

    fig = components_figure(X, labels, means, covs, weights, pruned, "t", ["x", "y"])
    ax = fig.axes[0]
    marked = np.array([line.get_xydata()[0] for line in ax.lines if line.get_marker() == "x"])
    assert len(marked) == (~pruned).sum()  # a marker at each used mean only
    np.testing.assert_allclose(marked, means[~pruned])
    grey = [e for e in ax.patches if e.get_edgecolor()[:3] == to_rgba(PRUNED_COLOUR)[:3]]
    assert len(grey) == pruned.sum() and all(e.get_linestyle() == ":" for e in grey)  # one faint 1-s.d. ellipse each
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert entries[-1] == expected_entry and sum("pruned" in e for e in entries) == 1
    assert not any("red" == line.get_color() for line in ax.lines)

    model = BayesianGaussianMixture(n_components=5, random_state=0).fit(X)
    np.testing.assert_allclose(model.means_, means, rtol=1e-9)
    fig = contours_figure(model, X, labels, "t", pruned, ["x", "y"])
    ax = fig.axes[0]
    marked = np.concatenate([line.get_xydata() for line in ax.lines if line.get_marker() == "x"])
    np.testing.assert_allclose(marked, means[~pruned])
    assert all(to_rgba(line.get_color()) == to_rgba("black") for line in ax.lines if line.get_marker() == "x")
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(e.startswith("not marked: pruned components") and f"weight < {PRUNED_WEIGHT:g}" in e for e in entries)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "faint dotted grey ellipse, without a mean marker" in page
