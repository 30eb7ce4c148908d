"""Shared machinery of the two Gaussian-mixture estimators: input checks, per-covariance-type linear algebra,
the chunked E-step sweep that also gathers the M-step's sufficient statistics, and the fit loop.

Conventions (as scikit-learn): ``precisions_cholesky_`` holds upper-triangular ``P`` with ``precision = P P^T``,
so the whitened residual of ``x`` under component ``k`` is ``y = P_k^T (x - mu_k)`` and the Mahalanobis term is
``|y|^2``. Internally the data are shifted by their column means (a GMM is shift-equivariant); this keeps the
second moments well conditioned in float32. Statistics are gathered around the *current* component centres in
whitened coordinates, so the M-step never subtracts two large second moments.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils import check_random_state

from elbolab.errors import DataError, ElbolabError
from elbolab.progress import Progress

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Whitened residuals per chunk, [K, D + 1, rows]: 4 MiB (and as much scratch) sits in L3. Measured on the AMD EPYC
# of BENCHMARKS.md (1 MiB L2, 32 MiB L3): fewer, larger chunks beat L2-sized ones, as their per-call overheads fall.
_CHUNK_BYTES = 4 << 20
LOG_2PI = math.log(2.0 * math.pi)


class SingularCovarianceError(ElbolabError):
    """A component's covariance is not positive definite."""


class MixtureNotFittedError(ElbolabError, NotFittedError):
    """The estimator was used before ``fit``."""


# ----------------------------------------------------------------------------------------- input checks
def as_data_matrix(X, *, dtype: torch.dtype, device: torch.device, n_features: int | None = None,
                   owner: str = "the model") -> torch.Tensor:
    """X as a finite 2-D float tensor on ``device``; one clear ``DataError`` for anything else."""
    if isinstance(X, torch.Tensor):
        if X.is_complex() or not (X.is_floating_point() or X.dtype in (torch.int8, torch.int16, torch.int32,
                                                                        torch.int64, torch.uint8, torch.bool)):
            raise DataError(f"expected real numbers in X, got a tensor of dtype {X.dtype} (Complex data not "
                            "supported)")
        t = X.detach()
    else:
        if hasattr(X, "toarray"):
            raise DataError("expected a dense X, got a sparse matrix (sparse input is not supported): pass "
                            "X.toarray()")
        try:
            arr = np.asarray(X)
            if arr.dtype == object:  # e.g. numbers in an object-dtype frame
                arr = arr.astype(np.float64)
        except (ValueError, TypeError) as err:
            raise DataError("expected X as a 2-D numeric array [n_samples, n_features], could not read it: "
                            f"{err}") from None
        if arr.dtype.kind == "c":
            raise DataError("expected real numbers in X, got complex numbers. Complex data not supported")
        if arr.dtype.kind not in "biuf":
            raise DataError(f"expected real numbers in X, got array dtype {arr.dtype}; convert the columns to "
                            "numbers (drop labels / text columns)")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        hint = ". Reshape your data: X.reshape(-1, 1) for one feature" if t.ndim == 1 else ""
        raise DataError(f"expected X with 2 dimensions [n_samples, n_features], got shape {tuple(t.shape)}{hint}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise DataError(f"expected a non-empty X, got {t.shape[1]} feature(s) (shape={tuple(t.shape)}) while a "
                        "minimum of 1 is required. Pass at least one row and one column")
    if n_features is not None and t.shape[1] != n_features:
        raise DataError(f"X has {t.shape[1]} features, but {owner} is expecting {n_features} features as input "
                        "(as during fit)")
    t = t.to(device=device, dtype=dtype)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        hint = " (values beyond the float32 range become inf: use dtype='float64')" if dtype == torch.float32 else ""
        raise DataError(f"expected finite values in X, got {int(bad.sum())} NaN/inf entries, first at row {row}, "
                        f"column {col}{hint}; remove or impute those rows")
    return t


def overflow_message(dtype: torch.dtype, biggest: float | None = None) -> str:
    """The data are finite but their squares (the moments every fit computes) are not representable."""
    up_to = f" (values up to {biggest:.3g})".replace("e+", "e") if biggest is not None else ""
    message = (f"the data overflow {str(dtype).replace('torch.', '')} arithmetic{up_to}; standardise the columns "
               "(subtract the mean, divide by the s.d.)")
    return message + (", or use dtype='float64'" if dtype == torch.float32 else "")


def check_no_overflow(X: torch.Tensor, Xc: torch.Tensor | None = None) -> None:
    """Refuse finite data whose column means or sums of squares (about the means, ``Xc`` when given) overflow: the
    fit would meet infinite covariances and blame a singular one."""
    Xc = X - X.mean(0) if Xc is None else Xc
    if not (bool(torch.isfinite(Xc).all()) and bool(torch.isfinite((Xc * Xc).sum(0)).all())):
        raise DataError(overflow_message(X.dtype, float(X.abs().max())))


def as_param_tensor(value, shape: tuple, name: str, *, dtype, device) -> torch.Tensor:
    """A user-supplied parameter array (weights_init, mean_prior, ...) with an exact shape and finite values."""
    try:
        t = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (ValueError, TypeError):
        raise ElbolabError(f"expected {name} as numbers of shape {shape}, could not read "
                           f"{type(value).__name__}") from None
    if tuple(t.shape) != tuple(shape):
        raise ElbolabError(f"expected {name} of shape {tuple(shape)}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ElbolabError(f"expected finite values in {name}, got NaN or inf")
    return t.to(device=device, dtype=dtype)


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ElbolabError(f"expected {name} in {list(choices)}, got {value!r}")


def check_number(value, name: str, *, low: float, integer: bool = False, strict: bool = False) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ElbolabError(f"expected {name} to be {kind} {'>' if strict else '>='} {low}, got {value!r}")


# ---------------------------------------------------------------------------------------- linear algebra
def singular_message(components, reg_covar: float, n_components: int, dtype: torch.dtype) -> str:
    msg = (f"component(s) {components} of the mixture have a singular covariance (a component collapsed onto "
           f"too few or duplicate points): raise reg_covar (now {reg_covar:g}), use fewer components "
           f"(now {n_components}), or scale the data (standardise the columns)")
    return msg + (" ; float64 (dtype='float64') is also more robust" if dtype == torch.float32 else "")


def precision_cholesky(cov: torch.Tensor, cov_type: str, *, reg_covar: float, n_components: int) -> torch.Tensor:
    """Upper ``P`` with ``P P^T = cov^{-1}``: ``P = L^{-T}`` from one triangular solve against the identity."""
    if not bool(torch.isfinite(cov).all()):  # from finite data (as_data_matrix checks): an overflow, not a collapse
        raise DataError(overflow_message(cov.dtype).replace("the data overflow", "the covariances computed from the "
                                                            "data overflow"))
    if cov_type in ("full", "tied"):
        chol, info = torch.linalg.cholesky_ex(cov)
        bad = (info != 0) | ~torch.isfinite(chol).flatten(-2).all(-1)
        if bool(bad.any()):
            where = bad.nonzero().flatten().tolist() if cov_type == "full" else "(tied)"
            raise SingularCovarianceError(singular_message(where, reg_covar, n_components, cov.dtype))
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(chol)
        return torch.linalg.solve_triangular(chol, eye, upper=False).mT
    bad = ~(cov > 0) | ~torch.isfinite(cov)
    if bool(bad.any()):
        rows = bad.reshape(n_components, -1).any(-1).nonzero().flatten().tolist()
        raise SingularCovarianceError(singular_message(rows, reg_covar, n_components, cov.dtype))
    return cov.rsqrt()


def precision_cholesky_from_precision(prec: torch.Tensor, cov_type: str, name: str) -> torch.Tensor:
    """Upper ``P`` with ``P P^T = prec``: the Cholesky factor of the index-reversed matrix, reversed back."""
    if cov_type in ("full", "tied"):
        if not bool(torch.allclose(prec, prec.mT, rtol=1e-6, atol=1e-10)):
            raise ElbolabError(f"expected {name} to be symmetric matrices, got asymmetric ones")
        flipped, info = torch.linalg.cholesky_ex(prec.flip(-2, -1))
        if bool((info != 0).any()):
            raise ElbolabError(f"expected {name} to be positive definite, got a matrix without a Cholesky factor")
        return flipped.flip(-2, -1)
    if not bool((prec > 0).all()):
        raise ElbolabError(f"expected {name} to be positive, got min {float(prec.min()):g}")
    return prec.sqrt()


def covariance_from_precision_cholesky(P: torch.Tensor, cov_type: str) -> torch.Tensor:
    if cov_type in ("full", "tied"):
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device).expand_as(P)
        inv_p = torch.linalg.solve_triangular(P, eye, upper=True)  # P^{-1}; cov = P^{-T} P^{-1}
        return inv_p.mT @ inv_p
    return P.square().reciprocal()


def precision_from_cholesky(P: torch.Tensor, cov_type: str) -> torch.Tensor:
    return P @ P.mT if cov_type in ("full", "tied") else P.square()


def log_det_cholesky(P: torch.Tensor, cov_type: str, n_features: int, n_components: int) -> torch.Tensor:
    """log |P| per component [K] (= half the log-determinant of the precision)."""
    if cov_type == "full":
        return torch.diagonal(P, dim1=-2, dim2=-1).log().sum(-1)
    if cov_type == "tied":
        return torch.diagonal(P).log().sum().expand(n_components)
    if cov_type == "diag":
        return P.log().sum(-1)
    return n_features * P.log()


class Components:
    """K Gaussians given by centres and precision Cholesky factors, batched over K.

    full / tied: rows are whitened by ONE GEMM on augmented rows ``[x, 1]`` against the K matrices
    ``A_k = [[P_k, 0], [-mu_k^T P_k, 1]]`` stacked ([K (D + 1), D + 1]: one wide product runs closer to the
    machine's peak than K narrow ones), giving ``[y, 1]`` with ``y = P_k^T (x - mu_k)``, laid out [K, D + 1, c]
    (rows along the contiguous axis: the M-step's products then reduce over contiguous memory, and the norms are
    a sum over the middle axis); the constant row makes the M-step's GEMM return the first moments and counts
    alongside the second.
    diag / spherical: the Mahalanobis term is expanded into three [c, D] x [D, K] products, always in float64
    (the expansion subtracts large terms; float64 keeps that harmless).

    ``dtype`` is the data's (the GEMM's) dtype when it differs from the parameters': the whitening matrices are
    formed in the parameters' precision and rounded once, and the M-step's small solves stay in that precision.
    """

    def __init__(self, means: torch.Tensor, prec_chol: torch.Tensor, cov_type: str, dtype: torch.dtype | None = None):
        self.means, self.prec_chol, self.cov_type = means, prec_chol, cov_type
        self.K, self.D = K, D = means.shape
        self.whitened = cov_type in ("full", "tied")
        if self.whitened:
            P = prec_chol.expand(K, D, D)
            augmented = torch.zeros(K, D + 1, D + 1, dtype=means.dtype, device=means.device)
            augmented[:, :D, :D] = P
            augmented[:, D, :D] = -(means.unsqueeze(1) @ P).squeeze(1)
            augmented[:, D, D] = 1.0
            augmented = augmented.to(dtype or means.dtype)
            self._stacked = augmented.mT.reshape(K * (D + 1), D + 1)  # [K (D + 1), D + 1], block k = A_k^T
        else:
            prec = prec_chol.double().square()
            self._prec = prec if cov_type == "diag" else prec[:, None].expand(K, D)  # [K, D]
            means64 = means.double()
            self._prec_mean = means64 * self._prec
            self._mean_term = (means64 * self._prec_mean).sum(1, keepdim=True)  # [K, 1]

    def whiten(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Augmented rows [c, D + 1] (last column 1) -> augmented whitened residuals [K, D + 1, c] (full / tied).

        ``out`` [K (D + 1), c] is an optional preallocated result buffer.
        """
        return torch.mm(self._stacked, x.T, out=out).view(self.K, self.D + 1, x.shape[0])

    def mahalanobis(self, x: torch.Tensor, x64: torch.Tensor | None = None, x64_sq: torch.Tensor | None = None):
        """Squared Mahalanobis distances [K, c] (diag / spherical: from float64 ``x64`` and ``x64_sq``)."""
        if self.whitened:
            return squared_norms(self.whiten(augment(x))) - 1.0
        if x64 is None:
            x64 = x.double()
            x64_sq = x64.square()
        maha = self._prec @ x64_sq.T - 2.0 * (self._prec_mean @ x64.T) + self._mean_term
        return maha.clamp_min_(0.0)

    def unwhiten_vectors(self, u: torch.Tensor) -> torch.Tensor:
        """[K, D] whitened sums -> sums of (x - centre): solve P^T v = u."""
        P = self.prec_chol
        if self.cov_type == "full":
            return torch.linalg.solve_triangular(P.mT, u.unsqueeze(-1), upper=False).squeeze(-1)
        return torch.linalg.solve_triangular(P.mT, u.T, upper=False).T

    def unwhiten_scatter(self, m: torch.Tensor) -> torch.Tensor:
        """Whitened second moments -> sum r (x - c)(x - c)^T = P^{-T} M P^{-1} (two triangular solves)."""
        left = torch.linalg.solve_triangular(self.prec_chol.mT, m, upper=False)
        return torch.linalg.solve_triangular(self.prec_chol, left, upper=True, left=False)


def augment(x: torch.Tensor) -> torch.Tensor:
    """[c, D] -> [c, D + 1] with a last column of ones."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)


def squared_norms(y: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """|[y, 1]|^2 = |y|^2 + 1 for [K, D + 1, c] -> [K, c]. Squares then a sum over the middle axis, both vectorised
    along the contiguous rows (vector_norm would reduce over the strided axis, far slower: BENCHMARKS.md); ``scratch``
    holds the squares."""
    return torch.mul(y, y, out=scratch).sum(1)


@dataclass
class SweepStats:
    """Sums over the data of one E-step, in float64: everything the M-step and the bound need.

    full / tied: ``first = sum_n r y`` [K, D] and ``second = sum_n r y y^T`` [K, D, D], whitened around each
    component's current centre. diag / spherical: ``first = sum_n r x`` and ``second = sum_n r x^2`` [K, D] (raw,
    in the shifted data coordinates).
    """

    log_norm: torch.Tensor  # sum_n log sum_k exp(weighted log prob)
    r_log_r: torch.Tensor  # sum_nk r log r
    nk: torch.Tensor  # [K] sum_n r
    first: torch.Tensor
    second: torch.Tensor


# exp() of arguments far below zero underflows to denormals or zero, and the vectorised exp then takes a slow path
# (timings in BENCHMARKS.md; in EM most of the [rows, K] log-responsibilities of
# well separated components are down there). Relative weights below e^FLOOR (1e-35 in float32, 1e-304 in float64)
# are raised to it: far below either dtype's resolution of the sums they enter, and still normal numbers after the
# division by at most K and a square root.
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def normalise_log_joint(log_joint: torch.Tensor, dim: int):
    """``(log_norm, r, sum r log r)`` for ``log_joint`` = log w_k N(x | k): the log-normaliser per row (keepdim),
    the responsibilities (see _EXP_FLOOR) and the entropy term summed in float64."""
    top = log_joint.amax(dim, keepdim=True)
    shifted = log_joint - top  # <= 0
    r = shifted.clamp_min(_EXP_FLOOR.get(log_joint.dtype, -80.0)).exp_()
    total = r.sum(dim, keepdim=True)  # in [1, K]
    r /= total
    log_total = total.log_()
    r_log_r = (r * (shifted - log_total)).sum(dtype=torch.float64)
    return top + log_total, r, r_log_r


def chunk_rows(n_components: int, n_features: int, itemsize: int = 8) -> int:
    return max(16, _CHUNK_BYTES // (n_components * n_features * itemsize))


def weighted_log_prob(X: torch.Tensor, comps: Components, log_const: torch.Tensor) -> torch.Tensor:
    """log w_k + log N(x | component k) for every row [N, K], with ``log_const`` [K] holding all x-free terms."""
    rows = chunk_rows(comps.K, comps.D)
    parts = [log_const[:, None] - 0.5 * comps.mahalanobis(X[s:s + rows]) for s in range(0, X.shape[0], rows)]
    return torch.cat(parts, dim=1).T.to(X.dtype)


def sweep(X: torch.Tensor, comps: Components, log_const: torch.Tensor | None = None,
          resp: torch.Tensor | None = None) -> SweepStats:
    """One pass over X: responsibilities (E-step, in log space) from ``log_const - maha / 2``, or the given
    ``resp`` [N, K], and their weighted sums (see :class:`SweepStats`)."""
    if comps.whitened:
        return _whitened_sweep(X, comps, log_const, resp)
    K, D = comps.K, comps.D
    acc = dict(dtype=torch.float64, device=X.device)
    log_norm, r_log_r, nk = torch.zeros((), **acc), torch.zeros((), **acc), torch.zeros(K, **acc)
    sums = torch.zeros((2, K, D), **acc)
    if log_const is not None:
        log_const = log_const[:, None]
    rows = chunk_rows(K, D)
    for start in range(0, X.shape[0], rows):
        x = X[start:start + rows]
        x64 = x.double()
        x64_sq = x64.square()
        maha = comps.mahalanobis(x, x64, x64_sq)  # [K, c]
        if resp is None:
            norm, r, entropy = normalise_log_joint(log_const - 0.5 * maha, dim=0)  # [1, c], [K, c]
            log_norm += norm.sum()
            r_log_r += entropy
        else:
            r = resp[start:start + rows].T
            r_log_r += torch.special.xlogy(r, r).sum()
        nk += r.sum(1)
        r64 = r.double()
        sums[0] += r64 @ x64
        sums[1] += r64 @ x64_sq
    return SweepStats(log_norm, r_log_r, nk, sums[0], sums[1])


def _whitened_sweep(X: torch.Tensor, comps: Components, log_const: torch.Tensor | None,
                    resp: torch.Tensor | None) -> SweepStats:
    """:func:`sweep` for full / tied covariances, chunk by chunk with preallocated buffers.

    Per chunk of c rows: one GEMM whitens them under all K components ([K (D + 1), D + 1] x [D + 1, c]); the
    E-step works on the [K, c] distances; then two batched GEMMs gather ``sum_n r [y, 1][y, 1]^T`` per component
    from ``sqrt(r) [y, 1]`` (its upper rows and lower-right block: it is symmetric). The GEMMs run in the data's
    dtype (float32: single-precision speed); each chunk's sums are added into float64 accumulators, so the rounding
    of a float32 run does not grow with N.
    """
    K, D, n = comps.K, comps.D, X.shape[0]
    acc = dict(dtype=torch.float64, device=X.device)
    log_norm, r_log_r, nk = torch.zeros((), **acc), torch.zeros((), **acc), torch.zeros(K, **acc)
    sums = torch.zeros((K, D + 1, D + 1), **acc)
    rows = min(n, chunk_rows(K, D + 1, X.element_size()))
    rows_aug = torch.ones(rows, D + 1, dtype=X.dtype, device=X.device)  # [c, D + 1], last column stays 1
    whitened = torch.empty(K * (D + 1) * rows, dtype=X.dtype, device=X.device)
    scratch = torch.empty_like(whitened)
    # The scatter is symmetric: per chunk, the first h rows of it (all columns) and the lower-right block, 3/4 of
    # the products of a full [D + 1, D + 1] one; the lower-left block is the transpose, filled in after the loop.
    h = (D + 1) // 2
    top, bottom = sums[:, :h, :], sums[:, h:, h:]  # views of the float64 accumulators
    if X.dtype != torch.float64:
        top_chunk = torch.empty(K, h, D + 1, dtype=X.dtype, device=X.device)
        bottom_chunk = torch.empty(K, D + 1 - h, D + 1 - h, dtype=X.dtype, device=X.device)
    if log_const is not None:
        log_const = (log_const + 0.5).to(X.dtype)[:, None]  # [K, 1]; |[y, 1]|^2 carries an extra 1
    for start in range(0, n, rows):
        c = min(rows, n - start)
        x_aug = rows_aug[:c]
        x_aug[:, :D] = X[start:start + c]
        size = K * (D + 1) * c
        y = comps.whiten(x_aug, out=whitened[:size].view(K * (D + 1), c))  # [K, D + 1, c]
        if resp is None:
            distances = squared_norms(y, scratch[:size].view(K, D + 1, c))  # [K, c]
            norm, r, entropy = normalise_log_joint(torch.add(log_const, distances, alpha=-0.5), dim=0)
            log_norm += norm.sum(dtype=torch.float64)  # norm [1, c], r [K, c]
            r_log_r += entropy
        else:
            r = resp[start:start + c].T  # [K, c]
            r_log_r += torch.special.xlogy(r, r).sum(dtype=torch.float64)
        nk += r.sum(1, dtype=torch.float64)
        root_y = y.mul_(r.sqrt().unsqueeze(1))  # sum r [y,1][y,1]^T = (sqrt(r) [y,1]) (sqrt(r) [y,1])^T
        if X.dtype == torch.float64:
            top.baddbmm_(root_y[:, :h], root_y.mT)
            bottom.baddbmm_(root_y[:, h:], root_y[:, h:].mT)
        else:
            top += torch.bmm(root_y[:, :h], root_y.mT, out=top_chunk)  # [K, h, D + 1]
            bottom += torch.bmm(root_y[:, h:], root_y[:, h:].mT, out=bottom_chunk)  # [K, D + 1 - h, D + 1 - h]
    sums[:, h:, :h] = sums[:, :h, h:].mT
    return SweepStats(log_norm, r_log_r, nk, sums[:, :D, D], sums[:, :D, :D])


def moments(stats: SweepStats, comps: Components):
    """Soft counts (with scikit-learn's 10 eps floor), component data means and scatter about them (float64).

    Returns ``nk [K]``, ``xbar [K, D]`` and the scatter ``sum_n r (x - xbar)(x - xbar)^T`` (no reg_covar):
    [K, D, D] for full, the sum over components [D, D] for tied, its diagonal [K, D] for diag/spherical.
    """
    nk = stats.nk + 10 * torch.finfo(comps.means.dtype).eps
    if not comps.whitened:
        xbar = stats.first / nk[:, None]
        return nk, xbar, (stats.second - stats.first * xbar).clamp_min(0.0)
    dtype = comps.means.dtype
    second = stats.second if comps.cov_type == "full" else stats.second.sum(0)
    s = comps.unwhiten_vectors(stats.first.to(dtype)).double()  # sum r (x - centre)
    a = comps.unwhiten_scatter(second.to(dtype)).double()
    xbar = comps.means.double() + s / nk[:, None]
    if comps.cov_type == "full":
        return nk, xbar, a - s[:, :, None] * s[:, None, :] / nk[:, None, None]
    return nk, xbar, a - (s / nk[:, None]).T @ s


def identity_precision_cholesky(K: int, D: int, cov_type: str, like: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(D, dtype=like.dtype, device=like.device)
    return {"full": eye.expand(K, D, D).contiguous(), "tied": eye,
            "diag": torch.ones(K, D, dtype=like.dtype, device=like.device),
            "spherical": torch.ones(K, dtype=like.dtype, device=like.device)}[cov_type]


def moments_from_resp(X: torch.Tensor, resp: torch.Tensor, cov_type: str):
    """``moments`` for given responsibilities (initialisation): two passes, centred at the weighted means."""
    K, D = resp.shape[1], X.shape[1]
    nk = resp.sum(0) + 10 * torch.finfo(X.dtype).eps
    centres = (resp.T @ X) / nk[:, None]
    comps = Components(centres, identity_precision_cholesky(K, D, cov_type, X), cov_type)
    return moments(sweep(X, comps, resp=resp), comps)


def initial_responsibilities(X: torch.Tensor, X_host: np.ndarray, n_components: int, init_params: str,
                             random_state: np.random.RandomState) -> torch.Tensor:
    """Starting responsibilities drawn exactly as scikit-learn draws them (same generator, same calls)."""
    n = X.shape[0]
    resp = np.zeros((n, n_components), dtype=X_host.dtype)
    if init_params == "kmeans":
        labels = KMeans(n_clusters=n_components, n_init=1, random_state=random_state).fit(X_host).labels_
        resp[np.arange(n), labels] = 1
    elif init_params == "k-means++":
        _, indices = kmeans_plusplus(X_host, n_components, random_state=random_state)
        resp[indices, np.arange(n_components)] = 1
    elif init_params == "random":
        resp = random_state.uniform(size=(n, n_components)).astype(X_host.dtype)
        resp /= resp.sum(axis=1)[:, np.newaxis]
    else:  # random_from_data
        resp[random_state.choice(n, size=n_components, replace=False), np.arange(n_components)] = 1
    return torch.from_numpy(resp).to(device=X.device, dtype=X.dtype)


# ------------------------------------------------------------------------------------------- the estimator
class MixtureBase(DensityMixin, BaseEstimator):
    """Fit loop shared by EM and VB: n_init restarts, tol/max_iter, history, ConvergenceWarning.

    Subclasses implement ``_prepare`` (check settings, priors), ``_initialize``, ``_iterate`` (one E+M sweep,
    returning the bound), ``_get_state``/``_set_state``, ``_weighted_log_prob``, ``_plugin_weights`` (the
    mixture weights ``sample`` draws from) and ``_export``.
    """

    _method_name = "EM"

    def _check_common(self) -> None:
        check_number(self.n_components, "n_components", low=1, integer=True)
        check_choice(self.covariance_type, COVARIANCE_TYPES, "covariance_type")
        check_number(self.tol, "tol", low=0.0)
        check_number(self.reg_covar, "reg_covar", low=0.0)
        check_number(self.max_iter, "max_iter", low=0, integer=True)
        check_number(self.n_init, "n_init", low=1, integer=True)
        check_choice(self.init_params, INIT_PARAMS, "init_params")
        check_number(self.verbose_interval, "verbose_interval", low=1, integer=True)
        check_choice(self.dtype, tuple(DTYPES), "dtype")
        try:
            self._device = torch.device(self.device if self.device is not None else "cpu")
        except (RuntimeError, TypeError):
            raise ElbolabError(f"expected device like 'cpu' or 'cuda:0', got {self.device!r}") from None
        self._dtype = DTYPES[self.dtype]

    def fit(self, X, y=None):
        """Fit the mixture to X [n_samples, n_features]; returns self."""
        self._check_common()
        warm = bool(self.warm_start) and hasattr(self, "_state")
        Xt = as_data_matrix(X, dtype=self._dtype, device=self._device,
                            n_features=self.n_features_in_ if warm else None, owner=type(self).__name__)
        n, d = Xt.shape
        if n < max(2, self.n_components):
            raise DataError(f"expected at least max(2, n_components) = {max(2, self.n_components)} samples, got "
                            f"n_samples={n}; use fewer components (n_components={self.n_components}) or more data")
        if not warm:
            self._shift = Xt.mean(0)
        Xc = Xt - self._shift
        check_no_overflow(Xt, Xc)
        self.n_features_in_ = d
        self._prepare(Xc)
        random_state = check_random_state(self.random_state)
        n_init = 1 if warm else self.n_init
        best = None
        # progress=True: a bar on a terminal, else a line every 10 s, per restart and within one (the bound so far)
        with Progress(f"{self._method_name}: {n_init} restart{'s' if n_init > 1 else ''} on {n:,} points", n_init,
                      "restarts", enabled=bool(self.progress)) as progress:
            for init in range(n_init):
                if self.verbose:
                    print(f"Initialization {init}")
                if not warm:
                    self._initialize(Xc, Xt, random_state)
                bound = self.lower_bound_ if warm else -math.inf
                history, converged, n_iter, change = [], False, 0, math.nan
                for n_iter in range(1, self.max_iter + 1):
                    previous, bound = bound, self._iterate(Xc)
                    if not math.isfinite(bound):
                        raise ElbolabError(f"the {self._method_name} bound became {bound} at iteration {n_iter}: "
                                           "scale the data, raise reg_covar, or use dtype='float64'")
                    history.append(bound)
                    change = bound - previous
                    if self.verbose and n_iter % self.verbose_interval == 0:
                        print(f"  Iteration {n_iter}\t bound {bound:.6f}\t change {change:.3e}")
                    progress.set_postfix_str(f"restart {init + 1} at iteration {n_iter}, bound {bound:.4f}")
                    progress.update(0)  # a line when it is due, even within one long restart
                    if abs(change) < self.tol:
                        converged = True
                        break
                if best is None or bound > best[0]:
                    best = (bound, self._get_state(), n_iter, history, converged, change)
                progress.update(1)
        self.lower_bound_, state, self.n_iter_, self.lower_bound_history_, self.converged_, change = best
        self._set_state(state)
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(f"{self._method_name} did not converge: after max_iter={self.max_iter} iterations the "
                          f"bound still changed by {change:.3g} (tol={self.tol:g}). Try a larger max_iter, a "
                          "larger tol, more restarts (n_init) or another init_params, or scale the data.",
                          ConvergenceWarning, stacklevel=2)
        self._export()
        return self

    @property
    def lower_bounds_(self) -> list:
        """scikit-learn's name for ``lower_bound_history_``."""
        return self.lower_bound_history_

    def _data(self, X) -> torch.Tensor:
        if not hasattr(self, "_state"):
            raise MixtureNotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X) first")
        X = as_data_matrix(X, dtype=self._dtype, device=self._device, n_features=self.n_features_in_,
                           owner=type(self).__name__)
        return X - self._shift

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).predict(X)

    def predict(self, X) -> np.ndarray:
        """Most probable component of each row [N]."""
        return self._weighted_log_prob(self._data(X)).argmax(1).cpu().numpy()

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities q(z = k | x) [N, K] (notes 001 eq. 11), normalised in log space."""
        return torch.softmax(self._weighted_log_prob(self._data(X)), dim=1).cpu().numpy()

    def score(self, X, y=None) -> float:
        """Mean log-likelihood per sample."""
        return float(np.mean(self.score_samples(X)))

    def sample(self, n_samples: int = 1):
        """``(X [n, D], labels [n])`` drawn from the fitted mixture (weights_, means_, covariances_)."""
        self._data(np.zeros((1, self.n_features_in_)))  # fitted check
        check_number(n_samples, "n_samples", low=1, integer=True)
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, self._plugin_weights().cpu().double().numpy())
        gen = torch.Generator(device=self._device).manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        P, means = self._state["prec_chol"], self._state["means"]
        noise = torch.randn(n_samples, self.n_features_in_, generator=gen, device=self._device, dtype=P.dtype)
        labels = torch.repeat_interleave(torch.arange(self.n_components, device=self._device),
                                         torch.as_tensor(counts, device=self._device))
        if self.covariance_type == "full":  # x = mu + P^{-T} e for e ~ N(0, I): covariance (P P^T)^{-1}
            steps = torch.cat([torch.linalg.solve_triangular(P[k].mT, part.T, upper=False).T
                               for k, part in enumerate(noise.split(counts.tolist()))])
        elif self.covariance_type == "tied":
            steps = torch.linalg.solve_triangular(P.mT, noise.T, upper=False).T
        else:
            steps = noise / (P[labels] if self.covariance_type == "diag" else P[labels, None])
        return (means[labels] + steps + self._shift).cpu().numpy(), labels.cpu().numpy()
