"""Entropy, cross-entropy and KL (notes 001 s4) against scipy.stats.entropy and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy as scipy_entropy

from elbolab.classical.information import binary_entropy, cross_entropy, entropy, kl_divergence
from elbolab.errors import ElbolabError


def random_distributions(seed, shape, zeros=False):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    if zeros:
        p[..., 0] = 0.0
        p /= p.sum(axis=-1, keepdims=True)
    return p


@pytest.mark.parametrize("base", [None, 2.0, 10.0])
@pytest.mark.parametrize("zeros", [False, True])
def test_matches_scipy(base, zeros):
    p = random_distributions(0, (5, 7), zeros)
    q = random_distributions(1, (5, 7))
    np.testing.assert_allclose(entropy(p, base=base), scipy_entropy(p, base=base, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(kl_divergence(p, q, base=base), scipy_entropy(p, q, base=base, axis=-1),
                               rtol=1e-12)
    # H(p, q) = H(p) + KL(p || q), both sides from scipy
    np.testing.assert_allclose(cross_entropy(p, q, base=base),
                               scipy_entropy(p, base=base, axis=-1) + scipy_entropy(p, q, base=base, axis=-1),
                               rtol=1e-12)
    assert isinstance(entropy(p[0]), float)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_gibbs_inequality(k, seed):
    p, q = random_distributions(seed, (k,)), random_distributions(seed + 1, (k,))
    assert cross_entropy(p, q) >= entropy(p) - 1e-12
    assert kl_divergence(p, q) >= -1e-12  # Gibbs: KL >= 0, up to rounding
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert entropy(p) <= math.log(k) + 1e-12  # the uniform distribution has the largest entropy


def test_zero_probabilities():
    assert entropy([1.0, 0.0, 0.0]) == 0.0  # 0 log 0 = 0
    assert cross_entropy([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert entropy(np.full(8, 1 / 8), base=2) == pytest.approx(3.0)


def test_binary_entropy_maximum_at_one_half():
    grid = np.linspace(0, 1, 10001)
    values = binary_entropy(grid)
    # where the maximum lies, not an argmax among neighbours that differ by ~2e-8: every grid point within 1e-4
    # of the largest value is within 0.01 of 0.5, and the value at 0.5 is the largest up to rounding
    near_top = grid[values > values.max() - 1e-4]
    assert near_top.min() > 0.49 and near_top.max() < 0.51
    assert binary_entropy(0.5) >= values.max() - 1e-15
    assert values.max() == pytest.approx(math.log(2))
    assert binary_entropy(0.5, base=2) == pytest.approx(1.0)
    assert binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    np.testing.assert_allclose(values, scipy_entropy(np.stack([grid, 1 - grid]), axis=0), atol=1e-15)
    # the notes' derivative -log(p / (1 - p)) vanishes only at 0.5; check it by finite differences
    h = 1e-6
    for p in (0.2, 0.5, 0.8):
        slope = (binary_entropy(p + h) - binary_entropy(p - h)) / (2 * h)
        assert slope == pytest.approx(-math.log(p / (1 - p)), abs=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: entropy([0.5, 0.6]), "sum to 1"),
    (lambda: entropy([1.5, -0.5]), "non-negative"),
    (lambda: entropy([np.nan, 1.0]), "NaN"),
    (lambda: entropy([]), "probabilities"),
    (lambda: entropy(["a"]), "real"),
    (lambda: kl_divergence([0.5, 0.5], [0.2, 0.3, 0.5]), "same number"),
    (lambda: cross_entropy(np.full((2, 2), 0.5), np.full((3, 2), 0.5)), "broadcast"),
    (lambda: entropy([0.5, 0.5], base=1), "base"),
    (lambda: binary_entropy(1.2), r"\[0, 1\]"),
])
def test_bad_input_raises_one_clear_error(call, match):
    with pytest.raises(ElbolabError, match=match):
        call()


def test_mutual_information_is_the_mean_kl_to_the_marginal_and_sklearn_on_hard_assignments():
    from sklearn.metrics import mutual_info_score

    from elbolab.classical.information import mutual_information

    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.full(4, 0.5), size=50)  # [N, K] soft assignments
    marginal = q.mean(0)
    expected = np.mean([kl_divergence(row, marginal) for row in q])  # I(x; c) = E_x KL(q(c|x) || q(c))
    assert mutual_information(q) == pytest.approx(expected, rel=1e-12)
    assert mutual_information(q, base=2) == pytest.approx(expected / math.log(2), rel=1e-12)
    # one-hot rows: I(x; c) = H(c), the entropy of the cluster sizes (sklearn, x = the row index)
    clusters = rng.integers(0, 3, size=40)
    one_hot = np.eye(3)[clusters]
    assert mutual_information(one_hot) == pytest.approx(mutual_info_score(np.arange(40), clusters), rel=1e-12)
    assert mutual_information(np.eye(5)) == pytest.approx(math.log(5))  # confident and balanced: the maximum
    assert mutual_information(np.tile(q[:1], (10, 1))) == pytest.approx(0.0, abs=1e-12)  # rows all alike
    with pytest.raises(ElbolabError, match=r"\[N, K\]"):
        mutual_information(q[0])
