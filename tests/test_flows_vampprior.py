"""flow-vae (planar and IAF posteriors) and vampprior, against independent references: autograd Jacobians, the
change-of-variables formula step by step, numerical quadrature, the plain VAE on the same weights and draws, and a
hand-computed mixture of per-component Normals."""

from __future__ import annotations

import math

import pytest
import torch
from test_evaluate import PPCA  # noqa: I001  (the pPCA reference lives beside the evaluator's tests)
from test_evaluate import SIGMA as PPCA_SIGMA
from torch.autograd.functional import jacobian
from torch.distributions import (
    AffineTransform,
    ExpTransform,
    Independent,
    LogNormal,
    Normal,
    Transform,
    TransformedDistribution,
    constraints,
)
from torch.nn import functional as F

from elbolab import pipeline
from elbolab.data import load_data
from elbolab.flows import IDENTITY_OFFSET, MADE, IAFTransform, PlanarTransform, planar_u_hat
from elbolab.models import get_model_class
from elbolab.models.base import check_parameter_groups
from elbolab.models.flow_vae import FlowVAE
from elbolab.models.vae import VAE
from elbolab.models.vampprior import VampPrior
from elbolab.objectives import detach_distribution
from elbolab.schedules import StepContext

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64


def planar(d: int, batch: tuple[int, ...] = (), scale: float = 1.0, seed: int = 0) -> PlanarTransform:
    """A planar step with random raw parameters u, w [*batch, d], b [*batch] (float64, no cache)."""
    g = torch.Generator().manual_seed(seed)
    u, w = (scale * torch.randn(*batch, d, generator=g, dtype=DTYPE) for _ in range(2))
    return PlanarTransform(u, w, torch.randn(batch, generator=g, dtype=DTYPE), cache_size=0)


def iaf(d: int, reverse: bool, context: torch.Tensor | None = None, seed: int = 0) -> IAFTransform:
    """An IAF step with a randomly initialised MADE (float64, no cache); s spread around 0 so sigma varies."""
    torch.manual_seed(seed)
    made = MADE(d, 16, None if context is None else context.shape[-1], "tanh", reverse).to(DTYPE)
    with torch.no_grad():
        made.s.bias.normal_()
        for layer in (made.m, made.s):
            layer.weight.mul_(3)
    return IAFTransform(made, context, cache_size=0)


def block_jacobians(fn, z: torch.Tensor) -> torch.Tensor:
    """d fn(z)_i / d z_i for each row i of z [B, d] (fn acts row by row): [B, d, d]."""
    full = jacobian(fn, z)  # [B, d, B, d]
    return torch.stack([full[i, :, i, :] for i in range(z.shape[0])])


def transforms_for(flow: str, d: int, n: int) -> list:
    """Two steps of the given flow, amortised over n rows (planar) or with a context per row (iaf)."""
    if flow == "planar":
        return [planar(d, (n,), seed=1), planar(d, (n,), seed=2)]
    context = torch.randn(n, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    return [iaf(d, False, context, seed=1), iaf(d, True, context, seed=2)]


# ----------------------------------------------------------------------------- (a) log |det| against autograd

@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["planar-global", "planar-amortized", "iaf", "iaf-reversed-context"])
def test_log_abs_det_jacobian_equals_autograd(kind, d):
    n = 6
    z = torch.randn(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(d))
    if kind == "planar-global":
        t = planar(d, (), scale=1.5)
    elif kind == "planar-amortized":
        t = planar(d, (n,), scale=1.5)
    elif kind == "iaf":
        t = iaf(d, reverse=False)
    else:
        t = iaf(d, reverse=True, context=torch.randn(n, 4, dtype=DTYPE))
    reference = torch.linalg.slogdet(block_jacobians(t._call, z))[1]  # [n]
    assert torch.allclose(t.log_abs_det_jacobian(z, t(z)), reference, atol=1e-10)


# ----------------------------------------------------------------------------- (b) planar invertibility

@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_planar_reparameterised_u_satisfies_the_invertibility_condition(scale):
    g = torch.Generator().manual_seed(0)
    w = scale * torch.randn(500, 4, generator=g, dtype=DTYPE)
    u = scale * torch.randn(500, 4, generator=g, dtype=DTYPE)
    u[:100] = -torch.rand(100, 1, generator=g, dtype=DTYPE) * 50 * w[:100]  # w^T u far below -1
    assert float((u * w).sum(-1).min()) < -1  # the raw parameters break the condition...
    wu_hat = (w * planar_u_hat(u, w)).sum(-1)
    rounding = 1e-13 * (1 + (u * w).sum(-1).abs())  # u_hat cancels the raw w^T u: rounding relative to it
    assert bool((wu_hat >= -1 - rounding).all())  # ...the reparameterised ones do not
    assert bool(((wu_hat - (F.softplus((w * u).sum(-1)) - 1)).abs() <= rounding).all())  # w^T u_hat = m(w^T u)
    t = PlanarTransform(u, w, torch.randn(500, generator=g, dtype=DTYPE), cache_size=0)
    assert bool((t.wu >= -1).all()) and bool(((t.wu - wu_hat).abs() <= rounding).all())  # what log |det| uses
    z = torch.randn(500, 4, generator=g, dtype=DTYPE)
    assert bool(torch.isfinite(t.log_abs_det_jacobian(z, t(z))).all())


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_the_numerical_inverses_invert_and_have_the_inverse_jacobian(flow):
    d, n = 3, 5
    t = planar(d, (n,), scale=2.0) if flow == "planar" else iaf(d, True, torch.randn(n, 2, dtype=DTYPE))
    z = torch.randn(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = t._call(z)
    assert torch.allclose(t._inverse(y), z, atol=1e-9)
    inverse_jacobian = block_jacobians(t._inverse, y)  # through the bisection's final Newton step (planar)
    assert torch.allclose(inverse_jacobian, torch.linalg.inv(block_jacobians(t._call, z)), atol=1e-8)


# ----------------------------------------------------------------------------- (c) log q_K by change of variables

@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_log_prob_of_rsample_is_the_change_of_variables_step_by_step_and_uses_the_cache(flow, monkeypatch):
    d, n = 3, 4
    g = torch.Generator().manual_seed(2)
    base = Independent(Normal(torch.randn(n, d, generator=g, dtype=DTYPE),
                              torch.rand(n, d, generator=g, dtype=DTYPE) + 0.5), 1)
    steps = [t.with_cache(1) for t in transforms_for(flow, d, n)]
    q = TransformedDistribution(base, steps)

    def no_inverse(self, y):
        raise AssertionError("the inverse was called")

    monkeypatch.setattr(type(steps[0]), "_inverse", no_inverse)
    torch.manual_seed(7)
    z = q.rsample((2,))  # [2, n, d]
    log_q = q.log_prob(z)  # from the cache: no inverse
    torch.manual_seed(7)
    z_k = base.rsample((2,))  # the same draw of z_0
    reference = base.log_prob(z_k)  # [2, n]
    for t in steps:
        jacobians = torch.stack([block_jacobians(t._call, z_k[i]) for i in range(2)])  # [2, n, d, d]
        reference = reference - torch.linalg.slogdet(jacobians)[1]
        z_k = t._call(z_k)
    assert torch.allclose(z, z_k, atol=1e-12)
    assert torch.allclose(log_q, reference, atol=1e-10)
    with pytest.raises(AssertionError, match="inverse was called"):  # a fresh tensor is not in the cache
        q.log_prob(z.clone())


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_the_flow_density_integrates_to_one_in_2d(flow):
    base = Independent(Normal(torch.tensor([0.3, -0.2], dtype=DTYPE), torch.tensor([0.8, 0.6], dtype=DTYPE)), 1)
    if flow == "planar":
        steps = [planar(2, (), scale=2.0, seed=s).with_cache(1) for s in (1, 2, 3)]
    else:
        steps = [iaf(2, s % 2 == 1, seed=s).with_cache(1) for s in (1, 2)]
    q = TransformedDistribution(base, steps)
    with torch.no_grad():
        spread = q.sample((20000,)).abs().max().item()
        assert spread < 7  # the grid below holds the mass
        axis = torch.linspace(-8, 8, 321, dtype=DTYPE)
        grid = torch.cartesian_prod(axis, axis)  # [N, 2], fresh points: log_prob inverts numerically
        step = float(axis[1] - axis[0])
        mass = float(q.log_prob(grid).exp().sum()) * step ** 2
        z0 = grid
        for t in reversed(steps):
            z0 = t._inverse(z0)
        without_jacobians = float(base.log_prob(z0).exp().sum()) * step ** 2  # q_0 at the pre-images alone
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert abs(without_jacobians - 1) > 0.05  # the log |det| terms are what makes it a density here


# ----------------------------------------------------------------------------- (d) IAF is autoregressive

@pytest.mark.parametrize("reverse", [False, True])
def test_one_iaf_step_has_a_triangular_jacobian_in_its_order_with_diagonal_sigma(reverse):
    d = 5
    context = torch.randn(1, 3, dtype=DTYPE)
    t = iaf(d, reverse, context)
    z = torch.randn(1, d, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    j = block_jacobians(t._call, z)[0]  # [d, d]: d z'_i / d z_j
    later = torch.ones(d, d, dtype=torch.bool).triu(1)  # j after i in the natural order
    if reverse:
        later = later.T
    assert bool((j[later] == 0).all())
    assert float(j[~later & ~torch.eye(d, dtype=torch.bool)].abs().max()) > 1e-3  # not merely diagonal
    assert torch.allclose(j.diagonal(), torch.sigmoid(t.made(z, context)[1])[0])


# ----------------------------------------------------------------------------- (e) the plain VAE as a special case

def twin_models(**options):
    """A VAE and a flow-vae with the same encoder and decoder weights (the flow's own parameters as built)."""
    torch.manual_seed(0)
    shared = dict(input_dim=64, latent_dim=3, hidden=(16,))
    vae = VAE(VAE.config_class(**shared))
    flow = FlowVAE(FlowVAE.config_class(**shared, **options))
    missing, unexpected = flow.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("flow.") for key in missing)
    return vae, flow


def test_flow_vae_with_no_flows_is_the_vae_bit_for_bit():
    vae, flow = twin_models(flows=0)
    x = torch.rand(8, 64)
    torch.manual_seed(1)
    expected = vae(x, StepContext(values={"beta": 0.7}))
    torch.manual_seed(1)
    got = flow(x, StepContext(values={"beta": 0.7}))
    assert torch.equal(expected.loss, got.loss) and torch.equal(expected.metrics["elbo"], got.metrics["elbo"])
    assert torch.equal(vae.kl_terms(x)["z"], flow.kl_terms(x)["z"])


@pytest.mark.parametrize("flow_name", ["planar", "iaf"])
def test_identity_flows_give_the_vae_loss_with_its_monte_carlo_kl(flow_name):
    vae, flow = twin_models(flow=flow_name, flows=3)
    if flow_name == "iaf":  # sigma = sigmoid(30) = 1 in float32: z' = z (planar steps start as the identity)
        with torch.no_grad():
            for made in flow.flow.made:
                made.s.weight.zero_()
                made.s.bias.fill_(30.0)
    x = torch.rand(8, 64)
    torch.manual_seed(1)
    got = flow(x, StepContext(values={"beta": 0.7}))
    torch.manual_seed(1)
    q = vae.encode(x)
    z = q.rsample((1,))  # the same draws
    recon = vae.decode(z).log_prob(x).mean(0)
    kl = (q.log_prob(z) - vae.prior().log_prob(z)).mean(0)
    assert torch.allclose(got.metrics["recon"], recon, atol=1e-5)
    assert torch.allclose(got.metrics["kl"], kl, atol=1e-5)
    assert torch.allclose(got.loss, (0.7 * kl - recon).mean(), atol=1e-5)


@pytest.mark.parametrize("flow_name", ["planar", "iaf"])
@pytest.mark.parametrize("amortized", [True, False])
def test_flow_parameters_belong_to_q_and_the_hooks_say_what_they_can(flow_name, amortized, monkeypatch):
    torch.manual_seed(0)
    config = FlowVAE.config_class(input_dim=64, latent_dim=3, hidden=(16,), flow=flow_name, amortized=amortized,
                                  updates="alternate")
    model = FlowVAE(config)
    groups = model.parameter_groups()
    check_parameter_groups(model, groups)
    flow_ids = {id(p) for p in model.flow.parameters()}
    assert flow_ids and flow_ids <= {id(p) for p in groups["encoder"]}
    x = torch.rand(5, 64)
    assert model.kl_terms(x) is None
    base, steps = model.base_and_transforms(x)
    expected = base.mean
    for t in steps:
        expected = t._call(expected)
    assert torch.allclose(model.latent_means(x)["z"], expected)
    monkeypatch.setattr(type(steps[0]), "_inverse", lambda self, y: pytest.fail("the inverse was called"))
    z, log_w = model.importance_samples(x, 4, reparameterize=True)  # log q from the cache
    # the loss too, with L = 2 draws (the encoder phase steps q, flow included)
    model(x, StepContext(step=0, mc_samples=2)).losses["encoder"].backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.flow.parameters())
    assert z.shape == (4, 5, 3) and bool(torch.isfinite(log_w).all())


# ----------------------------------------------------------------------------- (f) VampPrior

def test_vampprior_log_prob_is_the_mixture_of_the_encoders_gaussians_at_the_pseudo_inputs():
    torch.manual_seed(0)
    model = VampPrior(VampPrior.config_class(input_dim=64, latent_dim=3, hidden=(16,), pseudo_inputs=7))
    z = torch.randn(4, 5, 3)
    u = model.pseudo_inputs()  # [K, D]
    assert bool(((u > 0) & (u < 1)).all())
    per_component = []
    for k in range(7):
        h = model.encoder.body(u[k])
        normal = Normal(model.encoder.loc(h), torch.exp(0.5 * model.encoder.log_var(h)))
        per_component.append(normal.log_prob(z).sum(-1))  # [4, 5]
    expected = torch.logsumexp(torch.stack(per_component), 0) - math.log(7)
    assert torch.allclose(model.prior().log_prob(z), expected, atol=1e-5)
    assert model.kl_terms(torch.rand(5, 64)) is None


def test_vampprior_starts_at_training_examples_and_training_lowers_the_loss():
    splits = load_data("digits")
    config = VampPrior.config_class.from_data(splits.train, latent_dim=2, hidden=(32,), pseudo_inputs=50)
    torch.manual_seed(0)
    model = VampPrior(config)
    model.prepare(splits.train, StepContext())
    rows = splits.train.batch(torch.arange(len(splits.train))).x  # [N, D]
    start = (model.pseudo_inputs().detach() - 0.05) / 0.9  # back to the data's values
    assert float(torch.cdist(start, rows).min(1).values.max()) < 1e-4  # every pseudo-input is a training example
    batch = splits.train.batch(torch.arange(256))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss():
        torch.manual_seed(1)
        return model(batch, StepContext()).loss

    before = float(loss().detach())
    pseudo_before = model.pseudo.detach().clone()
    for _ in range(30):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()
    assert float(loss().detach()) < before - 1
    assert not torch.equal(model.pseudo, pseudo_before)  # the pseudo-inputs learn too


# ----------------------------------------------------------------------------- (g) through the pipeline

@pytest.mark.parametrize("name, options", [("flow-vae", {}), ("flow-vae", {"flow": "iaf"}), ("vampprior", {})],
                         ids=["flow-vae-planar", "flow-vae-iaf", "vampprior"])
def test_train_and_evaluate_through_the_pipeline(name, options, tmp_path):
    run = pipeline.train(name, "digits", out=tmp_path / name, epochs=1, hidden=(16,), latent_dim=2, progress=False,
                         tensorboard=False, **options)
    result = pipeline.evaluate(run, k=20, limit=20, refresh_report=False)
    assert math.isfinite(result["log_px"]["mean"])
    assert result.get("kl_per_dim") is None  # no per-dimension KL: the record leaves it out
    assert math.isfinite(result["elbo"]) and result["elbo"] <= result["log_px"]["mean"] + 1
    assert get_model_class(name).registry_name == name


# ----------------------------------------------------------------------------- (g) stop-gradient log q_K (STL)

def learned_flow(flow: str, d: int, n: int) -> tuple[TransformedDistribution, list[torch.Tensor]]:
    """q_K with every parameter a leaf that requires grad: the base's loc and log scale, and the flow's (planar
    u, w, b per row; the IAF's MADE weights and its context). Returns q and those parameters."""
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(n, d, generator=g, dtype=DTYPE).requires_grad_(True)
    log_scale = (0.3 * torch.randn(n, d, generator=g, dtype=DTYPE)).requires_grad_(True)
    base = Independent(Normal(loc, log_scale.exp()), 1)
    if flow == "planar":
        raw = [(1.5 * torch.randn(n, d, generator=g, dtype=DTYPE)).requires_grad_(True) for _ in range(4)]
        offsets = [torch.randn(n, generator=g, dtype=DTYPE).requires_grad_(True) for _ in range(2)]
        steps = [PlanarTransform(raw[0], raw[1], offsets[0]), PlanarTransform(raw[2], raw[3], offsets[1])]
        flow_parameters = raw + offsets
    else:
        context = torch.randn(n, 3, generator=g, dtype=DTYPE).requires_grad_(True)
        steps = [iaf(d, False, context, seed=1).with_cache(1), iaf(d, True, context, seed=2).with_cache(1)]
        flow_parameters = [context] + [p for t in steps for p in t.made.parameters()]
    return TransformedDistribution(base, steps), [loc, log_scale] + flow_parameters


def grad_log_q_by_the_forward_map(q: TransformedDistribution, z0: torch.Tensor) -> torch.Tensor:
    """d log q_K(z_K) / d z_K at z_K = F(z0), from the forward map F alone (no inverse, no log |det| code):
    log q_K(F(z0)) = log q_0(z0) - log |det J_F(z0)|, so grad_{z_K} = J_F(z0)^-T grad_{z0}[log q_0 - log |det J_F|].
    ``z0`` [n, d] (one draw per row); returns [n, d]."""
    base = Independent(Normal(q.base_dist.mean.detach(), q.base_dist.stddev.detach()), 1)

    def forward(z):
        for t in q.transforms:
            z = t._call(z)
        return z

    z0 = z0.detach().requires_grad_(True)
    full = jacobian(forward, z0, create_graph=True)  # [n, d, n, d]
    jacobians = torch.stack([full[i, :, i, :] for i in range(z0.shape[0])])  # [n, d, d]
    log_q = base.log_prob(z0) - torch.linalg.slogdet(jacobians)[1]  # [n]
    (grad_z0,) = torch.autograd.grad(log_q.sum(), z0)  # [n, d]
    return torch.linalg.solve(jacobians.detach().transpose(-1, -2), grad_z0.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_detached_flow_keeps_log_q_and_passes_gradients_only_through_z(flow):
    d, n = 3, 4
    q, parameters = learned_flow(flow, d, n)
    torch.manual_seed(11)
    z = q.rsample()  # [n, d], one draw per row, with the graph to every parameter
    torch.manual_seed(11)
    z0 = q.base_dist.rsample()  # the same draw of z_0
    stopped = detach_distribution(q)
    assert torch.allclose(stopped.log_prob(z), q.log_prob(z), atol=1e-9)  # the value is log q_K(z)
    # with z a leaf, nothing reaches the parameters: base and flow, amortised or not
    z_leaf = z.detach().requires_grad_(True)
    grads = torch.autograd.grad(stopped.log_prob(z_leaf).sum(), [z_leaf, *parameters], allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads[1:])
    # ... and the gradient in z is that of log q_K, computed from the forward map alone
    reference = grad_log_q_by_the_forward_map(q, z0)  # [n, d]
    assert torch.allclose(grads[0], reference, atol=1e-7)
    # through the reparameterised z: the path derivative (d log q / dz) dz/dtheta, unlike the total gradient
    path = torch.autograd.grad(stopped.log_prob(z).sum(), parameters, allow_unused=True, retain_graph=True)
    by_chain_rule = torch.autograd.grad(z, parameters, grad_outputs=reference, allow_unused=True,
                                        retain_graph=True)
    for got, expected in zip(path, by_chain_rule):
        assert (got is None) == (expected is None) and (got is None or torch.allclose(got, expected, atol=1e-7))
    total = torch.autograd.grad(q.log_prob(z).sum(), parameters, allow_unused=True)
    assert any(t is not None and not torch.allclose(t, p, atol=1e-3) for t, p in zip(total, path))


def test_detached_torch_transforms_and_the_refusal_of_unknown_ones():
    loc = torch.tensor([0.3, -1.0], dtype=DTYPE, requires_grad=True)
    scale = torch.tensor([0.5, 2.0], dtype=DTYPE, requires_grad=True)
    q = TransformedDistribution(Normal(torch.zeros(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)),
                                [AffineTransform(loc, scale), ExpTransform()])  # a log-normal, batch [2]
    z = q.rsample((3,))  # [3, 2]
    stopped = detach_distribution(q)
    reference = LogNormal(loc.detach(), scale.detach())  # torch's own density
    assert torch.allclose(stopped.log_prob(z), reference.log_prob(z), atol=1e-12)
    z_leaf = z.detach().requires_grad_(True)
    grads = torch.autograd.grad(stopped.log_prob(z_leaf).sum(), [z_leaf, loc, scale], allow_unused=True)
    z_ref = z.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.log_prob(z_ref).sum(), z_ref)
    assert grads[1] is None and grads[2] is None and torch.allclose(grads[0], expected, atol=1e-12)

    class Shift(Transform):  # a learned transform without a detached() rule
        domain = codomain = constraints.real
        bijective = True

        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def _call(self, x):
            return x + self.shift

        def _inverse(self, y):
            return y - self.shift

        def log_abs_det_jacobian(self, x, y):
            return torch.zeros_like(x)

    unknown = TransformedDistribution(Normal(0.0, 1.0), [Shift(loc)])
    with pytest.raises(NotImplementedError, match="no rule for the transform Shift; give it a detached"):
        detach_distribution(unknown)


def exact_posterior_flow_vae(gradient: str) -> tuple[FlowVAE, torch.Tensor]:
    """flow-vae on pPCA with orthogonal decoder columns (a diagonal exact posterior), its encoder set to output that
    posterior and its planar flows the identity (as they start): q_K(z|x) = p(z|x) exactly. float64."""
    ppca = PPCA(seed=0)
    w, _ = torch.linalg.qr(ppca.W)
    ppca.W = w * torch.tensor([1.5, 0.7], dtype=DTYPE)
    ppca.M = ppca.W.T @ ppca.W + PPCA_SIGMA**2 * torch.eye(2, dtype=DTYPE)
    ppca.A = torch.linalg.solve(ppca.M, ppca.W.T)
    ppca.post_cov = PPCA_SIGMA**2 * torch.linalg.inv(ppca.M)
    d_in = ppca.W.shape[0]
    torch.manual_seed(0)
    model = FlowVAE(FlowVAE.config_class(input_dim=d_in, latent_dim=2, hidden=(2 * d_in,), activation="relu",
                                         likelihood="gaussian", sigma=PPCA_SIGMA, flow="planar", flows=2,
                                         gradient=gradient))
    model.decoder = torch.nn.Linear(2, d_in)
    model.double()
    enc = model.encoder
    with torch.no_grad():
        model.decoder.weight.copy_(ppca.W)
        model.decoder.bias.copy_(ppca.b)
        enc.body[0].weight.copy_(torch.cat([torch.eye(d_in), -torch.eye(d_in)]))  # h = [relu(x), relu(-x)]
        enc.body[0].bias.zero_()
        enc.loc.weight.copy_(torch.cat([ppca.A, -ppca.A], dim=1))  # A relu(x) - A relu(-x) = A x
        enc.loc.bias.copy_(-ppca.A @ ppca.b)
        enc.log_var.weight.zero_()
        enc.log_var.bias.copy_(ppca.post_cov.diagonal().log())
        start = model.flow.head.bias.view(2, 5)  # [K, 2d + 1] = (u, w, b) per step, as float64 now
        w = start[:, 2:4]
        start[:, :2] = IDENTITY_OFFSET * w / w.pow(2).sum(-1, keepdim=True)  # u_hat = 0 to float64 rounding
    x = ppca.sample_x(6, seed=1).double()
    steps = model.base_and_transforms(x)[1]
    assert max(float(t.u_hat.detach().abs().max()) for t in steps) < 1e-12  # the identity
    return model, x


def test_stl_gives_flow_vae_a_zero_encoder_and_flow_gradient_at_the_exact_posterior():
    grads = {}
    for gradient in ("stl", "plain"):
        model, x = exact_posterior_flow_vae(gradient)
        torch.manual_seed(4)
        loss = model(x, StepContext(mc_samples=3)).loss
        q_grads = torch.autograd.grad(loss, model.q_parameters(), allow_unused=True)
        grads[gradient] = max(0.0 if g is None else float(g.abs().max()) for g in q_grads)
        flow_grads = torch.autograd.grad(model(x, StepContext(mc_samples=3)).loss, list(model.flow.parameters()))
        grads[gradient + " flow"] = max(float(g.abs().max()) for g in flow_grads)
    # every draw: d/dz [log p(x, z) - log q(z)] = 0 at q = p(z|x), so only a non-path term could move phi
    assert grads["stl"] < 1e-9 and grads["stl flow"] < 1e-9
    assert grads["plain"] > 1e-2 and grads["plain flow"] > 1e-2  # the score term: zero only on average
