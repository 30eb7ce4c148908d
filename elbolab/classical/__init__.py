"""Classical variational inference: EM and variational Bayes for Gaussian mixtures, mean-field Ising denoising,
calculus of variations, information theory."""

from elbolab.classical.bayesian_mixture import BayesianGaussianMixture
from elbolab.classical.gaussian_mixture import GaussianMixture
from elbolab.classical.ising import IsingDenoiser, IsingModel

__all__ = ["BayesianGaussianMixture", "GaussianMixture", "IsingDenoiser", "IsingModel"]
