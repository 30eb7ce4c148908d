"""elbolab: variational inference and variational autoencoders on PyTorch."""

__version__ = "0.1.0"

# The classical estimators, as elbolab.GaussianMixture etc.; imported on first use to keep `import elbolab` light.
_CLASSICAL = ("GaussianMixture", "BayesianGaussianMixture", "IsingDenoiser")


def __getattr__(name):
    if name in _CLASSICAL:
        import elbolab.classical

        return getattr(elbolab.classical, name)
    raise AttributeError(f"module 'elbolab' has no attribute {name!r}")


__all__ = list(_CLASSICAL)
