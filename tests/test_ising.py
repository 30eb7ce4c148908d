"""Ising denoising (notes 002 s3) checked against brute-force enumeration of all 2^(H W) states.

The reference below is written from the definitions in the module docstring of elbolab.classical.ising
(edges counted once, l_i(z) = log p(x_i | z) without the Gaussian normaliser), independently of the code.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
import typer
from scipy.special import logsumexp
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from typer.testing import CliRunner

from elbolab.classical.images import add_gaussian_noise, builtin_image, error_rate, flip_pixels, load_png, save_png
from elbolab.classical.ising import IsingDenoiser, IsingModel, evidence_from_flip_prob, flip_prob_from_evidence
from elbolab.classical.ising_cli import denoise_command
from elbolab.errors import ElbolabError


# ---------------------------------------------------------------- brute-force reference
def grid_edges(height, width):
    edges = []
    for r, c in itertools.product(range(height), range(width)):
        if r + 1 < height:
            edges.append((r * width + c, (r + 1) * width + c))
        if c + 1 < width:
            edges.append((r * width + c, r * width + c + 1))
    return edges


def log_lik(x, z, noise, sigma, flip_prob):
    if noise == "gaussian":
        return -((x - z) ** 2) / (2 * sigma**2)
    return np.where(z == x, math.log(1 - flip_prob), math.log(flip_prob))


class Enumeration:
    """All states z [S, n] of an H x W grid with their log p~(z | x)."""

    def __init__(self, x, coupling, noise="gaussian", sigma=1.0, flip_prob=0.1):
        height, width = x.shape
        n = height * width
        self.states = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))  # [S, n]
        flat = x.reshape(-1)
        self.log_p = log_lik(flat[None, :], self.states, noise, sigma, flip_prob).sum(axis=1)
        for i, j in grid_edges(height, width):
            self.log_p += coupling * self.states[:, i] * self.states[:, j]
        self.log_z = logsumexp(self.log_p)
        self.shape = x.shape

    def marginal_means(self):
        weights = np.exp(self.log_p - self.log_z)
        return (weights[:, None] * self.states).sum(axis=0).reshape(self.shape)

    def elbo(self, mu):
        """E_q[log p~] + H(q) for q(z) = prod_i (1 + mu_i z_i) / 2, summed over all states."""
        q = np.prod((1 + mu.reshape(-1)[None, :] * self.states) / 2, axis=1)
        positive = q > 0
        return float((q * self.log_p).sum() - (q[positive] * np.log(q[positive])).sum())


def neighbour_sum_loops(mu):
    height, width = mu.shape
    out = np.zeros_like(mu)
    for r, c in itertools.product(range(height), range(width)):
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= r + dr < height and 0 <= c + dc < width:
                out[r, c] += mu[r + dr, c + dc]
    return out


MODELS = [dict(noise="gaussian", sigma=0.8), dict(noise="flip", flip_prob=0.2)]


def observed_for(model, shape, seed):
    rng = np.random.default_rng(seed)
    clean = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    if model["noise"] == "gaussian":
        return clean + model["sigma"] * rng.standard_normal(shape)
    return np.where(rng.random(shape) < model["flip_prob"], -clean, clean)


# ---------------------------------------------------------------- the model's log p~ and ELBO
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shape", [(3, 3), (2, 4)])
def test_log_joint_and_elbo_match_enumeration(model, shape):
    x = observed_for(model, shape, seed=1)
    ising = IsingModel(coupling=0.7, **model)
    reference = Enumeration(x, 0.7, **model)
    for state, value in zip(reference.states[::37], reference.log_p[::37]):
        assert ising.log_joint(state.reshape(shape), x) == pytest.approx(value, abs=1e-10)
    mu = np.random.default_rng(2).uniform(-0.95, 0.95, shape)
    mu[0, 0] = 1.0  # a deterministic site: 0 log 0 = 0
    assert ising.elbo(mu, x) == pytest.approx(reference.elbo(mu), abs=1e-9)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schedule", ["parallel", "checkerboard"])
def test_fitted_elbo_equals_enumeration_and_is_below_log_z(model, schedule):
    x = observed_for(model, (4, 4), seed=3)
    denoiser = IsingDenoiser(coupling=0.6, damping=0.5, schedule=schedule, tol=1e-10, dtype="float64",
                             **model).fit(x)
    reference = Enumeration(x, 0.6, **model)
    assert denoiser.converged_
    assert denoiser.elbo_history_[-1] == pytest.approx(reference.elbo(denoiser.posterior_mean_), abs=1e-8)
    assert denoiser.elbo_history_[-1] <= reference.log_z
    # float32 tracks the same value to float32 precision
    fast = IsingDenoiser(coupling=0.6, schedule=schedule, tol=1e-5, **model).fit(x)
    assert fast.elbo_history_[-1] == pytest.approx(reference.elbo(fast.posterior_mean_), abs=1e-4)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schedule", ["parallel", "checkerboard"])
def test_meanfield_fixed_point_satisfies_update_equation(model, schedule):
    x = observed_for(model, (5, 6), seed=4)
    coupling = 0.9
    denoiser = IsingDenoiser(coupling=coupling, schedule=schedule, tol=1e-12, dtype="float64", **model).fit(x)
    mu = denoiser.posterior_mean_
    if model["noise"] == "gaussian":
        field = x / model["sigma"] ** 2
    else:
        field = 0.5 * (math.log(1 - model["flip_prob"]) - math.log(model["flip_prob"])) * x
    np.testing.assert_allclose(mu, np.tanh(coupling * neighbour_sum_loops(mu) + field), atol=1e-10)
    assert np.abs(mu).max() <= 1.0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_checkerboard_elbo_never_decreases():
    x = observed_for(MODELS[0], (12, 10), seed=5)
    for damping in (1.0, 0.5, 0.2):
        history = IsingDenoiser(coupling=1.0, sigma=0.8, damping=damping, schedule="checkerboard",
                                max_sweeps=150, dtype="float64").fit(x).elbo_history_
        assert np.all(np.diff(history) >= -1e-9), damping


def test_zero_coupling_meanfield_is_exact_and_weak_coupling_is_close():
    x = observed_for(MODELS[0], (3, 4), seed=6)
    exact0 = Enumeration(x, 0.0, sigma=0.8).marginal_means()
    fit0 = IsingDenoiser(coupling=0.0, sigma=0.8, tol=1e-12, dtype="float64").fit(x)
    np.testing.assert_allclose(fit0.posterior_mean_, exact0, atol=1e-10)
    exact = Enumeration(x, 0.1, sigma=0.8).marginal_means()
    fit = IsingDenoiser(coupling=0.1, sigma=0.8, tol=1e-12, dtype="float64").fit(x)
    # Mean-field ignores correlations: its error is second order in J, here far smaller than the prior's effect.
    assert np.abs(fit.posterior_mean_ - exact).max() < 0.1 * np.abs(exact - exact0).max()


@pytest.mark.parametrize("model", MODELS)
def test_gibbs_marginals_match_enumeration(model):
    x = observed_for(model, (3, 3), seed=7)
    exact = Enumeration(x, 0.5, **model).marginal_means()
    gibbs = IsingDenoiser(coupling=0.5, method="gibbs", max_sweeps=400, burn_in=50, n_chains=400,
                          random_state=0, **model).fit(x)
    # 400 chains x 350 sweeps: the Monte Carlo standard error is below 0.01.
    np.testing.assert_allclose(gibbs.posterior_mean_, exact, atol=0.04)
    assert len(gibbs.log_joint_history_) == 400 and gibbs.elbo_history_ == []
    again = IsingDenoiser(coupling=0.5, method="gibbs", max_sweeps=400, burn_in=50, n_chains=400,
                          random_state=0, **model).fit(x)
    np.testing.assert_array_equal(again.posterior_mean_, gibbs.posterior_mean_)


@pytest.mark.parametrize("coupling", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("seed", [8, 9, 10])
def test_icm_never_increases_energy_and_ends_in_a_local_optimum(coupling, seed):
    x = observed_for(MODELS[0], (9, 8), seed=seed)
    icm = IsingDenoiser(coupling=coupling, sigma=0.8, method="icm").fit(x)
    model = IsingModel(coupling=coupling, sigma=0.8)
    start = model.log_joint(np.where(x >= 0, 1.0, -1.0), x)
    history = [start] + icm.log_joint_history_
    assert np.all(np.diff(history) >= -1e-4)  # float32 sums of ~100 terms
    z = icm.posterior_mean_
    assert set(np.unique(z)) <= {-1.0, 1.0} and icm.converged_
    best = model.log_joint(z, x)
    assert best == pytest.approx(icm.log_joint_history_[-1], abs=1e-4)
    for r, c in itertools.product(range(9), range(8)):  # no single flip improves log p~
        flipped = z.copy()
        flipped[r, c] *= -1
        assert model.log_joint(flipped, x) <= best + 1e-9


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_denoising_builtin_image_reduces_errors():
    clean = builtin_image(32)
    assert set(np.unique(clean)) == {-1.0, 1.0} and clean.shape == (32, 32)
    noisy = add_gaussian_noise(clean, 1.0, seed=0)
    for method in ("meanfield", "icm", "gibbs"):
        denoiser = IsingDenoiser(coupling=1.0, sigma=1.0, method=method, max_sweeps=150, random_state=0)
        estimate = denoiser.fit(noisy).predict()
        assert set(np.unique(estimate)) <= {-1.0, 1.0}
        assert error_rate(estimate, clean) < 0.5 * error_rate(noisy, clean), method
    flipped = flip_pixels(clean, 0.1, seed=0)
    assert 0.06 < error_rate(flipped, clean) < 0.14  # binomial(1024, 0.1): sd 0.0094
    estimate = IsingDenoiser(noise="flip", flip_prob=0.1).fit(flipped).predict()
    assert error_rate(estimate, clean) < 0.5 * error_rate(flipped, clean)


def test_bishop_evidence_mapping():
    assert evidence_from_flip_prob(0.1) == pytest.approx(0.5 * math.log(9))
    assert flip_prob_from_evidence(evidence_from_flip_prob(0.07)) == pytest.approx(0.07)
    # eta x z and the flip likelihood differ by a constant: l(+1) - l(-1) = 2 eta x
    p = flip_prob_from_evidence(2.1)
    assert math.log((1 - p) / p) == pytest.approx(2 * 2.1)


# ---------------------------------------------------------------- estimator contract and bad input
def test_sklearn_contract_and_warning():
    denoiser = IsingDenoiser(coupling=0.5, max_sweeps=2, tol=1e-12)
    assert clone(denoiser).get_params()["coupling"] == 0.5
    x = observed_for(MODELS[0], (6, 6), seed=9)
    with pytest.warns(ConvergenceWarning, match="damping"):
        assert denoiser.fit(x) is denoiser
    assert denoiser.n_sweeps_ == 2 and len(denoiser.elbo_history_) == 3 and not denoiser.converged_
    with pytest.raises(ElbolabError, match="not fitted"):
        IsingDenoiser().predict()


@pytest.mark.parametrize("settings", [
    dict(sigma=0.0), dict(sigma=-1.0), dict(noise="flip", flip_prob=0.0), dict(noise="flip", flip_prob=0.5),
    dict(flip_prob=0.7), dict(damping=0.0), dict(damping=1.5), dict(method="bp"), dict(noise="poisson"),
    dict(schedule="random"), dict(max_sweeps=0), dict(tol=-1.0), dict(coupling=float("nan")),
    dict(method="gibbs", burn_in=1000), dict(dtype="float16"), dict(kernel="triton"), dict(elbo_every=0),
])
def test_bad_settings_raise_one_clear_error(settings):
    with pytest.raises(ElbolabError):
        IsingDenoiser(**settings).fit(np.ones((3, 3)))


@pytest.mark.parametrize("observed, noise, match", [
    (np.ones((2, 2, 3)), "gaussian", "2-D"), (np.ones(5), "gaussian", "2-D"),
    (np.array([[0.0, np.nan], [1.0, 1.0]]), "gaussian", "NaN"), (np.array([[0.0, 1.0]]), "flip", "-1 and \\+1"),
    (np.array([[np.inf, 1.0], [-np.inf, 1.0]]), "gaussian", "2 NaN/inf"),
    (np.array([[1.0, -1.0, 1.5]]), "flip", "-1 and"),
    (np.array([["a", "b"]]), "gaussian", "real-valued"),
])
def test_bad_images_raise_one_clear_error(observed, noise, match):
    with pytest.raises(ElbolabError, match=match):
        IsingDenoiser(noise=noise).fit(observed)


def test_finite_but_overflowing_images_are_accepted():
    huge = np.full((2, 2), 1e308)  # finite values whose sum overflows: the exact check must let them through
    with pytest.warns(RuntimeWarning, match="overflow"):  # sum x^2 of the ELBO's constant does overflow
        assert IsingDenoiser(max_sweeps=2).fit(huge).predict().tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 3 sweeps, on purpose
@pytest.mark.parametrize("noise, dtype", [("gaussian", "float64"), ("gaussian", "float32"), ("flip", "float64")])
def test_fit_uses_the_models_fields_and_leaves_the_callers_image_untouched(noise, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)) if noise == "gaussian" else np.where(rng.random((5, 7)) < 0.5, -1.0, 1.0)
    before = x.copy()
    model = IsingModel(coupling=0.7, noise=noise, sigma=1.3, flip_prob=0.2)
    for method in ("meanfield", "icm", "gibbs"):
        IsingDenoiser(coupling=0.7, noise=noise, sigma=1.3, flip_prob=0.2, method=method, dtype=dtype,
                      max_sweeps=3, random_state=0).fit(x)
        np.testing.assert_array_equal(x, before)
    h, c = model.local_fields(x)
    field, offset = model.field_and_offset(x, torch.float64)
    np.testing.assert_allclose(field.numpy(), h, rtol=1e-15, atol=0)
    assert offset == pytest.approx(c.sum(), rel=1e-12)
    fitted = IsingDenoiser(coupling=0.7, noise=noise, sigma=1.3, flip_prob=0.2, dtype="float64", tol=1e-12,
                           max_sweeps=2000).fit(x)
    # the fitted ELBO is the reference float64 ELBO of the fitted means (so offset and field are the model's)
    assert fitted.elbo_history_[-1] == pytest.approx(model.elbo(fitted.posterior_mean_, x), rel=1e-10)


# ---------------------------------------------------------------- images and CLI
def test_png_round_trip_and_errors(tmp_path):
    image = builtin_image(32)
    np.testing.assert_array_equal(load_png(save_png(image, tmp_path / "a.png")), image)
    with pytest.raises(ElbolabError, match="does not exist"):
        load_png(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ElbolabError, match="Could not read"):
        load_png(tmp_path / "text.png")


def cli_app():
    app = typer.Typer()
    app.command("denoise")(denoise_command)
    app.command("unused")(lambda: None)  # two commands, so "denoise" stays a named sub-command
    return app


def test_cli_denoise_writes_outputs(tmp_path):
    save_png(builtin_image(32), tmp_path / "in.png")
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = runner.invoke(cli_app(), ["denoise", str(tmp_path / "in.png"), "--noise", "flip", "--p", "0.1",
                                           "--method", "icm", "--out", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        builtin = runner.invoke(cli_app(), ["denoise", "--sigma", "1", "--size", "24", "--sweeps", "50",
                                            "--out", str(tmp_path / "run2")])
    assert builtin.exit_code == 0, builtin.output
    line = next(x for x in result.output.splitlines() if x.startswith("for comparison"))
    assert "meanfield " in line and "gibbs " in line and "icm " not in line  # the two other methods, by name
    for name in ("noisy.png", "denoised.png", "posterior_mean.png", "elbo.png", "result.json"):
        assert (tmp_path / "run" / name).is_file(), name
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["error_rate_denoised"] < summary["error_rate_noisy"]
    summary2 = json.loads((tmp_path / "run2" / "result.json").read_text())
    assert summary2["n_sweeps"] <= 50 and summary2["final_elbo"] is not None


def test_cli_denoise_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli_app(), ["denoise", str(tmp_path / "none.png"), "--out", str(tmp_path)])
    assert isinstance(result.exception, ElbolabError)
    result = runner.invoke(cli_app(), ["denoise", "--noise", "flip", "--p", "0.6", "--out", str(tmp_path)])
    assert isinstance(result.exception, ElbolabError)


# ---------------------------------------------------------------- the fused (torch.compile) sweep vs the eager one
def fit_both(x, **settings):
    """The same fit with the eager kernel and with the compiled one (which may have fallen back to eager)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # "compile failed, used eager": checked below instead
        eager = IsingDenoiser(kernel="eager", **settings).fit(x)
        compiled = IsingDenoiser(kernel="compiled", **settings).fit(x)
    return eager, compiled


@pytest.mark.parametrize("schedule", ["parallel", "checkerboard"])
def test_compiled_sweep_matches_eager_sweep(schedule):
    x = observed_for(MODELS[0], (20, 24), seed=11)
    settings = dict(coupling=0.9, sigma=0.8, schedule=schedule, max_sweeps=25, tol=0.0)  # float32
    eager, compiled = fit_both(x, **settings)
    assert eager.kernel_ == "eager" and compiled.kernel_ in ("compiled", "eager")
    assert compiled.n_sweeps_ == eager.n_sweeps_ == 25 and len(compiled.elbo_history_) == 26
    # Same arithmetic, different rounding (a vectorised tanh/log, other summation order): float32 tolerance
    # (the ELBO sums 480 pixel terms: absolute error ~1e-5 where it crosses zero).
    np.testing.assert_allclose(compiled.posterior_mean_, eager.posterior_mean_, atol=2e-6)
    np.testing.assert_allclose(compiled.elbo_history_, eager.elbo_history_, rtol=2e-6, atol=1e-4)
    # ... and both are the float64 reference ELBO of their means
    model = IsingModel(coupling=0.9, sigma=0.8)
    assert compiled.elbo_history_[-1] == pytest.approx(model.elbo(compiled.posterior_mean_, x), rel=2e-6)
    if compiled.kernel_ != "compiled":
        pytest.skip(f"torch.compile is unavailable here ({compiled.kernel_fallback_}); the fallback matched eager")


def test_fused_sweep_tanh_identity_is_accurate_over_the_whole_range():
    """The compiled sweep writes tanh(a) as 1 - 2 / (exp(2a) + 1): within 2e-7 of torch.tanh from a = -60 to 60,
    exactly +-1 where exp overflows or underflows, and its entropy sums agree with a float64 reference."""
    import torch

    from elbolab.classical.ising import compiled_half_sweep, fused_half_sweep

    field = torch.linspace(-60.0, 60.0, 64 * 96).reshape(64, 96)
    field[0, :5] = torch.tensor([0.0, 1e-6, -1e-6, 1e-3, -1e-3])
    src = torch.zeros(66, 98)  # zero means everywhere: a = field
    one, coupling = torch.tensor(1.0), torch.tensor(1.0)
    try:
        kernel = compiled_half_sweep(False, True)
        dst = torch.zeros_like(src)
        kernel(src, dst, field, coupling, one, None)  # damping 1: dst holds tanh(a)
    except Exception as error:  # noqa: BLE001 - no compiler here: the eager fallback is tested elsewhere
        pytest.skip(f"torch.compile is unavailable here ({type(error).__name__})")
    eager_dst = torch.zeros_like(src)
    fused_half_sweep(src, eager_dst, field, coupling, one, None, False)  # the same formula, eager
    reference = torch.tanh(field.double())
    assert float((dst[1:-1, 1:-1].double() - reference).abs().max()) < 2e-7
    assert float((eager_dst[1:-1, 1:-1].double() - reference).abs().max()) < 2e-7
    assert bool((dst[1:-1, 1:-1][field > 20] == 1.0).all()) and bool((dst[1:-1, 1:-1][field < -20] == -1.0).all())
    src[1:-1, 1:-1] = torch.tanh(field / 40)  # means in (-1, 1): the entropy term
    _, _, plogp = kernel(src, dst, field, coupling, one, None)
    t = src[1:-1, 1:-1].double().abs()
    expected = float(((1 + t) * torch.log1p(t) + (1 - t) * torch.log1p(-t)).sum())
    assert float(plogp) == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_elbo_every_n_sweeps_records_the_same_values_at_those_sweeps():
    x = observed_for(MODELS[1], (9, 11), seed=12)
    settings = dict(coupling=0.8, noise="flip", flip_prob=0.2, max_sweeps=40, tol=1e-9, dtype="float64",
                    kernel="eager")
    every = IsingDenoiser(**settings).fit(x)
    sparse = IsingDenoiser(elbo_every=7, **settings).fit(x)
    assert sparse.n_sweeps_ == every.n_sweeps_ and every.elbo_sweeps_ == list(range(every.n_sweeps_ + 1))
    expected = list(range(0, every.n_sweeps_, 7)) + [every.n_sweeps_]
    assert sparse.elbo_sweeps_ == expected
    np.testing.assert_allclose(sparse.elbo_history_, np.asarray(every.elbo_history_)[expected], rtol=1e-12)
    np.testing.assert_array_equal(sparse.posterior_mean_, every.posterior_mean_)


def test_failed_compile_falls_back_to_the_eager_kernel(monkeypatch):
    """A machine without a working torch.compile (no C++ compiler, ...) still fits, with the eager result."""
    import elbolab.classical.ising as ising

    def broken_compile(function, **options):
        def run(*args):
            raise RuntimeError("simulated: no C++ compiler")
        return run

    monkeypatch.setattr(ising, "_compile", broken_compile)
    monkeypatch.setattr(ising, "_COMPILED", {})
    x = observed_for(MODELS[0], (8, 9), seed=13)
    settings = dict(coupling=0.7, sigma=0.8, schedule="checkerboard", max_sweeps=15, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        eager = IsingDenoiser(kernel="eager", **settings).fit(x)
        with pytest.warns(RuntimeWarning, match="eager kernel"):
            fallback = IsingDenoiser(kernel="compiled", **settings).fit(x)
    assert fallback.kernel_ == "eager" and "no C\\+\\+ compiler".replace("\\", "") in fallback.kernel_fallback_
    np.testing.assert_array_equal(fallback.posterior_mean_, eager.posterior_mean_)
    assert fallback.elbo_history_ == eager.elbo_history_
    # kernel="auto" on a large image tries the compiled kernel and falls back without a warning
    big = observed_for(MODELS[0], (512, 512), seed=14)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        auto = IsingDenoiser(sigma=0.8, max_sweeps=2).fit(big)
    assert auto.kernel_ == "eager" and auto.kernel_fallback_ is not None and auto.n_sweeps_ == 2
