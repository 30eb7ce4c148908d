"""The family core's contracts: Batch, schedules, several objectives and optimisers, importance_samples, hooks,
shared building blocks, per-datapoint inference, and the IWAE model (plain and DReG gradients)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse
import torch
from test_evaluate import PPCA, SIGMA  # noqa: I001  (the pPCA reference lives beside the evaluator's tests)
from torch import nn
from torch.distributions import Normal

from elbolab import pipeline, runs
from elbolab.config import TrainConfig
from elbolab.data import TensorData, load_data
from elbolab.errors import ElbolabError
from elbolab.inference import amortization_gap, fit_local_posterior
from elbolab.models import ModelConfig, build_model, register_model
from elbolab.models.base import LossOutput
from elbolab.models.vae import VAE
from elbolab.networks import MixturePrior, precision_weighted_merge
from elbolab.objectives import detach_distribution, free_bits_kl, iwae_bound, kl_per_dim
from elbolab.schedules import Schedule, StepContext
from elbolab.trainer import Trainer

FAST = dict(latent_dim=2, hidden=(16,), batch_size=64, progress=False, tensorboard=False, figures=False)
F64 = torch.float64


# ----------------------------------------------------------------------------------------------- schedules
def test_schedules_follow_their_definitions():
    linear = Schedule.parse("linear:0:2:4")
    assert [linear(t) for t in (0, 1, 3, 4, 9)] == [0.0, 0.5, 1.5, 2.0, 2.0]
    delayed = Schedule.parse("linear:1:0:2:3")  # hold 1 until epoch 3, then down to 0 over 2 epochs
    assert [delayed(t) for t in (0, 3, 4, 5, 8)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    # Fu et al. 2019: period 4 epochs, rising over the first half of each cycle
    cyclical = Schedule.parse("cyclical:1:4:0.5")
    assert [cyclical(t) for t in (0, 1, 2, 3, 4, 5, 6.5)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    assert Schedule.parse("0.25")(7) == 0.25 and Schedule.parse("constant:3")(0) == 3.0
    assert Schedule.parse(Schedule.parse("linear:0:1:5").spec()) == Schedule.parse("linear:0:1:5")
    for bad in ("linear:0:1", "cyclical:1:0:0.5", "cyclical:1:4:1.5", "wobble:1", "linear:a:b:c", "nan", "inf",
                "step:1:0:10", "step:1:0.5:0"):
        with pytest.raises(ElbolabError, match="schedule"):
            Schedule.parse(bad)
    step = Schedule.parse("step:0.002:0.9:10")  # VaDE's learning rate: x0.9 every 10 epochs
    assert [step(t) for t in (0, 9.9, 10, 25)] == pytest.approx([0.002, 0.002, 0.0018, 0.002 * 0.81])
    for name, bad in (("beta", "-1"), ("free_bits", "linear:-0.5:1:3"), ("lr", "constant:0"), ("capacity", -2)):
        with pytest.raises(ElbolabError, match="non-negative|positive"):
            Schedule.parse(bad, name)


def test_beta_is_given_once_and_unread_schedules_are_refused(tmp_path):
    with pytest.raises(ElbolabError, match="not both"):
        pipeline.train("vae", "digits", out=tmp_path / "r0", epochs=1, beta=2.0, schedules={"beta": "constant:1"},
                       **FAST)
    with pytest.raises(ElbolabError, match="does not read"):
        pipeline.train("iwae", "digits", out=tmp_path / "r", epochs=1, beta=2.0, **FAST)
    with pytest.raises(ElbolabError, match="does not read"):
        pipeline.train("vae", "digits", out=tmp_path / "r2", epochs=1, schedules={"gamma": "constant:1"}, **FAST)


def test_validation_uses_the_scheduled_beta_of_its_epoch(tmp_path):
    # defect: during warm-up the val loss used the final beta while train used beta(t)
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=3, kl_warmup_epochs=4, **FAST)
    records = [json.loads(line) for line in (run / runs.METRICS).read_text().splitlines()]
    for epoch in (1, 2, 3):
        train, val = (r for r in records if r["epoch"] == epoch)
        assert train["beta"] == val["beta"] == epoch / 4
        # the val loss is the beta-weighted objective with that beta
        assert val["loss"] == pytest.approx(-(val["recon"] - val["beta"] * val["kl"]), rel=1e-5)


# --------------------------------------------------------------------------------------------------- Batch
class _Spy(VAE):
    """Records what reaches the model."""

    seen: list = []

    def loss(self, batch, ctx):
        type(self).seen.append((batch, ctx))
        return super().loss(batch, ctx)


def test_batch_carries_labels_and_row_ids_to_the_model():
    splits = load_data("digits")
    torch.manual_seed(0)
    model = _Spy(ModelConfig(input_dim=64, latent_dim=2, hidden=(8,)))
    _Spy.seen = []
    Trainer(model, TrainConfig(epochs=1, batch_size=100, progress=False, tensorboard=False,
                               schedules={"free_bits": "linear:0:1:2"}), "/nonexistent-never-written",
            model_name="vae")._train_epoch(splits.train)
    batches = [b for b, _ in _Spy.seen]
    ids = torch.cat([b.index for b in batches])
    assert sorted(ids.tolist()) == list(range(len(splits.train)))  # each row exactly once, by its row id
    for b in batches:
        assert torch.equal(b.y, splits.train.y[b.index]) and torch.equal(b.x, splits.train.rows(b.index))
    contexts = [c for _, c in _Spy.seen]
    assert [c.step for c in contexts] == list(range(len(contexts)))
    assert contexts[-1].value("free_bits", 0) == pytest.approx(0.5 * (len(contexts) - 1) / len(contexts))


def test_compact_storage_densifies_to_the_same_batches():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(30, 12)).astype(np.uint8)
    grey = torch.from_numpy(levels).float() / 255
    bits = torch.from_numpy(levels > 128)
    counts = scipy.sparse.random(30, 12, density=0.2, random_state=1, format="csr") * 10
    index = torch.tensor([4, 0, 29, 4])
    for stored, expected in ((torch.from_numpy(levels), grey), (bits, bits.float()),
                             (counts, torch.from_numpy(counts.toarray()).float())):
        split = TensorData(x=stored, y=None, image_shape=None, binarize="none", name="t")
        got = split.batch(index)
        assert got.x.dtype == torch.float32 and torch.equal(got.x, expected[index])
    assert TensorData(x=counts, y=None, image_shape=None, binarize="none", name="t").value_range() == (
        0.0, pytest.approx(counts.max()))
    factors = torch.randint(0, 3, (30, 4))
    split = TensorData(x=bits, y=factors, image_shape=(1, 3, 4), binarize="none", name="t")
    assert torch.equal(split.batch(index).y, factors[index]) and split.image_shape == (1, 3, 4)


# -------------------------------------------------------------------------------- several objectives
@register_model("test-two-groups")
class TwoGroups(VAE):
    """A VAE plus a logistic 'discriminator' on z with its own loss, optimiser settings and metric."""

    def __init__(self, config):
        super().__init__(config)
        self.discriminator = nn.Linear(config.latent_dim, 1)

    def parameter_groups(self):
        vae = [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]
        return {"model": vae, "discriminator": list(self.discriminator.parameters())}

    def optimizer_options(self):
        return {"discriminator": {"lr": 1e-2, "betas": (0.5, 0.9)}}

    def loss(self, batch, ctx):
        out = super().loss(batch, ctx)
        z = self.encode(batch).rsample()  # [B, d]
        logit_q = self.discriminator(z).squeeze(-1)  # [B]
        logit_p = self.discriminator(torch.randn_like(z)).squeeze(-1)
        # the VAE is also pushed by the discriminator (as in FactorVAE): its loss depends on D's weights too
        vae_loss = out.loss + 0.1 * logit_q.mean()
        bce = nn.functional.binary_cross_entropy_with_logits
        disc = bce(self.discriminator(z.detach()).squeeze(-1), torch.ones_like(logit_q)) + bce(
            logit_p, torch.zeros_like(logit_p))
        accuracy = ((logit_q > 0).float().mean() + (logit_p < 0).float().mean()) / 2  # one number per batch
        return LossOutput({"model": vae_loss, "discriminator": disc}, {**out.metrics, "disc_accuracy": accuracy})


def _two_groups_trainer(tmp_path, **config):
    torch.manual_seed(0)
    model = build_model("test-two-groups", ModelConfig(input_dim=64, latent_dim=2, hidden=(8,)))
    cfg = TrainConfig(**{**dict(epochs=1, batch_size=64, progress=False, tensorboard=False), **config})
    return model, Trainer(model, cfg, tmp_path, model_name="test-two-groups")


def test_each_group_is_trained_on_its_own_loss_only(tmp_path):
    model, trainer = _two_groups_trainer(tmp_path / "a")
    batch = load_data("digits").train.batch(torch.arange(64))
    assert trainer.optimizers["discriminator"].param_groups[0]["betas"] == (0.5, 0.9)
    assert trainer.optimizers["model"].param_groups[0]["betas"] == (0.9, 0.999)
    # the gradient each group receives equals the gradient of its own loss alone (computed independently)
    torch.manual_seed(1)
    out = model(batch, trainer.context(0.0))
    d_params, v_params = model.parameter_groups()["discriminator"], model.parameter_groups()["model"]
    expected_d = torch.autograd.grad(out.losses["discriminator"], d_params, retain_graph=True)
    expected_v = torch.autograd.grad(out.losses["model"], v_params, retain_graph=True)
    torch.manual_seed(1)
    captured = {}
    for name, group in model.parameter_groups().items():
        for p in group:
            p.register_hook(lambda g, p=p, name=name: captured.setdefault(id(p), g.clone()))
    trainer._step(model(batch, trainer.context(0.0)))
    for p, g in zip(d_params, expected_d):
        torch.testing.assert_close(captured[id(p)], g)  # on a single-optimiser trainer: + the VAE's gradient
    for p, g in zip(v_params, expected_v):
        torch.testing.assert_close(captured[id(p)], g)


def test_scalar_metrics_are_averaged_per_batch_not_divided_by_its_size(tmp_path):
    model, trainer = _two_groups_trainer(tmp_path / "b")
    record = trainer._train_epoch(load_data("digits").train)
    assert 0.0 <= record["disc_accuracy"] <= 1.0 and record["disc_accuracy"] > 0.2
    assert {"loss", "loss_discriminator", "elbo", "kl", "recon", "beta"} <= set(record)


class _Alternating(TwoGroups):
    """TwoGroups whose discriminator rests on odd steps (its loss is None there)."""

    def loss(self, batch, ctx):
        out = super().loss(batch, ctx)
        if ctx.step % 2:
            out.losses["discriminator"] = None
        return out


def test_a_group_whose_loss_is_none_rests_that_step(tmp_path):
    torch.manual_seed(0)
    model = _Alternating(ModelConfig(input_dim=64, latent_dim=2, hidden=(8,)))
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=100, progress=False, tensorboard=False), tmp_path,
                      model_name="test-two-groups")
    train = load_data("digits").train  # 1222 rows: 13 steps, the discriminator active on steps 0, 2, ..., 12
    record = trainer._train_epoch(train)
    steps = {name: int(next(iter(opt.state.values()))["step"]) for name, opt in trainer.optimizers.items()}
    assert steps == {"model": 13, "discriminator": 7}
    assert math.isfinite(record["loss_discriminator"]) and 0.0 < record["loss_discriminator"] < 5.0
    before = [p.detach().clone() for p in model.discriminator.parameters()]
    trainer.step = 1  # an odd step: the discriminator's weights must not move (not even by Adam's momentum)
    trainer._step(model(train.batch(torch.arange(100)), trainer.context(1.0)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.discriminator.parameters()))


def test_the_lr_schedule_sets_every_groups_rate(tmp_path):
    model, trainer = _two_groups_trainer(tmp_path, lr=1e-3, schedules={"lr": "step:1e-3:0.5:1"})
    trainer.epoch = 2  # the third epoch: lr = 1e-3 * 0.5^2; the discriminator keeps its 10x ratio to --lr
    record = trainer._train_epoch(load_data("digits").train)
    assert record["lr"] == pytest.approx(1.25e-4)  # logged at the epoch's end (t = 3), as every schedule
    assert trainer.optimizers["model"].param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert trainer.optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_train_size_keeps_the_first_training_rows_and_survives_resume(tmp_path):
    full = load_data("digits")
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, train_size=100, **FAST)
    records = [json.loads(line) for line in (run / runs.METRICS).read_text().splitlines()]
    assert records[0]["step"] == 2  # 100 rows in batches of 64
    assert runs.read_json(run / runs.CONFIG)["data"]["train_size"] == 100
    assert torch.equal(full.with_train_size(100).train.x, full.train.x[:100])
    assert len(full.with_train_size(100).test) == len(full.test)
    pipeline.train(out=run, epochs=2, resume=True, progress=False)
    records = [json.loads(line) for line in (run / runs.METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    for bad in (0, len(full.train) + 1):
        with pytest.raises(ElbolabError, match="--train-size between 1 and"):
            pipeline.train("vae", "digits", out=tmp_path / f"bad{bad}", epochs=1, train_size=bad, **FAST)


def test_resume_is_bit_identical_with_two_optimisers(tmp_path):
    opts = dict(FAST, binarize="dynamic", seed=2)
    straight = pipeline.train("test-two-groups", "digits", out=tmp_path / "s", epochs=2, **opts)
    pipeline.train("test-two-groups", "digits", out=tmp_path / "r", epochs=1, **opts)
    resumed = pipeline.train("test-two-groups", "digits", out=tmp_path / "r", epochs=2, resume=True, **opts)
    a, b = runs.load_tensors(straight / runs.CHECKPOINT)[0], runs.load_tensors(resumed / runs.CHECKPOINT)[0]
    assert {k.split(".")[1] for k in a if k.startswith("optimizer.")} == {"model", "discriminator"}
    for key in a:
        if key != "rng.torch":
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------- objectives and blocks
def test_free_bits_penalty_and_its_gradient():
    kl_bd = torch.tensor([[0.1, 2.0, 0.5], [0.3, 1.0, 0.7]], requires_grad=True)  # means 0.2, 1.5, 0.6
    penalty = free_bits_kl(kl_bd, 0.5)
    assert float(penalty.detach()) == pytest.approx(0.5 + 1.5 + 0.6)
    penalty.backward()
    assert torch.equal(kl_bd.grad, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))  # no push below lambda
    q = torch.distributions.Independent(Normal(torch.randn(4, 3), torch.rand(4, 3) + 0.5), 1)
    p = torch.distributions.Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    torch.testing.assert_close(kl_per_dim(q, p).sum(-1), torch.distributions.kl_divergence(q, p))


def test_vae_free_bits_and_capacity_penalties():
    torch.manual_seed(0)
    model = build_model("vae", ModelConfig(input_dim=6, latent_dim=3, hidden=(8,)))
    x = torch.rand(10, 6).round()
    q = model.encode(x)
    kl_bd = kl_per_dim(q, model.prior())
    for values, penalty in (({"free_bits": 0.3}, kl_bd.mean(0).clamp_min(0.3).sum()),
                            ({"beta": 2.0, "capacity": 5.0}, 2.0 * (kl_bd.sum(-1).mean() - 5.0).abs())):
        torch.manual_seed(1)
        out = model(x, StepContext(values=values))
        torch.testing.assert_close(out.loss, -out.metrics["recon"].mean() + penalty)


def test_detached_distribution_has_the_same_density_and_no_parameter_gradient():
    loc = torch.randn(3, 2, requires_grad=True)
    q = torch.distributions.Independent(Normal(loc, torch.ones(3, 2)), 1)
    z = torch.randn(3, 2, requires_grad=True)
    log_q = detach_distribution(q).log_prob(z)
    torch.testing.assert_close(log_q, q.log_prob(z))
    log_q.sum().backward()
    assert loc.grad is None and z.grad is not None


def test_precision_weighted_merge_is_the_normalised_product_of_two_gaussians():
    mu_a, var_a, mu_b, var_b = 0.7, 0.3, -1.2, 2.5
    grid = np.linspace(-10, 10, 400_001)
    product = np.exp(Normal(mu_a, math.sqrt(var_a)).log_prob(torch.from_numpy(grid)).numpy()
                     + Normal(mu_b, math.sqrt(var_b)).log_prob(torch.from_numpy(grid)).numpy())
    density = product / np.trapezoid(product, grid)
    mean = np.trapezoid(grid * density, grid)
    variance = np.trapezoid((grid - mean) ** 2 * density, grid)
    mu, var = precision_weighted_merge(*(torch.tensor([v], dtype=F64) for v in (mu_a, var_a, mu_b, var_b)))
    assert float(mu) == pytest.approx(mean, abs=1e-6) and float(var) == pytest.approx(variance, abs=1e-6)


def test_mixture_prior_density_matches_scikit_learn():
    from sklearn.mixture import GaussianMixture

    torch.manual_seed(0)
    prior = MixturePrior(3, 2).double()
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.2, -1.0, 0.5]))
        prior.log_var.normal_()
    z = torch.randn(50, 2, dtype=F64)
    reference = GaussianMixture(3, covariance_type="diag")
    reference.weights_ = torch.softmax(prior.logits, 0).detach().numpy()
    reference.means_ = prior.means.detach().numpy()
    reference.covariances_ = prior.log_var.exp().detach().numpy()
    reference.precisions_cholesky_ = 1 / np.sqrt(reference.covariances_)
    np.testing.assert_allclose(prior().log_prob(z).detach().numpy(), reference.score_samples(z.numpy()), rtol=1e-10)


# ------------------------------------------------------------------------------------------------- IWAE
def _ppca_iwae(ppca: PPCA, k: int, gradient: str = "plain") -> torch.nn.Module:
    """The pPCA VAE of test_evaluate with its (imperfect) encoder, as an IWAE."""
    vae = ppca.model(mean_shift=0.3, std_factor=1.5)
    iwae = build_model("iwae", _iwae_config(k, gradient))
    iwae.decoder = nn.Linear(vae.decoder.in_features, vae.decoder.out_features)
    iwae.load_state_dict(vae.state_dict())
    return iwae


def _iwae_config(k, gradient):
    from elbolab.models.iwae import IWAEConfig

    return IWAEConfig(input_dim=5, latent_dim=2, hidden=(10,), likelihood="gaussian", sigma=SIGMA, k=k,
                      gradient=gradient)


def test_iwae_l1_is_the_elbo_estimate_on_the_same_samples():
    ppca = PPCA(seed=0)
    model = _ppca_iwae(ppca, k=1)
    x = ppca.sample_x(30, seed=1)
    torch.manual_seed(3)
    bound = -model(x).loss
    torch.manual_seed(3)
    q = model.encode(x)
    z = q.rsample((1,))  # the same draw, by hand
    single = model.decode(z).log_prob(x) + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z)  # [1, B]
    torch.testing.assert_close(bound, single.mean(), rtol=1e-6, atol=1e-6)


def test_iwae_bound_rises_with_k_and_stays_below_the_exact_log_px():
    ppca = PPCA(seed=0)
    x = ppca.sample_x(100, seed=1)
    exact = ppca.log_px(x)
    bounds = {}
    for k in (1, 5, 50):
        model = _ppca_iwae(ppca, k=k)
        torch.manual_seed(k)
        with torch.no_grad():
            bounds[k] = torch.stack([model(x).metrics["iwae_bound"].double() for _ in range(40)]).mean(0)  # [N]
    for lower, upper in ((bounds[1], bounds[5]), (bounds[5], bounds[50]), (bounds[50], exact)):
        diff = upper - lower
        assert float(diff.mean()) > 4 * float(diff.std() / math.sqrt(len(diff)))


def test_dreg_encoder_gradient_has_the_plain_expectation_and_lower_variance_at_k50():
    ppca = PPCA(seed=0)
    x = ppca.sample_x(4, seed=1)
    grads = {}
    for gradient in ("plain", "dreg"):
        model = _ppca_iwae(ppca, k=50, gradient=gradient)
        params = [model.encoder.loc.bias, model.encoder.log_var.bias]
        torch.manual_seed(0)
        draws = []
        for _ in range(300):
            loss = model(x).loss
            draws.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
        grads[gradient] = torch.stack(draws)  # [repeats, 4]
        # the decoder gradient is the same estimator for both: not tested here
    plain, dreg = grads["plain"], grads["dreg"]
    se = torch.sqrt(plain.var(0) / len(plain) + dreg.var(0) / len(dreg))
    assert ((plain.mean(0) - dreg.mean(0)).abs() < 4.5 * se).all(), ((plain.mean(0) - dreg.mean(0)) / se)
    # variance ratio of independent draws: F(299, 299) has its 0.1% quantile near 0.70; DReG is far below that
    ratio = dreg.var(0) / plain.var(0)
    assert (ratio < 0.2).all(), ratio


def test_importance_samples_reparameterize_and_stop_q_grad():
    torch.manual_seed(0)
    model = build_model("vae", ModelConfig(input_dim=6, latent_dim=2, hidden=(8,)))
    x = torch.rand(3, 6).round()
    torch.manual_seed(1)
    z, log_w = model.importance_samples(x, 4, reparameterize=True)
    torch.manual_seed(1)
    z2, log_w2 = model.importance_samples(x, 4, reparameterize=True, stop_q_grad=True)
    assert z.shape == (4, 3, 2) and log_w.shape == (4, 3)
    torch.testing.assert_close(log_w, log_w2)
    assert z.requires_grad and log_w2.requires_grad
    assert not model.importance_samples(x, 4)[0].requires_grad  # sample(), not rsample()
    assert float(iwae_bound(log_w.detach()).mean()) < 0


# ------------------------------------------------------------------------------------------- hooks
class _Prepared(VAE):
    calls = 0

    def prepare(self, train, ctx):
        type(self).calls += 1
        assert ctx.step == 0 and len(train) > 0


def test_prepare_runs_once_before_training_and_not_on_resume(tmp_path):
    splits = load_data("digits")
    _Prepared.calls = 0
    config = ModelConfig(input_dim=64, latent_dim=2, hidden=(8,))
    cfg = TrainConfig(epochs=1, batch_size=64, progress=False, tensorboard=False)
    Trainer(_Prepared(config), cfg, tmp_path, model_name="vae").fit(splits.train)
    assert _Prepared.calls == 1
    Trainer(_Prepared(config), TrainConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path,
            model_name="vae").fit(splits.train, resume=True)
    assert _Prepared.calls == 1


def test_init_from_copies_matching_weights(tmp_path):
    source = pipeline.train("autoencoder", "digits", out=tmp_path / "ae", epochs=1, **FAST)
    run = pipeline.train("vae", "digits", out=tmp_path / "vae", epochs=1, init_from=source,
                         **dict(FAST, lr=1e-12))  # a tiny step: the weights stay where init_from put them
    ae, vae = runs.load_tensors(source / runs.WEIGHTS)[0], runs.load_tensors(run / runs.WEIGHTS)[0]
    shared = [k for k in ae if k in vae and ae[k].shape == vae[k].shape]
    assert any(k.startswith("decoder.") for k in shared)
    for key in shared:
        torch.testing.assert_close(vae[key], ae[key], rtol=0, atol=1e-6)
    config = json.loads((run / runs.CONFIG).read_text())
    assert config["init_from"]["run"] == str(source.resolve()) and config["init_from"]["tensors"]
    with pytest.raises(ElbolabError, match="none of the"):
        build_model("vae", ModelConfig(input_dim=64, latent_dim=2, hidden=(8,))).load_pretrained(
            {"unrelated": torch.zeros(2)})


def test_options_reach_the_model_config_and_bad_ones_are_named(tmp_path):
    run = pipeline.train("iwae", "digits", out=tmp_path / "r", epochs=1, k=3, gradient="dreg", **FAST)
    config = json.loads((run / runs.CONFIG).read_text())
    assert config["model_config"]["k"] == 3 and config["model_config"]["gradient"] == "dreg"
    assert config["model_config"]["image_shape"] == [1, 8, 8] and config["model_config"]["input_dim"] == 64
    with pytest.raises(ElbolabError, match="unknown option"):
        pipeline.train("vae", "digits", out=tmp_path / "x", epochs=1, k=3, **FAST)
    with pytest.raises(ElbolabError, match="expected k >= 1"):
        pipeline.train("iwae", "digits", out=tmp_path / "y", epochs=1, k=0, **FAST)
    with pytest.raises(ElbolabError, match="expected hidden as tuple"):
        ModelConfig(input_dim=4, hidden=400)
    with pytest.raises(ElbolabError, match="expected latent_dim as int"):
        ModelConfig(input_dim=4, latent_dim="2")


# ------------------------------------------------------------------------------ per-datapoint inference
def test_local_posterior_reaches_log_px_when_the_family_contains_the_posterior():
    """pPCA with orthogonal decoder columns has a diagonal exact posterior: fitting a per-datapoint diagonal
    Gaussian must close the gap to the exact log p(x), and the amortisation gap of a poor encoder is the rest."""
    ppca = PPCA(seed=0)
    w, _ = torch.linalg.qr(ppca.W)
    ppca.W = w * torch.tensor([1.5, 0.7], dtype=F64)  # orthogonal columns: W^T W diagonal
    ppca.M = ppca.W.T @ ppca.W + SIGMA**2 * torch.eye(2, dtype=F64)
    ppca.A = torch.linalg.solve(ppca.M, ppca.W.T)
    ppca.post_cov = SIGMA**2 * torch.linalg.inv(ppca.M)
    model = ppca.model(mean_shift=0.4, std_factor=2.0)  # a poor encoder
    x = ppca.sample_x(20, seed=2)
    exact = float(ppca.log_px(x).mean())
    local = fit_local_posterior(model, x, steps=400, lr=0.05, mc_samples=16)
    torch.testing.assert_close(local.loc.double(), (x.double() - ppca.b) @ ppca.A.T, rtol=0, atol=0.05)
    torch.testing.assert_close(local.scale.double() ** 2, ppca.post_cov.diagonal().expand(20, 2).contiguous(),
                               rtol=0.15, atol=0)
    gaps = amortization_gap(model, x, k=2000, elbo_samples=4000, steps=400, lr=0.05, mc_samples=16)
    assert abs(gaps["log_px"] - exact) < 0.02
    assert abs(gaps["approximation_gap"]) < 0.05  # the family holds the posterior
    assert gaps["amortization_gap"] > 0.3  # the shifted, widened encoder loses this much
    assert gaps["approximation_gap"] + gaps["amortization_gap"] == pytest.approx(exact - gaps["elbo_amortized"],
                                                                                 abs=0.03)


# ------------------------------------------------------------------------------------- evaluation
def test_paired_comparison_of_two_runs(tmp_path):
    a = pipeline.train("vae", "digits", out=tmp_path / "a", epochs=2, binarize="dynamic", **FAST)
    b = pipeline.train("vae", "digits", out=tmp_path / "b", epochs=1, binarize="dynamic", **FAST)
    only_b = pipeline.evaluate(b, k=20)
    result = pipeline.evaluate(a, k=20, compare=b)
    c = result["compare"]
    assert c["n_examples"] == result["log_px"]["n_examples"] and c["other_mean"] == pytest.approx(
        only_b["log_px"]["mean"])
    assert c["mean_difference"] == pytest.approx(result["log_px"]["mean"] - only_b["log_px"]["mean"])
    assert 0 < c["stderr"] < result["log_px"]["sd_over_examples"]
    other = pipeline.train("vae", "digits", out=tmp_path / "c", epochs=1, **FAST)  # grey, not binarised
    with pytest.raises(ElbolabError, match="same examples"):
        pipeline.evaluate(a, k=5, compare=other)


def test_one_latent_dimension_trains_draws_and_evaluates(tmp_path):
    # defect: --latent-dim 1 trained and then crashed in the latent scatter
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, **dict(FAST, latent_dim=1, figures=True))
    assert (run / "figures" / "latent_scatter.png").is_file() and (run / "index.html").is_file()
    assert pipeline.evaluate(run, k=5)["latent_dim"] == 1
