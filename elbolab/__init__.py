"""elbolab: variational inference and variational autoencoders on PyTorch."""

__version__ = "0.1.0"

# The classical estimators, as elbolab.GaussianMixture etc.; imported on first use to keep `import elbolab` light.
_CLASSICAL = ("GaussianMixture", "BayesianGaussianMixture", "IsingDenoiser")
# elbolab.load_run(run_dir) -> (model, config): a trained run in one call (runs.load_run; imports torch on first use).
_RUNS = ("load_run",)


def __getattr__(name):
    if name in _CLASSICAL:
        import elbolab.classical

        return getattr(elbolab.classical, name)
    if name in _RUNS:
        import elbolab.runs

        return getattr(elbolab.runs, name)
    raise AttributeError(f"module 'elbolab' has no attribute {name!r}")


__all__ = [*_CLASSICAL, *_RUNS]
