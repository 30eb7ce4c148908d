"""The fused fast path of ``objectives.elbo_terms`` (issue 22) against torch.distributions.

The fused route (diagonal Gaussian q, N(0, I) prior, Bernoulli or Gaussian p(x|z)) must give the numbers of the
generic route: the VAE's loss and metrics as they were computed before the fast path (``reference_loss`` below is
that code, verbatim), to 1e-6 relative in float32 (bit for bit for the Bernoulli head, whose pieces use torch's own
operations in torch's order), gradients to float32 precision, and the same random numbers drawn. Anything
non-standard (a full-covariance q, a mixture prior, a continuous Bernoulli, a learned prior) takes the generic route.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from elbolab import objectives
from elbolab.data.core import Batch
from elbolab.models import get_model_class
from elbolab.models import vae as vae_module
from elbolab.networks import MixturePrior, standard_normal_prior
from elbolab.objectives import (
    bernoulli_log_likelihood,
    elbo_terms,
    free_bits_kl,
    gaussian_log_likelihood,
    kl_per_dim,
    kl_term,
    reparameterized_sample,
    standard_normal_kl_per_dim,
)
from elbolab.precision import autocast
from elbolab.schedules import StepContext

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
STANDARD_HEADS = ("bernoulli", "gaussian", "gaussian-learned", "gaussian-decoder")
SETTINGS = {"plain": {}, "free-bits": {"free_bits": 0.4}, "beta-capacity": {"beta": 0.3, "capacity": 2.0}}
D, LATENT, B = 12, 3, 7


def reference_loss(model, batch: Batch, ctx: StepContext):
    """VAE.loss as written before the fast path (torch.distributions throughout): (loss, metrics)."""
    q = model.encode(batch)
    z = q.rsample((ctx.mc_samples,))
    recon = model.decode(z, batch).log_prob(batch.x).mean(0)
    prior = model.prior(batch)
    beta, free_bits = ctx.value("beta", 1.0), ctx.value("free_bits", 0.0)
    metrics = {}
    if free_bits > 0:
        kl_bd = kl_per_dim(q, prior)
        kl = kl_bd.sum(-1)
        penalty = free_bits_kl(kl_bd, free_bits)
        metrics["dims_above_free_bits"] = (kl_bd.mean(0) > free_bits).sum().float()
    else:
        kl = kl_term(q, prior, z)
        penalty = kl.mean()
    if "capacity" in ctx.values:
        penalty = (penalty - ctx.value("capacity", 0.0)).abs()
    loss = -recon.mean() + beta * penalty
    metrics.update(elbo=recon - kl, kl=kl, recon=recon)
    return loss, metrics


class MixturePriorVAE(get_model_class("vae")):
    """A VAE with a learnable Gaussian-mixture prior (no closed-form KL: Monte Carlo over z)."""

    def __init__(self, config):
        super().__init__(config)
        self.mixture = MixturePrior(3, config.latent_dim)

    def prior(self, batch=None):
        return self.mixture()


class LearnedNormalPriorVAE(get_model_class("vae")):
    """A VAE whose diagonal Gaussian prior has learned parameters (starting at N(0, I)): not a constant prior."""

    def __init__(self, config):
        super().__init__(config)
        self.prior_loc = nn.Parameter(torch.zeros(config.latent_dim))

    def prior(self, batch=None):
        return Independent(Normal(self.prior_loc, torch.ones_like(self.prior_loc), validate_args=False), 1)


def make_model(likelihood="bernoulli", cls=None, seed=1, **options):
    cls = cls or get_model_class("vae")
    torch.manual_seed(seed)
    options = {"input_dim": D, "latent_dim": LATENT, "hidden": (16,), "sigma": 0.5, **options}
    return cls(cls.config_class(likelihood=likelihood, **options))


def make_batch(seed=2, binary=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, D, generator=g)
    return Batch(x.round() if binary else x, index=torch.arange(B))


@pytest.fixture
def routes(monkeypatch):
    """The ``fused`` flag of every elbo_terms call VAE.loss makes."""
    taken = []

    def spy(*args, **kwargs):
        terms = elbo_terms(*args, **kwargs)
        taken.append(terms.fused)
        return terms

    monkeypatch.setattr(vae_module, "elbo_terms", spy)
    return taken


def run(model, batch, ctx, fn, seed=0):
    """(loss, metrics, gradients, RNG state after) of one forward + backward of ``fn``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if fn is None:
        out = model.loss(batch, ctx)
        loss, metrics = out.loss, out.metrics
    else:
        loss, metrics = fn(model, batch, ctx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads, torch.get_rng_state()


def assert_same_numbers(new, ref, exact: bool, rtol=1e-6):
    loss, metrics, grads, rng = new
    ref_loss, ref_metrics, ref_grads, ref_rng = ref
    assert torch.equal(rng, ref_rng), "the routes drew different random numbers"
    assert metrics.keys() == ref_metrics.keys() and grads.keys() == ref_grads.keys()
    if exact:
        assert torch.equal(loss, ref_loss)
        for k in metrics:
            assert torch.equal(metrics[k], ref_metrics[k]), k
        for k in grads:
            assert torch.equal(grads[k], ref_grads[k]), k
        return
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=rtol, atol=rtol * ref_metrics[k].abs().max())
    for k in grads:  # float32 precision, relative to the size of each gradient
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5 * ref_grads[k].abs().max())


# ----- the fused route: the VAE's loss, metrics and gradients as before -----

@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("likelihood", STANDARD_HEADS)
def test_fused_route_matches_the_torch_distributions_loss(likelihood, mc_samples, setting, routes):
    model, batch = make_model(likelihood), make_batch()
    ctx = StepContext(mc_samples=mc_samples, values=SETTINGS[setting])
    fused = run(model, batch, ctx, None)
    assert routes == [True]
    reference = run(model, batch, ctx, reference_loss)
    # Bernoulli: torch's operations in torch's order, so bit for bit; Gaussian: a different order, float rounding
    assert_same_numbers(fused, reference, exact=likelihood == "bernoulli")
    assert fused[0].isfinite() and fused[1]["kl"].gt(0).all()


def test_fused_route_on_binary_data_and_a_conv_network(routes):
    model = make_model("bernoulli", architecture="conv", image_shape=(1, 4, 4), input_dim=16)
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.rand(5, 16, generator=g).round(), index=torch.arange(5))
    ctx = StepContext(mc_samples=2)
    assert_same_numbers(run(model, batch, ctx, None), run(model, batch, ctx, reference_loss), exact=True)
    assert routes == [True]


def test_switching_the_fast_path_off_takes_the_generic_route_with_the_same_numbers(monkeypatch, routes):
    model, batch, ctx = make_model(), make_batch(), StepContext(mc_samples=2, values={"free_bits": 0.3})
    fused = run(model, batch, ctx, None)
    monkeypatch.setattr(objectives, "FAST_PATH", False)
    generic = run(model, batch, ctx, None)
    assert routes == [True, False]
    assert_same_numbers(fused, generic, exact=True)


def test_environment_variable_switches_the_fast_path_off():
    code = ("import importlib, os\n"
            "from elbolab import objectives\n"
            "for value in ('0', 'off', 'False', '1', ''):\n"
            "    os.environ['ELBOLAB_FAST_PATH'] = value\n"
            "    print(importlib.reload(objectives).FAST_PATH)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["False", "False", "False", "True", "True"], out.stderr[-2000:]


def test_training_steps_give_the_same_parameters_on_both_routes(monkeypatch):
    """A few Adam steps (fused Adam, as the trainer uses) with each route from the same seed: identical weights,
    so runs compared or resumed across the change continue the same random stream."""
    finals = []
    for fast in (True, False):
        monkeypatch.setattr(objectives, "FAST_PATH", fast)
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
        torch.manual_seed(5)
        for step in range(5):
            batch = make_batch(seed=10 + step, binary=True)
            loss = model.loss(batch, StepContext(step=step, mc_samples=1 + step % 2)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


# ----- the generic route for anything non-standard, with the numbers of before -----

@pytest.mark.parametrize("case", ["full-covariance q", "mixture prior", "continuous-bernoulli", "learned prior"])
@pytest.mark.parametrize("mc_samples", [1, 3])
def test_non_standard_pieces_take_the_generic_route(case, mc_samples, routes):
    model = {
        "full-covariance q": lambda: make_model(encoder_covariance="full"),
        "mixture prior": lambda: make_model(cls=MixturePriorVAE),
        "continuous-bernoulli": lambda: make_model("continuous-bernoulli"),
        "learned prior": lambda: make_model(cls=LearnedNormalPriorVAE),
    }[case]()
    batch, ctx = make_batch(), StepContext(mc_samples=mc_samples, values={"beta": 0.5})
    new = run(model, batch, ctx, None)
    assert routes == [False]
    assert_same_numbers(new, run(model, batch, ctx, reference_loss), exact=True)
    if case in ("mixture prior", "learned prior"):  # the prior's parameters are trained
        prior_grads = [k for k in new[2] if k.startswith(("mixture.", "prior_loc"))]
        assert prior_grads and all(new[2][k].abs().sum() > 0 for k in prior_grads)


def test_a_standard_normal_prior_built_by_hand_is_recognised_by_its_values():
    q = Normal(torch.randn(4, 3), torch.rand(4, 3) + 0.5)
    by_hand = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    assert objectives.is_standard_normal(by_hand, q)
    assert objectives.is_standard_normal(standard_normal_prior(3, q.loc), q)
    for loc, scale in ((torch.full((3,), 0.1), torch.ones(3)), (torch.zeros(3), torch.full((3,), 2.0))):
        assert not objectives.is_standard_normal(Independent(Normal(loc, scale), 1), q)
    assert not objectives.is_standard_normal(standard_normal_prior(4, q.loc), q)  # another latent size
    assert not objectives.is_standard_normal(standard_normal_prior(3, q.loc.double()), q)  # another dtype
    assert not objectives.is_standard_normal(Normal(torch.zeros(3), torch.ones(3)), q)  # no event dimension


# ----- the fused pieces against torch.distributions, values and gradients -----

@pytest.mark.parametrize("n", [1, 4])
def test_reparameterized_sample_is_normal_rsample_bit_for_bit(n):
    loc = torch.randn(5, 3, requires_grad=True)
    scale = (torch.rand(5, 3) + 0.1).requires_grad_()
    torch.manual_seed(7)
    mine = reparameterized_sample(loc, scale, n)
    after_mine = torch.rand(2)
    torch.manual_seed(7)
    torch_z = Independent(Normal(loc, scale, validate_args=False), 1).rsample((n,))
    assert torch.equal(mine, torch_z) and torch.equal(after_mine, torch.rand(2))
    weights = torch.randn(n, 5, 3)
    g_mine = torch.autograd.grad((mine * weights).sum(), (loc, scale))
    g_torch = torch.autograd.grad((torch_z * weights).sum(), (loc, scale))
    assert all(torch.equal(a, b) for a, b in zip(g_mine, g_torch))


@pytest.mark.parametrize("shape", [(6, D), (1, 6, D), (3, 6, D)])
def test_bernoulli_log_likelihood_is_torch_bit_for_bit(shape):
    logits = (4 * torch.randn(shape)).requires_grad_()
    x = torch.rand(6, D)  # grey levels: the cross-entropy score
    mine = bernoulli_log_likelihood(logits, x)
    theirs = Independent(Bernoulli(logits=logits, validate_args=False), 1).log_prob(x)
    assert mine.shape == theirs.shape == shape[:-1] and torch.equal(mine, theirs)
    w = torch.randn(shape[:-1])
    assert torch.equal(torch.autograd.grad((mine * w).sum(), logits)[0],
                       torch.autograd.grad((theirs * w).sum(), logits)[0])


@pytest.mark.parametrize("sigma", ["fixed", "per-pixel", "per-example", "decoder"])
def test_gaussian_log_likelihood_matches_torch(sigma):
    loc = torch.randn(3, 6, D, requires_grad=True)
    raw = torch.randn(3, 6, D, requires_grad=True)
    log_s = (0.3 * torch.randn(D)).requires_grad_()
    scale = {"fixed": lambda: 0.7, "per-pixel": lambda: log_s.exp(),
             "per-example": lambda: log_s.exp() * torch.ones(6, 1),
             "decoder": lambda: nn.functional.softplus(raw) + 1e-3}[sigma]()
    x = torch.rand(6, D)
    p = Independent(Normal(loc, scale, validate_args=False), 1)
    base = p.base_dist
    mine = gaussian_log_likelihood(base.loc, base.scale, x)
    theirs = p.log_prob(x)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    inputs = [t for t in (loc, raw, log_s) if t.requires_grad]
    w = torch.randn(3, 6)
    g_mine = torch.autograd.grad((mine * w).sum(), inputs, allow_unused=True, retain_graph=True)
    g_theirs = torch.autograd.grad((theirs * w).sum(), inputs, allow_unused=True)
    for a, b in zip(g_mine, g_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max())


def test_unexpanded_finds_the_broadcast_sigma_and_nothing_else():
    s = torch.rand(D) + 0.5
    wide = Normal(torch.zeros(3, 6, D), s).scale  # [3, 6, D], a broadcast view of s
    assert wide.shape == (3, 6, D) and objectives._unexpanded(wide) is s
    scalar = Normal(torch.zeros(3, 6, D), 0.5).scale
    assert objectives._unexpanded(scalar).dim() == 0
    out = torch.rand(6, 2 * D)
    loc, raw = out.chunk(2, dim=-1)  # views of a bigger tensor, not expansions: kept as they are
    assert objectives._unexpanded(loc) is loc
    full = torch.rand(6, D)
    assert objectives._unexpanded(full) is full


def test_standard_normal_kl_is_torch_bit_for_bit():
    loc = (2 * torch.randn(9, 4)).requires_grad_()
    scale = (torch.rand(9, 4) * 2 + 1e-3).requires_grad_()
    mine = standard_normal_kl_per_dim(loc, scale)
    prior = standard_normal_prior(4, loc)
    theirs = kl_divergence(Normal(loc, scale), prior.base_dist)
    assert torch.equal(mine, theirs)
    assert torch.equal(mine.sum(-1), kl_divergence(Independent(Normal(loc, scale), 1), prior))
    w = torch.randn(9, 4)
    g_mine = torch.autograd.grad((mine * w).sum(), (loc, scale))
    g_theirs = torch.autograd.grad((theirs * w).sum(), (loc, scale))
    assert all(torch.equal(a, b) for a, b in zip(g_mine, g_theirs))


def test_elbo_terms_shapes_and_the_kl_per_dimension():
    model, batch = make_model(), make_batch()
    q = model.encode(batch)
    for mc_samples in (1, 4):
        terms = elbo_terms(q, lambda z: model.decode(z, batch), model.prior(batch), batch.x, mc_samples,
                           per_dim=True)
        assert terms.fused and terms.z.shape == (mc_samples, B, LATENT)
        assert terms.recon.shape == terms.kl.shape == (B,) and terms.kl_per_dim.shape == (B, LATENT)
        assert torch.equal(terms.kl, terms.kl_per_dim.sum(-1))


# ----- bf16 autocast -----

@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian-learned"])
def test_bf16_autocast_fused_route(likelihood, monkeypatch, routes):
    """Under bf16 autocast the distributions are built from float32 outputs, so the fused route gives the
    generic route's numbers; both stay near the fp32 loss (the networks run in bfloat16: a loose tolerance)."""
    model, batch, ctx = make_model(likelihood), make_batch(), StepContext(mc_samples=2)
    fp32 = run(model, batch, ctx, None)
    with autocast("bf16"):
        fused = run(model, batch, ctx, None)
        monkeypatch.setattr(objectives, "FAST_PATH", False)
        generic = run(model, batch, ctx, None)
    assert routes == [True, True, False]
    assert fused[0].dtype == torch.float32 and all(v.dtype == torch.float32 for v in fused[1].values())
    assert_same_numbers(fused, generic, exact=likelihood == "bernoulli")
    torch.testing.assert_close(fused[0], fp32[0], rtol=3e-2, atol=0)
    for k in ("elbo", "kl", "recon"):
        torch.testing.assert_close(fused[1][k], fp32[1][k], rtol=5e-2, atol=5e-2 * fp32[1][k].abs().max())


# ----- the benchmarks' smoke modes -----

@pytest.mark.parametrize("script", ["bench_vae_train.py", "bench_iw_eval.py"])
def test_benchmark_smoke_mode_runs(script, tmp_path):
    """--smoke: the embedded digits, a tiny network, a few seconds (about 5-8 s each on a busy two-core machine)."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", "--scratch", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "smoke test" in done.stdout and "| elbolab" in done.stdout


def test_eval_probe_benchmark_smoke_mode_runs(tmp_path):
    """bench_eval_probe.py --smoke: a tiny digits VAE, one N:K pair, a row with both probes' predictions."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_eval_probe.py"), "--smoke", "--json",
                           str(tmp_path / "probe.json")], capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["n"] == 20 and rows[0]["k"] == 50
    assert rows[0]["predicted_s"] > 0 and rows[0]["measured_s"] > 0 and rows[0]["older_probe_s"] > 0


@pytest.mark.parametrize("script, result", [("bench_sandwich.py", "sandwich.json"),
                                            ("bench_kl_anatomy.py", "kl_anatomy.json")])
def test_evaluation_benchmark_smoke_mode_runs(script, result, tmp_path):
    """The sandwich (IS, AIS, BDMC) and KL-anatomy tables of BENCHMARKS.md: tiny digits runs through the CLI."""
    extra = ["--figure", str(tmp_path / "tc.png")] if "anatomy" in script else []
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", "--workdir", str(tmp_path / "runs"),
                           "--out-json", str(tmp_path / result), *extra], capture_output=True, text=True,
                          timeout=600, cwd=BENCHMARKS, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / result).read_text())
    assert record and "|" in done.stdout  # a table printed from the result written
