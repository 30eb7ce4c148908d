"""Conditional VAE (elbolab/models/cvae.py): the importance-sampled conditional log-likelihood against the exact one
of a linear-Gaussian CVAE, only missing pixels scored, label conditioning visible in the samples, both modes
trained and evaluated through the pipeline, clear errors."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from elbolab import loading, pipeline, runs
from elbolab.data import load_data
from elbolab.data.core import Batch, TensorData
from elbolab.errors import ElbolabError
from elbolab.models.cvae import CVAE, CVAEConfig, quadrant_mask

SHAPE = (1, 4, 4)
D = 16
QUICK = dict(progress=False, tensorboard=False, hidden=(64,), latent_dim=4, lr=3e-3, batch_size=64)


def linear_gaussian_cvae(condition: str, n_classes: int = 0) -> CVAE:
    """A CVAE whose decoder is linear with a fixed Gaussian likelihood: p(x|z,c) = N(W z + V c + b, sigma^2 I),
    and a learned conditional prior N(mu(c), diag s(c)^2), so p(x_t|c) is Gaussian in closed form."""
    torch.manual_seed(0)
    config = CVAEConfig(input_dim=D, image_shape=SHAPE, latent_dim=2, hidden=(8,), likelihood="gaussian", sigma=0.7,
                        condition=condition, given_quadrants=1, conditional_prior=True, n_classes=n_classes)
    model = CVAE(config)
    model.decoder = nn.Linear(2 + config.condition_dim, D)
    return model.double()


def exact_log_p_target(model: CVAE, batch: Batch, target: torch.Tensor) -> torch.Tensor:
    """log N(x_t; W mu(c) + V c + b, W diag(s(c)^2) W^T + sigma^2 I) over the target pixels ``target`` [D] (bool)."""
    c = model.condition(batch)  # [B, C]
    prior = model.prior(batch)  # batch [B]
    lin = model.decoder
    w, v = lin.weight[:, :2], lin.weight[:, 2:]  # [D, 2], [D, C]
    mean = prior.mean @ w.T + c @ v.T + lin.bias  # [B, D]
    cov = w @ torch.diag_embed(prior.variance) @ w.T + model.config.sigma ** 2 * torch.eye(D, dtype=w.dtype)
    t = target.nonzero().squeeze(-1)
    return MultivariateNormal(mean[:, t], cov[:, t][:, :, t]).log_prob(batch.x[:, t])  # [B]


@pytest.mark.parametrize("condition", ["label", "quadrants"])
def test_importance_sampled_conditional_log_likelihood_matches_the_linear_gaussian_closed_form(condition):
    model = linear_gaussian_cvae(condition, n_classes=3 if condition == "label" else 0)
    torch.manual_seed(1)
    batch = Batch(torch.randn(4, D, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    target = torch.ones(D, dtype=torch.bool) if condition == "label" else ~quadrant_mask(SHAPE, 1)
    exact = exact_log_p_target(model, batch, target)
    with torch.no_grad():
        _, log_w = model.importance_samples(batch, 40000)  # [k, B]
    estimate = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    torch.testing.assert_close(estimate, exact, atol=0.03, rtol=0)
    assert (log_w.mean(0) < exact).all()  # the ELBO is below log p(x_t|c)
    if condition == "quadrants":  # scoring every pixel would add the observed pixels' log-density
        everything = exact_log_p_target(model, batch, torch.ones(D, dtype=torch.bool))
        assert ((everything - exact).abs() > 1).all()


def test_only_missing_pixels_are_scored():
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(input_dim=D, image_shape=SHAPE, latent_dim=3, hidden=(8,), condition="quadrants",
                            given_quadrants=2))
    x = torch.rand(5, D).round()
    batch = Batch(x)
    observed = quadrant_mask(SHAPE, 2)
    assert observed.view(4, 4)[:, :2].all() and not observed.view(4, 4)[:, 2:].any()  # the left half is given
    z = torch.randn(7, 5, 3)
    p = model.decode(z, batch)  # conditioned on the observed pixels of x
    flipped_observed = torch.where(observed, 1 - x, x)
    torch.testing.assert_close(p.log_prob(flipped_observed), p.log_prob(x))  # observed pixels are not scored
    flipped_missing = torch.where(observed, x, 1 - x)
    assert (p.log_prob(flipped_missing) - p.log_prob(x)).abs().min() > 1e-3  # missing pixels are
    # an explicit mask: everything observed except pixel 13 scores that one Bernoulli pixel
    one = torch.ones(5, D, dtype=torch.bool)
    one[:, 13] = False
    lone = model.decode(z, Batch(x, observed=one))
    logits = model.decoder(torch.cat([z, model.condition(Batch(x, observed=one)).expand(7, -1, -1)], -1))
    expected = torch.distributions.Bernoulli(logits=logits[..., 13]).log_prob(x[:, 13])  # [7, 5]
    torch.testing.assert_close(lone.log_prob(x), expected)
    # without a mask in the batch, the configured quadrants are used
    torch.manual_seed(3)
    default = model.importance_samples(batch, 4)[1]
    torch.manual_seed(3)
    explicit = model.importance_samples(Batch(x, observed=observed.expand(5, -1)), 4)[1]
    torch.testing.assert_close(default, explicit)


def test_bad_configurations_and_inputs_fail_clearly():
    with pytest.raises(ElbolabError, match="condition in label, quadrants"):
        CVAEConfig(input_dim=D, image_shape=SHAPE, condition="pixels")
    with pytest.raises(ElbolabError, match="given_quadrants in 1, 2, 3"):
        CVAEConfig(input_dim=D, image_shape=SHAPE, condition="quadrants", given_quadrants=4)
    with pytest.raises(ElbolabError, match="images of at least 2x2"):
        CVAEConfig(input_dim=D, condition="quadrants")
    with pytest.raises(ElbolabError, match="n_classes >= 2"):
        CVAEConfig(input_dim=D, condition="label")
    with pytest.raises(ElbolabError, match="architecture mlp"):
        CVAEConfig(input_dim=D, image_shape=SHAPE, n_classes=10, architecture="conv")
    unlabelled = TensorData(torch.rand(10, D), None, SHAPE, "none", "toy/train")
    with pytest.raises(ElbolabError, match="expected class labels"):
        CVAEConfig.from_data(unlabelled)
    assert CVAEConfig.from_data(unlabelled, condition="quadrants").n_classes == 0
    with pytest.raises(ElbolabError, match="unknown option"):
        CVAEConfig.from_data(unlabelled, n_classes=3)  # a data field, not an option
    model = CVAE(CVAEConfig(input_dim=D, image_shape=SHAPE, n_classes=3, latent_dim=2, hidden=(8,)))
    with pytest.raises(ElbolabError, match="integer labels"):
        model.encode(Batch(torch.rand(2, D)))
    with pytest.raises(ElbolabError, match="integer labels"):
        model.encode(Batch(torch.rand(2, D), torch.tensor([0, 3])))
    with pytest.raises(ElbolabError, match="need the condition"):
        model.decode_mean(torch.zeros(2, 2))
    inpaint = CVAE(CVAEConfig(input_dim=D, image_shape=SHAPE, condition="quadrants", latent_dim=2, hidden=(8,)))
    with pytest.raises(ElbolabError, match="pass a Batch"):
        inpaint.sample(3)
    with pytest.raises(ElbolabError, match="expected class labels"):
        pipeline.train("cvae", torch.rand(30, D), out="/nonexistent/never-written", epochs=1, progress=False)


def test_label_conditioning_trains_evaluates_and_draws_each_class(tmp_path):
    from sklearn.linear_model import LogisticRegression

    run = pipeline.train("cvae", "digits", out=tmp_path / "label", epochs=25, conditional_prior=True, **QUICK)
    model, _ = loading.load_run(run)
    splits = load_data("digits", seed=0)
    train = splits.train.batch(torch.arange(len(splits.train)))
    classifier = LogisticRegression(max_iter=2000).fit(train.x.numpy(), train.y.numpy())
    torch.manual_seed(0)
    samples = model.sample(200)  # classes 0..9 in turn
    assert samples.shape == (200, 64)
    accuracy = (classifier.predict(samples.numpy()) == (torch.arange(200) % 10).numpy()).mean()
    assert accuracy > 0.6  # chance is 0.1: the label steers the samples
    result = pipeline.evaluate(run, k=50, refresh_report=False)
    assert math.isfinite(result["log_px"]["mean"]) and result["log_px"]["mean"] > result["elbo"]
    paths = pipeline.make_figures(run)
    assert (run / runs.FIGURES / "class_samples.png") in paths and all(p.is_file() for p in paths)


def test_quadrant_inpainting_trains_and_beats_an_unconditional_pixel_model(tmp_path):
    run = pipeline.train("cvae", "digits", out=tmp_path / "q", epochs=15, condition="quadrants", given_quadrants=3,
                         **QUICK)
    result = pipeline.evaluate(run, k=50, refresh_report=False)
    log_p = result["log_px"]["mean"]  # log p(x_missing | x_observed): the bottom-right quadrant
    assert log_p > result["elbo"]
    splits = load_data("digits", seed=0)
    mean = splits.train.batch(torch.arange(len(splits.train))).x.mean(0).clamp(1e-3, 1 - 1e-3)
    test = splits.test.batch(torch.arange(len(splits.test)))
    missing = ~quadrant_mask(SHAPE[:1] + (8, 8), 3)
    # digits are grey levels: scored by the same Bernoulli cross-entropy as the model's likelihood
    pixels = torch.distributions.Bernoulli(probs=mean, validate_args=False)
    independent = pixels.log_prob(test.x)[:, missing].sum(-1).mean()
    assert log_p > float(independent) + 1.0  # the given quadrants inform the missing one
    model, _ = loading.load_run(run)
    paths = pipeline.make_figures(run, model=model, splits=splits)
    assert (run / runs.FIGURES / "inpainting.png") in paths and all(p.is_file() for p in paths)


def test_quadrant_reconstructions_keep_the_given_pixels():
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(input_dim=D, image_shape=SHAPE, latent_dim=2, hidden=(8,), condition="quadrants",
                            given_quadrants=1)).eval()
    x = torch.rand(3, D).round()
    observed = quadrant_mask(SHAPE, 1)
    recon = model.reconstruct(Batch(x))
    assert torch.equal(recon[:, observed], x[:, observed])  # the given quadrant is the input itself
    z = model.encode(Batch(x)).mean
    torch.testing.assert_close(recon[:, ~observed], model.decode_mean(z, Batch(x))[:, ~observed])
