"""Likelihood heads against independent references: scipy quadrature and scipy.stats, not the heads' own formulas."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import quad
from torch.distributions import Distribution

import elbolab.models  # noqa: E402,F401  (discovers every model: nvdm adds its bag-of-words head)
from elbolab.errors import ElbolabError
from elbolab.likelihoods import (
    LIKELIHOODS,
    MIN_SCALE,
    SUPPORTS,
    LikelihoodHead,
    LikelihoodRegistry,
    build_likelihood,
    register_likelihood,
)

# the core's heads in their order, then those the model files register
EXPECTED_NAMES = ["bernoulli", "continuous-bernoulli", "gaussian", "gaussian-learned", "gaussian-decoder",
                  "bag-of-words"]
# 0 and +-1e-4 sit in torch's Taylor region around lambda = 1/2; +-0.004 just outside it (lambda ~ 0.499 / 0.501)
CB_LOGITS = [0.0, 1e-4, -1e-4, 0.004, -0.004, 2.0, -4.0, 10.0]
QUAD = {"epsabs": 0.0, "epsrel": 1e-12, "limit": 200}
QUAD_FLOAT32 = {"epsabs": 1e-6, "epsrel": 1e-6, "limit": 200}  # a float32 integrand is a fine staircase
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}  # absolute, on log-densities, integrals and means


def _log_lambdas(logit):
    """log lambda and log(1 - lambda) for lambda = sigmoid(logit), in numpy float64."""
    return -np.logaddexp(0.0, -logit), -np.logaddexp(0.0, logit)


def _cb_reference(logit):
    """(log C(lambda), mean) of the continuous Bernoulli by quadrature of the unnormalised density."""
    log_lam, log_1m = _log_lambdas(logit)
    shift = max(log_lam, log_1m)  # keeps the integrand near 1 for large |logit|

    def unnormalised(x):
        return math.exp(x * log_lam + (1 - x) * log_1m - shift)

    integral = quad(unnormalised, 0.0, 1.0, **QUAD)[0]
    first_moment = quad(lambda x: x * unnormalised(x), 0.0, 1.0, **QUAD)[0]
    return -math.log(integral) - shift, first_moment / integral


def _head_density(head, logit, dtype):
    """x -> p(x | logit) for a one-pixel head, as a Python float."""
    logits = torch.tensor([[logit]], dtype=dtype)
    dist = head(logits)
    return lambda x: math.exp(float(dist.log_prob(torch.tensor([[x]], dtype=dtype))))


def _softplus(raw):
    return np.log1p(np.exp(raw))


# ---------------------------------------------------------------------------------------------- continuous Bernoulli


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit", CB_LOGITS)
def test_continuous_bernoulli_density_integrates_to_one(logit, dtype):
    head = build_likelihood("continuous-bernoulli", 1)
    total = quad(_head_density(head, logit, dtype), 0.0, 1.0, **(QUAD if dtype == torch.float64 else QUAD_FLOAT32))[0]
    assert total == pytest.approx(1.0, abs=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continuous_bernoulli_log_prob_is_cross_entropy_plus_quadrature_normaliser(dtype):
    logits = np.array(CB_LOGITS)
    rng = np.random.default_rng(0)
    x = np.concatenate([[[0.0] * len(logits), [1.0] * len(logits)], rng.random((3, len(logits)))])  # [5, D]
    log_lam, log_1m = _log_lambdas(logits)
    log_c = np.array([_cb_reference(logit)[0] for logit in logits])
    expected = (x * log_lam + (1 - x) * log_1m + log_c).sum(-1)  # [5]

    head = build_likelihood("continuous-bernoulli", len(logits))
    out = torch.tensor(np.broadcast_to(logits, x.shape).copy(), dtype=dtype)
    got = head(out).log_prob(torch.tensor(x, dtype=dtype))
    assert got.shape == (5,)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=len(logits) * TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continuous_bernoulli_mean_is_the_quadrature_mean_and_not_sigmoid(dtype):
    # a dense sweep across torch's Taylor region (|lambda - 1/2| < 1e-3, |logit| < 0.004) and beyond
    logits = np.concatenate([CB_LOGITS, np.linspace(-0.02, 0.02, 81), [-30.0, -15.0, 15.0, 30.0]])
    expected = np.array([_cb_reference(logit)[1] for logit in logits])
    head = build_likelihood("continuous-bernoulli", len(logits))
    got = head.mean(torch.tensor(logits, dtype=dtype)[None]).double().numpy()[0]
    assert head.mean(torch.zeros(1, 3, dtype=dtype)).dtype == dtype
    # float32 too, as the mean is taken in float64; at |logit| = 30 torch's clamp of lambda costs ~1e-6
    far = np.abs(logits) > 20
    np.testing.assert_allclose(got[~far], expected[~far], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[far], expected[far], rtol=0, atol=1e-5)
    # the mean is pulled toward 1/2: it is not sigmoid(logits)
    sigmoid = 1 / (1 + np.exp(-2.0))
    assert abs(_cb_reference(2.0)[1] - sigmoid) > 0.1
    assert float(head.mean(torch.full((1, 1), 2.0, dtype=dtype))) == pytest.approx(_cb_reference(2.0)[1], abs=1e-6)


@pytest.mark.parametrize("logit", [0.0, 1e-4, -0.004, 0.004, 2.0, -4.0])
def test_continuous_bernoulli_gradient_matches_the_quadrature_derivative(logit):
    x, step = 0.3, 1e-4

    def reference(lg):
        log_lam, log_1m = _log_lambdas(lg)
        return x * log_lam + (1 - x) * log_1m + _cb_reference(lg)[0]

    expected = (reference(logit + step) - reference(logit - step)) / (2 * step)
    out = torch.tensor([[logit]], dtype=torch.float64, requires_grad=True)
    build_likelihood("continuous-bernoulli", 1)(out).log_prob(torch.tensor([[x]], dtype=torch.float64)).backward()
    assert float(out.grad) == pytest.approx(expected, abs=1e-6)


def test_continuous_bernoulli_is_finite_for_extreme_logits():
    out = torch.tensor([[-100.0, -20.0, 20.0, 100.0]], requires_grad=True)
    head = build_likelihood("continuous-bernoulli", 4)
    for x in (torch.zeros(1, 4), torch.ones(1, 4), torch.full((1, 4), 0.5)):
        log_prob = head(out).log_prob(x)
        log_prob.backward()
        assert torch.isfinite(log_prob).all() and torch.isfinite(out.grad).all()
        assert ((head.mean(out) > 0) & (head.mean(out) < 1)).all()


def test_continuous_bernoulli_scores_a_density_on_the_unit_interval_only():
    head = build_likelihood("continuous-bernoulli", 3)
    assert head.support == "unit-interval"
    assert head.scores_density(torch.tensor([[0.0, 0.37, 1.0]]))
    assert not head.scores_density(torch.tensor([[0.0, 0.37, 1.2]]))
    assert not head.scores_density(torch.tensor([[-0.1, 0.37, 1.0]]))
    assert not head.scores_density(torch.tensor([[0.0, float("nan"), 1.0]]))


# --------------------------------------------------------------------------------------------------------- Bernoulli


@pytest.mark.parametrize("logit", [0.0, 2.0, -4.0, 10.0])
def test_bernoulli_on_grey_levels_does_not_integrate_to_one(logit):
    # exp(log_prob) over x in [0, 1] is lambda^x (1 - lambda)^(1 - x): a score, not a density (0.5 at logit 0)
    head = build_likelihood("bernoulli", 1)
    total = quad(_head_density(head, logit, torch.float64), 0.0, 1.0, **QUAD)[0]
    assert total <= 0.5 + 1e-12
    if logit == 0.0:
        assert total == pytest.approx(0.5, abs=1e-12)


def test_bernoulli_is_a_mass_function_on_binary_data():
    # summed over {0, 1}, the Bernoulli mass is 1: a true log-likelihood of binary data
    head = build_likelihood("bernoulli", 1)
    for logit in (0.0, 2.0, -4.0):
        mass = sum(_head_density(head, logit, torch.float64)(x) for x in (0.0, 1.0))
        assert mass == pytest.approx(1.0, abs=1e-12)


def test_bernoulli_scores_a_density_on_binary_data_only():
    head = build_likelihood("bernoulli", 4)
    assert head.support == "binary"
    assert head.scores_density(torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    assert not head.scores_density(torch.tensor([[0.0, 1.0, 0.5, 0.0]]))
    assert not head.scores_density(torch.rand(10, 4) * 0.98 + 0.01)


# ---------------------------------------------------------------------------------------------------------- Gaussians


def test_gaussian_decoder_head_is_loc_first_then_softplus_raw_scale():
    rng = np.random.default_rng(1)
    d = 4
    loc = rng.normal(size=(3, d))
    raw = np.array([[-2.0, 0.0, 0.5, 3.0], [-0.3, 1.5, -1.0, 0.1], [-100.0, -40.0, 20.0, 5.0]])  # extremes in row 3
    x = rng.normal(size=(3, d))
    scale = _softplus(raw) + MIN_SCALE
    expected = stats.norm.logpdf(x, loc=loc, scale=scale).sum(-1)

    head = build_likelihood("gaussian-decoder", d)
    assert head.outputs_per_dim == 2
    out = torch.tensor(np.concatenate([loc, raw], axis=-1))  # [3, 2D]: loc first, raw second
    dist = head(out)
    np.testing.assert_allclose(dist.log_prob(torch.tensor(x)).numpy(), expected, rtol=1e-10, atol=1e-8)
    # the swapped layout would score differently, so the comparison pins the split
    swapped = stats.norm.logpdf(x, loc=raw, scale=_softplus(loc) + MIN_SCALE).sum(-1)
    assert not np.allclose(swapped, expected)
    np.testing.assert_allclose(head.mean(out).numpy(), loc)
    np.testing.assert_allclose(dist.mean.numpy(), loc)
    # a very negative raw scale sits on the floor MIN_SCALE
    np.testing.assert_allclose(dist.variance.sqrt().numpy()[2, :2], [MIN_SCALE, MIN_SCALE], rtol=1e-12)
    at_loc = head(out[2:]).log_prob(torch.tensor(loc[2:]))
    expected_at_loc = stats.norm.logpdf(0.0, scale=[MIN_SCALE, MIN_SCALE, 20.0 + MIN_SCALE, _softplus(5.0) + MIN_SCALE])
    assert float(at_loc) == pytest.approx(expected_at_loc.sum(), rel=1e-10)


def test_gaussian_learned_head_is_normal_with_exp_log_scale_floored_at_min_scale():
    rng = np.random.default_rng(2)
    d, sigma = 5, 0.7
    head = build_likelihood("gaussian-learned", d, sigma).double()
    mean, x = rng.normal(size=(4, d)), rng.normal(size=(4, d))
    # at initialisation every scale is sigma (up to the float32 rounding of the parameter log(sigma))
    expected = stats.norm.logpdf(x, loc=mean, scale=sigma).sum(-1)
    np.testing.assert_allclose(head(torch.tensor(mean)).log_prob(torch.tensor(x)).detach().numpy(), expected,
                               rtol=1e-7)
    log_scale = np.array([-20.0, math.log(MIN_SCALE) - 0.5, -1.0, 0.0, 1.3])  # the first two below the floor
    with torch.no_grad():
        head.log_scale.copy_(torch.tensor(log_scale))
    scale = np.maximum(np.exp(log_scale), MIN_SCALE)
    x = mean + rng.normal(size=(4, d)) * scale
    expected = stats.norm.logpdf(x, loc=mean, scale=scale).sum(-1)
    got = head(torch.tensor(mean)).log_prob(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert head.outputs_per_dim == 1
    np.testing.assert_allclose(head.mean(torch.tensor(mean)).detach().numpy(), mean)


def test_gaussian_fixed_head_is_normal_with_sigma():
    rng = np.random.default_rng(3)
    mean, x, sigma = rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), 0.3
    expected = stats.norm.logpdf(x, loc=mean, scale=sigma).sum(-1)
    got = build_likelihood("gaussian", 6, sigma)(torch.tensor(mean)).log_prob(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["gaussian", "gaussian-learned"])
@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_gaussian_heads_reject_a_non_positive_sigma(name, sigma):
    with pytest.raises(ElbolabError, match="positive Gaussian sigma"):
        build_likelihood(name, 3, sigma)


@pytest.mark.parametrize("name", ["gaussian", "gaussian-learned", "gaussian-decoder"])
def test_real_heads_score_a_density_on_any_finite_data(name):
    head = build_likelihood(name, 3)
    assert head.support == "real"
    assert head.scores_density(torch.tensor([[-5.0, 0.5, 12.0]]))
    assert not head.scores_density(torch.tensor([[-5.0, float("inf"), 12.0]]))


# ----------------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_the_old_tuple_idioms():
    assert list(LIKELIHOODS) == EXPECTED_NAMES
    assert "continuous-bernoulli" in LIKELIHOODS and "poisson" not in LIKELIHOODS
    assert ", ".join(LIKELIHOODS) == ", ".join(EXPECTED_NAMES)
    assert len(LIKELIHOODS) == len(EXPECTED_NAMES)
    with pytest.raises(TypeError):
        LIKELIHOODS["poisson"] = LikelihoodHead  # read-only: heads are added by register_likelihood


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_registered_head_builds_and_scores(name):
    d, batch = 3, 2
    head = build_likelihood(name, d, 0.5)
    assert type(head) is LIKELIHOODS[name]
    assert isinstance(head, LikelihoodHead) and head.support in SUPPORTS
    out = torch.randn(batch, d * head.outputs_per_dim)
    dist = head(out)
    assert isinstance(dist, Distribution) and dist.event_shape == (d,)  # one event per example
    x = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # in every support
    assert head.scores_density(x)
    assert dist.log_prob(x).shape == (batch,) and torch.isfinite(dist.log_prob(x)).all()
    assert head.mean(out).shape == (batch, d)


def test_unknown_name_raises_with_the_list_of_names():
    message = f"expected a likelihood in {', '.join(EXPECTED_NAMES)}, got 'poisson'"
    with pytest.raises(ElbolabError) as info:
        build_likelihood("poisson", 3)
    assert str(info.value) == message


def test_duplicate_or_invalid_registration_raises_and_leaves_the_registry_unchanged():
    before = dict(LIKELIHOODS)
    with pytest.raises(ElbolabError, match="already registered"):

        @register_likelihood("bernoulli")
        class Again(LikelihoodHead):
            support = "binary"

    with pytest.raises(ElbolabError, match="support"):

        @register_likelihood("test-bad-support")
        class BadSupport(LikelihoodHead):
            support = "integers"

    with pytest.raises(ElbolabError, match="LikelihoodHead subclass"):
        register_likelihood("test-not-a-head")(dict)
    with pytest.raises(ElbolabError, match="non-empty string"):
        register_likelihood("")
    assert dict(LIKELIHOODS) == before


def test_a_fresh_registry_registers_and_builds():
    registry = LikelihoodRegistry()

    @registry.register("laplace-ish")
    class Head(LikelihoodHead):
        support = "real"

    assert list(registry) == ["laplace-ish"] and registry["laplace-ish"] is Head
    assert isinstance(registry.build("laplace-ish", 4), Head) and registry.build("laplace-ish", 4).data_dim == 4
    with pytest.raises(ElbolabError, match="expected a likelihood in laplace-ish, got 'bernoulli'"):
        registry.build("bernoulli", 4)
    assert "laplace-ish" not in LIKELIHOODS
