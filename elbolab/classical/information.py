"""Entropy, cross-entropy and KL divergence of discrete distributions (notes 001 s4).

A distribution is an array of probabilities over the LAST axis (non-negative, summing to 1 within ``atol``);
leading axes are a batch and give one value per distribution. ``0 log 0 = 0``. Values are in nats by default;
``base=2`` gives bits.

    H(p)       = -sum_i p_i log p_i
    H(p, q)    = -sum_i p_i log q_i            (inf if some q_i = 0 where p_i > 0)
    KL(p || q) =  sum_i p_i log(p_i / q_i) = H(p, q) - H(p) >= 0     (Gibbs' inequality: H(p, q) >= H(p))
    I(x; c)    =  H(mean_n q_n) - mean_n H(q_n) = mean_n KL(q_n || mean_m q_m)   (rows q_n = q(c | x_n))
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import rel_entr, xlogy

from elbolab.errors import ElbolabError

SUM_ATOL = 1e-6


def _as_distribution(p, name: str, atol: float = SUM_ATOL) -> np.ndarray:
    array = np.asarray(p)
    if array.dtype.kind not in "iuf" or array.ndim == 0 or array.shape[-1] == 0:
        raise ElbolabError(f"{name} must be a real array of probabilities over its last axis, got "
                           f"dtype {array.dtype} and shape {array.shape}.")
    array = array.astype(np.float64)
    if not np.isfinite(array).all() or (array < 0).any():
        raise ElbolabError(f"{name} must contain finite non-negative probabilities, got min {np.nanmin(array)!r} "
                           f"and {int((~np.isfinite(array)).sum())} NaN/inf values.")
    sums = array.sum(axis=-1)
    if not np.allclose(sums, 1.0, rtol=0.0, atol=atol):
        worst = float(sums.flat[np.argmax(np.abs(sums - 1.0))])
        raise ElbolabError(f"{name} must sum to 1 over its last axis (within {atol}), got a sum of {worst!r}; "
                           "divide by p.sum(axis=-1, keepdims=True) to normalise.")
    return array


def _scale(values: np.ndarray, base: float | None):
    if base is not None:
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0 or base == 1:
            raise ElbolabError(f"base must be a positive number other than 1 (e.g. 2 for bits), got {base!r}.")
        values = values / math.log(base)
    return float(values) if np.ndim(values) == 0 else values


def _pair(p, q) -> tuple[np.ndarray, np.ndarray]:
    p, q = _as_distribution(p, "p"), _as_distribution(q, "q")
    if p.shape[-1] != q.shape[-1]:
        raise ElbolabError(f"p and q must have the same number of outcomes, got {p.shape[-1]} and {q.shape[-1]}.")
    try:
        np.broadcast_shapes(p.shape, q.shape)
    except ValueError as error:
        raise ElbolabError(f"p {p.shape} and q {q.shape} do not broadcast.") from error
    return p, q


def entropy(p, base: float | None = None):
    """``H(p) = -sum_i p_i log p_i`` over the last axis (a float for one distribution)."""
    p = _as_distribution(p, "p")
    return _scale(-xlogy(p, p).sum(axis=-1), base)


def cross_entropy(p, q, base: float | None = None):
    """``H(p, q) = -sum_i p_i log q_i``; inf where ``q_i = 0`` and ``p_i > 0``."""
    p, q = _pair(p, q)
    with np.errstate(divide="ignore"):
        return _scale(-xlogy(p, q).sum(axis=-1), base)


def kl_divergence(p, q, base: float | None = None):
    """``KL(p || q) = sum_i p_i log(p_i / q_i) >= 0``; inf where ``q_i = 0`` and ``p_i > 0``."""
    p, q = _pair(p, q)
    return _scale(rel_entr(p, q).sum(axis=-1), base)


def binary_entropy(p, base: float | None = None):
    """Entropy of a Bernoulli(p) variable, elementwise for ``p`` in [0, 1]; maximal (log 2) at ``p = 0.5``."""
    p = np.asarray(p)
    if p.dtype.kind not in "iuf":
        raise ElbolabError(f"p must be real probabilities in [0, 1], got dtype {p.dtype}.")
    p = p.astype(np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ElbolabError(f"p must be probabilities in [0, 1], got values from {np.nanmin(p)!r} to {np.nanmax(p)!r}.")
    return _scale(-(xlogy(p, p) + xlogy(1.0 - p, 1.0 - p)), base)


def mutual_information(assignments, base: float | None = None) -> float:
    """``I(x; c)`` between a data set (x uniform over the rows) and soft cluster assignments ``q(c | x_n)``, the rows
    of ``assignments`` [N, K]: ``H(mean_n q_n) - mean_n H(q_n)``. At most ``log K``, reached by confident (one-hot)
    and balanced assignments; 0 when every row is the same. Unsupervised, it ranks clusterings of the same data
    (the information-maximisation criterion of Krause, Perona & Gomes 2010)."""
    q = _as_distribution(assignments, "assignments")
    if q.ndim != 2:
        raise ElbolabError(f"assignments must be a [N, K] array of rows q(c|x), got shape {q.shape}.")
    marginal = q.mean(axis=0)
    return _scale(-xlogy(marginal, marginal).sum() + xlogy(q, q).sum(axis=1).mean(), base)
