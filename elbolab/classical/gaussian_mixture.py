"""Gaussian mixtures fitted by EM (notes 001 s1.3-1.4), in torch, batched over components.

E-step (eq. 11): ``q(z = k | x) = w_k N(x | a_k) / sum_j w_j N(x | a_j)``, computed in log space.
M-step: closed-form weights (eq. 13, ``w_k = N_k / N``), means and covariances (eq. 14).
The reported bound per iteration is scikit-learn's: the mean log-likelihood of the parameters *entering* that
iteration (computed by its E-step), so runs from the same start can be compared number for number.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from elbolab.classical._mixture_common import (
    LOG_2PI,
    Components,
    ElbolabError,
    MixtureBase,
    as_param_tensor,
    covariance_from_precision_cholesky,
    initial_responsibilities,
    log_det_cholesky,
    moments,
    moments_from_resp,
    precision_cholesky,
    precision_cholesky_from_precision,
    precision_from_cholesky,
    sweep,
    weighted_log_prob,
)

__all__ = ["GaussianMixture"]


class GaussianMixture(MixtureBase):
    """Maximum-likelihood Gaussian mixture by EM, with scikit-learn's estimator contract and parameter names.

    Parameters mirror :class:`sklearn.mixture.GaussianMixture` (``n_components``, ``covariance_type`` in
    full | tied | diag | spherical, ``tol``, ``reg_covar``, ``max_iter``, ``n_init``, ``init_params`` in kmeans |
    k-means++ | random | random_from_data, ``weights_init``, ``means_init``, ``precisions_init``,
    ``random_state``, ``warm_start``, ``verbose``, ``verbose_interval``) plus ``dtype`` ("float64" | "float32":
    the dtype of the passes over the data; the parameters are updated in float64 either way, and the fitted
    attributes are returned in ``dtype``) and ``device`` (e.g. "cuda:0").

    Fitted attributes: ``weights_``, ``means_``, ``covariances_``, ``precisions_``, ``precisions_cholesky_``,
    ``converged_``, ``n_iter_``, ``lower_bound_`` (mean log-likelihood per sample), ``lower_bound_history_``
    (one value per iteration; never decreases when ``reg_covar = 0``), ``n_features_in_``.
    """

    _method_name = "EM"

    def __init__(self, n_components=1, *, covariance_type="full", tol=1e-3, reg_covar=1e-6, max_iter=100,
                 n_init=1, init_params="kmeans", weights_init=None, means_init=None, precisions_init=None,
                 random_state=None, warm_start=False, verbose=0, verbose_interval=10, dtype="float64",
                 device=None, progress=False):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.dtype = dtype
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------------------------------- fit internals
    # The parameters are float64 whatever the data's dtype: the M-step's small solves and Cholesky factors cost
    # nothing next to the passes over the data, and in float32 their rounding steered the EM trajectory away from
    # the float64 one (BENCHMARKS.md, issue 12). Only the GEMMs over the data run in the data's dtype.
    def _prepare(self, Xc: torch.Tensor) -> None:
        K, D = self.n_components, Xc.shape[1]
        opts = dict(dtype=torch.float64, device=Xc.device)
        self._weights_init = self._means_init = self._prec_chol_init = None
        if self.weights_init is not None:
            w = as_param_tensor(self.weights_init, (K,), "weights_init", **opts)
            atol = 1e-6 if Xc.dtype == torch.float32 else 1e-8
            if bool((w < 0).any()) or bool((w > 1).any()) or abs(float(w.sum()) - 1.0) > atol:
                raise ElbolabError(f"expected weights_init in [0, 1] summing to 1, got sum {float(w.sum()):.8g}, "
                                   f"min {float(w.min()):g}; normalise it with w / w.sum()")
            self._weights_init = w
        if self.means_init is not None:
            self._means_init = as_param_tensor(self.means_init, (K, D), "means_init", **opts) - self._shift
        if self.precisions_init is not None:
            shape = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}[self.covariance_type]
            prec = as_param_tensor(self.precisions_init, shape, "precisions_init", **opts)
            self._prec_chol_init = precision_cholesky_from_precision(prec, self.covariance_type, "precisions_init")

    def _initialize(self, Xc: torch.Tensor, X: torch.Tensor, random_state) -> None:
        weights, means, cov, prec_chol = self._weights_init, self._means_init, None, self._prec_chol_init
        if weights is None or means is None or prec_chol is None:  # as scikit-learn: draw only if needed
            resp = initial_responsibilities(Xc, X.cpu().numpy(), self.n_components, self.init_params, random_state)
            nk, xbar, scatter = moments_from_resp(Xc, resp, self.covariance_type)
            weights = (nk / Xc.shape[0]).double() if weights is None else weights
            means = xbar.double() if means is None else means
            if prec_chol is None:
                cov = self._covariances(nk, scatter).double()
                prec_chol = self._precision_cholesky(cov)
        self._state = {"weights": weights, "means": means, "cov": cov, "prec_chol": prec_chol}

    def _covariances(self, nk: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        """eq. 14 plus reg_covar on the diagonal, as scikit-learn adds it."""
        reg, cov_type = self.reg_covar, self.covariance_type
        if cov_type == "full":
            eye = torch.eye(scatter.shape[-1], dtype=scatter.dtype, device=scatter.device)
            return scatter / nk[:, None, None] + reg * eye
        if cov_type == "tied":
            return scatter / nk.sum() + reg * torch.eye(scatter.shape[-1], dtype=scatter.dtype,
                                                        device=scatter.device)
        per_dim = scatter / nk[:, None] + reg
        return per_dim if cov_type == "diag" else per_dim.mean(1)

    def _precision_cholesky(self, cov: torch.Tensor) -> torch.Tensor:
        return precision_cholesky(cov, self.covariance_type, reg_covar=self.reg_covar,
                                  n_components=self.n_components)

    def _components(self) -> tuple[Components, torch.Tensor]:
        s = self._state
        comps = Components(s["means"], s["prec_chol"], self.covariance_type, dtype=self._dtype)
        log_det = log_det_cholesky(s["prec_chol"], self.covariance_type, comps.D, comps.K)
        return comps, s["weights"].log() + log_det - 0.5 * comps.D * LOG_2PI

    def _iterate(self, Xc: torch.Tensor) -> float:
        comps, log_const = self._components()
        stats = sweep(Xc, comps, log_const)  # E-step at the current parameters
        nk, xbar, scatter = moments(stats, comps)
        cov = self._covariances(nk, scatter)  # M-step, float64
        self._state = {"weights": nk / nk.sum(), "means": xbar, "cov": cov,
                       "prec_chol": self._precision_cholesky(cov)}
        return float(stats.log_norm) / Xc.shape[0]

    def _get_state(self) -> dict:
        return dict(self._state)

    def _set_state(self, state: dict) -> None:
        self._state = state
        if state["cov"] is None:  # precisions_init given and max_iter = 0
            state["cov"] = covariance_from_precision_cholesky(state["prec_chol"], self.covariance_type)

    def _plugin_weights(self) -> torch.Tensor:
        return self._state["weights"]

    def _export(self) -> None:
        s, cpu = self._state, (lambda t: t.detach().to(self._dtype).cpu().numpy())  # in the dtype asked for
        self.weights_ = cpu(s["weights"])
        self.means_ = cpu(s["means"] + self._shift)
        self.covariances_ = cpu(s["cov"])
        self.precisions_cholesky_ = cpu(s["prec_chol"])
        self.precisions_ = cpu(precision_from_cholesky(s["prec_chol"], self.covariance_type))

    def _weighted_log_prob(self, Xc: torch.Tensor) -> torch.Tensor:
        comps, log_const = self._components()
        return weighted_log_prob(Xc, comps, log_const)

    # ------------------------------------------------------------------------------------------ public API
    def score_samples(self, X) -> np.ndarray:
        """log p(x) of each row [N] (notes 001 eq. 4 without the average)."""
        return torch.logsumexp(self._weighted_log_prob(self._data(X)), dim=1).cpu().numpy()

    def complete_data_bound(self, X, resp=None) -> np.ndarray:
        """Per-row bound ``E_q log p(x, z) - E_q log q(z)`` of notes 001 eq. 7 [N].

        ``resp`` [N, K] is q(z), one distribution over the K components per row (non-negative, each row
        summing to 1); by default the exact posterior (``predict_proba``), where the bound equals
        ``score_samples`` because the KL term of eq. 7 vanishes. Otherwise the gap is ``KL(q || p(z | x))``.
        """
        log_joint = self._weighted_log_prob(self._data(X))  # log w_k + log N(x | a_k)
        if resp is None:
            q = torch.softmax(log_joint, 1)
        else:
            try:
                given = np.asarray(resp)
                q64 = torch.as_tensor(given.astype(np.float64), device=log_joint.device)
            except (TypeError, ValueError, RuntimeError):
                raise ElbolabError(f"expected resp as a numeric array of shape {tuple(log_joint.shape)}, could "
                                   f"not read a {type(resp).__name__} as numbers; pass model.predict_proba(X) "
                                   "or another [N, K] float array") from None
            if q64.shape != log_joint.shape or not bool(torch.isfinite(q64).all()) or bool((q64 < 0).any()):
                raise ElbolabError(f"expected resp as finite non-negative numbers of shape "
                                   f"{tuple(log_joint.shape)}, got shape {tuple(q64.shape)}")
            # A q(z) whose rows do not sum to 1 is not a distribution, and the result would not be a bound.
            single = given.dtype.itemsize < 8 or log_joint.dtype == torch.float32
            sums = q64.sum(1)
            if bool(((sums - 1.0).abs() > (1e-6 if single else 1e-8)).any()):
                row = int((sums - 1.0).abs().argmax())
                raise ElbolabError(f"expected each row of resp to sum to 1 (q(z) over the {q64.shape[1]} "
                                   f"components), got row {row} summing to {float(sums[row]):.8g}; normalise "
                                   "it with resp / resp.sum(axis=1, keepdims=True)")
            q = q64.to(log_joint.dtype)
        return ((q * log_joint).sum(1) - torch.special.xlogy(q, q).sum(1)).cpu().numpy()

    def _n_parameters(self) -> int:
        K, D = self.n_components, self.n_features_in_
        cov = {"full": K * D * (D + 1) / 2, "diag": K * D, "tied": D * (D + 1) / 2,
               "spherical": K}[self.covariance_type]
        return int(cov + K * D + K - 1)

    def bic(self, X) -> float:
        """Bayesian information criterion (lower is better)."""
        n = self._data(X).shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X) -> float:
        """Akaike information criterion (lower is better)."""
        n = self._data(X).shape[0]
        return -2 * self.score(X) * n + 2 * self._n_parameters()
