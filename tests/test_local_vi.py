"""Non-amortised VI (the ``local-vi`` model): per-row parameters fitted through the trainer reach the exact
posterior of a tractable model; rows outside the batch never move; test-time fits for unseen data. And the VAE as
EM: ``updates=alternate`` steps the encoder (E-like) and the decoder (M-like) groups in turn."""

from __future__ import annotations

import math

import pytest
import torch
from test_evaluate import PPCA, SIGMA  # noqa: I001  (the pPCA reference lives beside the evaluator's tests)
from torch import nn
from torch.distributions import kl_divergence

from elbolab import loading, pipeline
from elbolab.config import TrainConfig
from elbolab.data import TensorData, load_data
from elbolab.errors import ElbolabError
from elbolab.inference import local_elbo
from elbolab.models import build_model
from elbolab.models.local_vi import LocalVIConfig
from elbolab.models.vae import VAEConfig
from elbolab.schedules import StepContext
from elbolab.trainer import Trainer

F64 = torch.float64
FAST = dict(latent_dim=2, hidden=(16,), batch_size=64, progress=False, tensorboard=False, figures=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def _orthogonal_ppca() -> PPCA:
    """pPCA whose decoder columns are orthogonal: the exact posterior is a diagonal Gaussian, inside the family."""
    ppca = PPCA(seed=0)
    w, _ = torch.linalg.qr(ppca.W)
    ppca.W = w * torch.tensor([1.5, 0.7], dtype=F64)
    ppca.M = ppca.W.T @ ppca.W + SIGMA**2 * torch.eye(2, dtype=F64)
    ppca.A = torch.linalg.solve(ppca.M, ppca.W.T)
    ppca.post_cov = SIGMA**2 * torch.linalg.inv(ppca.M)
    return ppca


def _local_vi_with_ppca_decoder(ppca: PPCA, n: int, **options):
    config = LocalVIConfig(input_dim=ppca.W.shape[0], latent_dim=2, hidden=(8,), likelihood="gaussian",
                           sigma=SIGMA, n_train=n, **options)
    model = build_model("local-vi", config)
    model.decoder = nn.Linear(2, ppca.W.shape[0])
    with torch.no_grad():
        model.decoder.weight.copy_(ppca.W)
        model.decoder.bias.copy_(ppca.b)
    for p in model.decoder.parameters():
        p.requires_grad_(False)  # a fixed decoder: only the per-row parameters are fitted
    return model


def test_local_parameters_trained_by_the_trainer_reach_the_exact_posterior(tmp_path):
    ppca, n = _orthogonal_ppca(), 48
    x = ppca.sample_x(n, seed=3)
    model = _local_vi_with_ppca_decoder(ppca, n, local_lr=0.15)
    assert set(model.parameter_groups()) == {"local"}  # the frozen decoder has no optimiser
    epochs = 150
    config = TrainConfig(epochs=epochs, batch_size=16, mc_samples=16, progress=False, tensorboard=False,
                         schedules={"lr": f"linear:1e-3:5e-5:{epochs}"})  # local_lr decays with --lr
    torch.manual_seed(0)
    Trainer(model, config, tmp_path, model_name="local-vi").fit(TensorData(x, None, None, "none", "ppca"))
    loc, log_var = model.local.detach().double().chunk(2, dim=-1)
    exact_loc = (x.double() - ppca.b) @ ppca.A.T  # [n, 2]
    torch.testing.assert_close(loc, exact_loc, rtol=0, atol=0.06)
    exact_var = ppca.post_cov.diagonal()  # [2], the same for every row
    torch.testing.assert_close(log_var.exp(), exact_var.expand(n, 2), rtol=0.25, atol=0)  # Monte-Carlo noise
    torch.testing.assert_close(log_var.exp().mean(0), exact_var, rtol=0.05, atol=0)
    elbo = ppca.elbo(x, loc, torch.diag_embed(log_var.exp()))  # closed form, [n]
    gap = float((ppca.log_px(x) - elbo).mean())
    assert 0 <= gap < 0.01  # log p(x) - ELBO = KL(q || p(z|x)) -> 0 when the family holds the posterior


def test_rows_outside_the_batch_never_move_and_the_decoder_uses_the_trainer_lr(tmp_path):
    torch.manual_seed(0)
    n = 40
    model = build_model("local-vi", LocalVIConfig(input_dim=6, latent_dim=2, hidden=(8,), likelihood="gaussian",
                                                  n_train=n, local_lr=0.3))
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=10, progress=False, tensorboard=False), tmp_path,
                      model_name="local-vi")
    assert trainer.optimizers["local"].param_groups[0]["lr"] == 0.3
    assert trainer.optimizers["model"].param_groups[0]["lr"] == 1e-3
    data = TensorData(torch.randn(n, 6), None, None, "none", "toy")
    for step, rows in enumerate((torch.arange(0, 10), torch.arange(10, 20), torch.arange(0, 10))):
        before = model.local.detach().clone()
        trainer.step = step
        model.train()
        trainer._step(model(data.batch(rows), trainer.context(0.0)))
        moved = (model.local.detach() != before).any(-1)  # [n]
        assert moved[rows].all()  # Adam with momentum would also move the rows of the previous batch here
        assert not moved[torch.tensor([i for i in range(n) if i not in rows.tolist()])].any()
        assert (model.local.detach() - before).abs().max() <= 0.3 + 1e-6  # the step is bounded by local_lr


def test_config_gets_the_training_rows_from_the_data_and_refuses_bad_options():
    data = TensorData(torch.rand(30, 4), None, None, "none", "toy")
    config = LocalVIConfig.from_data(data, latent_dim=3)
    assert config.n_train == 30 and "n_train" not in {f.name for f in LocalVIConfig.option_fields()}
    model = build_model("local-vi", config)
    assert model.local.shape == (30, 6)
    with pytest.raises(ElbolabError, match="local_lr > 0"):
        LocalVIConfig(input_dim=4, n_train=3, local_lr=0)
    model.eval()  # unseen data: q is fitted per example, cached until the decoder changes
    x = torch.rand(5, 4)
    first, again = model.encode(x), model.encode(torch.cat([x[3:], x[:3]]))
    torch.testing.assert_close(again.mean, torch.cat([first.mean[3:], first.mean[:3]]), rtol=0, atol=0)
    with torch.no_grad():
        model.decoder[0].weight.mul_(2.0)  # an in-place change of the decoder: the fits are stale
    assert not torch.equal(model.encode(x).mean, first.mean)
    with pytest.raises(ElbolabError, match="row numbers"):
        model.train()
        model.encode(torch.rand(2, 4))  # no Batch.index in training mode


def test_train_and_evaluate_fit_unseen_data_at_test_time(tmp_path):
    run = pipeline.train("local-vi", "digits", out=tmp_path / "r", epochs=2, binarize="dynamic", fit_steps=30,
                         **FAST)
    model, _ = loading.load_run(run)
    splits = load_data("digits", binarize="static")
    assert model.local.shape[0] == len(splits.train)  # n_train came from the data
    result = pipeline.evaluate(run, k=20, limit=12, refresh_report=False)
    assert math.isfinite(result["log_px"]["mean"]) and math.isfinite(result["elbo"])
    # IS with K = 20 from the fitted q is (in expectation) above the fitted q's ELBO
    assert result["log_px"]["mean"] > result["elbo"] - 3 * result["log_px"]["mc_stderr"] - 0.5
    # the test-time fit raises the ELBO above the prior's (its starting point)
    model.eval()
    batch = splits.test.batch(torch.arange(12))
    with torch.no_grad():
        fitted = float(local_elbo(model, batch, model.encode(batch), 2000).mean())
        at_prior = float(local_elbo(model, batch, model.prior().expand((12,)), 2000).mean())
    assert fitted > at_prior + 0.1


# ------------------------------------------------------------------ VAE as EM: alternating encoder/decoder updates
def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params) -> list[bool]:
    return [not torch.equal(a, p) for a, p in zip(before, params)]


@pytest.mark.parametrize("every", [1, 2])
def test_alternating_updates_step_one_group_per_step(tmp_path, every):
    torch.manual_seed(0)
    config = VAEConfig(input_dim=64, latent_dim=2, hidden=(8,), likelihood="gaussian-learned", updates="alternate",
                       alternate_every=every)
    model = build_model("vae", config)
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=50, progress=False, tensorboard=False), tmp_path,
                      model_name="vae")
    groups = model.parameter_groups()
    assert list(groups) == ["encoder", "decoder"]
    assert {id(p) for p in groups["decoder"]} == {id(p) for p in [*model.decoder.parameters(),
                                                                   *model.likelihood_head.parameters()]}
    data = load_data("digits").train
    for step in range(4):
        expected = "encoder" if (step // every) % 2 == 0 else "decoder"
        before = {name: _snapshot(params) for name, params in groups.items()}
        trainer.step = step
        out = model(data.batch(torch.arange(50 * step, 50 * step + 50)), trainer.context(0.0))
        assert {name for name, loss in out.losses.items() if loss is not None} == {expected}
        trainer._step(out)
        for name, params in groups.items():
            changed = _changed(before[name], params)
            assert all(changed) if name == expected else not any(changed), (step, name)


def test_alternating_epoch_counts_steps_per_group_and_joint_is_one_group(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "alt", epochs=1, updates="alternate", train_size=640, **FAST)
    model, config = loading.load_run(run)
    assert config["model_config"]["updates"] == "alternate"
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=64, progress=False, tensorboard=False),
                      tmp_path / "again", model_name="vae")
    trainer._train_epoch(load_data("digits").train.head(640))  # 10 steps: the encoder on 0, 2, ..., 8
    steps = {name: int(next(iter(opt.state.values()))["step"]) for name, opt in trainer.optimizers.items()}
    assert steps == {"encoder": 5, "decoder": 5}
    # joint (the default, and any config that is not a VAEConfig): one group with every parameter, one loss
    joint = build_model("vae", VAEConfig(input_dim=64, latent_dim=2, hidden=(8,)))
    assert list(joint.parameter_groups()) == ["model"]
    assert len(joint.parameter_groups()["model"]) == len(list(joint.parameters()))
    batch = load_data("digits").train.batch(torch.arange(32))
    torch.manual_seed(5)
    out = joint(batch, StepContext(step=1))
    assert set(out.losses) == {"model"}
    torch.manual_seed(5)  # the same draw, computed by hand: -mean(E log p(x|z) - KL)
    q = joint.encode(batch)
    z = q.rsample((1,))
    by_hand = -(joint.decode(z).log_prob(batch.x).mean(0) - kl_divergence(q, joint.prior())).mean()
    torch.testing.assert_close(out.losses["model"], by_hand)
    with pytest.raises(ElbolabError, match="updates in joint, alternate"):
        VAEConfig(input_dim=4, updates="em")
