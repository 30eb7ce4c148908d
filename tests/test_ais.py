"""AIS and BDMC (elbolab/ais.py) checked on a linear-Gaussian model, where log p(x) is exact.

The model: z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D). Then p(x) = N(b, W W^T + sigma^2 I) and
p(z|x) = N(A (x - b), sigma^2 M^-1) with M = W^T W + sigma^2 I and A = M^-1 W^T.

Tolerances are set from the estimators' own spread (standard errors, or margins many times the spread seen over
40 seeds), so they hold for any seed; none of them is tuned to one seed's value.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from elbolab.ais import ais_log_px, annealing_schedule, bdmc, hmc_transition
from elbolab.data.core import Batch
from elbolab.errors import ElbolabError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
LATENT, D, SIGMA = 2, 8, 0.7
N = 16  # examples
LEAPFROG = 5
FEW, MANY = 2, 300  # annealing steps


class LinearGaussian:
    """prior / decode / encode of the linear-Gaussian model, in float64. ``encode`` is the exact posterior, or a
    shifted and widened one."""

    def __init__(self, seed: int = 0, *, shift: float = 0.0, widen: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, LATENT, generator=g, dtype=F64)
        self.b = torch.randn(D, generator=g, dtype=F64)
        m = self.W.T @ self.W + SIGMA**2 * torch.eye(LATENT, dtype=F64)
        self.A = torch.linalg.solve(m, self.W.T)  # posterior mean = A (x - b)
        self.post_cov = SIGMA**2 * torch.linalg.inv(m)
        self.shift, self.widen = shift, widen

    def prior(self, batch=None):
        zeros = torch.zeros(LATENT, dtype=F64)
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)

    def decode(self, z, batch=None):
        return Independent(Normal(z @ self.W.T + self.b, SIGMA, validate_args=False), 1, validate_args=False)

    def encode(self, batch):
        loc = (batch.x - self.b) @ self.A.T + self.shift  # [B, d]
        return MultivariateNormal(loc, self.post_cov * self.widen**2)

    def marginal(self) -> MultivariateNormal:
        return MultivariateNormal(self.b, self.W @ self.W.T + SIGMA**2 * torch.eye(D, dtype=F64))

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return self.marginal().log_prob(x)


class NoEncoder:
    """A model offering only prior and decode."""

    def __init__(self, model):
        self.prior, self.decode = model.prior, model.decode


@pytest.fixture(scope="module")
def model():
    return LinearGaussian(seed=0)


@pytest.fixture(scope="module")
def data(model):
    torch.manual_seed(1)
    return model.marginal().sample((N,))  # [N, D]


@pytest.fixture(scope="module")
def long_run(model, data):
    """AIS from the prior with many steps (shared by the convergence and the standard-error tests)."""
    return ais_log_px(model, data, steps=MANY, chains=16, leapfrog_steps=LEAPFROG, seed=0)


def paired_se(diff: torch.Tensor) -> float:
    """Standard error of the mean of per-example differences."""
    return float(diff.std() / math.sqrt(len(diff)))


# ------------------------------------------------------------------------------------------- HMC


def test_hmc_leaves_a_gaussian_invariant_and_reaches_it():
    """N(m, diag s^2): chains started at the target stay distributed as the target, chains started elsewhere reach
    it. Two examples, two step sizes broadcast over the chains: a small one, accepted most of the time (a wrong
    gradient sign would reject almost every move), and one near the leapfrog's stability limit 2 min(s) = 1, whose
    large energy errors expose a wrong acceptance rule or a non-reversible integrator as a biased mean or variance."""
    torch.manual_seed(0)
    m = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    s = torch.tensor([0.5, 2.0, 1.0], dtype=F64)

    def evaluate(z):
        u = (z - m) / s
        return -0.5 * u.pow(2).sum(-1), -u / s, ()

    k = 4000
    step = torch.tensor([[0.2], [0.8]], dtype=F64)  # [B=2, 1]
    for start in ("target", "elsewhere"):
        z = m + s * torch.randn(k, 2, 3, dtype=F64) if start == "target" else torch.randn(k, 2, 3, dtype=F64)
        log_f, grad, _ = evaluate(z)
        accepted = []
        for _ in range(25):
            z, log_f, grad, _, accept = hmc_transition(z, log_f, grad, evaluate, step, 10)
            accepted.append(accept.mean(0))  # [B]
        torch.testing.assert_close(log_f, evaluate(z)[0])  # the kept values belong to the kept states
        acceptance = torch.stack(accepted).mean(0)  # [B]
        assert acceptance[0] > 0.8 and acceptance[1] > 0.1, acceptance
        for example in range(2):
            zs = z[:, example]  # [k, 3]: independent chains
            assert ((zs.mean(0) - m).abs() / s < 5 / math.sqrt(k)).all(), (start, example, zs.mean(0))
            assert ((zs.var(0) / s**2 - 1).abs() < 5 * math.sqrt(2 / k)).all(), (start, example, zs.var(0))


# ------------------------------------------------------------------------------------------- schedule, exactness


def test_schedules_run_from_zero_to_one_and_the_sigmoid_is_finer_at_both_ends():
    for kind in ("sigmoid", "linear"):
        betas = torch.tensor(annealing_schedule(100, kind), dtype=F64)
        assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    linear = torch.tensor(annealing_schedule(100, "linear"), dtype=F64)
    sigmoid = torch.tensor(annealing_schedule(100), dtype=F64)
    torch.testing.assert_close(linear, torch.arange(101, dtype=F64) / 100)
    assert sigmoid.diff()[0] < linear.diff()[0] / 5 and sigmoid.diff()[-1] < linear.diff()[-1] / 5
    assert annealing_schedule(1) == [0.0, 1.0]


def test_starting_at_the_exact_posterior_every_weight_is_log_px(data):
    """With q(z|x) = p(z|x), f_beta = p(x)^beta q for every beta, so every increment is (beta_t - beta_{t-1})
    log p(x) and each chain's log weight is log p(x) exactly, forward and reverse."""
    model = LinearGaussian(seed=0)
    run = ais_log_px(model, data, steps=4, chains=3, leapfrog_steps=3, initial="posterior", seed=0)
    exact = model.log_px(data)
    torch.testing.assert_close(run["log_w"], exact.expand(3, -1), rtol=0, atol=1e-9)
    torch.testing.assert_close(run["log_px"], exact, rtol=0, atol=1e-9)
    assert run["stderr"].max() < 1e-6
    assert run["z"].shape == (3, N, LATENT) and run["step_sizes"].shape == (4, N)

    sandwich = bdmc(model, 5, steps=4, chains=3, leapfrog_steps=3, initial="posterior", seed=0)
    simulated = model.log_px(sandwich["x"])
    torch.testing.assert_close(sandwich["lower"], simulated, rtol=0, atol=1e-9)
    torch.testing.assert_close(sandwich["upper"], simulated, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------- AIS


def test_ais_approaches_the_exact_log_px_as_steps_grow(model, data, long_run):
    """(a) The error at many steps is small and far below the error at few steps. Over 40 seeds, the mean absolute
    error was 0.07-0.15 at 300 steps (its spread is set by s.e. ~0.12 per example) and 1.3-5.0 at 2 steps; the
    mean per-chain gap log p(x) - log w (>= 0 in expectation) 25-33 nats at 2 steps, 0.07-0.22 at 300."""
    exact = model.log_px(data)
    calls = []
    few = ais_log_px(model, data, steps=FEW, chains=16, leapfrog_steps=LEAPFROG, seed=0,
                     progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, FEW), (2, FEW)]
    error_few = float((few["log_px"] - exact).abs().mean())
    error_many = float((long_run["log_px"] - exact).abs().mean())
    assert error_many < 0.4 and error_few > 2 * error_many, (error_few, error_many)
    chain_gap_few = float((exact - few["log_w"]).mean())
    chain_gap_many = float((exact - long_run["log_w"]).mean())
    assert chain_gap_few > 10 and chain_gap_many < 0.5, (chain_gap_few, chain_gap_many)
    assert 0.45 < long_run["acceptance"] < 0.85  # the step size was adapted towards 0.65


def test_with_many_steps_the_estimate_matches_the_exact_value_within_its_standard_error(model, data, long_run):
    """(c) The mean over examples is within 4 reported s.e. of the exact mean, and the reported per-example s.e.
    (delta method across chains) matches the spread of the actual errors. Over 40 seeds: mean error / s.e. from
    -2.6 to 1.6; RMS error / RMS s.e. from 0.64 to 1.47; acceptance 0.66-0.67."""
    error = long_run["log_px"] - model.log_px(data)  # [N]
    assert abs(float(error.mean())) < 4 * long_run["mean_stderr"], (float(error.mean()), long_run["mean_stderr"])
    ratio = float(error.pow(2).mean().sqrt() / long_run["stderr"].pow(2).mean().sqrt())
    assert 0.3 < ratio < 3, ratio


def test_ais_from_an_imperfect_encoder_converges_too(data):
    """initial="posterior" with q shifted and 1.5 times wider than p(z|x): one step is importance sampling from q,
    whose per-chain gap E_q[log p(x) - log w] = KL(q || p(z|x)) annealing removes. Over 30 seeds: gap 1.6-3.3 nats
    at 1 step, 0.06-0.22 at 50; mean absolute error 0.08-0.19 at 50 steps."""
    model = LinearGaussian(seed=0, shift=0.3, widen=1.5)
    exact = model.log_px(data)
    few = ais_log_px(model, data, steps=1, chains=8, leapfrog_steps=LEAPFROG, initial="posterior", seed=0)
    many = ais_log_px(model, data, steps=50, chains=8, leapfrog_steps=LEAPFROG, initial="posterior", seed=0)
    chain_gap_few = float((exact - few["log_w"]).mean())
    chain_gap_many = float((exact - many["log_w"]).mean())
    assert chain_gap_many < chain_gap_few / 3, (chain_gap_few, chain_gap_many)
    assert float((many["log_px"] - exact).abs().mean()) < 0.4


def test_seeding_is_reproducible_and_leaves_the_global_generator_alone(model, data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = ais_log_px(model, data[:3], steps=3, chains=2, leapfrog_steps=2, seed=5)
    torch.testing.assert_close(torch.rand(3), expected)
    b = ais_log_px(model, data[:3], steps=3, chains=2, leapfrog_steps=2, seed=5)
    c = ais_log_px(model, data[:3], steps=3, chains=2, leapfrog_steps=2, seed=6)
    assert torch.equal(a["log_w"], b["log_w"]) and not torch.equal(a["log_w"], c["log_w"])


# ------------------------------------------------------------------------------------------- BDMC


def test_bdmc_brackets_the_exact_log_px_and_the_gap_shrinks(model):
    """(b) On simulated data, mean lower <= exact <= mean upper up to 5 s.e. (the larger of the reported and the
    paired empirical s.e.), at few and at many steps; the upper bound is clearly above at few steps; the gap
    shrinks. Over 40 seeds: (lower - exact) / s.e. <= 1.4 and (upper - exact) / s.e. >= -1.7 at 100 steps; at 3
    steps (upper - exact) / s.e. >= 3.4; the gap 2.7-10 nats at 3 steps, -0.08 to 0.43 at 100 (s.e. ~0.15)."""
    calls = []
    gaps, gap_se = {}, {}
    for steps in (3, 100):
        run = bdmc(model, N, steps=steps, chains=8, leapfrog_steps=LEAPFROG, seed=0,
                   progress=(lambda done, total: calls.append((done, total))) if steps == 3 else None)
        exact = model.log_px(run["x"])  # [N]
        assert run["x"].shape == (N, D) and run["z"].shape == (N, LATENT)
        below, above = run["lower"] - exact, run["upper"] - exact
        se_lower = max(paired_se(below), float(run["lower_stderr"].pow(2).sum().sqrt()) / N)
        se_upper = max(paired_se(above), float(run["upper_stderr"].pow(2).sum().sqrt()) / N)
        assert float(below.mean()) < 5 * se_lower, (steps, float(below.mean()), se_lower)
        assert float(above.mean()) > -5 * se_upper, (steps, float(above.mean()), se_upper)
        if steps == 3:
            assert float(above.mean()) > 0  # the reverse bias: ~2 nats, 3-18 s.e. over 40 seeds
        gaps[steps], gap_se[steps] = run["gap"], math.hypot(se_lower, se_upper)
        assert run["gap"] == pytest.approx(run["upper_mean"] - run["lower_mean"])
    assert calls == [(i, 6) for i in range(1, 7)]
    assert gaps[100] < 0.25 + 5 * gap_se[100] and gaps[100] < gaps[3] / 2, (gaps, gap_se)


# ------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("options, expected", [
    ({"steps": 0}, "steps as an integer >= 1"),
    ({"steps": 2.5}, "steps as an integer >= 1"),
    ({"chains": 0}, "chains as an integer >= 1"),
    ({"chains": True}, "chains as an integer >= 1"),
    ({"leapfrog_steps": 0}, "leapfrog_steps as an integer >= 1"),
    ({"tune_chains": -1}, "tune_chains as an integer >= 0"),
    ({"step_size": 0.0}, "step_size as a positive number"),
    ({"step_size": float("nan")}, "step_size as a positive number"),
    ({"initial": "uniform"}, "initial in"),
    ({"schedule": "cosine"}, "schedule in"),
    ({"progress": 3}, "progress as a callable"),
])
def test_bad_arguments_raise_elbolab_errors(model, data, options, expected):
    arguments = {"steps": 2, **options}
    with pytest.raises(ElbolabError, match=expected) as error:
        ais_log_px(model, data, **arguments)
    assert "got" in str(error.value)
    with pytest.raises(ElbolabError, match=expected):
        bdmc(model, 2, **arguments)


def test_bad_models_and_sizes_raise_elbolab_errors(model, data):
    with pytest.raises(ElbolabError, match="without \\['encode'\\]; try initial='prior'"):
        ais_log_px(NoEncoder(model), data, steps=2, initial="posterior")
    with pytest.raises(ElbolabError, match="n_examples as an integer >= 1"):
        bdmc(model, 0, steps=2)
    with pytest.raises(ElbolabError, match="at least n_examples=5 rows"):
        bdmc(model, 5, steps=2, batch=Batch(data[:3]))
    with pytest.raises(ElbolabError, match="at least one example"):
        ais_log_px(model, data[:0], steps=2)
