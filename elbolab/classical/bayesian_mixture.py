"""Variational Bayesian Gaussian mixture: mean-field coordinate ascent (CAVI), notes 000 eq. 19.

Model (K components, N rows of dimension D)::

    pi ~ Dirichlet(alpha0)                       (or a truncated stick-breaking "dirichlet_process" prior)
    Lambda_k ~ Wishart(nu0, Psi0^{-1}),  mu_k | Lambda_k ~ N(m0, (beta0 Lambda_k)^{-1})
    z_n | pi ~ Categorical(pi),          x_n | z_n = k ~ N(mu_k, Lambda_k^{-1})

with ``q(z) q(pi) prod_k q(mu_k, Lambda_k)``. Each factor is updated by ``ln q_j* = E_{i != j}[ln p] + const``:
the E-step sets ``ln q(z_n = k) = E ln pi_k + E ln N(x_n | mu_k, Lambda_k) + const``; the M-step gives the
conjugate posteriors (Bishop, PRML s10.2.1). The covariance types replace the Wishart by its natural analogue:

* ``diag``: per dimension ``lambda_kd ~ Gamma(nu0 / 2, rate psi0_d / 2)``;
* ``spherical``: one ``lambda_k ~ Gamma(D nu0 / 2, rate D psi0 / 2)`` shared by the D dimensions;
* ``tied``: one Lambda shared by all components. As in scikit-learn, the prior on it counts once per
  component: ``Wishart(K nu0, (K Psi0)^{-1})``, and ``degrees_of_freedom_`` reports ``nu / K``.

With these conventions the parameter updates, and for full and tied the responsibilities, are exactly
scikit-learn's. For diag and spherical scikit-learn takes E ln(lambda) from the Wishart formula
``sum_d psi((nu - d) / 2)``, which is not the expectation under the Gamma factor it updates; here the exact
``psi(a) - ln b`` is used, so D > 1 diag/spherical results differ slightly from scikit-learn (identical for D = 1).

``lower_bound_history_`` is the complete ELBO (all constants kept, in nats for the whole data set), evaluated
after each M-step with the q(z) of that iteration's E-step; it never decreases when ``reg_covar = 0``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.distributions import Beta, Dirichlet, Gamma, StudentT, kl_divergence

from elbolab.classical._mixture_common import (
    LOG_2PI,
    Components,
    ElbolabError,
    MixtureBase,
    as_param_tensor,
    check_choice,
    check_number,
    initial_responsibilities,
    log_det_cholesky,
    moments,
    moments_from_resp,
    precision_cholesky,
    precision_from_cholesky,
    sweep,
    weighted_log_prob,
)

__all__ = ["BayesianGaussianMixture"]

PRIOR_TYPES = ("dirichlet_distribution", "dirichlet_process")


def wishart_digamma_sum(nu: torch.Tensor, D: int) -> torch.Tensor:
    """sum_{d=0}^{D-1} psi((nu - d) / 2) for each entry of nu."""
    offsets = torch.arange(D, dtype=nu.dtype, device=nu.device)
    return torch.digamma(0.5 * (nu.unsqueeze(-1) - offsets)).sum(-1)


def wishart_kl(nu_q: torch.Tensor, prec_chol_q: torch.Tensor, nu_p: float, psi_p: torch.Tensor) -> torch.Tensor:
    """sum over the batch of KL(W(nu_q, W_q) || W(nu_p, Psi_p^{-1})), where ``nu_q W_q = P P^T`` (P upper)."""
    D = prec_chol_q.shape[-1]
    log_det_wq = 2 * torch.diagonal(prec_chol_q, dim1=-2, dim2=-1).log().sum(-1) - D * nu_q.log()
    log_det_wp = -torch.logdet(psi_p)
    trace = (psi_p * (prec_chol_q @ prec_chol_q.mT)).sum((-2, -1)) / nu_q  # tr(W_p^{-1} W_q)
    e_log_det = wishart_digamma_sum(nu_q, D) + D * math.log(2.0) + log_det_wq  # E_q ln|Lambda|
    kl = (-0.5 * nu_q * log_det_wq + 0.5 * nu_p * log_det_wp - 0.5 * (nu_q - nu_p) * D * math.log(2.0)
          - torch.mvlgamma(0.5 * nu_q, D) + torch.mvlgamma(torch.full_like(nu_q, 0.5 * nu_p), D)
          + 0.5 * (nu_q - nu_p) * e_log_det - 0.5 * nu_q * D + 0.5 * nu_q * trace)
    return kl.sum()


class BayesianGaussianMixture(MixtureBase):
    """Variational Bayesian Gaussian mixture by CAVI, with scikit-learn's estimator contract and names.

    Parameters mirror :class:`sklearn.mixture.BayesianGaussianMixture`: ``n_components``, ``covariance_type``,
    ``tol``, ``reg_covar``, ``max_iter``, ``n_init``, ``init_params``, ``weight_concentration_prior_type``
    ("dirichlet_distribution" (default here) | "dirichlet_process"), ``weight_concentration_prior`` (default
    1 / K), ``mean_precision_prior`` (1), ``mean_prior`` (data mean), ``degrees_of_freedom_prior`` (D),
    ``covariance_prior`` (data covariance; its diagonal for diag, mean variance for spherical),
    ``random_state``, ``warm_start``, ``verbose``, ``verbose_interval``; plus ``dtype`` and ``device``.

    Fitted: ``weight_concentration_``, ``mean_precision_``, ``means_``, ``degrees_of_freedom_``,
    ``covariances_`` (``W_k^{-1} / nu_k``), ``precisions_`` (``E[Lambda_k]``), ``precisions_cholesky_``,
    ``weights_`` (``E[pi]``), the resolved priors (``weight_concentration_prior_`` ...), ``converged_``,
    ``n_iter_``, ``lower_bound_`` and ``lower_bound_history_`` (complete ELBO, see the module docstring).
    Unneeded components fall back to the prior: their ``weights_`` tend to ``alpha0 / (N + K alpha0)``.
    """

    _method_name = "CAVI"

    def __init__(self, *, n_components=1, covariance_type="full", tol=1e-3, reg_covar=1e-6, max_iter=100,
                 n_init=1, init_params="kmeans", weight_concentration_prior_type="dirichlet_distribution",
                 weight_concentration_prior=None, mean_precision_prior=None, mean_prior=None,
                 degrees_of_freedom_prior=None, covariance_prior=None, random_state=None, warm_start=False,
                 verbose=0, verbose_interval=10, dtype="float64", device=None, progress=False):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.dtype = dtype
        self.device = device
        self.progress = progress

    # ---------------------------------------------------------------------------------------------- priors
    def _prepare(self, Xc: torch.Tensor) -> None:
        check_choice(self.weight_concentration_prior_type, PRIOR_TYPES, "weight_concentration_prior_type")
        K, D, cov_type = self.n_components, Xc.shape[1], self.covariance_type
        f64 = dict(dtype=torch.float64, device=Xc.device)
        for name in ("weight_concentration_prior", "mean_precision_prior"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, low=0.0, strict=True)
        self._alpha0 = float(self.weight_concentration_prior or 1.0 / K)
        self._beta0 = float(self.mean_precision_prior or 1.0)
        X64 = Xc.double()
        self._m0 = (X64.mean(0) if self.mean_prior is None
                    else as_param_tensor(self.mean_prior, (D,), "mean_prior", **f64) - self._shift.double())
        if self.degrees_of_freedom_prior is None:
            self._nu0 = float(D)
        else:
            check_number(self.degrees_of_freedom_prior, "degrees_of_freedom_prior", low=D - 1.0, strict=True)
            self._nu0 = float(self.degrees_of_freedom_prior)
        shape = {"full": (D, D), "tied": (D, D), "diag": (D,), "spherical": ()}[cov_type]
        if self.covariance_prior is None:
            variances = X64.var(0, correction=1) if Xc.shape[0] > 1 else torch.ones(D, **f64)
            self._psi0 = {"full": torch.cov(X64.T).reshape(D, D), "diag": variances,
                          "spherical": variances.mean()}.get(cov_type, torch.cov(X64.T).reshape(D, D))
        else:
            self._psi0 = as_param_tensor(self.covariance_prior, shape, "covariance_prior", **f64)
        if cov_type in ("full", "tied"):
            spd = bool(torch.allclose(self._psi0, self._psi0.T)) and int(torch.linalg.cholesky_ex(self._psi0)[1]) == 0
            if not spd:
                raise ElbolabError("expected covariance_prior to be a symmetric positive-definite matrix; "
                                   "pass e.g. np.cov(X.T) + 1e-6 * np.eye(D)")
        elif not bool((self._psi0 > 0).all()):
            raise ElbolabError(f"expected covariance_prior > 0 for covariance_type={cov_type!r}; constant "
                               "columns have zero variance: drop them or pass covariance_prior")

    # --------------------------------------------------------------------------------------- CAVI updates
    def _initialize(self, Xc: torch.Tensor, X: torch.Tensor, random_state) -> None:
        resp = initial_responsibilities(Xc, X.cpu().numpy(), self.n_components, self.init_params, random_state)
        self._update(*moments_from_resp(Xc, resp, self.covariance_type), dtype=Xc.dtype)

    def _update(self, nk: torch.Tensor, xbar: torch.Tensor, scatter: torch.Tensor, *, dtype) -> None:
        """q(pi), q(mu, Lambda) from the soft counts, means and scatter of q(z) (all float64)."""
        K, D, cov_type, reg = self.n_components, xbar.shape[1], self.covariance_type, self.reg_covar
        a0, b0, m0, nu0, psi0 = self._alpha0, self._beta0, self._m0, self._nu0, self._psi0
        if self.weight_concentration_prior_type == "dirichlet_process":  # stick lengths: Beta(1 + N_k, a0 + N_>k)
            conc = torch.stack([1.0 + nk, a0 + nk.flip(0).cumsum(0).flip(0) - nk])
        else:
            conc = a0 + nk
        beta = b0 + nk
        means = (b0 * m0 + nk[:, None] * xbar) / beta[:, None]
        diff = xbar - m0  # [K, D]
        eye = torch.eye(D, dtype=xbar.dtype, device=xbar.device)
        if cov_type == "full":
            nu = nu0 + nk
            sk = scatter / nk[:, None, None] + reg * eye
            spread = (nk * b0 / beta)[:, None, None] * diff[:, :, None] * diff[:, None, :]
            cov = (psi0 + nk[:, None, None] * sk + spread) / nu[:, None, None]
        elif cov_type == "tied":
            n_per = nk.sum() / K
            nu = nu0 + n_per
            sk = scatter / nk.sum() + reg * eye
            cov = (psi0 + sk * n_per + (b0 / K) * ((nk / beta)[:, None] * diff).T @ diff) / nu
        else:
            nu = nu0 + nk
            sk = scatter / nk[:, None] + reg
            spread = (b0 / beta)[:, None] * diff.square()
            if cov_type == "diag":
                cov = (psi0 + nk[:, None] * (sk + spread)) / nu[:, None]
            else:
                cov = (psi0 + nk * (sk.mean(1) + spread.mean(1))) / nu
        prec_chol = precision_cholesky(cov.to(dtype), cov_type, reg_covar=reg, n_components=K)
        self._state = {"conc": conc, "beta": beta, "means": means.to(dtype), "nu": nu, "cov": cov.to(dtype),
                       "prec_chol": prec_chol}

    def _expected_log_weights(self) -> torch.Tensor:
        conc = self._state["conc"]
        if self.weight_concentration_prior_type == "dirichlet_process":
            a, b = conc
            total = torch.digamma(a + b)
            log_rest = torch.cumsum(torch.digamma(b) - total, 0)
            return torch.digamma(a) - total + torch.cat([log_rest.new_zeros(1), log_rest[:-1]])
        return torch.digamma(conc) - torch.digamma(conc.sum())

    def _half_expected_log_det(self) -> torch.Tensor:
        """0.5 E ln|Lambda_k| [K] (float64)."""
        s, K, cov_type = self._state, self.n_components, self.covariance_type
        D = s["means"].shape[1]
        nu = s["nu"]
        if cov_type in ("full", "tied"):
            nu_eff = nu * K if cov_type == "tied" else nu
            offset = wishart_digamma_sum(nu_eff, D) + D * math.log(2.0) - D * torch.log(nu_eff)
        elif cov_type == "diag":
            offset = D * (torch.digamma(0.5 * nu) + math.log(2.0) - torch.log(nu))
        else:
            offset = D * (torch.digamma(0.5 * D * nu) - torch.log(0.5 * D * nu))
        log_det = log_det_cholesky(s["prec_chol"].double(), cov_type, D, K)
        return log_det + 0.5 * offset.expand(K)

    def _components(self) -> tuple[Components, torch.Tensor]:
        """Components with E[Lambda_k] and the x-free part of E ln pi_k + E ln N(x | mu_k, Lambda_k)."""
        s = self._state
        D = s["means"].shape[1]
        log_const = (self._expected_log_weights() + self._half_expected_log_det() - 0.5 * D / s["beta"]
                     - 0.5 * D * LOG_2PI)
        return Components(s["means"], s["prec_chol"], self.covariance_type), log_const.to(s["means"].dtype)

    def _iterate(self, Xc: torch.Tensor) -> float:
        comps, log_const = self._components()
        stats = sweep(Xc, comps, log_const)  # update q(z)
        nk, xbar, scatter = moments(stats, comps)
        self._update(nk, xbar, scatter, dtype=Xc.dtype)  # update q(pi), q(mu, Lambda)
        return float(self._elbo(stats.nk, xbar, scatter, stats.r_log_r))

    # ---------------------------------------------------------------------------------------------- ELBO
    def _expected_precisions(self) -> torch.Tensor:
        P = self._state["prec_chol"].double()
        return precision_from_cholesky(P, self.covariance_type)

    def _kl_parameters(self) -> torch.Tensor:
        """KL(q(pi) || p(pi)) + sum_k KL(q(mu_k, Lambda_k) || p(mu_k, Lambda_k))."""
        s, K, cov_type = self._state, self.n_components, self.covariance_type
        D = s["means"].shape[1]
        conc, beta, nu, a0, b0 = s["conc"], s["beta"], s["nu"], self._alpha0, self._beta0
        if self.weight_concentration_prior_type == "dirichlet_process":
            kl = kl_divergence(Beta(conc[0], conc[1]), Beta(torch.ones_like(conc[0]), a0 * torch.ones_like(
                conc[1]))).sum()
        else:
            kl = kl_divergence(Dirichlet(conc), Dirichlet(torch.full_like(conc, a0)))
        # E_q(Lambda) KL(N(m_k, (beta_k Lambda)^-1) || N(m0, (beta0 Lambda)^-1))
        kl = kl + 0.5 * (D * b0 / beta - D + D * torch.log(beta / b0)).sum()
        kl = kl + 0.5 * b0 * self._quadratic(s["means"].double() - self._m0).sum()
        P, cov = s["prec_chol"].double(), s["cov"].double()
        if cov_type == "full":
            return kl + wishart_kl(nu, P, self._nu0, self._psi0)
        if cov_type == "tied":
            return kl + wishart_kl((K * nu).reshape(1), P[None], K * self._nu0, K * self._psi0)
        scale = 1.0 if cov_type == "diag" else float(D)  # spherical: one Gamma over D dimensions
        cov_kd = cov if cov_type == "diag" else cov[:, None]
        q = Gamma(0.5 * scale * nu[:, None].expand_as(cov_kd), 0.5 * scale * nu[:, None] * cov_kd)
        p = Gamma(torch.full_like(cov_kd, 0.5 * scale * self._nu0), (0.5 * scale * self._psi0).expand_as(cov_kd))
        return kl + kl_divergence(q, p).sum()

    def _quadratic(self, v: torch.Tensor) -> torch.Tensor:
        """v_k^T E[Lambda_k] v_k for each row of v [K, D]."""
        P = self._state["prec_chol"].double()
        if self.covariance_type == "full":
            return torch.einsum("kd,kde->ke", v, P).square().sum(1)
        if self.covariance_type == "tied":
            return (v @ P).square().sum(1)
        return (v.square() * (P.square() if self.covariance_type == "diag" else P.square()[:, None])).sum(1)

    def _elbo(self, nk, xbar, scatter, r_log_r) -> torch.Tensor:
        """Complete ELBO for q(z) with counts/means/scatter ``nk, xbar, scatter`` and the current q(theta)."""
        s, cov_type = self._state, self.covariance_type
        D = xbar.shape[1]
        log_const = (self._expected_log_weights() + self._half_expected_log_det() - 0.5 * D / s["beta"]
                     - 0.5 * D * LOG_2PI)
        offset = xbar - s["means"].double()  # sum_n r (x - m)(x - m)^T = scatter + N_k offset offset^T
        prec = self._expected_precisions()
        if cov_type == "full":
            spread = (prec * scatter).sum((1, 2)) + nk * self._quadratic(offset)
        elif cov_type == "tied":  # one shared scatter: spread it evenly so that the sum over k is right
            spread = (prec * scatter).sum() / self.n_components + nk * self._quadratic(offset)
        else:
            spread = (scatter * (prec if cov_type == "diag" else prec[:, None])).sum(1) + nk * self._quadratic(
                offset)
        data = (nk * log_const).sum() - 0.5 * spread.sum()
        return data - r_log_r - self._kl_parameters()

    # ------------------------------------------------------------------------------------------ public API
    def _weighted_log_prob(self, Xc: torch.Tensor) -> torch.Tensor:
        comps, log_const = self._components()
        return weighted_log_prob(Xc, comps, log_const)

    def elbo(self, X) -> float:
        """Complete ELBO (nats, summed over rows) of X under the fitted q(theta), with q(z) at its optimum."""
        Xc = self._data(X)
        return float(torch.logsumexp(self._weighted_log_prob(Xc).double(), 1).sum() - self._kl_parameters())

    def score_samples(self, X) -> np.ndarray:
        """log of the posterior predictive density of each row [N]: a mixture of Student-t components
        (Bishop, PRML eq. 10.81) with weights E[pi] (``weights_``)."""
        Xc = self._data(X).double()
        s, K, cov_type = self._state, self.n_components, self.covariance_type
        D = Xc.shape[1]
        beta, nu = s["beta"], s["nu"]
        log_w = torch.log(self._weights())
        if cov_type == "diag":
            scale = ((1 + beta) / beta)[:, None] * s["cov"].double()
            t = StudentT(nu[:, None], s["means"].double(), scale.sqrt())
            log_t = torch.cat([t.log_prob(x[:, None, :]).sum(-1) for x in Xc.split(4096)])
            return torch.logsumexp(log_w + log_t, 1).cpu().numpy()
        if cov_type in ("full", "tied"):
            nu_eff = nu * K if cov_type == "tied" else nu
            df = nu_eff + 1 - D
            scale_sq = df * beta / ((1 + beta) * nu_eff)
        else:
            df = D * nu
            scale_sq = beta / (1 + beta)
        comps = Components(s["means"].double(), s["prec_chol"].double(), cov_type)
        log_det = log_det_cholesky(comps.prec_chol, cov_type, D, K) + 0.5 * D * torch.log(scale_sq)
        const = (torch.lgamma(0.5 * (df + D)) - torch.lgamma(0.5 * df) - 0.5 * D * torch.log(df * math.pi)
                 + log_det + log_w)
        maha = torch.cat([comps.mahalanobis(x) for x in Xc.split(4096)], dim=1).T * scale_sq  # [N, K]
        return torch.logsumexp(const - 0.5 * (df + D) * torch.log1p(maha / df), 1).cpu().numpy()

    def _weights(self) -> torch.Tensor:
        conc = self._state["conc"]
        if self.weight_concentration_prior_type == "dirichlet_process":
            a, b = conc
            stick = a / (a + b)
            rest = torch.cumprod(b / (a + b), 0)
            weights = stick * torch.cat([rest.new_ones(1), rest[:-1]])
            return weights / weights.sum()
        return conc / conc.sum()

    def _plugin_weights(self) -> torch.Tensor:
        return self._weights()

    def _get_state(self) -> dict:
        return dict(self._state)

    def _set_state(self, state: dict) -> None:
        self._state = state

    def _export(self) -> None:
        s, cpu = self._state, (lambda t: t.detach().cpu().numpy())
        if self.weight_concentration_prior_type == "dirichlet_process":
            self.weight_concentration_ = (cpu(s["conc"][0]), cpu(s["conc"][1]))
        else:
            self.weight_concentration_ = cpu(s["conc"])
        self.weights_ = cpu(self._weights())
        self.mean_precision_ = cpu(s["beta"])
        self.means_ = cpu(s["means"] + self._shift)
        self.degrees_of_freedom_ = cpu(s["nu"])
        self.covariances_ = cpu(s["cov"])
        self.precisions_cholesky_ = cpu(s["prec_chol"])
        self.precisions_ = cpu(precision_from_cholesky(s["prec_chol"], self.covariance_type))
        self.weight_concentration_prior_ = self._alpha0
        self.mean_precision_prior_ = self._beta0
        self.mean_prior_ = cpu(self._m0 + self._shift.double())
        self.degrees_of_freedom_prior_ = self._nu0
        self.covariance_prior_ = cpu(self._psi0) if self._psi0.ndim else float(self._psi0)
