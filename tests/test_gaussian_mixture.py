"""EM for Gaussian mixtures (notes 001 s1.3-1.4) against scikit-learn, torch.distributions and the EM identities;
plus the ``elbolab gmm`` sub-app."""

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal
from typer.testing import CliRunner

from elbolab.classical import GaussianMixture
from elbolab.classical._mixture_common import SingularCovarianceError
from elbolab.classical.gmm_cli import app
from elbolab.errors import ElbolabError

COV_TYPES = ["full", "tied", "diag", "spherical"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread
FITTED = ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]


def blobs(n_per=150, dim=3, seed=0, offset=20.0):
    """Three overlapping anisotropic clusters, shifted away from the origin (exercises the internal centring)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(3, dim))
    parts = [rng.normal(size=(n_per, dim)) @ rng.normal(scale=0.6, size=(dim, dim)) + c for c in centres]
    return np.concatenate(parts) + offset


def fit_quietly(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X)


def start_parameters(X, cov_type, K=3, seed=1):
    """Deliberately poor but valid starting weights, means and precisions, shaped for each covariance type."""
    rng = np.random.default_rng(seed)
    D = X.shape[1]
    weights = rng.dirichlet(np.full(K, 5.0))
    means = X[rng.choice(len(X), K, replace=False)]
    a = rng.normal(size=(K, D, D))
    full = np.linalg.inv(a @ a.transpose(0, 2, 1) / D + np.eye(D))
    precisions = {"full": full, "tied": full[0], "diag": np.abs(rng.normal(size=(K, D))) + 0.2,
                  "spherical": np.abs(rng.normal(size=K)) + 0.2}[cov_type]
    return dict(weights_init=weights, means_init=means, precisions_init=precisions)


def full_covariances(model):
    K, D = model.means_.shape
    cov = model.covariances_
    if model.covariance_type == "tied":
        return np.broadcast_to(cov, (K, D, D))
    if model.covariance_type == "diag":
        return np.stack([np.diag(c) for c in cov])
    if model.covariance_type == "spherical":
        return cov[:, None, None] * np.eye(D)
    return cov


def torch_mixture(model):
    """The fitted mixture as torch.distributions objects: (components, log weights)."""
    cov = torch.as_tensor(full_covariances(model).copy())
    components = MultivariateNormal(torch.as_tensor(model.means_), scale_tril=torch.linalg.cholesky(cov))
    return components, torch.log(torch.as_tensor(model.weights_))


def assert_close(actual, expected, rtol=1e-6, what=""):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    scale = np.maximum(np.abs(expected), 1e-3 * np.abs(expected).max())
    worst = np.max(np.abs(actual - expected) / scale)
    assert worst < rtol, f"{what}: worst relative difference {worst:.2e}"


def assert_same_mixture(ours, ref, rtol=1e-6):
    """The same fitted mixture up to a relabelling of its components: which label a component gets is no part of
    the model (two restarts can reach one optimum with permuted labels, and which of them is kept is a
    floating-point tie). Components are paired by their means (Hungarian matching), then compared as usual."""
    cost = np.linalg.norm(ref.means_[:, None, :] - ours.means_[None, :, :], axis=-1)
    ref_index, ours_index = linear_sum_assignment(cost)
    order = ours_index[np.argsort(ref_index)]  # ours component order[k] pairs with ref component k
    shared = {"covariances_", "precisions_", "precisions_cholesky_"} if ours.covariance_type == "tied" else set()
    for name in FITTED:
        value = getattr(ours, name)
        assert_close(value if name in shared else value[order], getattr(ref, name), rtol=rtol, what=name)


def assert_same_stopping(ours, ref, tol):
    """Same bound history, n_iter_ and converged_ as scikit-learn. The stopping rule |change| < tol is only
    checked when no change of the reference history lies within rounding of tol (that would be a tie)."""
    ours_history, ref_history = np.asarray(ours.lower_bound_history_), np.asarray(ref.lower_bounds_)
    assert len(ours_history) == ours.n_iter_
    common = min(len(ours_history), len(ref_history))
    # entry 0 scores the starting parameters; random_from_data starts from one point per component, whose
    # covariance is reg_covar plus a rounding-level scatter, so that one number only agrees to ~1e-6
    assert_close(ours_history[:1], ref_history[:1], rtol=1e-4, what="history[0]")
    if common > 1:
        assert_close(ours_history[1:common], ref_history[1:common], what="history")
    changes = np.abs(np.diff(ref_history, prepend=-np.inf))
    if not np.any(np.abs(changes - tol) <= 1e-10 * np.abs(ref_history)):
        assert (ours.n_iter_, ours.converged_) == (ref.n_iter_, ref.converged_)


def assert_same_labels(labels, ref_model, X):
    """``labels`` equal ``ref_model.predict(X)`` wherever its two most probable components are not tied to
    rounding: the argmax of two near-equal numbers depends on the last bits, which differ between CPUs."""
    proba = np.sort(ref_model.predict_proba(X), axis=1)
    clear = proba[:, -1] - proba[:, -2] > 1e-9
    assert clear.mean() > 0.95, "too many near-ties to compare labels"
    np.testing.assert_array_equal(np.asarray(labels)[clear], ref_model.predict(X)[clear])


# ------------------------------------------------------------------------------------------ EM properties
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_log_likelihood_never_decreases(cov_type):
    X = blobs()
    model = fit_quietly(GaussianMixture(3, covariance_type=cov_type, init_params="random", reg_covar=0.0,
                                        tol=0.0, max_iter=60, random_state=3), X)
    history = np.asarray(model.lower_bound_history_)
    assert len(history) == 60
    assert np.all(np.diff(history) >= -1e-12 * np.abs(history[:-1])), np.diff(history).min()
    assert history[-1] > history[0] + 0.1  # it did climb
    # the history is the log-likelihood of the parameters entering each iteration (scikit-learn's convention)
    assert model.score(X) >= history[-1] - 1e-12


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_matches_sklearn_from_the_same_initial_parameters(cov_type):
    X = blobs(seed=1)
    settings = dict(n_components=3, covariance_type=cov_type, max_iter=25, tol=0.0,
                    **start_parameters(X, cov_type))
    ours = fit_quietly(GaussianMixture(**settings), X)
    ref = fit_quietly(SkGaussianMixture(**settings), X)
    for name in FITTED:
        assert_close(getattr(ours, name), getattr(ref, name), what=name)
    assert_close(ours.lower_bound_history_, ref.lower_bounds_, what="history")
    assert_close(ours.score_samples(X), ref.score_samples(X), what="score_samples")
    assert_close(ours.predict_proba(X), ref.predict_proba(X), rtol=1e-5, what="predict_proba")
    assert_same_labels(ours.predict(X), ref, X)
    assert_close([ours.bic(X), ours.aic(X)], [ref.bic(X), ref.aic(X)], what="bic/aic")


@pytest.mark.parametrize(("cov_type", "init"), [("full", "kmeans"), ("tied", "random"), ("diag", "k-means++"),
                                                ("spherical", "random_from_data")])
def test_matches_sklearn_with_its_own_seeded_initialisation(cov_type, init):
    """Same random_state -> the same k-means / random draws as scikit-learn, restart by restart, with the same
    stopping rule; n_init keeps the best restart. Here two restarts can reach one optimum with permuted labels,
    and which one is kept is a floating-point tie (it differs between CPUs), so mixtures are compared up to a
    relabelling and the kept restart may be any restart whose bound ties with the best."""
    X = blobs(seed=2)
    settings = dict(n_components=3, covariance_type=cov_type, init_params=init, tol=1e-4, max_iter=200)
    ours_draws, ref_draws = np.random.RandomState(5), np.random.RandomState(5)
    restarts = []
    for _ in range(2):  # one generator shared by the fits: the draws of n_init=2, random_state=5
        ours = GaussianMixture(random_state=ours_draws, **settings).fit(X)
        ref = SkGaussianMixture(random_state=ref_draws, **settings).fit(X)
        assert_same_stopping(ours, ref, settings["tol"])
        assert_same_mixture(ours, ref)
        assert_close(ours.lower_bound_, ref.lower_bound_, what="lower_bound_")
        assert_close(ours.score_samples(X), ref.score_samples(X), what="score_samples")
        restarts.append(ours)
    kept = GaussianMixture(n_init=2, random_state=5, **settings).fit(X)
    best = max(restart.lower_bound_ for restart in restarts)
    assert_close(kept.lower_bound_, best, rtol=1e-12, what="best lower_bound_")
    ties = [restart for restart in restarts if restart.lower_bound_ >= best - 1e-10 * abs(best)]
    for restart in ties:
        if np.allclose(kept.means_, restart.means_, rtol=1e-9, atol=0.0):
            assert_same_mixture(kept, restart, rtol=1e-9)
            assert (kept.n_iter_, kept.converged_) == (restart.n_iter_, restart.converged_)
            break
    else:
        raise AssertionError("n_init=2 kept none of the restarts with the best bound")


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_densities_match_torch_mixture_same_family(cov_type):
    X = blobs(seed=3)
    model = fit_quietly(GaussianMixture(3, covariance_type=cov_type, max_iter=10, random_state=0), X)
    components, log_weights = torch_mixture(model)
    mixture = MixtureSameFamily(Categorical(logits=log_weights), components)
    points = torch.as_tensor(np.concatenate([X, X[:20] * 1.5]))
    np.testing.assert_allclose(model.score_samples(points.numpy()), mixture.log_prob(points).numpy(), rtol=1e-10)
    # responsibilities (eq. 11): Bayes' rule on the same torch components
    joint = components.log_prob(points[:, None, :]) + log_weights
    np.testing.assert_allclose(model.predict_proba(points.numpy()), torch.softmax(joint, 1).numpy(), atol=1e-10)


def test_complete_data_bound_is_tight_at_the_posterior():
    """Notes 001 eq. 7: log p(x) = E_q log p(x, z) - E_q log q(z) + KL(q || p(z | x)); zero KL at the posterior."""
    X = blobs(seed=4)
    model = GaussianMixture(3, random_state=0).fit(X)
    log_px = model.score_samples(X)
    np.testing.assert_allclose(model.complete_data_bound(X), log_px, rtol=1e-12, atol=1e-10)
    q = np.random.default_rng(0).dirichlet(np.ones(3), size=len(X))
    components, log_weights = torch_mixture(model)
    log_posterior = torch.log_softmax(components.log_prob(torch.as_tensor(X)[:, None, :]) + log_weights, 1)
    kl = (torch.as_tensor(q) * (torch.log(torch.as_tensor(q)) - log_posterior)).sum(1).numpy()
    gap = log_px - model.complete_data_bound(X, resp=q)
    np.testing.assert_allclose(gap, kl, rtol=1e-8, atol=1e-10)
    assert gap.min() > 0


def test_complete_data_bound_rejects_resp_rows_not_summing_to_one():
    """Eq. 7 needs q(z) to be a distribution: q = c p(z | x) gives c log p(x) - c log c, no bound on log p(x)."""
    X = blobs(seed=4)
    model = GaussianMixture(3, random_state=0).fit(X)
    q = model.predict_proba(X)
    for scale, shown in ((1.5, "1.5"), (0.5, "0.5")):
        bad = q.copy()
        bad[7] *= scale
        with pytest.raises(ElbolabError, match=rf"expected each row of resp to sum to 1 .*got row 7 summing to "
                                               rf"{shown}; normalise it with resp / resp.sum\(axis=1"):
            model.complete_data_bound(X, resp=bad)
    with pytest.raises(ElbolabError, match="sum to 1"):
        model.complete_data_bound(X, resp=np.ones_like(q))  # unnormalised weights
    with pytest.raises(ElbolabError, match="non-negative"):
        model.complete_data_bound(X, resp=-q)
    # normalised input is accepted, also float32 and one-hot, and stays below log p(x)
    for ok in (q.astype(np.float32), np.eye(3)[model.predict(X)]):
        assert np.all(model.complete_data_bound(X, resp=ok) <= model.score_samples(X) + 1e-6)


def test_float32_agrees_with_float64():
    X = blobs(seed=5)
    settings = dict(n_components=3, covariance_type="full", max_iter=30, tol=0.0, **start_parameters(X, "full"))
    m64 = fit_quietly(GaussianMixture(**settings), X)
    m32 = fit_quietly(GaussianMixture(dtype="float32", **settings), X)
    assert m32.means_.dtype == np.float32
    np.testing.assert_allclose(m32.lower_bound_history_, m64.lower_bound_history_, rtol=1e-5)
    np.testing.assert_allclose(m32.means_, m64.means_, rtol=1e-4)


def test_float32_follows_the_float64_trajectory_on_ill_conditioned_covariances():
    """Only the GEMMs over the data run in float32; the parameters (Cholesky factors, solves) stay float64. With
    them in float32 this unconverged fit ended 1e-4 nats/sample away from the float64 one (BENCHMARKS.md)."""
    rng = np.random.default_rng(0)
    n, d, k = 10_000, 30, 6
    centres = rng.normal(scale=2.0, size=(k, d))
    factors = rng.normal(scale=1.0 / np.sqrt(d), size=(k, d, d)) + 0.3 * np.eye(d)  # some thin directions
    labels = rng.integers(0, k, size=n)
    X = centres[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), factors[labels])
    settings = dict(n_components=k, max_iter=50, tol=0.0, random_state=0)
    m64 = fit_quietly(GaussianMixture(**settings), X)
    m32 = fit_quietly(GaussianMixture(dtype="float32", **settings), X)
    assert abs(m32.lower_bound_ - m64.lower_bound_) < 2e-6  # 2e-7 measured; 1e-4 with float32 parameters
    assert abs(m32.score(X) - m64.score(X)) < 2e-6


def test_warm_start_continues_where_it_stopped():
    X = blobs(seed=6)
    settings = dict(n_components=3, tol=0.0, **start_parameters(X, "full"))
    once = fit_quietly(GaussianMixture(max_iter=12, **settings), X)
    warm = GaussianMixture(max_iter=6, warm_start=True, **settings)
    fit_quietly(warm, X)
    fit_quietly(warm, X)
    for name in FITTED:
        assert_close(getattr(warm, name), getattr(once, name), rtol=1e-9, what=name)


def test_sample_follows_the_fitted_mixture():
    X = blobs(seed=7, dim=2)
    model = GaussianMixture(3, random_state=0).fit(X)
    samples, labels = model.sample(30000)
    assert samples.shape == (30000, 2) and labels.shape == (30000,)
    counts = np.bincount(labels, minlength=3) / 30000
    assert np.all(np.abs(counts - model.weights_) < 5 * np.sqrt(model.weights_ / 30000))
    for k in range(3):
        part = samples[labels == k]
        se = np.sqrt(np.diag(model.covariances_[k]) / len(part))
        assert np.all(np.abs(part.mean(0) - model.means_[k]) < 5 * se)
        np.testing.assert_allclose(np.cov(part.T), model.covariances_[k], atol=0.1 * model.covariances_[k].max())


def test_sklearn_contract():
    model = GaussianMixture(2, covariance_type="diag", reg_covar=1e-4)
    assert clone(model).get_params() == model.get_params()
    X = blobs(seed=8)
    model = GaussianMixture(3, random_state=0)
    labels = model.fit_predict(X)  # the labels of the fitted model (one fit: no tie between two fits' argmaxes)
    assert hasattr(model, "means_") and labels.shape == (len(X),)
    np.testing.assert_array_equal(labels, model.predict(X))
    assert set(labels) <= {0, 1, 2}


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("X", "match"), [
    (np.ones(10), "2 dimensions"),
    (np.ones((4, 2, 2)), "2 dimensions"),
    (np.array([[1.0, np.nan]] * 5), "NaN"),
    (np.array([[1.0, np.inf]] * 5), "row 0, column 1"),
    (np.array([["a", "b"]] * 5), "real numbers"),
    (np.ones((2, 3)), "fewer components"),
])
def test_bad_data_is_one_clear_error(X, match):
    with pytest.raises(ElbolabError, match=match):
        GaussianMixture(3).fit(X)


def test_singular_covariance_says_what_to_try():
    X = blobs(seed=9)
    X[:, 1] = 2.0  # a constant column: every covariance is singular without regularisation
    with pytest.raises(SingularCovarianceError, match="raise reg_covar.*fewer components.*scale the data"):
        GaussianMixture(3, reg_covar=0.0, random_state=0).fit(X)
    GaussianMixture(3, reg_covar=1e-6, random_state=0).fit(X)  # the advertised fix works


@pytest.mark.parametrize(("settings", "match"), [
    (dict(covariance_type="banana"), "covariance_type"),
    (dict(n_components=0), "n_components"),
    (dict(init_params="kmeans+"), "init_params"),
    (dict(dtype="float16"), "dtype"),
    (dict(weights_init=[0.5, 0.6, 0.1]), "summing to 1"),
    (dict(means_init=np.zeros((2, 3))), "means_init of shape"),
    (dict(covariance_type="full", precisions_init=-np.stack([np.eye(3)] * 3)), "positive definite"),
])
def test_bad_settings_are_one_clear_error(settings, match):
    with pytest.raises(ElbolabError, match=match):
        GaussianMixture(**{"n_components": 3, **settings}).fit(blobs())


def test_predict_before_fit_and_wrong_width():
    with pytest.raises(ElbolabError, match="not fitted"):
        GaussianMixture(2).predict(np.ones((3, 2)))
    model = GaussianMixture(3, random_state=0).fit(blobs())
    with pytest.raises(ElbolabError, match="X has 2 features, but GaussianMixture is expecting 3"):
        model.score_samples(np.ones((3, 2)))


def test_convergence_warning_says_what_to_try():
    with pytest.warns(ConvergenceWarning, match="larger max_iter.*n_init"):
        GaussianMixture(3, max_iter=2, tol=1e-12, random_state=0).fit(blobs())


# -------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("method", ["em", "vb"])
def test_cli_fit_writes_parameters_labels_and_plots(tmp_path, method):
    X = blobs(n_per=60, dim=2, seed=10)
    path = tmp_path / "points.csv"
    np.savetxt(path, X, delimiter=",", header="x,y", comments="")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["fit", str(path), "-k", "3", "--method", method, "--covariance", "diag",
                                      "--out", str(out), "--seed", "1", "--max-iter", "200"])
    assert result.exit_code == 0, result.output
    params = json.loads((out / "params.json").read_text())
    model_cls = GaussianMixture if method == "em" else __import__(
        "elbolab.classical", fromlist=["BayesianGaussianMixture"]).BayesianGaussianMixture
    model = model_cls(n_components=3, covariance_type="diag", random_state=1, max_iter=200).fit(X)
    np.testing.assert_allclose(params["means"], model.means_, rtol=1e-9)
    assert_same_labels(np.load(out / "labels.npy"), model, X)
    curve = np.loadtxt(out / "curve.csv", delimiter=",", skiprows=1)
    per_sample = 1.0 if method == "em" else 1.0 / len(X)  # VB's lower_bound_ is the whole-data ELBO
    np.testing.assert_allclose(curve[:, 1], np.asarray(model.lower_bound_history_) * per_sample, rtol=1e-8)
    assert params["lower_bound"] == pytest.approx(model.lower_bound_ * per_sample, rel=1e-8)
    for name in ("curve.png", "contours.png"):
        assert (out / name).stat().st_size > 1000
    assert "converged" in result.output


def test_cli_names_the_axes_after_the_csv_header(tmp_path, monkeypatch):
    """A CSV with a header: its column names label the axes of components.png and contours.png (not "feature 1/2")
    and are kept in params.json; without a header, "feature 1", "feature 2"."""
    from elbolab.classical import gmm_cli

    X = blobs(n_per=40, dim=2, seed=3)
    path = tmp_path / "points.csv"
    np.savetxt(path, X, delimiter=",", header="height_cm, weight kg", comments="")
    drawn = {}

    def keep_labels(name, make):
        def wrapper(*args, **kwargs):
            fig = make(*args, **kwargs)
            drawn[name] = (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel())
            return fig
        return wrapper

    monkeypatch.setattr(gmm_cli, "components_figure", keep_labels("components", gmm_cli.components_figure))
    monkeypatch.setattr(gmm_cli, "contours_figure", keep_labels("contours", gmm_cli.contours_figure))
    result = CliRunner().invoke(app, ["fit", str(path), "-k", "3", "--out", str(tmp_path / "named")])
    assert result.exit_code == 0, result.output
    assert drawn == {"components": ("height_cm", "weight kg"), "contours": ("height_cm", "weight kg")}
    assert json.loads((tmp_path / "named" / "params.json").read_text())["columns"] == ["height_cm", "weight kg"]
    np.savetxt(tmp_path / "bare.csv", X, delimiter=",")
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "bare.csv"), "-k", "3", "--out", str(tmp_path / "bare")])
    assert result.exit_code == 0, result.output
    assert drawn["components"] == drawn["contours"] == ("feature 1", "feature 2")
    assert gmm_cli.load_table(path)[1] == ["height_cm", "weight kg"] and gmm_cli.load_table(tmp_path / "bare.csv")[1] \
        is None
    np.testing.assert_array_equal(gmm_cli.load_matrix(path), gmm_cli.load_table(path)[0])


def test_cli_names_a_one_column_csv_and_the_first_two_of_many(tmp_path):
    from elbolab.classical.gmm_cli import axis_names, components_figure

    assert axis_names(["a", "b", "c"], 3) == ["a", "b", "c"] and axis_names(None, 2) == ["feature 1", "feature 2"]
    assert axis_names(["a"], 2) == ["feature 1", "feature 2"]  # names that do not fit the columns are not used
    X = np.random.default_rng(0).normal(size=(50, 1))
    fig = components_figure(X, np.zeros(50, dtype=int), np.zeros((2, 1)), np.ones((2, 1, 1)), [0.999, 0.001],
                            np.array([False, True]), "t", ["age"])
    assert fig.axes[0].get_xlabel() == "age"
    assert len(fig.axes[0].lines) == 1  # the pruned component's curve (flat at 0) is not drawn, and says so
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "1: w = 0.999", "not drawn: pruned component 2 (weight < 0.01)"]


def test_cli_reports_em_and_vb_bounds_per_sample(tmp_path):
    """Both methods' bounds in nats per sample, so their curves share a scale: the VB ELBO / N lies within a few
    nats of EM's mean log-likelihood (it bounds the log evidence), not N times it."""
    X = blobs(n_per=60, dim=3, seed=10)  # 3-D: no contour plot to draw
    path = tmp_path / "points.npy"
    np.save(path, X)
    reported = {}
    for method in ("em", "vb"):
        out = tmp_path / method
        result = CliRunner().invoke(app, ["fit", str(path), "-k", "3", "--method", method, "--covariance", "full",
                                          "--out", str(out), "--seed", "1", "--max-iter", "200"])
        assert result.exit_code == 0, result.output
        params = json.loads((out / "params.json").read_text())
        assert "per sample" in params["bound_name"]
        assert f"{params['bound_name']}: {params['lower_bound']:.6g}" in result.output
        curve = np.loadtxt(out / "curve.csv", delimiter=",", skiprows=1)
        assert curve[-1, 1] == pytest.approx(params["lower_bound"], rel=1e-8)
        reported[method] = params["lower_bound"]
    em = GaussianMixture(3, random_state=1, max_iter=200).fit(X)
    assert reported["em"] == pytest.approx(em.lower_bound_, rel=1e-9)  # EM's bound is already per sample
    assert abs(reported["vb"] - reported["em"]) < 3.0, reported
    assert abs(reported["vb"] - em.score(X)) < 3.0


def test_cli_bad_input_fails_with_a_clear_message(tmp_path):
    text = tmp_path / "words.csv"
    text.write_text("1.0,2.0\n3.0,oops\n")
    result = CliRunner().invoke(app, ["fit", str(text), "-k", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ElbolabError) and "'oops' in data row 2" in str(result.exception)
    np.save(tmp_path / "cube.npy", np.zeros((3, 3, 3)))
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "cube.npy"), "-k", "2"])
    assert result.exit_code != 0 and "2-D array" in str(result.exception)
    result = CliRunner().invoke(app, ["fit", str(text), "-k", "2", "--method", "gibbs"])
    assert result.exit_code != 0 and "--method" in str(result.exception)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("cov_type", ["full", "tied"])
def test_chunked_whitened_sweep_matches_dense_float64_statistics(monkeypatch, cov_type, dtype, tol):
    """The fast E-step (one GEMM per chunk for all K, fp32 GEMMs with fp64 sums) against a dense float64
    reference written from scipy's Gaussian log-density, over many chunks and a ragged last chunk."""
    from scipy.special import logsumexp, softmax, xlogy
    from scipy.stats import multivariate_normal

    import elbolab.classical._mixture_common as common

    # 7 rows per chunk in float64, 14 in float32 (K = 3, D + 1 = 4): 451 = 64 * 7 + 3 = 32 * 14 + 3
    monkeypatch.setattr(common, "_CHUNK_BYTES", 7 * 3 * 4 * 8)
    X = blobs(seed=8)[:451] - 20.0  # [N, D]
    params = start_parameters(X, cov_type)
    weights, means, precisions = params["weights_init"], params["means_init"], params["precisions_init"]
    prec = np.broadcast_to(precisions, (3, 3, 3))
    chol = np.linalg.cholesky(prec[:, ::-1, ::-1])[:, ::-1, ::-1]  # upper P with P P^T = precision
    # dense reference, float64
    log_joint = np.stack([np.log(w) + multivariate_normal(m, np.linalg.inv(p)).logpdf(X)
                          for w, m, p in zip(weights, means, prec)], axis=1)  # [N, K]
    resp = softmax(log_joint, axis=1)
    y = np.einsum("kde,nkd->nke", chol, X[:, None, :] - means[None])  # P_k^T (x - mu_k)  [N, K, D]
    reference = dict(log_norm=logsumexp(log_joint, axis=1).sum(), nk=resp.sum(0),
                     first=np.einsum("nk,nkd->kd", resp, y), second=np.einsum("nk,nkd,nke->kde", resp, y, y))

    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
    P = as_t(chol if cov_type == "full" else chol[0])
    comps = common.Components(as_t(means), P, cov_type)
    log_det = common.log_det_cholesky(P, cov_type, 3, 3)
    log_const = as_t(np.log(weights)) + log_det - 1.5 * common.LOG_2PI
    stats = common.sweep(as_t(X), comps, log_const)
    for name, expected in reference.items():
        got = getattr(stats, name).double().numpy()
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=name)
    # the same sums from given responsibilities (the M-step of an initialisation), with their entropy term
    given = common.sweep(as_t(X), comps, resp=as_t(resp))
    for name in ("nk", "first", "second"):
        expected = reference[name]
        np.testing.assert_allclose(getattr(given, name).double().numpy(), expected, rtol=tol,
                                   atol=tol * np.abs(expected).max(), err_msg=f"{name} from resp")
    expected_entropy = xlogy(resp, resp).sum()
    assert float(given.r_log_r) == pytest.approx(expected_entropy, rel=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1])
def test_normalise_log_joint_matches_logsumexp_and_keeps_responsibilities_normal(dtype, dim):
    """The E-step's normaliser against torch.logsumexp / softmax on rows whose components lie far apart (log
    weights down to -1e4: exp underflows there), and no denormal responsibility (they are slow to compute with)."""
    from elbolab.classical._mixture_common import normalise_log_joint

    g = torch.Generator().manual_seed(0)
    log_joint = torch.randn(40, 6, generator=g, dtype=torch.float64) * 3
    log_joint[::2, 1:] -= torch.rand(20, 5, generator=g, dtype=torch.float64) * 1e4  # far components
    log_joint = (log_joint if dim == 1 else log_joint.T).to(dtype)
    norm, r, r_log_r = normalise_log_joint(log_joint, dim)
    reference = log_joint.double()
    torch.testing.assert_close(norm.double(), torch.logsumexp(reference, dim, keepdim=True), rtol=1e-6, atol=1e-5)
    expected_r = torch.softmax(reference, dim)
    torch.testing.assert_close(r.double(), expected_r, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(r.sum(dim).double(), torch.ones(40, dtype=torch.float64), rtol=1e-6, atol=0)
    assert float(r.min()) >= torch.finfo(dtype).tiny  # normal numbers only
    expected_entropy = float(torch.special.xlogy(expected_r, expected_r).sum())
    assert float(r_log_r) == pytest.approx(expected_entropy, rel=1e-5, abs=1e-6)
