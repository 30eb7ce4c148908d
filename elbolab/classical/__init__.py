"""Classical variational inference: EM and variational Bayes for Gaussian mixtures, mean-field Ising denoising,
calculus of variations, information theory.

The estimators are imported on first use (they import torch and scikit-learn), so that the command-line modules in
this package (gmm_cli, ising_cli) load in milliseconds for ``elbolab --help``."""

_ESTIMATORS = {
    "BayesianGaussianMixture": "elbolab.classical.bayesian_mixture",
    "GaussianMixture": "elbolab.classical.gaussian_mixture",
    "IsingDenoiser": "elbolab.classical.ising",
    "IsingModel": "elbolab.classical.ising",
}


def __getattr__(name):
    if name in _ESTIMATORS:
        import importlib

        return getattr(importlib.import_module(_ESTIMATORS[name]), name)
    raise AttributeError(f"module 'elbolab.classical' has no attribute {name!r}")


__all__ = ["BayesianGaussianMixture", "GaussianMixture", "IsingDenoiser", "IsingModel"]
