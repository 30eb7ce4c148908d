"""The 2-D toy of notes 002 s4.10: a VAE with a 2-D latent space trained (through pipeline.train, in memory) on the
four XOR points (a, b, a xor b). The independent references: -log 4, the best possible average log-likelihood
(the data are uniform on four points), and 3 log(1/2), the best a decoder ignoring z can do (every coordinate is a
fair coin). A VAE that uses z lies between them, its four posteriors occupy separate regions and the decoder
returns each point from its own region."""

from __future__ import annotations

import math

import pytest
import torch

from elbolab import loading, pipeline
from elbolab.estimators import importance_sampled_log_px
from elbolab.figures.toy import plot_toy_regions, xor_data, xor_points

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    run = pipeline.train("vae", xor_data(100), out=out, epochs=100, latent_dim=2, hidden=(64,), lr=1e-2,
                         batch_size=32, kl_warmup_epochs=50, progress=False, tensorboard=False, figures=False)
    model, _ = loading.load_run(run)
    model.eval()
    return model, out


def test_the_toy_vae_uses_z_and_approaches_the_best_log_likelihood(toy_model):
    model, _ = toy_model
    points = xor_points()
    torch.manual_seed(0)
    log_px = importance_sampled_log_px(model, points, k=4000)
    assert log_px.mean <= -math.log(4) + 3 * log_px.mc_stderr + 0.01  # no model beats the data's entropy
    assert log_px.mean > 3 * math.log(0.5) + 0.25  # far above every decoder that ignores z (collapse)


def test_each_point_has_its_own_region_of_latent_space(toy_model):
    model, _ = toy_model
    points = xor_points()
    torch.manual_seed(1)
    with torch.no_grad():
        q = model.encode(points)  # batch [4], event [2]
        z = q.sample((4000,))  # [S, 4, 2]: draws from each q(z|x_i)
        owner = q.log_prob(z[:, :, None, :]).argmax(-1)  # [S, 4]: whose q is densest at a draw of q(z|x_i)
        decoded = model.decode(z[:, :, None, :]).log_prob(points).exp()  # [S, 4 (source), 4 (target)]
    own_region = (owner == torch.arange(4)).double().mean(0)  # [4]
    assert (own_region > 0.6).all(), own_region  # overlap small: most of q_i's mass lies where q_i dominates
    reconstructed = decoded.mean(0).diagonal()  # E_{z~q(z|x_i)} p(x_i|z), [4]
    assert (reconstructed > 0.5).all(), reconstructed  # vs 1/8 for a decoder ignoring z
    assert (decoded.mean(0).argmax(-1) == torch.arange(4)).all()  # each region decodes to its own point


def test_the_regions_figure(toy_model):
    model, out = toy_model
    path = plot_toy_regions(model, xor_points(), out / "figures" / "toy_regions.png")
    assert path.stat().st_size > 20_000


def test_the_toy_is_a_data_source_and_its_report_draws_the_regions(tmp_path):
    from elbolab.data import load_data

    splits = load_data("xor")
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1000 and splits.train.dim == 3
    rows = splits.train.batch(torch.arange(len(splits.train))).x
    assert {tuple(int(v) for v in r) for r in rows} == {tuple(int(v) for v in p) for p in xor_points()}
    run = pipeline.train("vae", "xor", out=tmp_path / "xor", epochs=1, latent_dim=2, hidden=(8,), progress=False,
                         tensorboard=False)
    assert (run / "figures" / "toy_regions.png").is_file()
