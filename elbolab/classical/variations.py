"""Calculus of variations by direct minimisation (notes 002 s1).

Minimise ``J[y] = int_{x0}^{x1} L(x, y(x), y'(x)) dx`` over curves with fixed end points ``y(x0) = y0``,
``y(x1) = y1``. The curve is discretised on ``N`` equally spaced nodes ``x_k = x0 + k h`` (``h = (x1 - x0) /
(N - 1)``) and the integral by the midpoint rule on each of the ``N - 1`` intervals::

    J_h[y] = sum_{k=0}^{N-2} L(x_{k+1/2}, (y_k + y_{k+1}) / 2, (y_{k+1} - y_k) / h) * h

The interior values ``y_1 .. y_{N-2}`` are optimised with autograd gradients (L-BFGS, Adam or plain gradient
descent). A minimiser of ``J`` satisfies the Euler-Lagrange equation ``dL/dy - d/dx dL/dy' = 0``; its
discretisation at an interior node ``k``::

    R_k = (L_y(k-1/2) + L_y(k+1/2)) / 2 - (L_y'(k+1/2) - L_y'(k-1/2)) / h

(partial derivatives of ``L`` at the interval midpoints, by autograd) approximates the continuous E-L
expression to O(h^2) and equals ``(dJ_h / dy_k) / h``, so it vanishes at the discrete minimiser.
``L`` must act elementwise: ``lagrangian(x, y, dy)`` gets three ``[N-1]`` float64 tensors and returns ``[N-1]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from elbolab.errors import ElbolabError

Lagrangian = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS = ("lbfgs", "adam", "gd")


def arc_length_lagrangian(x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``L = sqrt(1 + y'^2)``: J[y] is the length of the curve; the minimiser is the straight line."""
    return torch.sqrt(1.0 + dy**2)


@dataclass(frozen=True)
class FunctionalResult:
    x: np.ndarray  # [N] nodes, end points included
    y: np.ndarray  # [N] the final curve
    value: float  # J_h[y]
    history: list[float]  # J_h after each recorded step, starting with the initial curve
    iterates: list[np.ndarray] = field(repr=False)  # [N] curves at the recorded steps, the initial one first
    euler_lagrange_residual: float = math.nan  # max_k |R_k| at the final curve
    n_steps: int = 0
    converged: bool = False


def _terms(lagrangian: Lagrangian, x: torch.Tensor, y: torch.Tensor):
    """Midpoints, slopes and the per-interval ``L * h`` ``[N-1]`` of the discretised functional."""
    h = x[1] - x[0]
    x_mid, y_mid, slope = (x[1:] + x[:-1]) / 2, (y[1:] + y[:-1]) / 2, (y[1:] - y[:-1]) / h
    values = lagrangian(x_mid, y_mid, slope)
    if not isinstance(values, torch.Tensor) or values.shape != x_mid.shape:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ElbolabError(f"lagrangian(x, y, dy) must return a tensor of shape {tuple(x_mid.shape)} (one value "
                           f"per interval, elementwise in its inputs), got {got}.")
    return x_mid, y_mid, slope, values * h


def functional_value(lagrangian: Lagrangian, x, y) -> float:
    """``J_h[y]`` for nodes ``x`` [N] (equally spaced) and values ``y`` [N]."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    return float(_terms(lagrangian, x, y)[3].sum())


def euler_lagrange_residual(lagrangian: Lagrangian, x, y) -> np.ndarray:
    """``R_k`` of the module docstring at the interior nodes, ``[N-2]``."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    h = x[1] - x[0]
    x_mid, y_mid, slope = (x[1:] + x[:-1]) / 2, (y[1:] + y[:-1]) / 2, (y[1:] - y[:-1]) / h
    y_mid, slope = y_mid.clone().requires_grad_(True), slope.clone().requires_grad_(True)
    values = lagrangian(x_mid, y_mid, slope)
    d_y, d_slope = torch.autograd.grad(values.sum(), (y_mid, slope), allow_unused=True)
    d_y = torch.zeros_like(y_mid) if d_y is None else d_y
    d_slope = torch.zeros_like(slope) if d_slope is None else d_slope
    residual = (d_y[:-1] + d_y[1:]) / 2 - (d_slope[1:] - d_slope[:-1]) / h
    return residual.detach().numpy()


def _check_inputs(lagrangian, x0, x1, y0, y1, n_points, steps, lr, optimizer) -> None:
    if not callable(lagrangian):
        raise ElbolabError(f"lagrangian must be a function L(x, y, dy) of torch tensors, got {lagrangian!r}.")
    for name, value in (("x0", x0), ("x1", x1), ("y0", y0), ("y1", y1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ElbolabError(f"{name} must be a finite number, got {value!r}.")
    if not x1 > x0:
        raise ElbolabError(f"Expected x0 < x1, got x0={x0!r}, x1={x1!r}; swap the end points.")
    for name, value, low in (("n_points", n_points, 3), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ElbolabError(f"{name} must be an integer >= {low}, got {value!r}.")
    if optimizer not in OPTIMIZERS:
        raise ElbolabError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
        raise ElbolabError(f"lr must be a positive number or None (the optimizer's default), got {lr!r}.")


def default_initial_curve(x: np.ndarray, y0: float, y1: float) -> np.ndarray:
    """The straight line plus two sine bumps of size 0.3 (x1 - x0): a curvy start with the right end points."""
    t = (x - x[0]) / (x[-1] - x[0])
    return y0 + (y1 - y0) * t + 0.3 * (x[-1] - x[0]) * (np.sin(np.pi * t) + 0.5 * np.sin(3 * np.pi * t))


def minimize_functional(lagrangian: Lagrangian, x0: float, x1: float, y0: float, y1: float, *,
                        n_points: int = 33, steps: int = 1000, lr: float | None = None,
                        optimizer: str = "lbfgs", y_init=None, tol: float = 1e-5,
                        record_every: int = 1) -> FunctionalResult:
    """Minimise ``J_h[y]`` with fixed end points; stop when ``max_k |R_k| < tol`` or after ``steps`` steps.

    ``y_init`` is None (:func:`default_initial_curve`), a function of the nodes, or an ``[N]`` array (its end
    values are replaced by ``y0, y1``). ``lr`` defaults to 1 (L-BFGS, with a strong-Wolfe line search), 1e-2
    (Adam) or ``h / 4`` (gradient descent; stable when ``d^2 L / dy'^2 <= 1``, as for the arc length).
    One step is one optimizer iteration; ``record_every`` sets how often the curve goes into ``iterates``.

    Near the optimum the line search compares values of ``J_h`` that agree to float64 precision, so with many
    points L-BFGS can stall above a very small ``tol``; the run then stops early with ``converged=False`` and a
    ConvergenceWarning (fewer points or a larger tol help).
    """
    _check_inputs(lagrangian, x0, x1, y0, y1, n_points, steps, lr, optimizer)
    x_np = np.linspace(x0, x1, n_points)
    start = default_initial_curve(x_np, y0, y1) if y_init is None else (
        y_init(x_np) if callable(y_init) else y_init)
    start = np.array(start, dtype=np.float64)
    if start.shape != (n_points,) or not np.isfinite(start).all():
        raise ElbolabError(f"y_init must give {n_points} finite values, got shape {start.shape}.")
    x = torch.from_numpy(x_np)
    h = float(x[1] - x[0])
    ends = torch.tensor([y0], dtype=torch.float64), torch.tensor([y1], dtype=torch.float64)
    interior = torch.from_numpy(start[1:-1]).clone().requires_grad_(True)

    def curve() -> torch.Tensor:
        return torch.cat([ends[0], interior, ends[1]])

    def objective() -> torch.Tensor:
        return _terms(lagrangian, x, curve())[3].sum()

    if optimizer == "lbfgs":
        # One iteration per step so every iterate is seen; max_eval must be given explicitly, as its default
        # (5/4 of max_iter) would leave the line search no function evaluations.
        opt = torch.optim.LBFGS([interior], lr=lr or 1.0, max_iter=1, max_eval=25, history_size=50,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    elif optimizer == "adam":
        opt = torch.optim.Adam([interior], lr=lr or 1e-2)
    else:
        opt = torch.optim.SGD([interior], lr=lr or h / 4)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.no_grad():
        first = float(objective())
    if not math.isfinite(first):
        raise ElbolabError(f"J[y] of the initial curve is {first}; check the lagrangian and y_init.")
    history, iterates = [first], [curve().detach().numpy().copy()]
    residual, step = math.inf, 0
    previous = curve().detach()
    stalled = False
    for step in range(1, steps + 1):
        opt.step(closure)
        y_now = curve().detach()
        stalled, previous = bool(torch.equal(y_now, previous)), y_now
        residual = float(np.abs(euler_lagrange_residual(lagrangian, x, y_now)).max())
        if step % record_every == 0 or residual < tol:
            history.append(functional_value(lagrangian, x, y_now))
            iterates.append(y_now.numpy().copy())
        if residual < tol or stalled:
            break
    converged = residual < tol
    if not converged:
        why = "the optimizer stalled (no change in a step)" if stalled else f"{steps} steps"
        warnings.warn(f"minimize_functional stopped after {why} with Euler-Lagrange residual "
                      f"{residual:.3g} > tol={tol}; try more steps, a larger tol, or fewer points.",
                      ConvergenceWarning, stacklevel=2)
    y_final = curve().detach().numpy().copy()
    return FunctionalResult(x=x_np, y=y_final, value=functional_value(lagrangian, x, y_final), history=history,
                            iterates=iterates, euler_lagrange_residual=residual, n_steps=step,
                            converged=converged)
