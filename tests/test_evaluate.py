"""log p(x) estimators and latent diagnostics, checked on probabilistic PCA, where everything is exact.

The model: z ~ N(0, I_2), x | z ~ N(W z + b, sigma^2 I_5), a VAE whose decoder is the linear map z -> W z + b.
Then p(x) = N(b, W W^T + sigma^2 I) and p(z|x) = N(M^-1 W^T (x - b), sigma^2 M^-1) with M = W^T W + sigma^2 I.
The encoder is set by hand: its body computes [relu(x), relu(-x)], so its heads can express any affine mean A x + c.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from elbolab import evaluate as evaluate_module
from elbolab.data import Batch
from elbolab.errors import ElbolabError
from elbolab.estimators import LogLikelihoodEstimate, importance_sampled_log_px, naive_log_px, plan_chunks
from elbolab.evaluate import active_units, evaluate_model, importance_diagnostics, kl_per_dimension
from elbolab.models import ModelConfig, build_model
from elbolab.models.autoencoder import AutoencoderConfig
from elbolab.objectives import iwae_bound
from elbolab.schedules import StepContext

D, LATENT, SIGMA = 5, 2, 0.5
F64 = torch.float64


class PPCA:
    """Exact quantities of the linear-Gaussian model, in float64."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, LATENT, generator=g, dtype=F64)
        self.b = torch.randn(D, generator=g, dtype=F64)
        self.M = self.W.T @ self.W + SIGMA**2 * torch.eye(LATENT, dtype=F64)
        self.A = torch.linalg.solve(self.M, self.W.T)  # posterior mean = A (x - b)
        self.post_cov = SIGMA**2 * torch.linalg.inv(self.M)

    def marginal(self) -> MultivariateNormal:
        return MultivariateNormal(self.b, self.W @ self.W.T + SIGMA**2 * torch.eye(D, dtype=F64))

    def sample_x(self, n: int, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return self.marginal().sample((n,)).float()

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return self.marginal().log_prob(x.double())

    def elbo(self, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Closed-form ELBO for q = N(loc, cov): E_q log p(x|z) - KL(q || N(0, I))."""
        x = x.double()
        resid = x - loc @ self.W.T - self.b
        trace = torch.einsum("ij,bjk,ik->b", self.W, cov, self.W)  # tr(W cov W^T)
        expected_loglik = -0.5 * D * math.log(2 * math.pi * SIGMA**2) - ((resid**2).sum(-1) + trace) / (2 * SIGMA**2)
        kl = 0.5 * (cov.diagonal(dim1=-2, dim2=-1).sum(-1) + (loc**2).sum(-1) - LATENT - torch.logdet(cov))
        return expected_loglik - kl

    def model(self, *, mean_shift=0.0, std_factor=1.0, exact_covariance=False):
        """The VAE with this decoder and an encoder N(A (x - b) + shift, factor^2 * cov or its diagonal)."""
        covariance = "full" if exact_covariance else "diag"
        model = build_model("vae", ModelConfig(input_dim=D, latent_dim=LATENT, hidden=(2 * D,),
                                               likelihood="gaussian", sigma=SIGMA, encoder_covariance=covariance))
        model.decoder = nn.Linear(LATENT, D)
        enc = model.encoder
        with torch.no_grad():
            model.decoder.weight.copy_(self.W)
            model.decoder.bias.copy_(self.b)
            enc.body[0].weight.copy_(torch.cat([torch.eye(D), -torch.eye(D)]))  # h = [relu(x), relu(-x)]
            enc.body[0].bias.zero_()
            enc.loc.weight.copy_(torch.cat([self.A, -self.A], dim=1))  # A relu(x) - A relu(-x) = A x
            enc.loc.bias.copy_(-self.A @ self.b + mean_shift)
            cov = self.post_cov * std_factor**2
            tril = torch.linalg.cholesky(cov) if exact_covariance else torch.diag(cov.diagonal().sqrt())
            enc.log_var.weight.zero_()
            enc.log_var.bias.copy_(2 * tril.diagonal().log())
            if exact_covariance:
                rows, cols = enc.tril_index
                enc.off_diagonal.weight.zero_()
                enc.off_diagonal.bias.copy_(tril[rows, cols])
        return model


class ArrayData:
    """Stand-in for a data split: x and batch(index, generator)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def batch(self, index, generator=None):
        return Batch(self.x[index], index=index)


@pytest.fixture(scope="module")
def ppca():
    return PPCA(seed=0)


@pytest.fixture(scope="module")
def data(ppca):
    return ppca.sample_x(200, seed=1)


def perturbed(ppca):
    # not the posterior: shifted mean, diagonal (correlations dropped) and 1.5 times wider
    return ppca.model(mean_shift=0.3, std_factor=1.5)


def repeated_iwae(model, x, k, repeats, seed):
    """[N] IWAE_k averaged over repeats (each repeat is fresh draws for every example)."""
    torch.manual_seed(seed)
    est = importance_sampled_log_px(model, x.repeat(repeats, 1), k=k)
    return est.per_example.view(repeats, -1).mean(0)


def assert_greater(a: torch.Tensor, b: torch.Tensor, z: float = 4.0):
    """mean(a - b) > z standard errors, over paired examples."""
    diff = (a - b).double()
    se = float(diff.std() / math.sqrt(len(diff)))
    assert float(diff.mean()) > z * se, (float(diff.mean()), se)


def test_exact_posterior_makes_elbo_exact_and_weights_constant(ppca, data):
    model = ppca.model(exact_covariance=True)
    exact = ppca.log_px(data)
    with torch.no_grad():
        q = model.encode(data)
    # the encoder really is p(z|x) ...
    torch.testing.assert_close(q.loc.double(), (data.double() - ppca.b) @ ppca.A.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.covariance_matrix[0].double(), ppca.post_cov, rtol=1e-4, atol=1e-5)
    # ... so KL(q || p(z|x)) = 0 and the ELBO equals log p(x) (notes 001 eq. 7)
    elbo = ppca.elbo(data, q.loc.double(), q.covariance_matrix.double())
    torch.testing.assert_close(elbo, exact, rtol=1e-5, atol=1e-4)
    # every importance weight equals p(x): one sample is exact and the ESS is K
    est = importance_sampled_log_px(model, data, k=1)
    torch.testing.assert_close(est.per_example, exact, rtol=1e-5, atol=1e-3)
    est = importance_sampled_log_px(model, data, k=64, chunk_size=10)
    torch.testing.assert_close(est.per_example, exact, rtol=1e-5, atol=1e-3)
    assert abs(est.ess_mean - 64) < 1e-2
    # the model's single-sample ELBO is unbiased for it
    torch.manual_seed(0)
    with torch.no_grad():
        mc = torch.stack([model(data, StepContext(mc_samples=1)).metrics["elbo"].double() for _ in range(50)]).mean(0)
    se = float((mc - exact).std() / math.sqrt(len(mc)))
    assert abs(float((mc - exact).mean())) < 4 * se + 1e-4


def test_bounds_are_ordered_elbo_iwae_log_px(ppca, data):
    model = perturbed(ppca)
    exact = ppca.log_px(data)
    with torch.no_grad():
        q = model.encode(data)
    elbo = ppca.elbo(data, q.mean.double(), torch.diag_embed(q.variance.double()))
    iwae = {k: repeated_iwae(model, data, k, repeats=r, seed=k) for k, r in ((1, 40), (5, 40), (50, 20))}
    # E[IWAE_1] is the ELBO (with a Monte-Carlo KL): equal within MC error
    diff = iwae[1] - elbo
    assert abs(float(diff.mean())) < 4 * float(diff.std() / math.sqrt(len(diff)))
    # strictly increasing in K and below log p(x), each gap several standard errors wide
    assert_greater(iwae[5], iwae[1])
    assert_greater(iwae[50], iwae[5])
    assert_greater(exact, iwae[50])
    assert float(elbo.mean()) < float(exact.mean()) - 0.05  # the encoder is not the posterior


def test_importance_diagnostics_curve_flattens_toward_the_exact_log_px(ppca, data):
    model = perturbed(ppca)
    exact = float(ppca.log_px(data[:100]).mean())
    diagnostics = importance_diagnostics(model, data[:100], k=2000, seed=3)
    curve = diagnostics["curve"]
    assert [c["k"] for c in curve][:4] == [1, 2, 5, 10] and curve[-1]["k"] == 2000
    assert diagnostics["n_examples"] == 100 and diagnostics["ess"].shape == (100,)
    assert bool(((diagnostics["ess"] >= 1 - 1e-9) & (diagnostics["ess"] <= 2000 + 1e-6)).all())
    # K' = 1 is the ELBO estimate (below the exact value); the last point is within its MC error of the truth
    assert curve[0]["log_px"] < exact - 0.05
    assert abs(curve[-1]["log_px"] - exact) < 4 * curve[-1]["mc_stderr"] + 0.01
    # the shortfall shrinks as K grows (nested subsets of the same draws)
    gaps = [exact - c["log_px"] for c in curve]
    assert gaps[-1] < gaps[2] / 5 < gaps[0] / 5
    shown = diagnostics["shown"]
    assert [s["ess"] for s in shown] == sorted(s["ess"] for s in shown)  # lowest, median, highest
    assert all(float(s["log_w"].max()) == 0.0 and s["log_w"].shape == (2000,) for s in shown)


def test_importance_sampling_converges_to_exact_log_px(ppca, data):
    model = perturbed(ppca)
    exact = ppca.log_px(data)
    torch.manual_seed(2)
    small = importance_sampled_log_px(model, data, k=5)
    large = importance_sampled_log_px(model, data, k=5000)
    assert isinstance(large, LogLikelihoodEstimate) and large.per_example.dtype == F64
    assert large.k == 5000 and large.n_examples == 200
    err_small, err_large = small.mean - float(exact.mean()), large.mean - float(exact.mean())
    assert abs(err_large) < abs(err_small) / 20
    diff = large.per_example - exact  # Monte-Carlo error only
    assert abs(err_large) < 4 * float(diff.std() / math.sqrt(len(diff))) + 1e-3
    assert 1 < large.ess_mean < 5000 and small.ess_mean <= 5
    assert large.ess_min <= large.ess_mean
    assert large.sd_over_examples == pytest.approx(float(large.per_example.std()))
    assert set(large.to_dict()) == {"mean", "mc_stderr", "bias_estimate", "sd_over_examples", "stderr_over_examples",
                                    "ess_mean", "ess_min", "k", "n_examples"}


def test_mc_stderr_and_bias_match_repeated_estimates(ppca, data):
    """The reported Monte-Carlo s.e. is the spread of the mean estimate over repeated runs on the SAME examples
    (not the spread over examples), and the bias estimate matches the mean shortfall from the exact log p(x)."""
    model = perturbed(ppca)
    exact = float(ppca.log_px(data).mean())
    torch.manual_seed(8)
    runs = [importance_sampled_log_px(model, data, k=100) for _ in range(60)]
    means = torch.tensor([r.mean for r in runs], dtype=F64)
    empirical_se = float(means.std())
    reported_se = float(torch.tensor([r.mc_stderr for r in runs]).mean())
    # the sd of a sample sd over 60 runs is ~9%: a factor 1.35 either way is well outside chance
    assert empirical_se / 1.35 < reported_se < empirical_se * 1.35, (reported_se, empirical_se)
    assert reported_se < runs[0].stderr_over_examples / 5  # far smaller than the spread over examples
    bias = float(means.mean()) - exact
    reported_bias = float(torch.tensor([r.bias_estimate for r in runs]).mean())
    assert reported_bias < 0 and bias < 0
    bias_se = empirical_se / math.sqrt(len(runs))
    assert abs(bias - reported_bias) < 4 * bias_se + 0.3 * abs(reported_bias), (bias, reported_bias, bias_se)


def test_naive_prior_sampling_is_much_noisier_than_importance_sampling(ppca, data):
    model = perturbed(ppca)
    x = data[:20]
    repeats, k = 30, 100
    torch.manual_seed(3)
    naive = naive_log_px(model, x.repeat(repeats, 1), k=k).per_example.view(repeats, -1)
    is_ = importance_sampled_log_px(model, x.repeat(repeats, 1), k=k).per_example.view(repeats, -1)
    ratio = naive.std(0).mean() / is_.std(0).mean()
    assert ratio > 3, float(ratio)
    assert math.isnan(naive_log_px(model, x, k=5).ess_mean)
    assert naive_log_px(model, x, k=5).to_dict()["ess_mean"] is None  # strict JSON has no NaN
    # both estimate the same quantity: with many samples the naive estimate approaches log p(x) too
    torch.manual_seed(4)
    many = naive_log_px(model, x[:5], k=200_000, chunk_size=50_000)
    torch.testing.assert_close(many.per_example, ppca.log_px(x[:5]), rtol=0, atol=0.05)


def test_same_seed_and_single_chunk_reproduces_the_iwae_bound(ppca, data):
    model = perturbed(ppca)
    torch.manual_seed(5)
    with torch.no_grad():
        direct = iwae_bound(model.log_importance_weights(data, 300).double())
    torch.manual_seed(5)
    est = importance_sampled_log_px(model, data, k=300, batch_size=len(data), chunk_size=300)
    torch.testing.assert_close(est.per_example, direct, rtol=1e-10, atol=1e-6)


def test_chunk_and_batch_sizes_change_only_the_random_draws(ppca, data):
    model = perturbed(ppca)
    exact = float(ppca.log_px(data).mean())
    torch.manual_seed(6)
    a = importance_sampled_log_px(model, data, k=700, chunk_size=7, batch_size=13)
    b = importance_sampled_log_px(model, data, k=700, chunk_size=700, batch_size=200)
    diff = a.per_example - b.per_example
    assert abs(float(diff.mean())) < 4 * float(diff.std() / math.sqrt(len(diff))) + 1e-6
    assert abs(a.mean - exact) < 0.05 and abs(b.mean - exact) < 0.05


class CountingModel(nn.Module):
    """Deterministic log weights f(i, j) for example id i (= x[:, 0]) and its j-th requested sample.

    Whatever the chunking, example i must receive exactly f(i, 0..K-1), so the running logsumexp over chunks and
    batches can be compared with a direct computation. Offsets of -400 i make exp underflow in float64.
    """

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.served: dict[int, int] = {}

    @staticmethod
    def f(i, j):
        return -400.0 * i + 3.0 * torch.sin(1.7 * j + i) + 0.01 * j

    def importance_samples(self, batch, k):
        columns = []
        for i in batch.x[:, 0].long().tolist():
            start = self.served.get(i, 0)
            self.served[i] = start + k
            columns.append(self.f(i, torch.arange(start, start + k, dtype=F64)))
        return None, torch.stack(columns, 1)  # [k, B]


@pytest.mark.parametrize("batch_size,chunk_size", [(1, 1), (3, 7), (10, 50), (4, 50), (10, 13), (None, None)])
def test_running_logsumexp_over_chunks_is_exact(batch_size, chunk_size):
    n, k = 10, 50
    x = torch.arange(n, dtype=torch.float32)[:, None]
    model = CountingModel()
    est = importance_sampled_log_px(model, x, k=k, batch_size=batch_size, chunk_size=chunk_size)
    assert all(count == k for count in model.served.values()) and len(model.served) == n
    log_w = CountingModel.f(torch.arange(n, dtype=F64)[None, :], torch.arange(k, dtype=F64)[:, None]).numpy()
    shifted = np.exp(log_w - log_w.max(0))  # NumPy reference, shifted by hand
    expected = log_w.max(0) + np.log(shifted.mean(0))
    ess = shifted.sum(0) ** 2 / (shifted**2).sum(0)
    np.testing.assert_allclose(est.per_example.numpy(), expected, rtol=1e-12)
    assert est.ess_mean == pytest.approx(ess.mean(), rel=1e-10)


def test_plan_chunks_respects_the_memory_budget():
    batch, chunk = plan_chunks(10_000, 5000, 784, block_bytes=64 * 2**20)
    assert chunk == 5000 and batch * chunk * 784 * 4 <= 64 * 2**20 and batch >= 1
    batch, chunk = plan_chunks(10_000, 10**6, 784, block_bytes=64 * 2**20)
    assert batch == 1 and chunk * 784 * 4 <= 64 * 2**20
    assert plan_chunks(3, 5, 784) == (3, 5)
    assert plan_chunks(100, 5000, 784, batch_size=2, chunk_size=9) == (2, 9)


def test_active_units_and_kl_per_dimension(ppca, data):
    model = perturbed(ppca)
    count, variance = active_units(model, data)
    assert count == 2 and variance.shape == (2,)
    with torch.no_grad():
        model.encoder.loc.weight[1].zero_()  # latent 1 ignores x: its posterior mean is constant
    count, variance = active_units(model, data, batch_size=37)
    means = ((data.double() - ppca.b) @ ppca.A.T).numpy()
    assert count == 1 and float(variance[1]) == 0.0
    assert float(variance[0]) == pytest.approx(np.var(means[:, 0], ddof=1), rel=1e-4)
    assert active_units(model, data, threshold=float(variance[0]) + 1)[0] == 0

    kl = kl_per_dimension(model, data, batch_size=64)
    with torch.no_grad():
        q = model.encode(data)
    mu, var = q.mean.double(), q.variance.double()
    per_dim = 0.5 * (mu**2 + var - var.log() - 1)  # notes 001 eq. 37, one term per dimension
    torch.testing.assert_close(kl, per_dim.mean(0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        mean_kl = model(data).metrics["kl"].double().mean()
    torch.testing.assert_close(kl.sum(), mean_kl, rtol=1e-5, atol=1e-5)


def test_kl_per_dimension_uses_marginals_of_a_full_covariance_encoder(ppca, data):
    model = ppca.model(exact_covariance=True)
    kl = kl_per_dimension(model, data)
    with torch.no_grad():
        q = model.encode(data)
    mu, var = q.mean.double(), q.covariance_matrix.double().diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(kl, (0.5 * (mu**2 + var - var.log() - 1)).mean(0), rtol=1e-5, atol=1e-6)


def test_evaluate_model_reports_documented_keys_reproducibly(ppca, data):
    model = ppca.model(exact_covariance=True)
    state = torch.get_rng_state()
    result = evaluate_model(model, ArrayData(data), k=20, naive_k=10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    json.dumps(result, allow_nan=False)
    assert {"log_px", "log_px_naive", "elbo", "active_units", "latent_dim", "kl_per_dim", "n_examples"} <= set(result)
    assert result["n_examples"] == 200 and result["latent_dim"] == 2 and result["active_units"] == 2
    exact = float(ppca.log_px(data).mean())
    assert result["log_px"]["k"] == 20 and result["log_px"]["mean"] == pytest.approx(exact, abs=1e-3)
    assert result["log_px_naive"]["k"] == 10
    assert abs(result["elbo"] - exact) < 0.5  # single-sample ELBO of the exact posterior, unbiased for log p(x)
    assert len(result["kl_per_dim"]) == 2
    assert evaluate_model(model, ArrayData(data), k=20, naive_k=10, seed=3) == result
    assert "log_px_naive" not in evaluate_model(model, ArrayData(data), k=5, seed=3)


def test_evaluate_model_draws_one_binarisation_with_the_seed():
    class Recording(ArrayData):
        def batch(self, index, generator=None):
            self.calls = getattr(self, "calls", 0) + 1
            return Batch(torch.bernoulli(self.x[index], generator=generator))

    torch.manual_seed(0)
    model = build_model("vae", ModelConfig(input_dim=6, latent_dim=2, hidden=(8,)))
    data = Recording(torch.rand(30, 6))
    first = evaluate_model(model, data, k=10, seed=1)
    assert data.calls == 1
    assert evaluate_model(model, data, k=10, seed=1) == first
    assert evaluate_model(model, data, k=10, seed=2)["log_px"]["mean"] != first["log_px"]["mean"]


def test_autoencoder_and_bad_input_raise_one_clear_error(ppca, data):
    config = AutoencoderConfig(input_dim=D, latent_dim=2, hidden=(8,), likelihood="gaussian")
    autoencoder = build_model("autoencoder", config)
    with pytest.raises(ElbolabError, match="autoencoder has no likelihood"):
        evaluate_model(autoencoder, ArrayData(data), k=5)
    with pytest.raises(ElbolabError, match="autoencoder has no likelihood"):
        importance_sampled_log_px(autoencoder, data, k=5)
    model = perturbed(ppca)
    with pytest.raises(ElbolabError, match=r"expected x of shape \[N, 5\]"):
        importance_sampled_log_px(model, data[:, :3], k=5)
    with pytest.raises(ElbolabError, match="k to be a positive integer"):
        importance_sampled_log_px(model, data, k=0)
    with pytest.raises(ElbolabError, match="chunk_size"):
        naive_log_px(model, data, k=5, chunk_size=-1)
    with pytest.raises(ElbolabError, match="torch.Tensor"):
        active_units(model, data.numpy())
    with pytest.raises(ElbolabError, match="expected finite x"):
        importance_sampled_log_px(model, torch.full((2, D), float("nan")), k=3)
    broken = CountingModel()
    broken.f = lambda i, j: torch.full_like(j, float("nan"))
    with pytest.raises(ElbolabError, match="NaN log weights"):
        importance_sampled_log_px(broken, torch.zeros(2, 1), k=3)


def test_vae_loss_gradient_is_the_reparameterised_gradient_of_the_closed_form_elbo(ppca, data):
    """On pPCA, E_q log p(x|z) and the KL have closed forms (PPCA.elbo), so the exact gradient of the ELBO with
    respect to every encoder parameter is known. VAE.loss with L Monte-Carlo samples must give it on average: a loss
    that drew z without the reparameterisation (q.sample) would give the reconstruction term no gradient."""
    model = perturbed(ppca)
    x = data[:40]
    params = list(model.encoder.parameters())
    q = model.encode(x)
    closed = -ppca.elbo(x, q.mean.double(), torch.diag_embed(q.variance.double())).mean()
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(closed, params)])
    estimates = []
    torch.manual_seed(9)
    for _ in range(20):
        loss = model(x, StepContext(mc_samples=200)).loss
        estimates.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    estimates = torch.stack(estimates)  # [repeats, parameters]
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert exact.abs().max() > 0.1  # the target is not trivially zero
    assert ((mean - exact).abs() <= 5 * se + 1e-4).all(), float(((mean - exact).abs() / (se + 1e-12)).max())


def test_compiled_importance_sampling_matches_eager_and_the_exact_log_px(ppca, data):
    import torch._inductor.config as inductor_config

    model = perturbed(ppca)
    torch.manual_seed(5)
    eager = importance_sampled_log_px(model, data, k=2000, batch_size=64)
    torch.manual_seed(5)
    # inductor draws what eager draws; config.patch, not monkeypatch: undoing a monkeypatch deletes the option from
    # torch's config module, and every later compilation in the process fails
    with warnings.catch_warnings(), inductor_config.patch(fallback_random=True):
        warnings.simplefilter("ignore", UserWarning)  # a machine without a C++ compiler: checked below instead
        compiled = importance_sampled_log_px(model, data, k=2000, batch_size=64, compile=True)  # last batch: 8
    assert torch.allclose(compiled.per_example, eager.per_example, atol=1e-4, rtol=0)
    diff = compiled.per_example - ppca.log_px(data)  # Monte-Carlo error only
    assert abs(float(diff.mean())) < 4 * float(diff.std() / math.sqrt(len(diff))) + 1e-3
    if compiled.compile_fallback is not None:
        pytest.skip(f"torch.compile is unavailable here ({compiled.compile_fallback}); the fallback matched eager")


def test_compile_failure_falls_back_to_the_eager_estimate(ppca, data, compile_fails):
    model = perturbed(ppca)
    torch.manual_seed(6)
    eager = importance_sampled_log_px(model, data, k=50)
    torch.manual_seed(6)
    with pytest.warns(UserWarning, match="torch.compile failed .*InvalidCxxCompiler.*evaluating without it"):
        fallen = importance_sampled_log_px(model, data, k=50, compile=True)
    assert torch.equal(fallen.per_example, eager.per_example)
    assert "InvalidCxxCompiler" in fallen.compile_fallback
    with pytest.warns(UserWarning):
        result = evaluate_model(model, ArrayData(data), k=5, seed=3, compile=True)
    assert result["compiled"] is False and "InvalidCxxCompiler" in result["compile_fallback"]
    assert evaluate_model(model, ArrayData(data), k=5, seed=3)["compiled"] is False


def test_eval_with_ais_and_bdmc_writes_the_sandwich_into_the_record(tmp_path):
    from elbolab import pipeline
    from elbolab.records import Evaluation

    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=2, hidden=(32,), latent_dim=2,
                         binarize="dynamic", progress=False, tensorboard=False, figures=False)
    result = pipeline.evaluate(run, k=1000, limit=12, ais_steps=40, ais_chains=6, ais_examples=12, bdmc_examples=6,
                               refresh_report=False)
    ais, sandwich = result["log_px_ais"], result["bdmc"]
    assert ais["n_examples"] == 12 and ais["steps"] == 40 and 0.2 < ais["acceptance"] < 1.0
    # the same 12 examples: AIS (a stochastic lower bound) agrees with IS at K = 1000 on a 2-d latent
    assert abs(ais["mean"] - result["log_px"]["mean"]) < 3 * (ais["mc_stderr"] + result["log_px"]["mc_stderr"]) + 0.3
    assert sandwich["lower"] <= sandwich["upper"] + 0.05 and sandwich["gap"] < 2.0
    ev = Evaluation.from_dict(json.loads(Path(result["saved_to"]).read_text()))
    assert ev.log_px_ais["mean"] == ais["mean"] and ev.bdmc["gap"] == sandwich["gap"] and not ev.other


def test_the_estimate_warns_when_k_is_too_small_and_not_when_it_is_enough(ppca, data):
    from elbolab.estimators import k_warning

    torch.manual_seed(0)
    small = importance_sampled_log_px(perturbed(ppca), data[:200], k=5)  # still rising, ESS near 2
    warning = k_warning(small)
    assert warning is not None and "still rises" in warning and "median effective sample size" in warning
    torch.manual_seed(0)
    exact = importance_sampled_log_px(ppca.model(), data[:200], k=50)  # the exact posterior: constant weights
    assert k_warning(exact) is None
    # the curve is the headline's own: its last point is the estimate itself
    assert small.curve[-1]["k"] == 5 and small.curve[-1]["log_px"] == pytest.approx(small.mean)


def test_sticking_the_landing_has_zero_encoder_gradient_at_the_exact_posterior(ppca, data):
    # Roeder et al. 2017: with q = p(z|x) the path derivative of log p(x, z) - log q(z) is zero for every draw,
    # while the usual estimator's encoder gradient is zero only on average
    model = ppca.model(exact_covariance=True)
    encoder = list(model.encoder.parameters())
    batch = Batch(data[:16])

    def encoder_gradient(loss_fn, seed):
        torch.manual_seed(seed)
        model.zero_grad()
        loss_fn(batch, StepContext(mc_samples=1)).loss.backward()
        return torch.cat([p.grad.flatten() for p in encoder if p.grad is not None])

    stl = torch.stack([encoder_gradient(model.sticking_the_landing_loss, s) for s in range(5)])
    plain = torch.stack([encoder_gradient(lambda b, c: type(model).loss(model, b, c), s) for s in range(5)])
    assert stl.abs().max() < 1e-4
    assert plain.std(0).max() > 1e-2


def test_quick_budget_keeps_everything_that_fits_and_shrinks_what_does_not():
    from elbolab.evaluate import quick_budget_examples

    assert quick_budget_examples(10_000, 100.0, target_seconds=60) == 10_000  # within twice the target
    sizes = [quick_budget_examples(10_000, s, target_seconds=60, minimum=500) for s in (121, 300, 600, 2_400, 1e6)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < 10_000
    assert sizes[1] == 2_000 and sizes[2] == 1_000  # 60 s of a 300 s / 600 s run, in hundreds
    assert sizes[-1] == 500  # never below the minimum
    assert quick_budget_examples(300, 1e6, minimum=500) == 300  # nor above the split
    with pytest.raises(ElbolabError):
        quick_budget_examples(0, 10.0)


def test_estimated_seconds_scale_the_timed_block_by_examples_and_samples(monkeypatch):
    import time

    from elbolab.data.core import TensorData
    from elbolab.evaluate import estimated_log_px_seconds

    torch.manual_seed(0)
    model = build_model("vae", ModelConfig(input_dim=16, latent_dim=2, hidden=(8,)))
    data = TensorData(torch.rand(64, 16).round(), None, None, "none", "tiny")
    ticks = iter(float(t) for t in range(100))
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))  # every timed block takes 1 s
    # 2 examples x 1,000 samples timed; 64 examples x 6,400 samples is 32 x 6.4 times that
    assert estimated_log_px_seconds(model, data, 6_400) == pytest.approx(204.8)
    assert estimated_log_px_seconds(model, data.head(1), 16) == pytest.approx(1.0)  # 1 x 16 timed as they are


def test_the_default_budget_scores_the_first_examples_that_fit_and_says_so(tmp_path, monkeypatch, capsys):
    from elbolab import pipeline
    from elbolab.cli import main

    run = pipeline.train("vae", "digits", out=tmp_path / "run", epochs=1, latent_dim=2, hidden=(8,), train_size=64,
                         progress=False, tensorboard=False, figures=False)
    from elbolab.loading import load_run_data

    split_size = len(load_run_data(json.loads((run / "config.json").read_text())["data"]).test)
    # 6 s per example: the whole split "would take" half an hour; the budget keeps what fits a minute (>= 100 here)
    monkeypatch.setattr(pipeline, "estimated_log_px_seconds", lambda model, data, k: 6.0 * len(data))
    monkeypatch.setattr(pipeline, "quick_budget_examples",
                        lambda n, seconds: evaluate_module.quick_budget_examples(n, seconds, minimum=100))
    assert main(["eval", str(run), "--iw-samples", "3"]) == 0
    out = capsys.readouterr().out
    record = json.loads((run / "eval.json").read_text())
    assert record["limit"] == record["log_px"]["n_examples"] == 100 and record["limit_reason"] == "budget"
    assert record["split_size"] == split_size
    assert "the default budget scores the first 100" in out and f"100 examples of {split_size}" in out
    assert "(the default budget; eval --full scores all)" in (run / "index.html").read_text()
    assert main(["eval", str(run), "--iw-samples", "3", "--full"]) == 0  # the papers' protocol: everything
    record = json.loads((run / "eval.json").read_text())
    assert record.get("limit") is None and record["log_px"]["n_examples"] == split_size
    assert main(["eval", str(run), "--iw-samples", "3", "--limit", "20"]) == 0  # asked for: no budget on top
    record = json.loads((run / "eval.json").read_text())
    assert record["limit"] == 20 and record["limit_reason"] == "--limit"
    capsys.readouterr()
    assert main(["eval", str(run), "--full", "--limit", "20"]) != 0
    assert "give one of the two" in capsys.readouterr().err
