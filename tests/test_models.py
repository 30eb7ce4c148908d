"""Model building blocks: likelihood heads against their textbook formulas, the registry, every configuration."""

import math

import pytest
import torch
from torch.distributions import Normal
from torch.nn import functional as F

from elbolab import loading, runs
from elbolab.errors import CheckpointError, ElbolabError
from elbolab.likelihoods import build_likelihood
from elbolab.models import ModelConfig, available_models, build_model, register_model
from elbolab.models.autoencoder import AutoencoderConfig
from elbolab.models.vae import VAE
from elbolab.schedules import StepContext


def test_bernoulli_head_is_the_negative_binary_cross_entropy():
    logits, x = torch.randn(3, 10), torch.rand(3, 10).round()
    expected = -F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum(-1)
    torch.testing.assert_close(build_likelihood("bernoulli", 10)(logits).log_prob(x), expected, rtol=1e-5, atol=1e-4)


def test_fixed_gaussian_head_is_scaled_squared_error():
    # notes 000 eq. 3 / notes 001 eq. 29:
    # log N(x; f(z), sigma^2 I) = -||x - f(z)||^2 / (2 sigma^2) - D/2 log(2 pi sigma^2)
    mean, x, sigma = torch.randn(4, 6), torch.randn(4, 6), 0.3
    expected = -((x - mean) ** 2).sum(-1) / (2 * sigma**2) - 6 / 2 * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(build_likelihood("gaussian", 6, sigma)(mean).log_prob(x), expected)


def test_learned_variances_receive_gradients_and_move_toward_the_residual_scale():
    head = build_likelihood("gaussian-learned", 5, 1.0)
    x = 0.1 * torch.randn(2000, 5)  # residual scale 0.1 around a zero mean
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        (-head(torch.zeros_like(x)).log_prob(x).mean()).backward()
        opt.step()
    torch.testing.assert_close(head.log_scale.exp(), torch.full((5,), 0.1), rtol=0.1, atol=0)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian-learned", "gaussian-decoder"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_every_vae_configuration_trains_one_step(arch, likelihood, covariance):
    torch.manual_seed(0)
    model = build_model("vae", ModelConfig(input_dim=64, image_shape=(8, 8), latent_dim=3, hidden=(16,),
                                           architecture=arch, likelihood=likelihood, encoder_covariance=covariance))
    x = torch.rand(6, 64).round()
    out = model(x, StepContext(mc_samples=3))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert set(out.metrics) == {"elbo", "kl", "recon"} and all(v.shape == (6,) for v in out.metrics.values())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.sample(5).shape == (5, 64) and model.log_importance_weights(x, 4).shape == (4, 6)


def test_autoencoder_losses_are_ce_and_sse():
    torch.manual_seed(0)
    x = torch.rand(5, 16)
    ce = build_model("autoencoder", AutoencoderConfig(input_dim=16, latent_dim=2, hidden=(8,), likelihood="bernoulli"))
    logits = ce.decoder(ce.encoder(x))
    torch.testing.assert_close(ce(x).loss, F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 5)
    # notes 004: SSE = 1/2 sum (x - x_hat)^2, the negative log-likelihood of N(x_hat, I) less its constant
    sse = build_model("autoencoder", AutoencoderConfig(input_dim=16, latent_dim=2, hidden=(8,), likelihood="gaussian"))
    x_hat = sse.decoder(sse.encoder(x))
    gaussian_nll = -Normal(x_hat, 1.0).log_prob(x).sum(-1) - 16 / 2 * math.log(2 * math.pi)  # [5]
    torch.testing.assert_close(sse(x).loss, gaussian_nll.mean())
    with pytest.raises(NotImplementedError, match="no q"):
        sse.encode(x)


def test_denoising_autoencoder_corrupts_the_input_in_training_only():
    torch.manual_seed(0)
    x = torch.rand(8, 500) + 0.1  # no zero features: a zero at the encoder's input is a dropped one
    model = build_model("autoencoder", AutoencoderConfig(input_dim=500, latent_dim=2, hidden=(8,), input_dropout=0.3))
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    loss = model(x).loss  # a fresh module is in training mode
    x_in = seen[-1]
    dropped = x_in == 0
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    torch.testing.assert_close(x_in[~dropped], x[~dropped] / 0.7)  # survivors rescaled, as dropout does
    logits = model.decoder(model.encoder(x_in))
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 8)  # clean target
    model.eval()
    model(x)
    torch.testing.assert_close(seen[-1], x, rtol=0, atol=0)
    torch.testing.assert_close(model.latent_means(x)["z"], model.encoder(x))
    for bad in (1.0, -0.1):
        with pytest.raises(ElbolabError, match="input_dropout"):
            AutoencoderConfig(input_dim=5, input_dropout=bad)


def test_registry():
    assert {"vae", "autoencoder"} <= set(available_models())
    with pytest.raises(ElbolabError, match="expected a model in"):
        build_model("nope", ModelConfig(input_dim=4))
    with pytest.raises(ValueError, match="already registered"):
        register_model("vae")(type("Other", (VAE,), {}))


def test_config_validation_and_round_trip():
    cfg = ModelConfig(input_dim=64, image_shape=(8, 8), hidden=[32, 16])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.hidden == (32, 16)
    with pytest.raises(ElbolabError, match="image_shape"):
        ModelConfig(input_dim=60, image_shape=(8, 8))
    with pytest.raises(ElbolabError, match="unknown keys"):
        ModelConfig.from_dict({"input_dim": 4, "latnet_dim": 2})
    with pytest.raises(ElbolabError, match="divisible by 4"):
        build_model("vae", ModelConfig(input_dim=36, image_shape=(6, 6), architecture="conv"))


def test_damaged_weights_give_a_checkpoint_error(tmp_path):
    from elbolab import pipeline

    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, latent_dim=2, hidden=(8,), progress=False,
                         tensorboard=False, figures=False)
    data = (run / runs.WEIGHTS).read_bytes()
    (run / runs.WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        loading.load_run(run)
    (run / runs.CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        loading.load_run(run)


def test_a_wrong_shaped_input_to_encode_is_one_clear_error():
    import torch

    from elbolab.errors import ElbolabError
    from elbolab.models import ModelConfig, build_model

    model = build_model("vae", ModelConfig(input_dim=64, latent_dim=2, hidden=(8,)))
    with pytest.raises(ElbolabError, match=r"expected inputs of shape \[B, 64\].*got \[3, 8, 8\]"):
        model.encode(torch.rand(3, 8, 8))
    assert model.encode(torch.rand(3, 64)).batch_shape == (3,)


def test_keep_best_follows_the_bound_the_model_trains():
    from elbolab.models import get_model_class

    assert get_model_class("iwae").selection_metric == "iwae_bound"
    assert get_model_class("hiwae").selection_metric == "iwae_bound"
    assert get_model_class("vae").selection_metric == "elbo"
