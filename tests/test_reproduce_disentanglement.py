"""benchmarks/reproduce/disentanglement.py's position geometry: on codes of known shape (a flat grid on two axes,
the same grid rotated, and one folded through four dimensions) it must tell a rotated code from a folded one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPRODUCE = Path(__file__).resolve().parent.parent / "benchmarks" / "reproduce"
sys.path.insert(0, str(REPRODUCE))
disentanglement = pytest.importorskip("disentanglement")


class FactorGrid:
    """Factor data whose "images" are the factor indices themselves, so an encoder can be any function of them."""

    factor_names = ("shape", "posX", "posY")
    factor_sizes = (3, 32, 32)

    def sample_factors(self, n, generator):
        return np.stack([generator.integers(0, s, n) for s in self.factor_sizes], axis=1)

    def images(self, factors):
        return torch.as_tensor(np.asarray(factors), dtype=torch.float64)


def flat(x):
    return torch.stack([x[:, 1] / 9, x[:, 2] / 9, 0.01 * x[:, 0], torch.zeros(len(x))], dim=1)


def rotated(x):
    angle = torch.tensor(0.6)
    c, s = torch.cos(angle), torch.sin(angle)
    u, v = x[:, 1] / 9, x[:, 2] / 9
    return torch.stack([c * u - s * v, s * u + c * v, 0.01 * x[:, 0], torch.zeros(len(x))], dim=1)


def folded(x):
    # position on two arcs of 0.95 turn each: every value kept (the ends stay apart), neither linear
    a, b = 1.9 * np.pi * x[:, 1] / 31, 1.9 * np.pi * x[:, 2] / 31
    return torch.stack([torch.cos(a), torch.sin(a), torch.cos(b), torch.sin(b)], dim=1)


@pytest.mark.parametrize("encode, angle", [(flat, 0.0), (rotated, np.degrees(0.6))])
def test_a_flat_grid_is_linear_and_spans_two_dimensions_at_its_angle(encode, angle):
    g = disentanglement.position_geometry(encode, FactorGrid(), num_points=2000, sprites=2)
    assert min(g["r2_linear"].values()) > 0.99
    assert min(g["r2_knn"].values()) > 0.95
    assert g["grid_dims"] == pytest.approx(2.0, abs=0.05)
    assert g["axis_angle"] == pytest.approx(angle, abs=0.1)  # the rotation by 0.6 rad = 34.4 degrees
    assert np.asarray(g["grid"]).shape == (32, 32, 2)


def test_a_folded_grid_keeps_position_but_not_linearly_and_spans_four_dimensions():
    g = disentanglement.position_geometry(folded, FactorGrid(), num_points=2000, sprites=2)
    assert max(g["r2_linear"].values()) < 0.7  # a line through an arc of almost a turn fits part of it only
    assert min(g["r2_knn"].values()) > 0.9  # 10 neighbours among 1,000 points average nearby positions
    assert g["grid_dims"] == pytest.approx(4.0, abs=0.1)
    assert g["axis_angle"] < 1  # each dimension follows x alone or y alone: folded, not rotated


def test_the_result_file_keeps_the_grid_of_the_last_score_only():
    scores = [{"epoch": e, "position": {"grid_dims": 2.0, "grid": [[0.0]]}} for e in (1, 2, 3)]
    slim = disentanglement.without_old_grids(scores)
    assert ["grid" in x["position"] for x in slim] == [False, False, True]
    assert all(x["position"]["grid_dims"] == 2.0 for x in slim)
