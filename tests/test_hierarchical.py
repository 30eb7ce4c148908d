"""Hierarchical VAEs (hvae, ladder-vae): per-layer KL, importance-sampled log p(x) against an exact linear-Gaussian
marginal, the precision-weighted q, training and per-layer active units, config errors."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from elbolab import pipeline
from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.estimators import importance_sampled_log_px
from elbolab.models import get_model_class
from elbolab.networks import precision_weighted_merge
from elbolab.objectives import effective_sample_size
from elbolab.schedules import StepContext

NAMES = ("hvae", "ladder-vae")


def build(name, **options):
    cls = get_model_class(name)
    options = {"input_dim": 12, "latent_dims": (5, 3), "hidden": (16,), "batch_norm": False, **options}
    torch.manual_seed(0)
    return cls(cls.config_class(**options)).eval()


def binary_x(n=6, d=12):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(1)) > 0.5).float()


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_layer_kl_matches_monte_carlo(name):
    """Each closed-form layer KL equals E_q[log q(z_l|.) - log p(z_l|z_{l+1})] estimated by many draws of z_l with
    the same parent (the ladder: every layer; the hvae: the top layer, the only closed-form one)."""
    model, x = build(name), binary_x()
    with torch.no_grad():
        zs, qs, ps = model.joint(Batch(x), 1, reparameterize=False)
        layers = range(len(zs)) if name == "ladder-vae" else [len(zs) - 1]
        for i in layers:
            closed = model.layer_kl(i, zs, qs, ps)[0].sum(-1)  # [B]
            draws = qs[i].sample((20000,))  # [S, 1, B, d]: the same parent z_{i+1}
            mc = (qs[i].log_prob(draws) - ps[i].log_prob(draws)).mean(0)[0]  # [B]
            assert torch.allclose(closed, mc, atol=0.05 + 0.02 * closed.abs().max()), (i, closed, mc)


@pytest.mark.parametrize("name", NAMES)
def test_kl_terms_sum_to_the_elbo_kl(name):
    """The per-layer diagnostics add up to the KL part of the ELBO (averaged over draws): ELBO = recon - sum."""
    model, x, draws = build(name), binary_x(4), 4000
    torch.manual_seed(2)
    with torch.no_grad():
        terms = model.kl_terms(x.repeat(draws, 1))  # one joint draw per row: [draws * B, d_l]
        per_layer = [terms[f"z{i + 1}"].sum(-1).reshape(draws, 4).mean(0) for i in range(2)]  # [B]
        z, log_w = model.importance_samples(x, draws)
        kl = (model.decode(z).log_prob(x) - log_w).mean(0)  # E_q[log q - log p(z)]  [B]
    assert torch.allclose(per_layer[0] + per_layer[1], kl, atol=0.15), (per_layer, kl)


@pytest.mark.parametrize("name", NAMES)
def test_importance_sampled_log_px_exceeds_the_elbo(name):
    model, x = build(name), binary_x(20)
    torch.manual_seed(3)
    with torch.no_grad():
        elbo = model(x, StepContext(mc_samples=200)).metrics["elbo"]  # [B]
        log_px = importance_sampled_log_px(model, x, k=500).per_example
    assert torch.isfinite(elbo).all() and torch.isfinite(log_px).all()
    assert log_px.mean() > elbo.mean() + 0.1  # an untrained q is far from the posterior


def test_ladder_q_is_the_precision_weighted_merge():
    """q(z_1|z_2, x) of the ladder is the merge of the bottom-up estimate and p(z_1|z_2), not either alone."""
    model, x = build("ladder-vae"), binary_x(4)
    with torch.no_grad():
        zs, qs, ps = model.joint(Batch(x), 3, reparameterize=False)
        mu_hat, var_hat = model.bottom_up(x)[0]  # [B, d_1]
        _, mu_p, var_p = model.top_down[0](zs[1])  # [3, B, d_1]
        mu, var = precision_weighted_merge(mu_hat, var_hat, mu_p, var_p)
        assert torch.allclose(qs[0].mean, mu) and torch.allclose(qs[0].variance, var)
        assert (qs[0].variance < torch.minimum(var_hat, var_p)).all()  # a product of Gaussians is narrower
        top_mu, top_var = model.bottom_up(x)[1]
        assert torch.allclose(qs[1].mean, top_mu) and torch.allclose(qs[1].variance, top_var)  # q(z_L|x)


def fit_inference(model, x, steps=150):
    """Adam on the inference network only (the ELBO of ``x``), the generative model left as it is."""
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=0.05)
    torch.manual_seed(7)
    for _ in range(steps):
        loss = model(x, StepContext(mc_samples=8)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_log_px_of_a_linear_gaussian_hierarchy_is_exact(name):
    """depth 0 and constant variances make every layer linear-Gaussian: z_2 ~ N(0, I), z_1 = A z_2 + a + noise,
    x = B z_1 + b + sigma noise, so p(x) = N(B a + b, B (A A^T + V) B^T + sigma^2 I) exactly. With q fitted to
    these examples (the generative model fixed), the importance-sampled estimate (K = 10000) must agree with it."""
    model = build(name, depth=0, likelihood="gaussian", sigma=0.7, input_dim=6, latent_dims=(3, 2))
    with torch.no_grad():
        head = model.top_down[0]
        head.raw_var.weight.zero_()  # var_p(z_2) = softplus(bias): constant
        head.loc.weight.mul_(2.0)  # a clearly correlated marginal
        A, a = head.loc.weight.double(), head.loc.bias.double()
        V = torch.diag(model.conditional_priors([torch.zeros(3), torch.zeros(2)])[0].variance.double())
        B, b = model.decoder[1].weight.double(), model.decoder[1].bias.double()
        cov = B @ (A @ A.T + V) @ B.T + 0.49 * torch.eye(6, dtype=torch.float64)
        marginal = MultivariateNormal(B @ a + b, cov)
        torch.manual_seed(4)
        x = marginal.sample((8,)).float()  # typical data of this model
        exact = marginal.log_prob(x.double())  # [8]
    fit_inference(model, x)
    torch.manual_seed(5)
    with torch.no_grad():
        log_w = model.importance_samples(x, 10000)[1].double()  # [K, B]
    estimate = torch.logsumexp(log_w, 0) - math.log(10000)  # [B]
    stderr = (effective_sample_size(log_w).reciprocal() - 1 / 10000).sqrt()  # delta method, per example
    assert (stderr < 0.1).all()  # a usable proposal, so the comparison below is sharp
    assert ((estimate - exact).abs() < 4 * stderr + 0.01).all(), (estimate, exact, stderr)
    assert (exact.max() - exact.min()) > 1.0  # the examples really differ


@pytest.mark.parametrize("name", NAMES)
def test_prior_draws_top_down_and_scores_the_joint(name):
    model = build(name)
    torch.manual_seed(6)
    with torch.no_grad():
        z = model.prior().sample((4000,))  # [S, 8]
        z1, z2 = model.split(z)
        assert z2.mean(0).abs().max() < 0.1 and (z2.var(0) - 1).abs().max() < 0.1  # p(z_L) = N(0, I)
        p1 = model.conditional_priors([z1, z2])[0]  # z_1 | z_2 follows p(z_1|z_2): its standardised draws are N(0,1)
        eps = (z1 - p1.mean) / p1.stddev
        assert eps.mean().abs() < 0.05 and (eps.var() - 1).abs() < 0.05
        assert torch.allclose(model.prior().log_prob(z), p1.log_prob(z1) + model.top_prior().log_prob(z2))


@pytest.mark.parametrize("name", NAMES)
def test_training_on_digits_and_active_units_per_layer(name, tmp_path):
    figures = name == "ladder-vae"  # the figures code is shared; drawing them once keeps the test short
    run = pipeline.train(name, "digits", out=tmp_path / name, epochs=2, train_size=200, latent_dims=(8, 4),
                         hidden=(64, 32), batch_norm=True, kl_warmup_epochs=1, progress=False, tensorboard=False,
                         figures=figures)
    result = pipeline.evaluate(run, k=20, limit=100, refresh_report=False)
    assert set(result["active_units_per_group"]) == {"z1", "z2"}
    assert result["latent_dim"] == 12 and result["log_px"]["mean"] > result["elbo"] - 0.5
    assert math.isfinite(result["log_px"]["mean"]) and set(result["kl_per_group"]) == {"z1", "z2"}
    if figures:
        assert {"samples.png", "reconstructions.png"} <= {p.name for p in (run / "figures").glob("*.png")}


@pytest.mark.parametrize("options, message", [
    ({"latent_dims": ()}, "latent_dims"),
    ({"latent_dims": (4, 0)}, "latent_dims"),
    ({"hidden": (16, 16, 16)}, "one hidden width per stochastic layer"),
    ({"latent_dim": 7}, "latent_dim = sum(latent_dims) = 8"),
    ({"depth": -1}, "depth >= 0"),
    ({"architecture": "conv", "image_shape": (1, 4, 3)}, "--arch mlp"),
    ({"encoder_covariance": "full"}, "--arch mlp"),
])
@pytest.mark.parametrize("name", NAMES)
def test_bad_configs_are_refused_clearly(name, options, message):
    cls = get_model_class(name)
    with pytest.raises(ElbolabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls.config_class(**{"input_dim": 12, "latent_dims": (5, 3), "hidden": (16,), **options})


def test_latent_dim_is_derived_or_checked():
    cls = get_model_class("ladder-vae").config_class
    assert cls(input_dim=12, latent_dims=(5, 3), hidden=(16,)).latent_dim == 8  # the base default 20 is replaced
    assert cls(input_dim=12, latent_dims=(5, 3), hidden=(16,), latent_dim=8).latent_dim == 8
    assert cls().latent_dims == (64, 32, 16, 8, 4) and cls().latent_dim == 124  # the paper's MNIST model


def test_stop_q_grad_and_a_single_q_are_refused():
    with pytest.raises(ElbolabError, match="stop_q_grad"):
        build("hvae").importance_samples(binary_x(), 2, stop_q_grad=True)
    with pytest.raises(ElbolabError, match="not one distribution"):
        build("ladder-vae").encode(binary_x())


def test_hiwae_bound_rises_with_k_toward_the_exact_log_px_and_trains():
    """hiwae's training objective is L_k over joint draws of the hierarchy: on a linear-Gaussian hierarchy with an
    exact marginal, the mean L_1 < L_5 < L_50 <= log p(x) (Burda et al. eq. 8), L_1 is the single-draw ELBO, and
    the bound trains every parameter through the reparameterised draws."""
    model = build("hiwae", depth=0, likelihood="gaussian", sigma=0.7, input_dim=6, latent_dims=(3, 2), k=1)
    with torch.no_grad():
        head = model.top_down[0]
        head.raw_var.weight.zero_()
        A, a = head.loc.weight.double(), head.loc.bias.double()
        V = torch.diag(model.conditional_priors([torch.zeros(3), torch.zeros(2)])[0].variance.double())
        B, b = model.decoder[1].weight.double(), model.decoder[1].bias.double()
        marginal = MultivariateNormal(B @ a + b, B @ (A @ A.T + V) @ B.T + 0.49 * torch.eye(6, dtype=torch.float64))
        torch.manual_seed(4)
        x = marginal.sample((64,)).float()
        exact = marginal.log_prob(x.double()).mean()
    bounds = {}
    for k in (1, 5, 50):
        object.__setattr__(model.config, "k", k)
        torch.manual_seed(6)
        with torch.no_grad():
            bounds[k] = torch.stack([-model.loss(Batch(x), StepContext()).losses["model"] for _ in range(40)]).mean()
    assert bounds[1] < bounds[5] < bounds[50] <= exact + 0.05, (bounds, exact)
    assert bounds[50] - bounds[1] > 0.1  # the rise is real, not noise
    object.__setattr__(model.config, "k", 5)
    model.loss(Batch(x), StepContext()).losses["model"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_hiwae_trains_on_digits_and_refuses_a_bad_k(tmp_path):
    run = pipeline.train("hiwae", "digits", out=tmp_path / "h", epochs=2, latent_dims=(4, 2), hidden=(16,), k=3,
                         binarize="dynamic", progress=False, tensorboard=False, figures=False)
    result = pipeline.evaluate(run, k=20, refresh_report=False)
    assert result["log_px"]["mean"] > result["elbo"]
    with pytest.raises(ElbolabError, match="k >= 1"):
        build("hiwae", k=0)
