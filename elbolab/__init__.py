"""elbolab: variational inference and variational autoencoders on PyTorch.

The public API, each imported on first use (``import elbolab`` stays light):

* ``elbolab.train(model, data, out=..., **options)``: train a run folder (``pipeline.train``);
* ``elbolab.evaluate(run, k=5000, ...)``: importance-sampled log p(x) and diagnostics (``pipeline.evaluate``);
* ``elbolab.report(run)``: rebuild RUN/index.html;
* ``elbolab.load_run(run)`` -> (model, config): a trained run in one call; ``elbolab.load_run_data(config["data"])``:
  its data splits;
* ``elbolab.available_models()``, ``elbolab.get_model_class(name)``: the model registry;
* ``elbolab.GaussianMixture``, ``elbolab.BayesianGaussianMixture``, ``elbolab.IsingDenoiser``: classical VI with
  scikit-learn's estimator contract.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "train": "elbolab.pipeline",
    "evaluate": "elbolab.pipeline",
    "report": "elbolab.pipeline",
    "load_run": "elbolab.loading",
    "load_run_data": "elbolab.loading",
    "available_models": "elbolab.models",
    "get_model_class": "elbolab.models",
    "GaussianMixture": "elbolab.classical",
    "BayesianGaussianMixture": "elbolab.classical",
    "IsingDenoiser": "elbolab.classical",
}


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'elbolab' has no attribute {name!r}")


def __dir__():
    return sorted([*_PUBLIC, "__version__"])


__all__ = list(_PUBLIC)
