"""Command-line interface: ``elbolab models | train | eval | sample | report | demo | gmm | denoise | functional``.

Errors from bad input are one line on stderr and exit code 2; ``--debug`` (anywhere on the line) shows the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path

import typer

from elbolab.errors import ElbolabError, TrainingDiverged, TrainingInterrupted

# Nothing heavy (torch, NumPy, scikit-learn, matplotlib, elbolab.classical's estimators) is imported at module level
# here or in the classical command modules: 'elbolab --help', '-h' and '--version' start in a fraction of a second;
# each command imports what it needs in its body (tests/test_cli_manners.py checks).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Variational inference and variational autoencoders, from the lecture notes to real data.")


def _print_version(value: bool) -> None:
    if value:
        from elbolab import __version__

        typer.echo(f"elbolab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Variational inference and variational autoencoders, from the lecture notes to real data."""


def _parse_dims(text: str) -> list[int]:
    try:
        dims = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 0:
        raise ElbolabError(f"expected --dims as latent dimensions (0, 1, ...) separated by commas, e.g. 0,3; got "
                           f"{text!r}")
    return dims


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


def _parse_assignments(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or not key or not value:
            raise ElbolabError(f"expected {flag} KEY=VALUE with a value, got {pair!r}")
        if key in out and out[key] != value:
            raise ElbolabError(f"{flag} {key} given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out


def _parse_set(cls, pairs: list[str]) -> dict:
    """``--set key=value`` -> typed model options, by the model config's field types (listed by 'models NAME')."""
    from elbolab.config import parse_option

    fields = {f.name for f in cls.config_class.option_fields()}
    options = {}
    for key, text in _parse_assignments(pairs, "--set").items():
        if key in ("beta", "kl_warmup") and key not in fields:
            flag = "--beta" if key == "beta" else "--kl-warmup"
            raise ElbolabError(f"--set {key}: beta is a schedule for every model, not a model option: use {flag} "
                               f"{text} (or --schedule beta=SPEC, e.g. beta=linear:0:4:10 for a warm-up to 4)")
        if key not in fields:
            raise ElbolabError(f"--set {key}: model {cls.registry_name!r} has no such option; expected one of "
                               f"{sorted(fields)} (see 'elbolab models {cls.registry_name}')")
        options[key] = parse_option(cls.config_class, key, text, flag=f"--set {key}")
    return options


THREADS_HELP = ("torch threads for this command [default: torch's own, one per core, or OMP_NUM_THREADS]; 1 is "
                "often fastest for small models, and much faster when other processes keep cores busy")


class _Threads:
    """``--threads N`` for one command: torch.set_num_threads(N) on entry and the previous number back on exit (the
    CLI also runs inside Python: tests, notebooks). Without it, torch's own number. Train and eval warn once when
    more than one thread would wait on cores that other processes keep busy (``pipeline.warn_if_cores_busy``; not
    when OMP_NUM_THREADS is set): a warning and an option rather than a default that follows the load, which would
    make a command's speed depend on what else ran when it started (a long run begun beside a job about to end would
    keep one thread for hours)."""

    def __init__(self, threads: int | None):
        if threads is not None and threads < 1:
            raise ElbolabError(f"expected --threads N >= 1, got {threads}")
        self.threads, self._before = threads, None

    def __enter__(self) -> _Threads:
        if self.threads is not None:
            import torch

            self._before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        if self._before is not None:
            import torch

            torch.set_num_threads(self._before)


def _registered_models_from_source() -> dict[str, str] | None:
    """``{name: first docstring line}`` of the models registered by ``@register_model("name")`` in the model modules
    of elbolab/models (every module but the contracts; see elbolab/models/__init__.py), read from their source:
    'elbolab models' then lists them without importing torch (about 0.3 s instead of 3). ``None`` when the sources
    do not look as expected (the caller then imports the registry); tests/test_cli_manners.py checks that both give
    the same list."""
    import ast

    folder = Path(__file__).resolve().parent / "models"
    found = {}
    try:
        package = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
        infrastructure = next(ast.literal_eval(node.value) for node in package.body if isinstance(node, ast.Assign)
                              and getattr(node.targets[0], "id", None) == "INFRASTRUCTURE")
        modules = sorted(p.stem for p in folder.glob("*.py")
                         if p.stem not in infrastructure and not p.stem.startswith("_"))
        for module in modules:
            tree = ast.parse((folder / f"{module}.py").read_text(encoding="utf-8"))
            for node in tree.body:
                if not isinstance(node, ast.ClassDef):
                    continue
                for decorator in node.decorator_list:
                    if (isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register_model"
                            and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                        doc = (ast.get_docstring(node, clean=False) or "").strip()
                        found[decorator.args[0].value] = doc.splitlines()[0] if doc else ""
    except (OSError, SyntaxError, UnicodeDecodeError, StopIteration, ValueError):
        return None
    return dict(sorted(found.items())) if modules and found else None


@app.command("models")
def models_command(name: str = typer.Argument(None, help="a model name: list its options")):
    """List the registered models, or one model's options (for --set KEY=VALUE)."""
    if name is None:
        listed = _registered_models_from_source()
        if listed is None:
            from elbolab.models import available_models

            listed = {model_name: ((cls.__doc__ or "").strip().splitlines() or [""])[0]
                      for model_name, cls in available_models().items()}
        for model_name, doc in listed.items():
            typer.echo(f"{model_name:18s} {doc}")
        return
    import typing

    from elbolab.models import get_model_class

    cls = get_model_class(name)
    typer.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
    typer.echo(f"options (elbolab train {name} --set KEY=VALUE; the common ones also have their own flags):")
    hints = typing.get_type_hints(cls.config_class)
    for f in cls.config_class.option_fields():
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        typer.echo(f"  {f.name:20s} {kind:10s} default {f.default!r:12s} {f.metadata.get('help', '')}")


# train's flags for the options every model config has (ModelConfig) and for the train and data settings: flag
# parameter -> option name. A model's defaults are its own (``elbolab models NAME``); tests/test_cli.py checks that
# every name here is a field of ModelConfig or TrainConfig, or a data option.
MODEL_FLAGS = {"latent_dim": "latent_dim", "hidden": "hidden", "activation": "activation", "arch": "architecture",
               "likelihood": "likelihood", "sigma": "sigma", "encoder_covariance": "encoder_covariance"}
TRAIN_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "adam_eps": "adam_eps",
               "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2", "beta": "beta",
               "kl_warmup": "kl_warmup_epochs", "mc_samples": "mc_samples", "seed": "seed",
               "checkpoint_every": "checkpoint_every", "keep_best": "keep_best", "device": "device",
               "precision": "precision", "compile": "compile"}
DATA_FLAGS = {"binarize": "binarize", "val_size": "val_size", "train_size": "train_size", "data_dir": "data_dir"}
MODEL_DEFAULT = "[default: the model's own; see 'elbolab models NAME']"


@app.command("train")
def train_command(
    ctx: typer.Context,
    model: str = typer.Argument(None, help="registered model name (see 'elbolab models'); not needed with --resume "
                                            "or --config"),
    out: Path = typer.Option(..., "--out", help="run folder to create (or continue with --resume)"),
    config: Path = typer.Option(None, "--config", help="settings from a TOML, JSON or YAML file (flat options, or a "
                                                       "run's config.json to re-run it); flags given here win"),
    data: str = typer.Option("digits", help="digits (built in, offline), mnist, sprites, dsprites, 20news, a "
                                            ".npy/.npz/.csv file, a sparse document-term .npz, a folder of .txt "
                                            "documents, or a folder written by elbolab.data.mmap"),
    data_dir: Path = typer.Option(None, "--data-dir", help="folder holding the data set's files (e.g. mnist/)"),
    binarize: str = typer.Option("none", help="none | dynamic | static"),
    val_size: str = typer.Option(None, "--val-size", help="validation rows (count, or a fraction like 0.1)"),
    train_size: int = typer.Option(None, "--train-size", help="train on the first N training rows only (after the "
                                                             "seeded split; a quick look at a large data set)"),
    latent_dim: int = typer.Option(None, "--latent-dim", help=f"dimensions of z {MODEL_DEFAULT}"),
    hidden: str = typer.Option(None, help=f"hidden layer sizes, e.g. 400,400 {MODEL_DEFAULT}"),
    activation: str = typer.Option(None, help=f"relu | tanh | elu | softplus | gelu {MODEL_DEFAULT}"),
    arch: str = typer.Option(None, help=f"mlp | conv {MODEL_DEFAULT}"),
    likelihood: str = typer.Option(None, help="bernoulli | continuous-bernoulli | gaussian | gaussian-learned | "
                                              f"gaussian-decoder {MODEL_DEFAULT}"),
    sigma: float = typer.Option(None, help=f"standard deviation of a fixed Gaussian likelihood {MODEL_DEFAULT}"),
    encoder_covariance: str = typer.Option(None, "--encoder-covariance", help=f"diag | full {MODEL_DEFAULT}"),
    epochs: int = typer.Option(10, help="train until this many epochs (with --resume: extend the run to it)"),
    batch_size: int = typer.Option(128, "--batch-size", help="examples per optimiser step (global under torchrun)"),
    lr: float = typer.Option(1e-3, help="Adam's learning rate (a schedule: --schedule lr=SPEC)"),
    adam_eps: float = typer.Option(1e-8, "--adam-eps", help="Adam's epsilon"),
    adam_beta1: float = typer.Option(0.9, "--adam-beta1", help="Adam's beta1 (the IWAE paper's code: 0.99)"),
    adam_beta2: float = typer.Option(0.999, "--adam-beta2", help="Adam's beta2"),
    beta: float = typer.Option(None, help=f"weight of the KL term (the beta schedule, constant) {MODEL_DEFAULT}"),
    kl_warmup: float = typer.Option(0.0, "--kl-warmup", help="epochs of linear KL warm-up from 0 to beta (the beta "
                                                              "schedule)"),
    mc_samples: int = typer.Option(1, "--mc-samples", help="L Monte-Carlo samples per data point"),
    seed: int = typer.Option(0, help="seed of the initial weights, the data split and every random draw"),
    set_options: list[str] = typer.Option(None, "--set", help="a model option KEY=VALUE (repeatable); "
                                                              "'elbolab models NAME' lists them"),
    schedule: list[str] = typer.Option(None, "--schedule", help="NAME=SPEC (repeatable): constant:v, "
                                       "linear:v0:v1:epochs[:start], cyclical:vmax:period:ratio, "
                                       "step:v0:factor:every, geometric:v0:factor:first:growth; e.g. "
                                       "free_bits=constant:0.25, beta=cyclical:1:10:0.5, lr=step:0.002:0.9:10, "
                                       "lr=geometric:0.001:0.7196857:1:3 (the IWAE paper's)"),
    init_from: Path = typer.Option(None, "--init-from", help="copy the matching weights of a trained run first "
                                   "(refused when less than half of this model's tensors match)"),
    init_partial: bool = typer.Option(False, "--init-partial", help="with --init-from: copy whatever matches, "
                                                                    "however little"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="also checkpoint every N steps within an "
                                                                      "epoch (exact mid-epoch resume)"),
    keep_best: bool = typer.Option(False, "--keep-best", help="also keep the best-on-validation weights "
                                                              "(model.best.safetensors; eval --weights best)"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (matrix products in bfloat16, sums in float32; fast "
                                               "only on CPUs with AVX512-BF16/AMX) | fp16 (GPU)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint, with "
                                                        "its saved settings"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete the run in --out and start it again"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="a progress bar and a line per epoch"),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard", help="also log to RUN/tensorboard"),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
    compile: bool = typer.Option(False, "--compile", help="the training step through torch.compile: seconds to "
                                 "compile, faster for some models (hvae, hiwae, ladder-vae, flow-vae, vampprior), "
                                 "slower for others; see BENCHMARKS.md"),
):
    """Train a model and write a run folder with weights, metrics, figures and a report.

    Ctrl-C stops at the next step with a checkpoint; continue with 'elbolab train --out RUN --resume'."""
    from elbolab import pipeline

    model, data, init_from, options = _train_settings(ctx, model, data, init_from)
    with _Threads(threads):
        run = pipeline.train(model, data, out=out, init_from=init_from, init_partial=init_partial, resume=resume,
                             overwrite=overwrite, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"run written to {run}")


def _train_settings(ctx: typer.Context, model, data, init_from) -> tuple[str | None, str | None, Path | None, dict]:
    """(model, data, init_from, options) for ``pipeline.train`` from train's flags: a settings file (--config)
    first, the flags given on the command line over it; a flag left at its default counts only for a new run
    started without a file (a resumed run keeps its own settings, a model keeps its own defaults)."""
    from elbolab import pipeline
    from elbolab.config import parse_option
    from elbolab.models import ModelConfig, get_model_class

    params = ctx.params
    config, out, resume = params["config"], params["out"], params["resume"]

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)  # click's ParameterSource (typer vendors click in new versions)
        return source is not None and source.name != "DEFAULT"

    if config is not None and resume:
        raise ElbolabError("--config starts a run from a settings file; --resume continues the run in --out with "
                           "its own settings. Give one of them")
    file_model, file_data, options = pipeline.settings_from_file(config) if config is not None else (None, None, {})
    model = model or file_model
    init_from = init_from if init_from is not None else options.pop("init_from", None)
    options.pop("init_from", None)
    defaults_apply = config is None and not resume
    for param, key in {**MODEL_FLAGS, **TRAIN_FLAGS, **DATA_FLAGS}.items():
        value = params[param]
        if given(param) or (defaults_apply and param not in MODEL_FLAGS and param != "beta"):
            if value is not None and param == "hidden":
                value = parse_option(ModelConfig, "hidden", value, flag="--hidden")
            elif param == "val_size":
                value = _parse_val_size(value)
            options[key] = value
    options["progress"] = params["progress"]  # how a run is watched may change on resume; what it writes may not
    if given("tensorboard") or defaults_apply:
        options["tensorboard"] = params["tensorboard"]
    if params["schedule"]:
        options["schedules"] = {**options.get("schedules", {}), **_parse_assignments(params["schedule"],
                                                                                     "--schedule")}
    if params["set_options"]:
        if model is None and not resume:
            raise ElbolabError("--set needs a model name: elbolab train MODEL --set KEY=VALUE")
        from_set = _parse_set(get_model_class(model or _saved_model(out)), params["set_options"])
        flags = {key: param for param, key in {**MODEL_FLAGS, **TRAIN_FLAGS, **DATA_FLAGS}.items()}
        twice = sorted(key for key in from_set if key in flags and given(flags[key]))
        if twice:
            raise ElbolabError(f"{', '.join(twice)} given both as --set and as its own flag "
                               f"(--{flags[twice[0]].replace('_', '-')}); give it once")
        options.update(from_set)
    if given("data"):
        return model, data, init_from, options
    return model, file_data if file_data is not None else (None if resume else data), init_from, options


def _saved_model(out: Path) -> str:
    from elbolab import runs

    return runs.read_json(out / runs.CONFIG).get("model", "")


def _headline(result: dict) -> str:
    """One line: what log p(x) is, its Monte-Carlo s.e., K and the number of examples."""
    log_px = result["log_px"]
    name = "log p(x)" if log_px.get("is_density", True) else "Bernoulli score (not a log-density)"
    line = (f"{result.get('split', 'test')} {name} = {log_px['mean']:.2f} nats, Monte-Carlo s.e. "
            f"{log_px['mc_stderr']:.3f} (K = {log_px['k']}"
            + (f", mean ESS {log_px['ess_mean']:,.0f}" if log_px.get("ess_mean") is not None else "")
            + f", {log_px['n_examples']:,} examples"
            f"{_subset_note(result)}; s.d. over examples "
            f"{log_px['sd_over_examples'] or 0:.2f})")
    if "elbo" in result:
        line += f"; ELBO {result['elbo']:.2f}"
    if "compare" in result:
        c = result["compare"]
        mine = c["mean_difference"] + c["other_mean"] if c.get("other_mean") is not None else log_px["mean"]
        other = f" ({c['other_mean']:.2f})" if c.get("other_mean") is not None else ""
        line += (f"\npaired difference, this run ({mine:.2f}) minus {c['other_run']}{other}: "
                 f"{c['mean_difference']:+.3f} +- {c['stderr'] or 0:.3f} nats (s.e. over {c['n_examples']:,} "
                 "examples, the same for both)")
    if result.get("log_px_note"):
        line += f"\nnote: {result['log_px_note']}"
    if log_px.get("warning"):
        line += f"\nwarning: {log_px['warning']}"
    metrics = {k: v for k, v in (result.get("model_metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:  # the model's own headline numbers: perplexity (nvdm), clustering accuracy (vade), ...
        line += "\n" + f"{result.get('model', 'model')}: " + ", ".join(
            f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int) else f"{k.replace('_', ' ')} {v:.4g}"
            for k, v in metrics.items())
    return line


def _bdmc_reading(gap: float) -> str:
    """What a BDMC gap says about AIS at this budget (Grosse et al. 2015: the true log p(x) lies between)."""
    if gap < 0:
        return "the bounds cross: the gap is below their Monte-Carlo noise, so AIS at this budget is accurate"
    if gap < 0.5:
        return "a small gap: AIS at this budget is accurate on data like these"
    return "a wide gap: neither bound is tight; raise --ais-steps before trusting AIS or IS to better than that"


def _subset_note(result: dict) -> str:
    """' (--limit)', or what the default budget left out and how to score everything."""
    if not result.get("limit"):
        return ""
    if result.get("limit_reason") == "budget":
        of = f" of {result['split_size']:,}" if result.get("split_size") else ""
        return f"{of}: the default budget; --full for all"
    return " (--limit)"


@app.command("eval")
def eval_command(
    run_dir: Path = typer.Argument(..., help="a run folder written by 'elbolab train'"),
    iw_samples: int = typer.Option(5000, "--iw-samples", help="K importance samples per example"),
    split: str = typer.Option("test", help="test | train | val"),
    naive_samples: int = typer.Option(0, "--naive-samples", help="also the prior-sampling estimator with this K"),
    compare: Path = typer.Option(None, "--compare", help="another run: the paired difference of log p(x) on the "
                                                         "same examples"),
    data_dir: Path = typer.Option(None, "--data-dir"),
    seed: int = typer.Option(0),
    weights: str = typer.Option("last", help="last (end of training) | best (best val ELBO, needs --keep-best)"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    limit: int = typer.Option(None, "--limit", help="only the first N examples of the split (a quick first look)"),
    full: bool = typer.Option(False, "--full", help="score every example of the split (the papers' protocol). "
                              "Without it, when that would take more than about two minutes here, the first "
                              "examples that fit about one minute (at least 500) are scored, and the output says so"),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (matrix products in bfloat16; log-sum-exp in float64)"),
    disentanglement: bool = typer.Option(False, "--disentanglement", help="also the beta-VAE, FactorVAE and MIG "
                                         "metrics (a run on --data sprites or dsprites)"),
    disentanglement_protocol: str = typer.Option("quick", "--disentanglement-protocol", help="quick (0.6 M images "
                                                 "drawn and encoded; accuracy s.e. <= 0.016) | full (Locatello et "
                                                 "al. 2019: 2.9 M images, about 5x longer; s.e. <= 0.007)"),
    compile: bool = typer.Option(False, "--compile", help="importance sampling through torch.compile: seconds to "
                                 "compile, then about 1.8x faster (worth it from about a minute of evaluation)"),
    ais_steps: int = typer.Option(0, "--ais-steps", help="also log p(x) by annealed importance sampling with N "
                                  "steps (a stochastic lower bound; HMC transitions) on --ais-examples examples"),
    ais_chains: int = typer.Option(16, "--ais-chains", help="AIS chains per example"),
    ais_leapfrog: int = typer.Option(10, "--ais-leapfrog", help="leapfrog steps per HMC transition"),
    ais_examples: int = typer.Option(100, "--ais-examples", help="examples AIS runs on (the first of the split)"),
    bdmc: int = typer.Option(0, "--bdmc", help="also bidirectional Monte Carlo on N examples simulated from the "
                             "model: an upper and a lower bound on their log p(x) (steps: --ais-steps, or 100)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
):
    """Importance-sampled log p(x) with its Monte-Carlo s.e., ELBO, active units. Every evaluation is kept in
    RUN_DIR/evaluations (eval.json is the latest) and the report is refreshed."""
    from elbolab import pipeline

    with _Threads(threads):
        result = pipeline.evaluate(run_dir, k=iw_samples, split=split, naive_k=naive_samples or None,
                                   data_dir=data_dir, seed=seed, progress=progress, compare=compare,
                                   weights=weights, device=device, limit=limit, precision=precision,
                                   disentanglement=disentanglement, compile=compile, ais_steps=ais_steps,
                                   ais_chains=ais_chains, ais_leapfrog=ais_leapfrog, ais_examples=ais_examples,
                                   bdmc_examples=bdmc, disentanglement_protocol=disentanglement_protocol,
                                   full=full)
    typer.echo(f"weights: {result['weights']}")
    if compile:
        typer.echo("compiled: yes (torch.compile)" if result.get("compiled") else
                   f"compiled: no, torch.compile failed ({result.get('compile_fallback')}); evaluated eagerly")
    typer.echo(_headline(result))
    if "log_px_ais" in result:
        ais = result["log_px_ais"]
        typer.echo(f"log p(x) by AIS = {ais['mean']:.2f} nats, Monte-Carlo s.e. {ais['mc_stderr']:.3f} ({ais['steps']} "
                   f"steps, {ais['chains']} chains, {ais['n_examples']} examples, acceptance {ais['acceptance']:.2f}, "
                   f"{ais['seconds']:.0f} s)")
    if "bdmc" in result:
        b = result["bdmc"]
        typer.echo(f"BDMC on {b['n_examples']} simulated examples: lower {b['lower']:.2f}, upper {b['upper']:.2f} "
                   f"(gap {b['gap']:.3f} nats at {b['steps']} steps; {_bdmc_reading(b['gap'])})")
    if "disentanglement" in result:
        scores = result["disentanglement"]
        beta, factor = scores["beta_vae"], scores["factor_vae"]
        typer.echo(f"disentanglement ({scores['protocol']['name']} protocol, {scores['protocol']['images']:,} images): "
                   f"beta-VAE metric {beta['eval_accuracy']:.3f} +- {beta['eval_accuracy_se']:.3f}, FactorVAE metric "
                   f"{factor['eval_accuracy']:.3f} +- {factor.get('eval_accuracy_se', 0):.3f} (held-out accuracies; "
                   f"chance {beta['chance']:.3f}), MIG {scores['mig']['mig']:.3f} (in [0, 1])")
    typer.echo(f"saved to {result['saved_to']}; report refreshed: {(Path(run_dir) / 'index.html').resolve()}")


@app.command("sample")
def sample_command(
    run_dir: Path = typer.Argument(...),
    n: int = typer.Option(64, "-n", help="number of samples"),
    out: Path = typer.Option(Path("samples.png"), "--out", help="a .png grid, or a .npy file for the array [n, D] "
                             "(default samples.png in the current folder; the run folder is never changed)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    seed: int = typer.Option(0),
):
    """Draw samples from the model's prior through its decoder into a PNG grid (or a .npy array)."""
    from elbolab import pipeline

    typer.echo(str(pipeline.sample(run_dir, n, out, seed, overwrite=overwrite)))


@app.command("traverse")
def traverse_command(
    run_dir: Path = typer.Argument(..., help="a run folder written by 'elbolab train'"),
    dims: str = typer.Option(None, "--dims", help="latent dimensions to sweep, e.g. 0,3,5 [default: all, up to 10, "
                                                  "the highest KL first]"),
    steps: int = typer.Option(9, help="values per dimension"),
    span: float = typer.Option(3.0, help="sweep each dimension over [-span, span] around the image's code"),
    index: int = typer.Option(0, help="the seed image: its row in --split"),
    split: str = typer.Option("test", help="test | train | val"),
    out: Path = typer.Option(None, "--out", help="folder for traversals.png and .gif [default: RUN_DIR/figures]"),
    data_dir: Path = typer.Option(None, "--data-dir"),
):
    """Latent traversals around one image: a grid (one row per dimension) and an animated GIF."""
    from elbolab import pipeline
    from elbolab.pipeline import traverse_run

    chosen = None if dims is None else _parse_dims(dims)
    for path in traverse_run(run_dir, dims=chosen, steps=steps, span=span, index=index, split=split, out_dir=out,
                             data_dir=data_dir):
        typer.echo(str(path))
    if out is None:  # written into the run folder: its report shows them
        typer.echo(f"report refreshed: {pipeline.report(run_dir).resolve()}")


@app.command("holes")
def holes_command(
    run_dir: Path = typer.Argument(..., help="a run folder of a model with an N(0, I) prior"),
    split: str = typer.Option("test", help="test | train | val"),
    n_points: int = typer.Option(2000, "--n-points", help="encoded examples forming the aggregated posterior"),
    threshold: float = typer.Option(0.1, help="a hole: where q(z) / p(z) is below this"),
    n_samples: int = typer.Option(100_000, "--n-samples", help="prior samples for the hole mass"),
    seed: int = typer.Option(0),
):
    """Prior holes: the prior mass where the aggregated posterior q(z) barely reaches (q/p < threshold), with a
    figure of both densities and decoded samples from holes and from covered regions."""
    from elbolab.prior_holes import prior_holes

    result = prior_holes(run_dir, split=split, n_points=n_points, threshold=threshold, n_samples=n_samples,
                         seed=seed)
    typer.echo(f"prior mass in holes (q(z)/p(z) < {result['threshold']:g}): {result['mass']:.3f} +- "
               f"{result['se']:.3f} (s.e., {result['n_samples']:,} prior samples; q(z) from {result['n_points']:,} "
               f"{split} examples, {result['plane']}; p(z) = {result.get('prior_name', 'N(0, I)')})")
    for path in result["figures"]:
        typer.echo(path)
    from elbolab import pipeline

    typer.echo(f"report refreshed: {pipeline.report(run_dir).resolve()}")


@app.command("encode")
def encode_command(
    run_dir: Path = typer.Argument(..., help="a run folder written by 'elbolab train'"),
    out: Path = typer.Option(..., "--out", help="codes.npy (an array file with z and, when the data have them, "
                                                "labels y: codes.npz), or codes.csv (z1..zd, then y)"),
    split: str = typer.Option("test", help="test | train | val"),
    data_dir: Path = typer.Option(None, "--data-dir"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
):
    """The latent means E[z|x] of a split (and its labels): sklearn's transform, for use elsewhere. Never writes
    into the run folder."""
    from elbolab import pipeline

    path, shape = pipeline.encode(run_dir, out, split=split, data_dir=data_dir, overwrite=overwrite)
    typer.echo(f"{shape[0]:,} codes of {shape[1]} dimensions written to {path}")


@app.command("topics")
def topics_command(
    run_dir: Path = typer.Argument(..., help="a run folder of a topic model (nvdm)"),
    top: int = typer.Option(10, help="words per latent dimension"),
):
    """The top words of each latent dimension (largest weights of R)."""
    from elbolab.topics import topics

    typer.echo(topics(run_dir, top))


@app.command("neighbours")
def neighbours_command(
    run_dir: Path = typer.Argument(..., help="a run folder of a topic model (nvdm)"),
    words: list[str] = typer.Argument(..., help="one or more words of the vocabulary"),
    n: int = typer.Option(5, "-n", help="neighbours per word"),
):
    """The nearest words by cosine similarity of the decoder's word vectors (the columns of R)."""
    from elbolab.topics import neighbours

    typer.echo(neighbours(run_dir, words, n))


@app.command("report")
def report_command(run_dir: Path = typer.Argument(...)):
    """Redraw the run's figures and rebuild RUN_DIR/index.html from what the run folder holds."""
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
    """Train a 2-D-latent VAE on binarised scikit-learn digits (offline), evaluate it and write its report."""
    from elbolab import pipeline

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        stamp = 1
        while Path(f"{out}-{stamp}").exists():
            stamp += 1
        out = Path(f"{out}-{stamp}")  # never overwrite an earlier demo
    # dynamically binarised digits: the Bernoulli likelihood is then a true log-likelihood of binary images
    run = pipeline.train("vae", "digits", out=out, latent_dim=2, hidden=(256, 128), epochs=epochs, batch_size=64,
                         lr=3e-3, seed=0, binarize="dynamic")
    result = pipeline.evaluate(run, k=iw_samples, naive_k=iw_samples)
    pipeline.report(run)
    typer.echo(_headline(result))
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
    except TrainingInterrupted as e:
        typer.echo(str(e), err=True)
        return 130  # the shell's code for a Ctrl-C stop
    except (ElbolabError, TrainingDiverged, OSError) as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {_os_error_message(e) if isinstance(e, OSError) else e}", err=True)
        return 2
    return 0


def _os_error_message(error: OSError) -> str:
    """A file-system failure (read-only, full, missing, forbidden) as one line that says what to check."""
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or type(error).__name__
    verb = "write" if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS) else "use"
    return (f"could not {verb}{where}: {reason}; check that the path exists and is writable and that the disk has "
            "room (files written before this point are complete; a run folder can be trained into again)")


def entry_point() -> None:
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun, skip the interpreter's teardown: torch's C++ threads (the rendezvous store's) may still be
        # joinable then, and about one exit in twenty aborted with "terminate called without an active exception"
        # after the run was complete. Every file is closed by now; only the streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
