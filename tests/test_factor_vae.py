"""The disentangling models: factor-vae (Kim & Mnih 2018) and the beta-vae preset (Higgins et al. 2017; Burgess et al.
2018). The losses against their formulas, the discriminator's own parameter group, optimiser and gradients, the
gamma schedule, and training and evaluation through the pipeline on digits."""

import json
import math

import pytest
import torch

from elbolab import pipeline
from elbolab.config import TrainConfig, beta_schedule
from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.kl_anatomy import kl_anatomy
from elbolab.models import ModelConfig, get_model_class
from elbolab.models.base import LatentVariableModel
from elbolab.models.factor_vae import FactorVAEConfig
from elbolab.models.vae import VAE
from elbolab.schedules import StepContext
from elbolab.trainer import Trainer

SMALL = dict(input_dim=6, latent_dim=3, hidden=(8,))
QUIET = dict(progress=False, tensorboard=False, figures=False, train_size=300, latent_dim=3, hidden=(32,))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def factor_vae(**options):
    torch.manual_seed(0)
    config = FactorVAEConfig(**{**SMALL, "discriminator_width": 16, "discriminator_depth": 2, **options})
    return get_model_class("factor-vae")(config)


def x_batch(n=5, seed=1):
    return Batch(torch.rand(n, 6, generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------------------------------------- factor-vae
def test_factor_vae_loss_is_the_elbo_plus_gamma_times_the_mean_logit():
    model, batch = factor_vae(gamma=7.0), x_batch()
    torch.manual_seed(2)
    out = model.loss(batch, StepContext(mc_samples=3))
    m = out.metrics
    assert torch.allclose(m["elbo"], m["recon"] - m["kl"])
    assert torch.allclose(out.losses["model"], -m["elbo"].mean() + 7.0 * m["tc_estimate"].mean())
    # the TC estimate is the discriminator's logit averaged over the same z ~ q(z|x) the reconstruction used
    torch.manual_seed(2)
    z = model.encode(batch).rsample((3,))  # [L, B, d]: the same draws
    assert torch.allclose(m["tc_estimate"], model.discriminator(z).mean(0))
    # a scheduled gamma replaces the config's
    torch.manual_seed(2)
    scheduled = model.loss(batch, StepContext(mc_samples=3, values={"gamma": 0.0}))
    assert torch.allclose(scheduled.losses["model"], -m["elbo"].mean())
    assert 0.0 <= float(m["discriminator_accuracy"]) <= 1.0


def test_each_loss_reaches_only_its_own_parameters():
    model = factor_vae()
    groups = model.parameter_groups()
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    assert ids["discriminator"] == {id(p) for p in model.discriminator.parameters()}
    assert not ids["model"] & ids["discriminator"]
    assert ids["model"] | ids["discriminator"] == {id(p) for p in model.parameters()}
    out = model.loss(x_batch(), StepContext())
    out.losses["discriminator"].backward()  # a plain backward: the codes are detached, so no encoder gradient
    assert all(p.grad is None for p in groups["model"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["discriminator"])


def test_the_trainer_gives_the_discriminator_the_papers_adam():
    model = factor_vae(discriminator_lr=2e-4)
    trainer = Trainer(model, TrainConfig(lr=1e-3, progress=False, tensorboard=False), "unused", model_name="factor-vae")
    disc = trainer.optimizers["discriminator"].param_groups[0]
    assert disc["lr"] == 2e-4 and disc["betas"] == (0.5, 0.9)
    assert trainer.optimizers["model"].param_groups[0]["lr"] == 1e-3
    with pytest.raises(ElbolabError, match="does not read the scheduled value"):
        Trainer(factor_vae(), TrainConfig(schedules={"beta": "constant:4.0"}, progress=False, tensorboard=False),
                "unused", model_name="factor-vae")


@pytest.mark.parametrize("bad, match", [({"gamma": -1.0}, "gamma >= 0"), ({"discriminator_depth": 0}, "depth"),
                                        ({"discriminator_lr": 0.0}, "discriminator_lr")])
def test_factor_vae_refuses_bad_settings(bad, match):
    with pytest.raises(ElbolabError, match=match):
        FactorVAEConfig(**{**SMALL, **bad})


def test_factor_vae_trains_and_evaluates_on_digits(tmp_path):
    run = pipeline.train("factor-vae", "digits", out=tmp_path / "f", epochs=2, discriminator_width=32,
                         discriminator_depth=2, schedules={"gamma": "linear:0:6:1"}, **QUIET)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"tc_estimate", "discriminator_accuracy", "loss_discriminator", "elbo"} <= set(train[-1])
    assert [r["gamma"] for r in train] == [6.0, 6.0]  # the schedule's value at each epoch's end
    assert 0.0 <= train[-1]["discriminator_accuracy"] <= 1.0
    result = pipeline.evaluate(run, k=20, limit=50, refresh_report=False)
    assert result["log_px"]["is_exact_estimate"] is True  # N(0, I) prior: the usual importance sampling
    assert result["log_px"]["mean"] >= result["elbo"] - 0.5  # L_20 above the ELBO, up to the noise of 50 examples


def test_validation_logs_the_kl_anatomy_tc_of_the_batch_next_to_the_discriminators():
    model, batch = factor_vae(), x_batch(n=40)
    model.train()
    assert "tc_kl_anatomy" not in model.loss(batch, StepContext()).metrics  # not in training steps: no cost there
    model.eval()
    m = model.loss(batch, StepContext()).metrics
    q = model.encode(batch)
    expected = kl_anatomy(q.base_dist.loc, q.base_dist.scale, seed=0)["total_correlation"]  # exact aggregate
    assert m["tc_kl_anatomy"].dim() == 0 and float(m["tc_kl_anatomy"]) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert "tc_estimate" in m  # the discriminator's, on the same batch
    # its own generator: the global RNG advances exactly as in a training step (trajectory and resume untouched)
    states = []
    for training in (True, False):
        model.train(training)
        torch.manual_seed(5)
        model.loss(batch, StepContext())
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_the_logged_tc_sees_dependence_between_latent_dimensions_and_its_finite_batch_bias(monkeypatch):
    """Posteriors N(m_i, s^2 I) with means m_i = (u_i, u_i, u_i) have the aggregate N(0, 1 1^T + s^2 I) for a large
    batch, whose TC is 0.5 (3 log(1 + s^2) - log(s^4 (s^2 + 3))) (1.13 nats at s = 0.5); independent means give 0.
    Narrow posteriors (s = 0.05) show the documented finite-batch bias: 400 separate bumps in 3 dimensions whose
    one-dimensional marginals overlap, so the TC of independent codes comes out nats too high."""
    from torch.distributions import Independent, Normal

    model = factor_vae().eval()
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(400, 1, generator=g).expand(400, 3)
    independent = torch.randn(400, 3, generator=g)

    def logged_tc(means, s):
        monkeypatch.setattr(model, "encode", lambda batch: Independent(Normal(means, torch.full_like(means, s)), 1))
        return float(model.loss(x_batch(n=400), StepContext()).metrics["tc_kl_anatomy"])

    v = 0.25
    exact = 0.5 * (3 * math.log(1 + v) - math.log(v * v * (v + 3)))
    assert logged_tc(shared, 0.5) == pytest.approx(exact, abs=0.25)  # s.e. about 0.08 nats
    assert abs(logged_tc(independent, 0.5)) < 0.15
    assert logged_tc(independent, 0.05) > 1.0  # biased high when I(x; z) nears log B (see factor_vae's docstring)


def test_the_trainers_validation_record_carries_both_tc_estimates(tmp_path):
    run = pipeline.train("factor-vae", "digits", out=tmp_path / "v", epochs=1, discriminator_width=16,
                         discriminator_depth=2, **QUIET)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in records if r["split"] == "val")
    train = next(r for r in records if r["split"] == "train")
    assert {"tc_estimate", "tc_kl_anatomy"} <= set(val) and "tc_kl_anatomy" not in train
    assert val["tc_kl_anatomy"] == val["tc_kl_anatomy"]  # finite, not NaN


# --------------------------------------------------------------------------------------------------- beta-vae
def beta_vae(**options):
    torch.manual_seed(0)
    return get_model_class("beta-vae")(ModelConfig(**{**SMALL, **options}))


@pytest.mark.parametrize("values, weight", [({}, 4.0), ({"beta": 2.0}, 2.0), ({"beta": 0.0}, 0.0)])
def test_beta_vae_uses_its_default_beta_unless_a_schedule_gives_one(values, weight):
    model, batch = beta_vae(), x_batch()
    torch.manual_seed(3)
    out = model.loss(batch, StepContext(values=values))
    m = out.metrics
    assert torch.allclose(out.loss, -m["recon"].mean() + weight * m["kl"].mean())
    torch.manual_seed(3)  # the same as the vae with that beta, same weights and draws
    plain = VAE.loss(model, batch, StepContext(values={"beta": weight}))
    assert torch.allclose(out.loss, plain.loss)


def test_beta_vae_capacity_is_burgess_gamma_times_the_distance_to_c():
    model, batch = beta_vae(), x_batch()
    torch.manual_seed(4)
    out = model.loss(batch, StepContext(values={"capacity": 3.0, "beta": 50.0}))
    m = out.metrics
    assert torch.allclose(out.loss, -m["recon"].mean() + 50.0 * (m["kl"].mean() - 3.0).abs())
    with pytest.raises(ElbolabError, match="beta >= 0"):
        beta_schedule(-1.0)


@pytest.mark.skipif(not hasattr(LatentVariableModel, "scheduled_defaults"),
                    reason="needs the trainer to take a model's scheduled_defaults (notes/density-ratio.md)")
def test_beta_vae_trains_with_its_beta_and_a_users_schedule_wins(tmp_path):
    run = pipeline.train("beta-vae", "digits", out=tmp_path / "b", epochs=1, **QUIET)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["beta"] == 4.0
    assert record["loss"] == pytest.approx(-(record["recon"] - 4.0 * record["kl"]), rel=1e-4)
    run = pipeline.train("beta-vae", "digits", out=tmp_path / "c", epochs=2, kl_warmup_epochs=2, **QUIET)
    assert [json.loads(line)["beta"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line] == [2.0, 4.0]  # warm-up to the model's beta
