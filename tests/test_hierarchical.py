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
from elbolab.evaluate import active_units_per_group
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


# ----- ladder-iwae: the ladder's hierarchy and top-down q trained on L_k (Sønderby et al. 2016, table 1) -----
def ladder_iwae_bounds(model, x, k, repeats):
    """The training bound L_k of each example from the model's own loss, ``repeats`` independent draws of the k
    importance samples: ``[repeats, B]``."""
    object.__setattr__(model.config, "k", k)
    with torch.no_grad():
        bound = model.loss(Batch(x.repeat(repeats, 1)), StepContext()).metrics["iwae_bound"]  # [repeats * B]
    return bound.reshape(repeats, len(x)).double()


def test_ladder_iwae_l1_is_the_ladder_elbo_and_l_k_rises_below_log_px():
    """Same weights in ladder-iwae and ladder-vae: L_1 is the ladder's ELBO in expectation (its KLs in closed form,
    L_1's one-draw estimates: the same expectation), and the mean L_1 < L_5 < L_50 <= log p(x) (Burda et al.
    eq. 8, Theorem 1), log p(x) by importance sampling with K = 20000."""
    model, x = build("ladder-iwae"), binary_x(6)
    vae = build("ladder-vae")
    vae.load_state_dict(model.state_dict())
    torch.manual_seed(11)
    l1 = ladder_iwae_bounds(model, x, 1, 20000)  # [R, B]
    with torch.no_grad():
        elbo = torch.stack([vae(x, StepContext(mc_samples=500)).metrics["elbo"] for _ in range(40)]).double()
    se = (l1.var(0) / len(l1) + elbo.var(0) / len(elbo)).sqrt()  # [B]
    assert (se < 0.05).all()  # sharp enough to see a wrong weight
    assert ((l1.mean(0) - elbo.mean(0)).abs() < 4 * se).all(), (l1.mean(0), elbo.mean(0), se)
    means, ses = {}, {}
    for k, repeats in ((1, 4000), (5, 1000), (50, 200)):
        bounds = ladder_iwae_bounds(model, x, k, repeats).mean(1)  # [R]: the mean over the examples
        means[k], ses[k] = bounds.mean(), bounds.std() / math.sqrt(repeats)
    with torch.no_grad():
        log_w = model.importance_samples(x, 20000)[1].double()  # [K, B]
    log_px = (torch.logsumexp(log_w, 0) - math.log(20000)).mean()
    assert means[1] + 4 * ses[1] < means[5] - 4 * ses[5], (means, ses)
    assert means[5] + 4 * ses[5] < means[50] - 4 * ses[50], (means, ses)
    assert means[50] < log_px + 4 * ses[50] + 0.02, (means, log_px)
    assert log_px - means[1] > 0.5  # an untrained q: the bounds have room to rise


def linear_gaussian_ladder(posterior_q: bool):
    """ladder-iwae on a linear-Gaussian hierarchy (depth 0, constant variances, float64): z_2 ~ N(0, 1) (1-d),
    z_1 = A z_2 + a + N(0, V) (2-d), x = B z_1 + b + N(0, sigma^2 I) (5-d), B with orthogonal columns. The exact
    marginal is p(x) = N(B a + b, B (A A^T + V) B^T + sigma^2 I). With ``posterior_q`` the bottom-up estimates are
    set so that q(z|x) IS the exact posterior: var_hat_1, mu_hat_1 the Gaussian factor of p(x|z_1) in z_1 (diagonal
    because B^T B is), merged with p(z_1|z_2) into p(z_1|z_2, x); q(z_2|x) = p(z_2|x), 1-d. Returns (model, p(x))."""
    model = build("ladder-iwae", depth=0, likelihood="gaussian", sigma=0.7, input_dim=5, latent_dims=(2, 1))
    model.double()
    gen = torch.Generator().manual_seed(3)

    def raw(var):  # the softplus pre-image of a variance (softplus(raw) + MIN_VAR = var)
        return torch.log(torch.expm1(var - 1e-6))

    s2 = 0.49
    A, a = torch.tensor([[1.5], [-1.0]], dtype=torch.float64), torch.tensor([0.3, -0.2], dtype=torch.float64)
    V = torch.tensor([0.5, 0.8], dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(5, 2, generator=gen, dtype=torch.float64))[0]
    scale = torch.tensor([1.5, 0.8], dtype=torch.float64)
    B, b = Q * scale, torch.randn(5, generator=gen, dtype=torch.float64)  # B^T B = diag(scale^2)
    with torch.no_grad():
        prior_head, decoder_out = model.top_down[0], model.decoder[1]
        prior_head.loc.weight.copy_(A), prior_head.loc.bias.copy_(a)
        prior_head.raw_var.weight.zero_(), prior_head.raw_var.bias.copy_(raw(V))
        decoder_out.weight.copy_(B), decoder_out.bias.copy_(b)
        if posterior_q:
            low, top = model.encoder  # d_1 = d_2 = x at depth 0
            W1 = (B / scale ** 2).T  # [2, 5]: the factor N(z_1; W1 (x - b), sigma^2 / scale^2)
            low.loc.weight.copy_(W1), low.loc.bias.copy_(-W1 @ b)
            low.raw_var.weight.zero_(), low.raw_var.bias.copy_(raw(s2 / scale ** 2))
            C = B @ torch.diag(V) @ B.T + s2 * torch.eye(5, dtype=torch.float64)  # Cov(x | z_2)
            BA = (B @ A)[:, 0]  # [5]
            post_var = 1 / (1 + BA @ torch.linalg.solve(C, BA))  # Var(z_2 | x)
            w2 = post_var * torch.linalg.solve(C, BA)  # E[z_2 | x] = w2 . (x - B a - b)
            top.loc.weight.copy_(w2[None]), top.loc.bias.copy_((-w2 @ (B @ a + b))[None])
            top.raw_var.weight.zero_(), top.raw_var.bias.copy_(raw(post_var[None]))
    marginal = MultivariateNormal(B @ a + b, B @ (A @ A.T + torch.diag(V)) @ B.T + s2 * torch.eye(5,
                                                                                                dtype=torch.float64))
    return model, marginal


def test_ladder_weights_are_constant_when_q_is_the_exact_posterior():
    """When q(z|x) is the exact posterior, every importance weight equals p(x) exactly: log w_i = log p(x) for all
    i (zero-variance importance sampling). Each term of the ladder's log w (p(x|z_1), p(z_1|z_2), p(z_2), the merged
    q(z_1|z_2, x), q(z_2|x)) must be right for this to hold; a missing or wrongly-parented term leaves a spread."""
    model, marginal = linear_gaussian_ladder(posterior_q=True)
    torch.manual_seed(8)
    x = marginal.sample((10,))  # [B, 5]
    with torch.no_grad():
        z, log_w = model.importance_samples(x, 200)  # [K, B, 3], [K, B]
    assert z.std(0).min() > 0.05  # the draws really differ
    assert (log_w - marginal.log_prob(x)).abs().max() < 1e-8, (log_w - marginal.log_prob(x)).abs().max()
    assert torch.allclose(model.loss(Batch(x), StepContext()).metrics["iwae_bound"], marginal.log_prob(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ladder_is_estimate_converges_to_the_exact_log_px_for_any_q(seed):
    """Importance sampling is consistent for any proposal with finite-variance weights: with the ladder's q at
    random parameters (the exact posterior's bottom-up means moved, its variances widened 1.5-2.5x), the estimate
    with K = 20000 agrees with the closed-form log p(x) within its Monte-Carlo error (~0.01 nats, so a wrong term
    in log w shows), while L_1 (the ELBO) stays clearly below it."""
    model, marginal = linear_gaussian_ladder(posterior_q=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for head in model.encoder:
            head.loc.weight.add_(0.05 * torch.randn_like(head.loc.weight))
            head.loc.bias.add_(0.3 * torch.randn_like(head.loc.bias))
            var = torch.nn.functional.softplus(head.raw_var.bias) * (1.5 + torch.rand_like(head.raw_var.bias))
            head.raw_var.bias.copy_(torch.log(torch.expm1(var)))
        x = marginal.sample((8,))
        log_w = model.importance_samples(x, 20000)[1]  # [K, B]
    exact = marginal.log_prob(x)  # [B]
    estimate = torch.logsumexp(log_w, 0) - math.log(20000)
    stderr = (effective_sample_size(log_w).reciprocal() - 1 / 20000).sqrt()  # delta method, per example
    assert (stderr < 0.05).all()
    assert ((estimate - exact).abs() < 4 * stderr + 1e-3).all(), (estimate, exact, stderr)
    assert (exact - log_w.mean(0)).mean() > 0.1  # q is not the posterior: the ELBO gap is real


def test_ladder_iwae_trains_every_parameter_and_checks_k(tmp_path):
    model, x = build("ladder-iwae", batch_norm=True), binary_x(8)
    assert get_model_class("ladder-iwae").config_class(input_dim=12).k == 10  # the paper's k
    model.train().loss(Batch(x), StepContext()).losses["model"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ElbolabError, match="k >= 1"):
        build("ladder-iwae", k=0)
    run = pipeline.train("ladder-iwae", "digits", out=tmp_path / "l", epochs=2, train_size=300, latent_dims=(4, 2),
                         hidden=(16,), k=3, binarize="dynamic", progress=False, tensorboard=False, figures=False)
    result = pipeline.evaluate(run, k=50, limit=100, refresh_report=False)
    assert math.isfinite(result["log_px"]["mean"]) and result["log_px"]["mean"] > result["elbo"]
    assert set(result["active_units_per_group"]) == {"z1", "z2"}


# ----- E_q[z_l|x] for the active units: sampled, not the mean pass -----
def tanh_hierarchy(slope, var_1, mean_samples=1000):
    """hvae with 1-d layers whose q(z_2|z_1) has mean tanh(slope z_1): q(z_1|x) = N(s tanh(x_0), var_1) (s = 1),
    so E_q[z_2|x] = E[tanh(slope z_1)], z_1 ~ N(m(x), var_1), while the mean pass gives tanh(slope m(x))."""
    model = build("hvae", input_dim=2, latent_dims=(1, 1), hidden=(3,), depth=1, activation="tanh",
                  mean_samples=mean_samples).double()
    with torch.no_grad():
        for head, gain in zip(model.encoder, (1.0, slope)):
            first = head.block.net[0]  # Linear(n_in, 3), then tanh
            first.weight.zero_(), first.bias.zero_(), first.weight[0, 0].fill_(gain)
            head.loc.weight.zero_(), head.loc.bias.zero_(), head.loc.weight[0, 0].fill_(1.0)
            head.raw_var.weight.zero_(), head.raw_var.bias.fill_(math.log(math.expm1(var_1 - 1e-6)))
    return model


def normal_moments(f, mean, var, points=40001):
    """E[f(z)] and Var[f(z)], z ~ N(mean, var) per entry of ``mean`` [N], by the trapezoid rule on a fine grid over
    +-12 standard deviations (float64; accurate to ~1e-9 for these smooth, bounded f)."""
    std = math.sqrt(var)
    z = mean[:, None] + std * torch.linspace(-12, 12, points, dtype=torch.float64)  # [N, points]
    density = torch.distributions.Normal(mean[:, None], std).log_prob(z).exp()
    first = torch.trapezoid(f(z) * density, z)
    return first, torch.trapezoid(f(z) ** 2 * density, z) - first ** 2


def test_sampled_posterior_mean_matches_numerical_integration_where_the_mean_pass_is_wrong():
    """E_q[z_2|x] = E[tanh(2 z_1)] with z_1 ~ N(m(x), 0.5): latent_means (S = 4000 seeded draws) agrees with a
    numerical-integration reference within its Monte-Carlo error, the mean pass tanh(2 m(x)) misses it by > 0.1;
    z_1, drawn first, is exact either way. The estimate is a function of x and leaves the caller's RNG alone."""
    model = tanh_hierarchy(slope=2.0, var_1=0.5, mean_samples=4000)
    x = torch.stack([torch.linspace(-1.5, 1.5, 7), torch.zeros(7)], 1).double()  # m(x) = tanh(x_0)
    mean_1 = torch.tanh(x[:, 0])
    exact, var = normal_moments(lambda z: torch.tanh(2 * z), mean_1, 0.5)
    state = torch.get_rng_state()
    with torch.no_grad():
        sampled, again, passed = model.latent_means(x), model.latent_means(x), model.mean_pass(x)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(sampled["z2"], again["z2"])
    assert torch.allclose(sampled["z1"][:, 0], mean_1) and torch.allclose(passed["z1"][:, 0], mean_1)
    assert torch.allclose(passed["z2"][:, 0], torch.tanh(2 * mean_1))  # the construction is what it says
    stderr = (var / 4000).sqrt()  # [N]
    assert ((sampled["z2"][:, 0] - exact).abs() < 4 * stderr).all(), (sampled["z2"][:, 0], exact, stderr)
    assert (passed["z2"][:, 0] - exact).abs().max() > 0.1


def test_active_units_count_the_sampled_mean_not_the_mean_pass():
    """A unit that only the mean pass calls active: m(x) in [-0.15, 0.15], z_1 ~ N(m(x), 4), q(z_2|z_1) with mean
    tanh(5 z_1). Over x, Var tanh(5 m(x)) ~ 0.16 > 0.01 (mean pass: active) but Var E[tanh(5 z_1)] ~ 0.001 < 0.01
    (a numerical-integration reference: inactive); the evaluator's count with the sampled means agrees with it."""
    model = tanh_hierarchy(slope=5.0, var_1=4.0)
    x = torch.stack([torch.linspace(-0.151, 0.151, 200), torch.zeros(200)], 1).double()  # m(x) ~ U(-0.15, 0.15)
    exact, var = normal_moments(lambda z: torch.tanh(5 * z), torch.tanh(x[:, 0]), 4.0)  # [N]
    sampled = active_units_per_group(model, x)
    object.__setattr__(model.config, "mean_samples", 0)
    passed = active_units_per_group(model, x)
    assert exact.var() < 0.005 and passed["z2"][1][0] > 0.1  # the reference: inactive; the mean pass: active
    assert passed["z2"][0] == 1 and sampled["z2"][0] == 0
    noise = var.mean() / 1000  # what S = 1000 draws add to the variance over x: E_x Var_q[tanh(5 z_1)] / S
    assert (sampled["z2"][1][0] - exact.var() - noise).abs() < 5e-4, (sampled["z2"][1], exact.var(), noise)
    assert sampled["z1"][0] == passed["z1"][0] == 0  # z_1's variance over x is 0.0077: inactive both ways


def test_mean_samples_is_checked():
    with pytest.raises(ElbolabError, match="mean_samples >= 0"):
        build("ladder-vae", mean_samples=-1)
