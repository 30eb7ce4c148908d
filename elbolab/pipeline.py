"""The Python API behind the CLI: train a run, evaluate it, draw its figures, write its report.

    from elbolab import pipeline
    run = pipeline.train("vae", "digits", out="runs/vae", latent_dim=2, epochs=30)
    pipeline.evaluate(run, k=1000)
    pipeline.report(run)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from elbolab import runs
from elbolab.data import available_sources
from elbolab.errors import ElbolabError
from elbolab.likelihoods import build_likelihood
from elbolab.models import get_model_class
from elbolab.trainer import TrainConfig, Trainer


def _load_splits(data_info: dict, data_dir=None):
    from elbolab.data import load_data

    return load_data(
        data_info["source"], data_dir=data_dir or data_info.get("data_dir"), binarize=data_info["binarize"],
        seed=data_info["seed"], val_size=data_info.get("val_size"),
    )


DATA_OPTIONS = ("binarize", "val_size", "data_dir")


def split_options(cls, options: dict) -> tuple[dict, dict, dict]:
    """Sort keyword options into (model config, train config, data) options by their names; unknown names fail
    with the list of valid ones."""
    model_names = {f.name for f in cls.config_class.option_fields()}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train, data, unknown = {}, {}, {}, []
    for key, value in options.items():
        if key in model_names:
            model[key] = value
        elif key in train_names:
            train[key] = value
        elif key in DATA_OPTIONS:
            data[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ElbolabError(
            f"unknown option(s) {sorted(unknown)} for model {cls.registry_name!r}; expected model options "
            f"{sorted(model_names)}, training options {sorted(train_names - {'progress', 'tensorboard'})} or data "
            f"options {list(DATA_OPTIONS)} (see 'elbolab models {cls.registry_name}')"
        )
    return model, train, data


def train(model_name: str, data: str = "digits", *, out, resume: bool = False, figures: bool = True,
          init_from=None, **options) -> Path:
    """Train ``model_name`` on ``data`` into the run folder ``out``; returns the run folder.

    ``options`` are fields of the model's config class (``latent_dim``, ``hidden``, ``likelihood``, a model's own
    fields such as ``k``), of ``TrainConfig`` (``epochs``, ``lr``, ``schedules``, ...) or data options
    (``binarize``, ``val_size``, ``data_dir``). ``init_from`` copies the matching weights of a trained run first.
    """
    cls = get_model_class(model_name)
    model_options, train_options, data_options = split_options(cls, options)
    if data not in available_sources():
        data = str(Path(data).resolve())
    data_dir = data_options.get("data_dir")
    data_info = {"source": data, "binarize": data_options.get("binarize", "none"),
                 "seed": train_options.get("seed", 0), "val_size": data_options.get("val_size"),
                 "data_dir": str(Path(data_dir).resolve()) if data_dir else None}
    splits = _load_splits(data_info)
    model_config = cls.config_class.from_data(splits.train, **model_options)
    low, high = splits.train.value_range()
    support = getattr(build_likelihood(model_config.likelihood, 1), "support", "real")
    if support in ("binary", "unit-interval") and (low < 0 or high > 1):
        raise ElbolabError(
            f"the {model_config.likelihood} likelihood needs data in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
            "use --likelihood gaussian or rescale the data"
        )
    train_config = TrainConfig(**train_options)
    torch.manual_seed(train_config.seed)  # the initial weights
    model = cls(model_config)
    init_info = None
    if init_from is not None and not resume:
        pretrained, _ = runs.load_run(init_from)
        loaded = model.load_pretrained(pretrained.state_dict())
        init_info = {"run": str(Path(init_from).resolve()), "tensors": loaded}
    trainer = Trainer(model, train_config, out, model_name=model_name, data_info=data_info, init_from=init_info)
    trainer.fit(splits.train, splits.val, resume=resume)
    if figures and trainer.rank == 0:
        model.figures(out, splits)
        report(out)
    return Path(out)


def evaluate(run_dir, *, k: int = 5000, split: str = "test", naive_k: int | None = None, data_dir=None,
             seed: int = 0, progress: bool = False, compare=None) -> dict:
    """Importance-sampled log p(x) (with its Monte-Carlo s.e.), ELBO, active units and KL per dimension, and model
    metrics; written to RUN_DIR/eval.json. ``compare``: another run, evaluated on the same examples with the same
    settings, reported as the paired difference of log p(x) (this run minus the other)."""
    from elbolab.evaluate import evaluate_model, paired_difference

    if split not in ("test", "train", "val"):
        raise ElbolabError(f"expected --split test, train or val, got {split!r}")
    if k < 1:
        raise ElbolabError(f"expected --iw-samples >= 1, got {k}")
    model, config = runs.load_run(run_dir)
    splits = _load_splits(config["data"], data_dir)
    data = getattr(splits, split)
    result, mine = evaluate_model(model, data, k=k, naive_k=naive_k, seed=seed, progress=progress,
                                  return_per_example=True)
    if compare is not None:
        other, other_config = runs.load_run(compare)
        keys = ("source", "binarize", "seed", "val_size")
        if any(other_config["data"].get(key) != config["data"].get(key) for key in keys):
            raise ElbolabError(
                f"--compare: {compare} was trained on other data "
                f"({ {key: other_config['data'].get(key) for key in keys} } vs "
                f"{ {key: config['data'].get(key) for key in keys} }); a paired comparison needs the same examples"
            )
        _, theirs = evaluate_model(other, data, k=k, seed=seed, progress=progress, return_per_example=True)
        result["compare"] = {"other_run": str(compare), **paired_difference(mine, theirs)}
    result.update(split=split, dataset=data.name, model=config["model"])
    runs.write_json(Path(run_dir) / runs.EVAL, result)
    return result


def make_figures(run_dir, *, model=None, splits=None) -> list[Path]:
    """The run's figures, through the model's ``figures`` hook."""
    if model is None:
        model, config = runs.load_run(run_dir)
        splits = _load_splits(config["data"])
    model.eval()
    return model.figures(Path(run_dir), splits)


@torch.no_grad()
def standard_figures(model, run_dir, splits, *, n_samples: int = 100, seed: int = 0) -> list[Path]:
    """The default figures of a model: samples, reconstructions, training curves, 2-D manifold (latent_dim == 2)
    and the latent scatter (a histogram for one latent dimension)."""
    import json

    from elbolab import plots

    run_dir = Path(run_dir)
    fig_dir = run_dir / runs.FIGURES
    shape = model.config.image_shape
    torch.manual_seed(seed)
    paths = []
    test = splits.test
    batch = test.batch(torch.arange(min(len(test), 2000)), torch.Generator().manual_seed(seed))
    if shape is not None:
        paths.append(plots.plot_image_grid(model.sample(n_samples), shape, fig_dir / "samples.png",
                                           title="samples: E[x|z], z ~ p(z)"))
        paths.append(plots.plot_reconstructions(batch.x[:10], model.reconstruct(batch[:10]), shape,
                                                fig_dir / "reconstructions.png"))
        if model.config.latent_dim >= 2:
            paths.append(plots.plot_latent_manifold(model.decode_mean, shape, fig_dir / "manifold.png",
                                                    latent_dim=model.config.latent_dim))
    metrics_path = run_dir / runs.METRICS
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        paths.append(plots.plot_training_curves(records, fig_dir / "curves.png"))
    means = next(iter(model.latent_means(batch).values()))
    paths.append(plots.plot_latent_scatter(means, batch.y, fig_dir / "latent_scatter.png"))
    return paths


def sample(run_dir, n: int = 64, out=None, seed: int = 0) -> Path:
    from elbolab import plots

    if n < 1:
        raise ElbolabError(f"expected -n >= 1, got {n}")
    model, _ = runs.load_run(run_dir)
    if model.config.image_shape is None:
        raise ElbolabError("sample: this run's data are not images; there is nothing to draw")
    torch.manual_seed(seed)
    out = Path(out) if out else Path(run_dir) / runs.FIGURES / "samples.png"
    return plots.plot_image_grid(model.sample(n), model.config.image_shape, out, title=f"{n} samples")


def report(run_dir) -> Path:
    from elbolab.report import write_report

    return write_report(run_dir)
