"""Latent traversals (issue 9): each row sweeps one dimension with the others at the seed's mean (checked against
decoding those codes directly), unused dimensions give constant rows and sort last, the PNG and the animated GIF,
the run-level entry point, and the refusals."""

import pytest
import torch
from PIL import Image

from elbolab import pipeline
from elbolab.errors import ElbolabError
from elbolab.figures.traversals import traversal_images, traverse
from elbolab.models import get_model_class
from elbolab.models.vae import VAEConfig
from elbolab.pipeline import traverse_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def small_vae(dead_dim=None):
    torch.manual_seed(0)
    model = get_model_class("vae")(VAEConfig(input_dim=64, image_shape=(1, 8, 8), latent_dim=3, hidden=(16,)))
    if dead_dim is not None:
        with torch.no_grad():  # the decoder ignores z_dead, the encoder's mean and variance for it match the prior
            model.decoder[0].weight[:, dead_dim] = 0.0
            model.encoder.loc.weight[dead_dim] = 0.0
            model.encoder.loc.bias[dead_dim] = 0.0
            model.encoder.log_var.weight[dead_dim] = 0.0
            model.encoder.log_var.bias[dead_dim] = 0.0
    return model.eval()


def test_rows_sweep_one_dimension_around_the_seed_mean():
    model = small_vae()
    x = torch.rand(4, 64)
    images, dims, values, kl = traversal_images(model, x, dims=[2, 0], steps=5, span=2.0)
    assert dims == [2, 0] and images.shape == (2, 5, 64)
    assert torch.allclose(torch.as_tensor(values), torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    mu = model.encode(x[:1]).mean[0]  # the seed is the first image
    for row, j in enumerate(dims):
        for col, v in enumerate(values):
            z = mu.clone()
            z[j] = float(v)
            assert torch.allclose(images[row, col], model.decode_mean(z), atol=1e-6)
    q = model.encode(x)
    expected_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.stddev), torch.distributions.Normal(0.0, 1.0)).mean(0)  # [d]
    assert torch.allclose(torch.as_tensor(kl), expected_kl, atol=1e-5)
    one_image, *_ = traversal_images(model, x[0], dims=[2, 0], steps=5, span=2.0)
    assert torch.allclose(one_image, images)  # one image [D] is a batch of one


def test_an_unused_dimension_gives_a_constant_row_and_sorts_last():
    model = small_vae(dead_dim=1)
    images, dims, _, kl = traversal_images(model, torch.rand(6, 64), steps=4)
    assert dims[-1] == 1 and kl[1] == pytest.approx(0.0, abs=1e-6)
    assert kl[dims[0]] >= kl[dims[1]] > kl[1]  # largest KL first
    row = images[dims.index(1)]
    assert torch.allclose(row, row[:1].expand_as(row))  # the decoder ignores z1: every column the same image
    moving = images[0]
    assert (moving[0] - moving[-1]).abs().max() > 1e-3  # a used dimension changes the image


def test_png_and_gif_are_written(tmp_path):
    model = small_vae()
    paths = traverse(model, torch.rand(3, 64), tmp_path / "fig", dims=[0, 1], steps=6)
    assert [p.name for p in paths] == ["traversals.png", "traversals.gif"]
    with Image.open(paths[0]) as png:
        assert png.format == "PNG" and min(png.size) > 150
    with Image.open(paths[1]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 2 * 6 - 2 and gif.info.get("loop") == 0  # forwards and back
        assert gif.size[0] > 2 * 96  # two dimensions side by side, each enlarged to 96 pixels


def test_traverse_run_draws_a_trained_run(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "run", epochs=1, latent_dim=3, hidden=(16,), train_size=200,
                         progress=False, tensorboard=False, figures=False)
    paths = traverse_run(run, dims=[0, 2], steps=5, index=3)
    assert all(p.is_file() and p.parent == run / "figures" for p in paths)
    other = traverse_run(run, out_dir=tmp_path / "elsewhere", split="val")
    assert all(p.is_file() for p in other)
    with pytest.raises(ElbolabError, match="--index"):
        traverse_run(run, index=10_000)
    with pytest.raises(ElbolabError, match="--split"):
        traverse_run(run, split="everything")


def test_bad_requests_are_refused(tmp_path):
    model = small_vae()
    with pytest.raises(ElbolabError, match="dimensions in 0..2"):
        traverse(model, torch.rand(2, 64), tmp_path, dims=[3])
    with pytest.raises(ElbolabError, match="steps >= 2"):
        traverse(model, torch.rand(2, 64), tmp_path, steps=1)
    with pytest.raises(ElbolabError, match="at least one image"):
        traverse(model, torch.rand(0, 64), tmp_path)
    torch.manual_seed(0)
    flat = get_model_class("vae")(VAEConfig(input_dim=5, latent_dim=2, hidden=(4,)))
    with pytest.raises(ElbolabError, match="not images"):
        traverse(flat, torch.rand(2, 5), tmp_path)


def test_a_hierarchy_is_traversed_over_its_joint_code():
    """hvae's decoder takes z = cat(z1, z2) and reads z1 only: rows of z1 dimensions change the image, rows of z2
    dimensions do not, and the KL labels cover both layers."""
    from elbolab.models.hvae import HierarchicalConfig

    torch.manual_seed(0)
    model = get_model_class("hvae")(HierarchicalConfig(input_dim=64, image_shape=(1, 8, 8), latent_dims=(3, 2),
                                                       hidden=(16,))).eval()
    x = torch.rand(5, 64).round()
    images, dims, _, kl = traversal_images(model, x, dims=[0, 2, 3, 4], steps=4)
    assert images.shape == (4, 4, 64) and kl.shape == (5,)
    spread = (images.amax(1) - images.amin(1)).amax(-1)  # [rows]: how much each sweep changes the image
    assert (spread[:2] > 1e-3).all() and (spread[2:] < 1e-6).all()
