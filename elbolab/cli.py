"""Command-line interface: ``elbolab models | train | eval | sample | report | demo | gmm | denoise | functional``.

Errors from bad input are one line on stderr and exit code 2; ``--debug`` (anywhere on the line) shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import typer

from elbolab.errors import ElbolabError, TrainingDiverged

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Variational inference and variational autoencoders, from the lecture notes to real data.")


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ElbolabError(f"expected --hidden as positive integers separated by commas, e.g. 400,400; got {text!r}")
    return sizes


def _parse_val_size(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ElbolabError(f"expected --val-size as a count (1000) or a fraction (0.1), got {text!r}") from None


@app.command("models")
def models_command():
    """List the registered models."""
    from elbolab.models import available_models

    for name, cls in available_models().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:14s} {doc}")


@app.command("train")
def train_command(
    model: str = typer.Argument(..., help="registered model name (see 'elbolab models')"),
    out: Path = typer.Option(..., "--out", help="run folder to create (or continue with --resume)"),
    data: str = typer.Option("digits", help="digits (built in), mnist, or a .npy/.npz/.csv file"),
    data_dir: Path = typer.Option(None, "--data-dir", help="folder holding the MNIST IDX files"),
    binarize: str = typer.Option("none", help="none | dynamic | static"),
    val_size: str = typer.Option(None, "--val-size", help="validation rows (count, or a fraction like 0.1)"),
    latent_dim: int = typer.Option(20, "--latent-dim"),
    hidden: str = typer.Option("400", help="hidden layer sizes, e.g. 400,400"),
    activation: str = typer.Option("relu", help="relu | tanh | elu | softplus | gelu"),
    arch: str = typer.Option("mlp", help="mlp | conv"),
    likelihood: str = typer.Option("bernoulli", help="bernoulli | gaussian | gaussian-learned | gaussian-decoder"),
    sigma: float = typer.Option(1.0, help="standard deviation of the fixed Gaussian likelihood"),
    encoder_covariance: str = typer.Option("diag", "--encoder-covariance", help="diag | full"),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(1e-3),
    adam_eps: float = typer.Option(1e-8, "--adam-eps"),
    beta: float = typer.Option(1.0, help="weight of the KL term (beta-VAE)"),
    kl_warmup: float = typer.Option(0.0, "--kl-warmup", help="epochs of linear KL warm-up from 0 to beta"),
    mc_samples: int = typer.Option(1, "--mc-samples", help="L Monte-Carlo samples per data point"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard"),
):
    """Train a model and write a run folder with weights, metrics, figures and a report."""
    from elbolab import pipeline

    run = pipeline.train(
        model, data, out=out, data_dir=data_dir, binarize=binarize, val_size=_parse_val_size(val_size),
        latent_dim=latent_dim,
        hidden=_parse_hidden(hidden), activation=activation, architecture=arch, likelihood=likelihood, sigma=sigma,
        encoder_covariance=encoder_covariance, epochs=epochs, batch_size=batch_size, lr=lr, adam_eps=adam_eps,
        beta=beta, kl_warmup_epochs=kl_warmup, mc_samples=mc_samples, seed=seed, resume=resume,
        progress=progress, tensorboard=tensorboard,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"run written to {run}  (report: {run / 'index.html'})")


@app.command("eval")
def eval_command(
    run_dir: Path = typer.Argument(..., help="a run folder written by 'elbolab train'"),
    iw_samples: int = typer.Option(5000, "--iw-samples", help="K importance samples per example"),
    split: str = typer.Option("test", help="test | train | val"),
    naive_samples: int = typer.Option(0, "--naive-samples", help="also the prior-sampling estimator with this K"),
    data_dir: Path = typer.Option(None, "--data-dir"),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Importance-sampled log p(x), ELBO, active units; writes RUN_DIR/eval.json and prints it."""
    from elbolab import pipeline

    result = pipeline.evaluate(run_dir, k=iw_samples, split=split, naive_k=naive_samples or None,
                               data_dir=data_dir, seed=seed, progress=progress)
    typer.echo(json.dumps(result, indent=2))


@app.command("sample")
def sample_command(
    run_dir: Path = typer.Argument(...),
    n: int = typer.Option(64, "-n", help="number of samples"),
    out: Path = typer.Option(None, "--out", help="PNG file (default RUN_DIR/figures/samples.png)"),
    seed: int = typer.Option(0),
):
    """Draw samples from the model's prior through its decoder into a PNG grid."""
    from elbolab import pipeline

    typer.echo(str(pipeline.sample(run_dir, n, out, seed)))


@app.command("report")
def report_command(run_dir: Path = typer.Argument(...)):
    """Rebuild RUN_DIR/index.html from what the run folder holds."""
    from elbolab import pipeline, runs

    if not (Path(run_dir) / runs.CONFIG).exists():
        raise ElbolabError(f"expected a run folder with config.json, got {run_dir}; pass the --out of 'elbolab train'")
    pipeline.make_figures(run_dir)
    typer.echo(str(pipeline.report(run_dir)))


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    epochs: int = typer.Option(100),
    iw_samples: int = typer.Option(1000, "--iw-samples"),
):
    """Train a 2-D-latent VAE on scikit-learn's digits (offline), evaluate it and write its report."""
    from elbolab import pipeline

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        stamp = 1
        while Path(f"{out}-{stamp}").exists():
            stamp += 1
        out = Path(f"{out}-{stamp}")  # never overwrite an earlier demo
    run = pipeline.train("vae", "digits", out=out, latent_dim=2, hidden=(256, 128), epochs=epochs, batch_size=64,
                         lr=3e-3, seed=0, tensorboard=False)
    result = pipeline.evaluate(run, k=iw_samples, naive_k=iw_samples)
    pipeline.report(run)
    log_px = result["log_px"]
    typer.echo(f"test log p(x) ~ {log_px['mean']:.2f} +- {log_px['stderr']:.2f} nats (K={iw_samples}), "
               f"ELBO {result['elbo']:.2f}")
    typer.echo(f"report: {(run / 'index.html').resolve()}")


def _register_classical() -> None:
    from elbolab.classical.gmm_cli import app as gmm_app
    from elbolab.classical.ising_cli import denoise_command, functional_app

    app.add_typer(gmm_app, name="gmm", help="Gaussian mixtures by EM or variational Bayes.")
    app.command("denoise")(denoise_command)
    app.add_typer(functional_app, name="functional", help="Calculus of variations demos.")


_register_classical()


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns (and, as a script, exits with) 0 on success, 2 on bad input."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        # standalone mode: typer prints usage errors itself and exits with 2
        app(args=args, prog_name="elbolab")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (ElbolabError, TrainingDiverged, FileNotFoundError, PermissionError) as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        return 2
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
