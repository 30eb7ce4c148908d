"""The disentanglement metrics (issue 9) on constructed representations of known quality: a factor-aligned code,
the same code mixed by rotations, codes of noise and a code that leaves one factor out, with the chance levels
stated; the mutual information against a count-by-hand reference; and MIG on sprites through an encoder made of
image moments (it captures position, not orientation)."""

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from elbolab.data.sprites import Sprites
from elbolab.disentanglement import (
    beta_vae_score,
    discretise,
    disentanglement_scores,
    factor_vae_score,
    model_encoder,
    mutual_information_gap,
)
from elbolab.errors import ElbolabError

SIZES = (1, 3, 6, 40, 32, 32)  # dSprites' factors: one constant, K = 5 varying
K = 5
SMALL = dict(num_train=1500, num_eval=1000)


class FactorGrid:
    """A data set whose 'images' are the factor indices themselves, so an encoder can build any code from them."""

    factor_names = ("color", "shape", "scale", "orientation", "posX", "posY")
    factor_sizes = SIZES

    def sample_factors(self, n, generator):
        return np.stack([generator.integers(0, s, n) for s in SIZES], axis=1)

    def images(self, factors):
        return torch.as_tensor(np.asarray(factors, dtype=np.float64))


GRID = FactorGrid()
_sizes = torch.tensor(SIZES, dtype=torch.float64)


def aligned(x):
    """One dimension per varying factor, standardised: the ideal code."""
    return ((x - (_sizes - 1) / 2) / ((_sizes**2 - 1).clamp(min=1) / 12).sqrt())[:, 1:]  # [B, 5]


def noise(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(len(x), K, generator=generator, dtype=torch.float64)


def scores(encode, seed=0, bins=20):
    return (beta_vae_score(encode, GRID, seed=seed, **SMALL)["eval_accuracy"],
            factor_vae_score(encode, GRID, seed=seed, **SMALL)["eval_accuracy"],
            mutual_information_gap(encode, GRID, seed=seed, num_points=10_000, bins=bins)["mig"])


def test_a_factor_aligned_code_scores_one():
    beta, factor, mig = scores(aligned, bins=40)  # 40 bins resolve every value of every factor
    assert beta == 1.0 and factor == 1.0
    # MIG = 1 - (the largest MI between a factor and another dimension) / H: that MI is only the finite-sample
    # bias of the discrete estimator, about (bins - 1)(values - 1) / 2N = 0.08 nats for orientation (H = 3.7)
    assert 0.95 < mig < 1.0
    assert scores(aligned, bins=20)[2] < mig  # fewer bins merge values of the 32- and 40-valued factors


def test_a_fully_mixed_code_scores_chance():
    """The aligned code and three noise dimensions mixed by a Hadamard rotation: every output dimension carries
    every factor with the same weight 1/sqrt(8), so no dimension stands for one factor."""
    mix = torch.tensor(hadamard(8) / np.sqrt(8))
    extra = noise(1)

    def mixed(x):
        return torch.cat([aligned(x), extra(x)[:, :3]], 1) @ mix

    beta, factor, mig = scores(mixed)
    assert abs(beta - 1 / K) < 0.08 and abs(factor - 1 / K) < 0.08 and mig < 0.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_rotation_scores_lower_than_the_aligned_code(seed):
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(K, K)))
    rotation = torch.tensor(rotation)
    beta, factor, mig = scores(lambda x: aligned(x) @ rotation, seed=seed)
    aligned_mig = scores(aligned, seed=seed)[2]
    assert beta < 0.99 and factor < 0.99  # the aligned code scores exactly 1 on both
    assert mig < 0.5 * aligned_mig  # MIG is the one metric that a rotation always hurts badly


def test_codes_of_noise_score_chance():
    beta, factor, mig = scores(noise(2))
    assert abs(beta - 1 / K) < 0.05  # logistic regression on uninformative z_diff: the class frequency, 1/K
    assert abs(factor - 1 / K) < 0.05  # argmin dimension independent of the factor: 1/K
    assert mig < 0.01  # only the estimator's bias (bins - 1)(values - 1) / 2N, over H


def test_a_code_missing_one_factor_fools_the_beta_vae_metric_only():
    """Kim & Mnih's criticism: with posY not coded (its dimension replaced by noise) the beta-VAE metric still
    scores 1 (no dimension shrinks when posY is fixed, which itself identifies posY), while the majority vote
    gives (K - 1)/K + 1/K^2 = 0.84: posY's votes fall on any of the K dimensions and are right only on the noise
    one, which no other factor claims."""
    extra = noise(3)

    def missing(x):
        z = aligned(x)
        z[:, -1] = extra(x)[:, 0]
        return z

    beta, factor, mig = scores(missing)
    assert beta > 0.99
    assert abs(factor - ((K - 1) / K + 1 / K**2)) < 0.04
    full = factor_vae_score(missing, GRID, seed=0, **SMALL)
    assert full["votes"][-1][-1] > 0 and np.argmax(full["votes"][-1]) == K - 1  # the noise dimension votes posY


def test_collapsed_dimensions_are_pruned_and_a_dead_code_scores_zero():
    def with_dead(x):
        return torch.cat([aligned(x), torch.zeros(len(x), 3, dtype=torch.float64)], 1)  # 3 collapsed dimensions

    result = factor_vae_score(with_dead, GRID, seed=0, **SMALL)
    assert result["num_active_dims"] == K and result["eval_accuracy"] == 1.0
    dead = factor_vae_score(lambda x: torch.zeros(len(x), 4), GRID, seed=0, **SMALL)
    assert dead["num_active_dims"] == 0 and dead["eval_accuracy"] == 0.0


def test_mutual_information_matches_counting_by_hand():
    rng = np.random.default_rng(5)
    codes = rng.normal(size=(4000, 2))

    class Tiny:
        factor_names, factor_sizes = ("a", "b"), (3, 4)

        def sample_factors(self, n, generator):
            return np.stack([generator.integers(0, 3, n), generator.integers(0, 4, n)], axis=1)

        def images(self, factors):
            f = torch.as_tensor(factors, dtype=torch.float64)
            return torch.stack([f[:, 0] + 0.3 * torch.as_tensor(codes[: len(f), 0]), f[:, 1]], 1)

    result = mutual_information_gap(lambda x: x, Tiny(), seed=7, num_points=4000, bins=6)
    factors = Tiny().sample_factors(4000, np.random.default_rng(7))
    binned = discretise(np.asarray(Tiny().images(factors)), 6)
    edges = np.histogram_bin_edges(np.asarray(Tiny().images(factors))[:, 0], bins=6)
    assert np.array_equal(binned[:, 0], np.clip(np.digitize(Tiny().images(factors)[:, 0], edges[1:-1]), 0, 5))

    def mi_by_hand(a, b):
        joint = np.zeros((a.max() + 1, b.max() + 1))
        np.add.at(joint, (a, b), 1.0)
        joint /= joint.sum()
        outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        nz = joint > 0
        return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())

    expected = [[mi_by_hand(binned[:, j], factors[:, k]) for k in range(2)] for j in range(2)]
    assert np.allclose(result["mutual_information"], expected, atol=1e-12)
    entropy = [mi_by_hand(factors[:, k], factors[:, k]) for k in range(2)]
    gaps = [(max(col) - min(col)) / h for col, h in zip(np.array(expected).T, entropy)]
    assert result["mig"] == pytest.approx(np.mean(gaps), abs=1e-12)


def test_scores_are_reproducible_from_the_seed():
    encode = noise(4)
    a = disentanglement_scores(lambda x: aligned(x) + 0.5 * encode(x), GRID, seed=3, num_train=300, num_eval=200,
                               num_points=2000)
    encode = noise(4)
    b = disentanglement_scores(lambda x: aligned(x) + 0.5 * encode(x), GRID, seed=3, num_train=300, num_eval=200,
                               num_points=2000)
    assert a.pop("protocol").pop("seconds") >= 0 and b.pop("protocol").pop("seconds") >= 0  # wall time differs
    assert a == b


def test_the_quick_protocol_is_the_default_and_says_its_precision():
    scores = disentanglement_scores(aligned, GRID, seed=0, batch_size=4, num_train=100, num_eval=50, num_points=300,
                                    progress=False)
    assert scores["protocol"]["name"] == "quick" and scores["protocol"]["num_eval"] == 50
    assert scores["protocol"]["images"] == (100 + 50) * 4 * 3 + 2 * 300
    accuracy = scores["beta_vae"]["eval_accuracy"]
    assert scores["beta_vae"]["eval_accuracy_se"] == pytest.approx((accuracy * (1 - accuracy) / 50) ** 0.5)
    with pytest.raises(ElbolabError, match="protocol"):
        disentanglement_scores(aligned, GRID, protocol="slow")


def test_bad_inputs_are_refused():
    with pytest.raises(ElbolabError, match="num_train"):
        beta_vae_score(aligned, GRID, num_train=0)
    with pytest.raises(ElbolabError, match="batch_size >= 2"):
        factor_vae_score(aligned, GRID, batch_size=1)
    with pytest.raises(ElbolabError, match="finite latent means"):
        mutual_information_gap(lambda x: torch.full((len(x), 2), float("nan")), GRID, num_points=10)

    class OneFactor(FactorGrid):
        factor_sizes = (1, 3, 1, 1, 1, 1)

    with pytest.raises(ElbolabError, match="at least two factors"):
        mutual_information_gap(aligned, OneFactor(), num_points=10)


def test_position_moments_of_sprites_score_on_position_only():
    """An encoder of image moments (centroid, area) on the real sprites: the centroid codes posX and posY alone,
    the area codes scale (and shape, the shapes' areas differ); no dimension codes orientation."""
    sprites = Sprites()
    grid = torch.arange(64, dtype=torch.float64) + 0.5

    def moments(x):
        images = x.reshape(-1, 64, 64).to(torch.float64)
        area = images.sum((1, 2))
        return torch.stack([(images.sum(1) * grid).sum(1) / area, (images.sum(2) * grid).sum(1) / area, area], 1)

    result = mutual_information_gap(moments, sprites, seed=0, num_points=5000, bins=32)
    gaps = result["per_factor"]
    assert gaps["posX"] > 0.9 and gaps["posY"] > 0.9 and gaps["scale"] > 0.5
    assert gaps["orientation"] < 0.05
    mi = np.array(result["mutual_information"])  # [3 dims, 5 factors]: the area tells scale best
    assert np.argmax(mi[2]) == list(result["per_factor"]).index("scale")
    model = torch.nn.Linear(4096, 2)
    model.latent_means = lambda x: {"z": model(x)}
    codes = model_encoder(model, batch_size=7)(sprites.images(sprites.sample_factors(20, np.random.default_rng(0))))
    assert codes.shape == (20, 2)
