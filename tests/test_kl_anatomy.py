"""The KL anatomy (``elbolab.kl_anatomy``): I(n; z), total correlation and dimension-wise KL against the closed forms
of a linear-Gaussian encoder, the minibatch estimator against brute-force mixtures and the exact aggregate, bad
inputs; and the beta-tcvae model (Chen et al. 2018) built on it.

Linear-Gaussian reference: x ~ N(0, Sigma_x), q(z|x) = N(A x, S) with S = diag(s^2), so the population's aggregate
posterior is q(z) = N(0, C), C = A Sigma_x A^T + S, and

    I(n; z) = E_x KL(N(Ax, S) || N(0, C)) = 1/2 (log|C| - log|S|)
    TC      = KL(N(0, C) || N(0, diag C)) = 1/2 (sum_j log C_jj - log|C|) = -1/2 log det corr(C)
    dim-KL  = sum_j KL(N(0, C_jj) || N(0, 1)) = sum_j 1/2 (C_jj - 1 - log C_jj)

A data set of N points has a mixture of N Gaussians for its aggregate, not N(0, C): the estimates of the population's
terms are biased by O(R/N) with R = E_x E_q(z|x)[q(z|x)/q(z)] = |C|/|S| (and R_j = C_jj/s_j^2 per dimension; see the
kl_anatomy docstring). The tolerances are 4 standard errors plus (R - 1 + sum_j (R_j - 1))/N, twice the first-order
bias of any of the three terms: they hold for any seed, not tuned to one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal, kl_divergence

import elbolab.kl_anatomy as anatomy
from elbolab.data.core import Batch
from elbolab.data.memory import load_in_memory
from elbolab.errors import ElbolabError
from elbolab.kl_anatomy import kl_anatomy, minibatch_weighted_sampling
from elbolab.models import get_model_class
from elbolab.models.beta_tcvae import BetaTCVAEConfig
from elbolab.schedules import StepContext

F64 = torch.float64
SIGMAS = 4.0

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems: see conftest.one_thread

CORRELATED = dict(A=[[1.2, 0.8, 0.0], [0.5, 1.0, 0.6], [0.0, -0.7, 1.1]], var_x=[1.0, 0.8, 0.6], s2=[0.5, 0.4, 0.6])
INDEPENDENT = dict(A=[[1.0, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 1.5]], var_x=[1.0, 1.0, 1.0], s2=[0.5, 0.3, 0.8])


def linear_gaussian(A, var_x, s2, n: int, seed: int):
    """Posteriors N(A x_n, diag s2) of n draws x_n ~ N(0, diag var_x), and the population's closed forms."""
    A, var_x, s2 = (torch.tensor(v, dtype=F64) for v in (A, var_x, s2))
    x = torch.randn(n, len(var_x), generator=torch.Generator().manual_seed(seed), dtype=F64) * var_x.sqrt()
    means, stds = x @ A.T, s2.sqrt().expand(n, len(s2))
    C = A @ torch.diag(var_x) @ A.T + torch.diag(s2)
    dwkl_per_dim = 0.5 * (C.diagonal() - 1 - C.diagonal().log())
    truth = {"mutual_information": 0.5 * float(torch.logdet(C) - s2.log().sum()),
             "total_correlation": 0.5 * float(C.diagonal().log().sum() - torch.logdet(C)),
             "dimension_wise_kl": float(dwkl_per_dim.sum()), "dimension_wise_kl_per_dim": dwkl_per_dim.tolist()}
    r, r_j = float(torch.det(C) / s2.prod()), C.diagonal() / s2
    bias = (r - 1 + float((r_j - 1).sum())) / n
    return means, stds, truth, bias, (r_j - 1) / n


# ------------------------------------------------------------------------------------ against closed forms
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("setting", ["correlated", "independent"])
def test_terms_match_the_linear_gaussian_closed_forms(setting, seed):
    n = 3000
    means, stds, truth, bias, bias_per_dim = linear_gaussian(**(CORRELATED if setting == "correlated" else INDEPENDENT),
                                                             n=n, seed=seed)
    r = kl_anatomy(means, stds, seed=seed)
    assert r["estimator"] == "exact-aggregate" and r["n_points"] == n and r["latent_dim"] == 3
    for key in ("mutual_information", "total_correlation", "dimension_wise_kl"):
        assert abs(r[key] - truth[key]) <= SIGMAS * r[f"{key}_se"] + bias, (key, r[key], truth[key])
    for got, se, want, b in zip(r["dimension_wise_kl_per_dim"], r["dimension_wise_kl_per_dim_se"],
                                truth["dimension_wise_kl_per_dim"], bias_per_dim.tolist()):
        assert abs(got - want) <= SIGMAS * se + b
    if setting == "independent":  # (i) independent dimensions: no total correlation
        assert truth["total_correlation"] == 0.0
        assert abs(r["total_correlation"]) <= SIGMAS * r["total_correlation_se"] + bias
    else:  # and the test can tell: the correlated code's TC is clearly positive
        assert r["total_correlation"] - SIGMAS * r["total_correlation_se"] > 0.1
    # (ii) the three terms sum to the average KL, which is torch's closed form over the data set
    q, prior = Independent(Normal(means, stds), 1), Independent(Normal(torch.zeros(3, dtype=F64), 1.0), 1)
    assert r["average_kl"] == pytest.approx(float(kl_divergence(q, prior).mean()), rel=1e-12)
    assert r["sum_of_terms"] == pytest.approx(r["mutual_information"] + r["total_correlation"]
                                              + r["dimension_wise_kl"], abs=1e-12)
    assert r["sum_minus_average_kl"] == pytest.approx(r["sum_of_terms"] - r["average_kl"], abs=1e-9)
    assert abs(r["sum_minus_average_kl"]) <= SIGMAS * r["sum_minus_average_kl_se"]
    assert r["sum_matches_average_kl"] is True
    assert sum(r["dimension_wise_kl_per_dim"]) == pytest.approx(r["dimension_wise_kl"], abs=1e-12)
    assert r["mutual_information_bound"] == pytest.approx(math.log(n))


def test_mutual_information_reaches_log_n_and_no_further_when_posteriors_do_not_overlap():
    n = 50
    means = torch.stack([torch.arange(n, dtype=F64) * 100.0, torch.zeros(n, dtype=F64)], 1)  # far apart in z_1
    r = kl_anatomy(means, torch.full((n, 2), 0.5, dtype=F64), samples_per_point=4)
    assert r["mutual_information"] == pytest.approx(math.log(n), abs=1e-9)
    assert r["mutual_information"] <= r["mutual_information_bound"] + 1e-12  # never above, and nothing clamped
    assert r["total_correlation"] == pytest.approx(0.0, abs=1e-9)  # z_2 carries nothing about n nor about z_1


def test_the_same_seed_gives_the_same_numbers_and_progress_is_reported():
    means, stds, *_ = linear_gaussian(**CORRELATED, n=40, seed=0)
    calls = []
    first = kl_anatomy(means, stds, samples_per_point=3, seed=5, progress=lambda *counts: calls.append(counts))
    assert kl_anatomy(means, stds, samples_per_point=3, seed=5) == first
    assert kl_anatomy(means, stds, samples_per_point=3, seed=6) != first
    assert calls and calls[-1] == (120, 120) and all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    # a distribution in place of means and stds, and arrays
    q = Independent(Normal(means, stds), 1)
    assert kl_anatomy(q, samples_per_point=3, seed=5) == first
    assert kl_anatomy(means.numpy(), stds.numpy(), samples_per_point=3, seed=5) == first


def test_blocks_do_not_change_the_result(monkeypatch):
    means, stds, *_ = linear_gaussian(**CORRELATED, n=30, seed=2)
    prior = Independent(Normal(torch.tensor([0.2, -0.1, 0.0]), torch.tensor([1.5, 0.8, 1.0])), 1)
    whole = {e: kl_anatomy(means, stds, prior, samples_per_point=2, estimator=e, batch_size=7)
             for e in ("exact-aggregate", "mws")}
    monkeypatch.setattr(anatomy, "BLOCK_ELEMENTS", 5)  # 1 query x 3 dims x 1 component per block
    for e, expected in whole.items():
        got = kl_anatomy(means, stds, prior, samples_per_point=2, estimator=e, batch_size=7)
        for key in ("mutual_information", "total_correlation", "dimension_wise_kl"):
            assert got[key] == pytest.approx(expected[key], abs=1e-10)


# ------------------------------------------------------------------------------------ the minibatch estimator
def _brute_force_log_q(z, means, stds, weights):
    """log sum_k W_ik N(z_li; means_k, stds_k) and per dimension, dense: z [L, M, d], W [M, M]."""
    comp = Normal(means[None, None], stds[None, None]).log_prob(z[:, :, None, :])  # [L, M(query), M(comp), d]
    log_w = weights.log()[None, :, :]  # [1, M, M]
    return (torch.logsumexp(comp.sum(-1) + log_w, -1), torch.logsumexp(comp + log_w[..., None], -2))


@pytest.mark.parametrize("weights", ["normalised", "paper"])
def test_minibatch_weighted_sampling_matches_brute_force(weights, monkeypatch):
    g = torch.Generator().manual_seed(0)
    m, d, n, draws = 6, 3, 40, 2
    means, stds = torch.randn(m, d, generator=g, dtype=F64), 0.3 + torch.rand(m, d, generator=g, dtype=F64)
    q = Independent(Normal(means, stds), 1)
    z = q.sample((draws,))  # [L, M, d]
    if weights == "normalised":
        w = torch.full((m, m), (n - 1) / (n * (m - 1)), dtype=F64).fill_diagonal_(1 / n)
    else:
        w = torch.full((m, m), 1 / (n * m), dtype=F64)
    prior = Independent(Normal(torch.tensor([0.3, 0.0, -0.2], dtype=F64), torch.tensor([1.2, 0.7, 1.0], dtype=F64)), 1)
    want_joint, want_marginal = _brute_force_log_q(z, means, stds, w)
    for block in (anatomy.BLOCK_ELEMENTS, 4):  # one block, then one component (and one query) per block
        monkeypatch.setattr(anatomy, "BLOCK_ELEMENTS", block)
        got = minibatch_weighted_sampling(z, means, stds, n, prior, weights=weights)
        torch.testing.assert_close(got.log_qz, want_joint)
        torch.testing.assert_close(got.log_qz_per_dim, want_marginal)
        torch.testing.assert_close(got.log_qz_given_x, q.log_prob(z))
        torch.testing.assert_close(got.log_pz, prior.log_prob(z))
        # the three terms telescope to log q(z|x) - log p(z) whatever the estimate of q(z)
        torch.testing.assert_close(got.mutual_information + got.total_correlation + got.dimension_wise_kl,
                                   q.log_prob(z) - prior.log_prob(z))
    assert got.log_qz.shape == (draws, m) and got.dimension_wise_kl_per_dim.shape == (draws, m, d)


def test_a_full_batch_with_normalised_weights_is_the_exact_aggregate():
    g = torch.Generator().manual_seed(1)
    n, d = 9, 2
    means, stds = torch.randn(n, d, generator=g, dtype=F64), 0.2 + torch.rand(n, d, generator=g, dtype=F64)
    z = Independent(Normal(means, stds), 1).sample()  # [N, d]
    got = minibatch_weighted_sampling(z, means, stds, n)
    mixture = MixtureSameFamily(Categorical(logits=torch.zeros(n, dtype=F64)), Independent(Normal(means, stds), 1))
    torch.testing.assert_close(got.log_qz, mixture.log_prob(z))
    for j in range(d):
        marginal = MixtureSameFamily(Categorical(logits=torch.zeros(n, dtype=F64)), Normal(means[:, j], stds[:, j]))
        torch.testing.assert_close(got.log_qz_per_dim[:, j], marginal.log_prob(z[:, j]))


def test_minibatch_estimates_approach_the_exact_aggregate_as_the_batch_grows():
    # (iii) the same seed gives both estimators the same draws: the differences are the estimator's bias
    n = 2048
    g = torch.Generator().manual_seed(3)
    means = torch.randn(n, 2, generator=g, dtype=F64) @ torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64)
    stds = torch.tensor([0.35, 0.3], dtype=F64).expand(n, 2)
    exact = kl_anatomy(means, stds)
    bias = {}
    for m in (8, 64, 512, n):
        r = kl_anatomy(means, stds, estimator="mws", batch_size=m)
        assert r["mutual_information"] <= r["mutual_information_bound"]
        bias[m] = {k: r[k] - exact[k] for k in ("mutual_information", "total_correlation", "dimension_wise_kl")}
    mi, dw = ({m: b[key] for m, b in bias.items()} for key in ("mutual_information", "dimension_wise_kl"))
    assert mi[8] > 2 * mi[64] > 4 * abs(mi[512])  # log q^ biased low: I biased high, shrinking with M
    assert dw[8] < 2 * dw[64] < -4 * abs(dw[512])  # the marginals' log q^ biased low: the dimension-wise KL low
    assert all(abs(v) < 1e-9 for v in bias[n].values())  # M = N: the exact aggregate
    # the printed weights sum to 1/N: log q^ about log N low here (overlapping posteriors), I beyond its bound
    paper = kl_anatomy(means, stds, estimator="mws", batch_size=64, weights="paper")
    assert paper["mutual_information"] > paper["mutual_information_bound"]
    assert paper["dimension_wise_kl"] - exact["dimension_wise_kl"] < -math.log(n)


# ------------------------------------------------------------------------------------ bad inputs
GOOD = torch.zeros(4, 2), torch.ones(4, 2)


@pytest.mark.parametrize("call, match", [
    (lambda: kl_anatomy(torch.zeros(4, 2), torch.ones(4, 3)), "stds of the means' shape"),
    (lambda: kl_anatomy(torch.zeros(4), torch.ones(4)), r"shape \[N, d\]"),
    (lambda: kl_anatomy(torch.zeros(4, 2), None), "expected stds"),
    (lambda: kl_anatomy(torch.zeros(4, 2), -torch.ones(4, 2)), "standard deviations > 0"),
    (lambda: kl_anatomy(torch.full((4, 2), math.nan), torch.ones(4, 2)), "finite"),
    (lambda: kl_anatomy(torch.zeros(1, 2), torch.ones(1, 2)), "at least 2 data points"),
    (lambda: kl_anatomy("means", torch.ones(4, 2)), "numbers"),
    (lambda: kl_anatomy(MultivariateNormal(torch.zeros(4, 2), torch.eye(2))), "diagonal-Gaussian"),
    (lambda: kl_anatomy(Independent(Normal(*GOOD), 1), GOOD[1]), "got both"),
    (lambda: kl_anatomy(*GOOD, Independent(Normal(torch.zeros(3), 1.0), 1)), "factorised Gaussian prior"),
    (lambda: kl_anatomy(*GOOD, MultivariateNormal(torch.zeros(2), torch.eye(2))), "factorised Gaussian prior"),
    (lambda: kl_anatomy(*GOOD, samples_per_point=0), "samples_per_point"),
    (lambda: kl_anatomy(*GOOD, seed=1.5), "integer seed"),
    (lambda: kl_anatomy(*GOOD, estimator="kde"), "estimator in"),
    (lambda: kl_anatomy(*GOOD, estimator="mws", batch_size=5), "batch_size <= N"),
    (lambda: kl_anatomy(*GOOD, estimator="mws", batch_size=2, weights="uniform"), "weights in"),
    (lambda: minibatch_weighted_sampling(torch.zeros(3, 2), *GOOD, 10), r"z of shape \[\.\.\., 4, 2\]"),
    (lambda: minibatch_weighted_sampling(torch.zeros(4, 2), *GOOD, 0), "dataset_size"),
    (lambda: minibatch_weighted_sampling(np.zeros((4, 2)), *GOOD, 10), "z as a tensor"),
])
def test_bad_inputs_say_what_was_expected(call, match):
    with pytest.raises(ElbolabError, match=match):
        call()


# ------------------------------------------------------------------------------------ the beta-tcvae model
def tcvae(n_train=50, **options):
    torch.manual_seed(0)
    config = BetaTCVAEConfig(input_dim=6, latent_dim=3, hidden=(8,), likelihood="gaussian", n_train=n_train, **options)
    return get_model_class("beta-tcvae")(config)


def beta(value):
    """The step context of a run whose beta schedule is ``value`` (beta, the weight of the total correlation)."""
    return {"beta": value}


def x_batch(n=8, seed=1):
    return Batch(torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)))


def test_unit_weights_penalise_the_kl_in_expectation():
    model, batch, draws = tcvae(alpha=1.0, gamma=1.0), x_batch(), 4000
    torch.manual_seed(2)
    out = model.loss(batch, StepContext(mc_samples=draws, values=beta(1.0)))
    torch.manual_seed(2)
    with torch.no_grad():
        q, prior = model.encode(batch), model.prior(batch)
        z = q.rsample((draws,))  # the draws the loss used
        terms = minibatch_weighted_sampling(z, q.base_dist.loc, q.base_dist.scale, 50, prior)
        penalty = terms.mutual_information + terms.total_correlation + terms.dimension_wise_kl  # [L, B]
        kl = kl_divergence(q, prior)  # [B]
    torch.testing.assert_close(penalty, q.log_prob(z) - prior.log_prob(z), rtol=1e-5, atol=1e-4)  # per draw
    se = penalty.std(0) / math.sqrt(draws)
    assert ((penalty.mean(0) - kl).abs() <= SIGMAS * se).all()  # in expectation: the KL
    torch.testing.assert_close(out.loss, -(out.metrics["recon"] - penalty.mean(0)).mean())
    torch.testing.assert_close(out.metrics["elbo"], out.metrics["recon"] - out.metrics["kl"])
    torch.testing.assert_close(out.metrics["kl"], kl)


def test_the_loss_weights_the_three_terms():
    model, batch = tcvae(alpha=2.0, gamma=0.5), x_batch()
    out = model.loss(batch, StepContext())  # beta: the model's default, 6
    m = out.metrics
    assert {k: v.shape for k, v in m.items()} == {"elbo": (8,), "kl": (8,), "recon": (8,), "mi": (), "tc": (),
                                                  "dwkl": ()}
    torch.testing.assert_close(out.loss, -m["recon"].mean() + 2.0 * m["mi"] + 6.0 * m["tc"] + 0.5 * m["dwkl"])
    assert float(m["mi"]) <= math.log(50) + 1e-6  # normalised weights: never above the bound


def test_beta_tcvae_builds_from_in_memory_data_and_trains():
    rng = np.random.default_rng(0)  # two factors seen through six features, and a little noise
    x = (2 * rng.normal(size=(120, 2)) @ rng.normal(size=(2, 6)) + 0.1 * rng.normal(size=(120, 6))).astype("float32")
    splits, _ = load_in_memory(x)
    config = BetaTCVAEConfig.from_data(splits.train, latent_dim=2, hidden=(16,), likelihood="gaussian")
    assert config.n_train == len(splits.train) and config.input_dim == 6
    with pytest.raises(ElbolabError, match="unknown option"):
        BetaTCVAEConfig.from_data(splits.train, n_train=5)  # filled from the data, not an option
    torch.manual_seed(0)
    model = get_model_class("beta-tcvae")(config)
    batch = splits.train.batch(torch.arange(len(splits.train)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def fixed_loss():
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return float(model.loss(batch, StepContext(mc_samples=16)).loss)

    before = fixed_loss()
    for _ in range(40):
        opt.zero_grad()
        out = model.loss(batch, StepContext())
        assert torch.isfinite(out.loss) and all(torch.isfinite(v).all() for v in out.metrics.values())
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    after = fixed_loss()
    assert after < before - 1.0, (before, after)
    # a last batch of one example, and a batch larger than the training set (validation), stay finite
    for net, rows in ((model, batch[torch.arange(1)]), (tcvae(n_train=3), x_batch(8))):
        net.zero_grad()
        out = net.loss(rows, StepContext(mc_samples=2))
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("options, match", [
    (dict(encoder_covariance="full"), "encoder_covariance diag"),
    (dict(mws_weights="stratified"), "mws_weights in"),
    (dict(n_train=0), "n_train >= 1"),
])
def test_beta_tcvae_config_rejects_bad_options(options, match):
    with pytest.raises(ElbolabError, match=match):
        tcvae(**{"n_train": 50, **options})
