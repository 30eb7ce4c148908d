"""Calculus of variations (notes 002 s1): direct minimisation against Euler-Lagrange solutions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from elbolab.classical.ising_cli import functional_app
from elbolab.classical.variations import (
    arc_length_lagrangian,
    euler_lagrange_residual,
    functional_value,
    minimize_functional,
)
from elbolab.errors import ElbolabError


def test_shortest_curve_is_the_straight_line():
    result = minimize_functional(arc_length_lagrangian, 0.0, 2.0, 1.0, 3.0, n_points=33)
    line = 1.0 + result.x
    assert result.converged and result.euler_lagrange_residual < 1e-5
    assert np.abs(result.y - line).max() < 1e-6
    assert np.abs(result.iterates[0] - line).max() > 0.3  # it started far from the line
    assert result.value == pytest.approx(math.hypot(2.0, 2.0), rel=1e-12)
    assert result.history[0] > result.value and len(result.iterates) == len(result.history)
    assert np.abs(euler_lagrange_residual(arc_length_lagrangian, result.x, result.iterates[0])).max() > 0.1


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("optimizer", ["adam", "gd"])
def test_first_order_optimizers_approach_the_line(optimizer):
    # 300 steps may stop short of tol, but the curve gets close
    result = minimize_functional(arc_length_lagrangian, 0.0, 1.0, 0.0, 0.5, n_points=9, steps=300,
                                 optimizer=optimizer, lr=0.02 if optimizer == "adam" else None)
    assert np.abs(result.y - 0.5 * result.x).max() < 0.05 < np.abs(result.iterates[0] - 0.5 * result.x).max()


def sinh_lagrangian(x, y, dy):
    return 0.5 * dy**2 + 0.5 * y**2  # Euler-Lagrange: y'' = y


def test_second_functional_matches_analytic_solution_with_second_order_error():
    errors = []
    for n in (17, 33):
        result = minimize_functional(sinh_lagrangian, 0.0, 1.0, 0.0, 1.0, n_points=n)
        assert result.converged
        errors.append(np.abs(result.y - np.sinh(result.x) / math.sinh(1.0)).max())
    assert errors[1] < 3e-5
    assert 3.0 < errors[0] / errors[1] < 5.0  # midpoint rule: error O(h^2)


def test_lagrangian_with_explicit_x():
    # L = y'^2 / 2 + x y  ->  y'' = x  ->  y = x^3 / 6 + c x with y(0) = 0, y(1) = 1: c = 5 / 6
    result = minimize_functional(lambda x, y, dy: 0.5 * dy**2 + x * y, 0.0, 1.0, 0.0, 1.0, n_points=33)
    np.testing.assert_allclose(result.y, result.x**3 / 6 + 5 * result.x / 6, atol=1e-4)


def test_residual_against_analytic_euler_lagrange_expression():
    # For y = x^2 the arc-length E-L expression is -y'' / (1 + y'^2)^(3/2) = -2 / (1 + 4 x^2)^(3/2).
    x = np.linspace(0.0, 1.0, 81)
    residual = euler_lagrange_residual(arc_length_lagrangian, x, x**2)
    np.testing.assert_allclose(residual, -2.0 / (1.0 + 4.0 * x[1:-1] ** 2) ** 1.5, atol=1e-3)
    # and the discretised functional is the arc length of the parabola
    exact = (2 * math.sqrt(5) + math.asinh(2)) / 4
    assert functional_value(arc_length_lagrangian, x, x**2) == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x0=1.0, x1=0.0), "x0 < x1"), (dict(n_points=2), "n_points"), (dict(optimizer="newton"), "optimizer"),
    (dict(lr=-1.0), "lr"), (dict(y0=float("nan")), "y0"), (dict(y_init=np.zeros(5)), "y_init"),
    (dict(lagrangian=lambda x, y, dy: dy.sum()), "shape"), (dict(lagrangian="arc"), "function"),
])
def test_bad_input_raises_one_clear_error(kwargs, match):
    call = dict(lagrangian=arc_length_lagrangian, x0=0.0, x1=1.0, y0=0.0, y1=1.0)
    call.update(kwargs)
    args = [call.pop(name) for name in ("lagrangian", "x0", "x1", "y0", "y1")]
    with pytest.raises(ElbolabError, match=match):
        minimize_functional(*args, steps=5, **call)


def test_cli_shortest_curve(tmp_path):
    app = typer.Typer()
    app.add_typer(functional_app, name="functional")
    app.command("unused")(lambda: None)
    result = CliRunner().invoke(app, ["functional", "shortest-curve", "--points", "17",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "iterates.png").is_file()
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["max_deviation_from_line"] < 1e-6 and summary["euler_lagrange_residual"] < 1e-5
    assert summary["length"] == pytest.approx(math.sqrt(2.0), rel=1e-10)


def test_torch_is_float64():
    seen = []
    minimize_functional(lambda x, y, dy: seen.append(dy.dtype) or torch.sqrt(1 + dy**2), 0.0, 1.0, 0.0, 1.0,
                        n_points=5)
    assert set(seen) == {torch.float64}
