"""The Python API behind the CLI: train a run, evaluate it, draw its figures, write its report.

    from elbolab import pipeline
    run = pipeline.train("vae", "digits", out="runs/vae", latent_dim=2, epochs=30)
    pipeline.evaluate(run, k=1000)
    pipeline.report(run)
"""

from __future__ import annotations

from pathlib import Path

import torch

from elbolab import runs
from elbolab.errors import ElbolabError
from elbolab.models import get_model_class
from elbolab.trainer import TrainConfig, Trainer


def _load_splits(data_info: dict, data_dir=None):
    from elbolab.data import load_data

    return load_data(
        data_info["source"], data_dir=data_dir or data_info.get("data_dir"), binarize=data_info["binarize"],
        seed=data_info["seed"], val_size=data_info.get("val_size"),
    )


def train(model_name: str, data: str = "digits", *, out, data_dir=None, binarize: str = "none",
          val_size=None, latent_dim: int = 20, hidden=(400,), activation: str = "relu",
          architecture: str = "mlp", likelihood: str = "bernoulli", sigma: float = 1.0,
          encoder_covariance: str = "diag", epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
          adam_eps: float = 1e-8, beta: float = 1.0, kl_warmup_epochs: float = 0.0, mc_samples: int = 1,
          seed: int = 0, resume: bool = False, progress: bool = True, tensorboard: bool = True,
          figures: bool = True) -> Path:
    """Train ``model_name`` on ``data`` into the run folder ``out``; returns the run folder."""
    cls = get_model_class(model_name)
    if data not in ("digits", "mnist"):
        data = str(Path(data).resolve())
    data_info = {"source": data, "binarize": binarize, "seed": seed, "val_size": val_size,
                 "data_dir": str(Path(data_dir).resolve()) if data_dir else None}
    splits = _load_splits(data_info)
    model_config = cls.config_class(
        input_dim=splits.train.dim, image_shape=splits.train.image_shape, latent_dim=latent_dim, hidden=tuple(hidden),
        activation=activation, architecture=architecture, likelihood=likelihood, sigma=sigma,
        encoder_covariance=encoder_covariance,
    )
    if likelihood == "bernoulli" and (splits.train.x.min() < 0 or splits.train.x.max() > 1):
        raise ElbolabError(
            f"the bernoulli likelihood needs data in [0, 1], got values in [{splits.train.x.min():.3g}, "
            f"{splits.train.x.max():.3g}]; use --likelihood gaussian or rescale the data"
        )
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, adam_eps=adam_eps, beta=beta,
                               kl_warmup_epochs=kl_warmup_epochs, mc_samples=mc_samples, seed=seed,
                               progress=progress, tensorboard=tensorboard)
    torch.manual_seed(seed)  # the initial weights
    model = cls(model_config)
    trainer = Trainer(model, train_config, out, model_name=model_name, data_info=data_info)
    trainer.fit(splits.train, splits.val, resume=resume)
    if figures and trainer.rank == 0:
        make_figures(out, model=model, splits=splits)
        report(out)
    return Path(out)


def evaluate(run_dir, *, k: int = 5000, split: str = "test", naive_k: int | None = None, data_dir=None,
             seed: int = 0, progress: bool = False) -> dict:
    """Importance-sampled log p(x), ELBO, active units and KL per dimension; written to RUN_DIR/eval.json."""
    from elbolab.evaluate import evaluate_model

    if split not in ("test", "train", "val"):
        raise ElbolabError(f"expected --split test, train or val, got {split!r}")
    if k < 1:
        raise ElbolabError(f"expected --iw-samples >= 1, got {k}")
    model, config = runs.load_run(run_dir)
    splits = _load_splits(config["data"], data_dir)
    data = getattr(splits, split)
    result = evaluate_model(model, data, k=k, naive_k=naive_k, seed=seed, progress=progress)
    result.update(split=split, dataset=data.name, model=config["model"])
    runs.write_json(Path(run_dir) / runs.EVAL, result)
    return result


@torch.no_grad()
def make_figures(run_dir, *, model=None, splits=None, n_samples: int = 100, seed: int = 0) -> list[Path]:
    """Samples, reconstructions, training curves, 2-D manifold (latent_dim == 2) and latent scatter."""
    import json

    from elbolab import plots

    run_dir = Path(run_dir)
    if model is None:
        model, config = runs.load_run(run_dir)
        splits = _load_splits(config["data"])
    model.eval()
    fig_dir = run_dir / runs.FIGURES
    shape = model.config.image_shape
    torch.manual_seed(seed)
    paths = []
    test = splits.test
    x = test.batch(torch.arange(min(len(test), 2000)), torch.Generator().manual_seed(seed))
    if shape is not None:
        paths.append(plots.plot_image_grid(model.sample(n_samples), shape, fig_dir / "samples.png",
                                           title="samples: E[x|z], z ~ p(z)"))
        paths.append(plots.plot_reconstructions(x[:10], model.reconstruct(x[:10]), shape,
                                                fig_dir / "reconstructions.png"))
        if model.config.latent_dim >= 2:
            paths.append(plots.plot_latent_manifold(model.decode_mean, shape, fig_dir / "manifold.png",
                                                    latent_dim=model.config.latent_dim))
    metrics_path = run_dir / runs.METRICS
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        paths.append(plots.plot_training_curves(records, fig_dir / "curves.png"))
    labels = None if test.y is None else test.y[: len(x)]
    paths.append(plots.plot_latent_scatter(model.latent_mean(x), labels, fig_dir / "latent_scatter.png"))
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
