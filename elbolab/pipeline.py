"""The Python API behind the CLI: train a run, evaluate it, draw its figures, write its report.

    from elbolab import pipeline
    run = pipeline.train("vae", "digits", out="runs/vae", latent_dim=2, epochs=30)
    pipeline.evaluate(run, k=1000)
    pipeline.report(run)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from elbolab import plots, runs
from elbolab.config import BETA_SUGAR, TrainConfig, beta_schedule, check_device, upgrade_run_config
from elbolab.data import available_sources
from elbolab.data.core import Batch
from elbolab.data.memory import is_in_memory, load_in_memory
from elbolab.disentanglement import disentanglement_scores, model_encoder, run_factor_data
from elbolab.errors import CheckpointError, ElbolabError, TrainingInterrupted
from elbolab.evaluate import (
    ais_evaluation,
    bdmc_evaluation,
    collapse_check,
    estimated_log_px_seconds,
    evaluate_model,
    importance_diagnostics,
    paired_difference,
    quick_budget_examples,
)
from elbolab.figures.traversals import traverse
from elbolab.likelihoods import LIKELIHOODS
from elbolab.loading import load_run, load_run_data
from elbolab.models import get_model_class
from elbolab.outputs import check_memory, check_output_file, round_down
from elbolab.progress import Progress, format_duration, quiet, say
from elbolab.records import SCHEMA_VERSION, Evaluation
from elbolab.report import write_report
from elbolab.trainer import Trainer

DATA_OPTIONS = ("binarize", "val_size", "data_dir", "train_size")


def split_options(cls, options: dict) -> tuple[dict, dict, dict, dict]:
    """Sort keyword options into (model config, train config, data, beta sugar) options by their names; unknown
    names fail with the list of valid ones."""
    model_names = {f.name for f in cls.config_class.option_fields()}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train, data, sugar, unknown = {}, {}, {}, {}, []
    for key, value in options.items():
        if key in model_names:
            model[key] = value
        elif key in train_names:
            train[key] = value
        elif key in DATA_OPTIONS:
            data[key] = value
        elif key in BETA_SUGAR:
            sugar[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ElbolabError(
            f"unknown option(s) {sorted(unknown)} for model {cls.registry_name!r}; expected model options "
            f"{sorted(model_names)}, training options "
            f"{sorted((train_names | set(BETA_SUGAR)) - {'progress', 'tensorboard'})} or data options "
            f"{list(DATA_OPTIONS)} (see 'elbolab models {cls.registry_name}')"
        )
    return model, train, data, sugar


def with_beta_schedule(train_options: dict, sugar: dict, model) -> dict:
    """``beta`` / ``kl_warmup_epochs`` written as the one beta schedule (warming up to the model's own beta when
    only the warm-up is given); refused next to an explicit ``schedules["beta"]``."""
    if sugar.get("beta") is None and not sugar.get("kl_warmup_epochs"):  # neither given: the model's default
        return train_options
    schedules = dict(train_options.get("schedules") or {})
    if "beta" in schedules:
        raise ElbolabError("give beta either as --beta/--kl-warmup or as --schedule beta=..., not both")
    default = float(model.scheduled_defaults().get("beta", 1.0))
    schedules["beta"] = beta_schedule(sugar.get("beta"), sugar.get("kl_warmup_epochs") or 0.0, default)
    return {**train_options, "schedules": schedules}


def train(model_name: str | None = None, data=None, *, out, resume: bool = False, overwrite: bool = False,
          figures: bool = True, init_from=None, init_partial: bool = False, **options) -> Path:
    """Train ``model_name`` on ``data`` (default "digits") into the run folder ``out``; returns the run folder.

    ``options`` are fields of the model's config class (``latent_dim``, ``hidden``, ``likelihood``, a model's own
    fields such as ``k``), of ``TrainConfig`` (``epochs``, ``lr``, ``schedules``, ``checkpoint_every``,
    ``keep_best``, ``device``, ...) or data options (``binarize``, ``val_size``, ``data_dir``). ``init_from`` copies
    the matching weights of a trained run first (refused when less than half of this model's tensors match, unless
    ``init_partial``). ``resume=True`` continues the run in ``out`` with its saved
    settings (only ``out`` is needed; ``epochs`` may extend it; any other option that differs is refused by name).
    ``overwrite=True`` deletes the run in ``out`` and starts again.
    """
    started = time.perf_counter()
    if resume and init_from is not None:
        raise ElbolabError("--init-from starts a new run from another run's weights; --resume continues this run "
                           "from its own checkpoint. Give one of them")
    if resume and overwrite:
        raise ElbolabError("--resume continues the run in --out, --overwrite deletes it and starts again; give one")
    if resume:
        model_name, data, options = _resume_settings(Path(out), model_name, data, options)
    if model_name is None:
        raise ElbolabError("expected a model name (see 'elbolab models'); only --resume reads it from the run folder")
    data = "digits" if data is None else data
    cls = get_model_class(model_name)
    model_options, train_options, data_options, beta_sugar = split_options(cls, options)
    splits, data_info = _training_data(data, data_options, seed=train_options.get("seed", 0))
    model_config = cls.config_class.from_data(splits.train, **model_options)
    low, high = splits.train.value_range()
    support = LIKELIHOODS[model_config.likelihood].support
    if support in ("binary", "unit-interval") and (low < 0 or high > 1):
        raise ElbolabError(
            f"the {model_config.likelihood} likelihood needs data in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
            "use --likelihood gaussian or rescale the data"
        )
    torch.manual_seed(train_options.get("seed", 0))  # the initial weights
    model = cls(model_config)
    train_config = TrainConfig(**with_beta_schedule(train_options, beta_sugar, model))
    init_info = None
    if init_from is not None and not resume:
        pretrained, _ = load_run(init_from)
        loaded = model.load_pretrained(pretrained.state_dict(), partial=init_partial)
        init_info = {"run": str(Path(init_from).resolve()), "tensors": list(loaded), "copied": loaded.copied,
                     "of": loaded.total}
    elif init_partial:
        raise ElbolabError("--init-partial allows a partial --init-from copy; give --init-from RUN too")
    trainer = Trainer(model, train_config, out, model_name=model_name, data_info=data_info, init_from=init_info)
    if init_info is not None:
        trainer.say(loaded.summary())
    if trainer.rank == 0:
        warn_if_cores_busy(train_config.progress)
    with quiet(not train_config.progress):  # also the progress a model reports from inside
        history = trainer.fit(splits.train, splits.val, resume=resume, overwrite=overwrite)
        if trainer.rank == 0:
            try:
                summary = _training_summary(model, splits.val, history, Path(out), time.perf_counter() - started)
                if figures:
                    model.figures(out, splits)
                    report(out)
            except KeyboardInterrupt:
                raise TrainingInterrupted("training is complete (weights and checkpoint saved); the report was "
                                          f"interrupted: rebuild it with 'elbolab report {out}'") from None
            for line in summary["lines"]:
                trainer.say(line)
    if trainer.world > 1 and torch.distributed.is_initialized():
        # leave together and release the process group. Its gloo threads may outlive this call (something in torch
        # keeps a reference) and abort the interpreter's teardown ("terminate called without an active exception",
        # about 1 exit in 6 on a loaded 2-core machine, after a complete run): the CLI therefore ends with os._exit
        # under torchrun, and so should a script of your own (README, DDP).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return Path(out)


SETTINGS_SUFFIXES = (".toml", ".json", ".yaml", ".yml")


def settings_from_file(path) -> tuple[str | None, str | None, dict]:
    """``(model, data, options)`` from a TOML, JSON or YAML file, for ``train(model, data, **options)``.

    Two forms: flat settings (``model = "vae"``, ``data = "digits"``, then any option by name: ``latent_dim = 2``,
    ``epochs = 30``, ``schedules = {beta = "linear:0:1:10"}``), or a run's own config.json, which re-runs that run
    (same model, options, data and seed: the same numbers on a CPU)."""
    path = Path(path)
    if path.suffix.lower() not in SETTINGS_SUFFIXES:
        raise ElbolabError(f"--config: expected a {', '.join(SETTINGS_SUFFIXES)} file, got {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ElbolabError(f"--config: could not read {path} ({error.strerror or error})") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            settings = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            import json

            settings = json.loads(text)
        else:
            import yaml

            settings = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - each parser raises its own error type
        raise ElbolabError(f"--config: {path} is not valid {path.suffix[1:].upper()} ({error})") from None
    if not isinstance(settings, dict):
        raise ElbolabError(f"--config: expected {path} to hold a table of settings, got a {type(settings).__name__}")
    if {"model_config", "train_config"} <= set(settings):  # a run's config.json
        settings = upgrade_run_config(settings)
        cls = get_model_class(settings.get("model"))
        saved_data = settings.get("data") or {}
        if saved_data.get("source") == "in-memory":
            raise ElbolabError(f"--config: {path} describes a run on arrays passed from Python; call "
                               "pipeline.train with the same arrays and the options of its config.json instead")
        options = {k: v for k, v in settings["model_config"].items() if k not in cls.config_class.data_fields}
        options.update({k: v for k, v in settings["train_config"].items() if k not in ("progress",)})
        options.update({k: saved_data.get(k) for k in DATA_OPTIONS if saved_data.get(k) is not None})
        if isinstance(settings.get("init_from"), dict) and settings["init_from"].get("run"):
            options["init_from"] = settings["init_from"]["run"]
        return settings["model"], saved_data.get("source"), options
    options = dict(settings)
    model, data = options.pop("model", None), options.pop("data", None)
    if model is not None and not isinstance(model, str) or data is not None and not isinstance(data, str):
        raise ElbolabError(f"--config: expected model and data as names or paths in {path}, got {model!r}, {data!r}")
    return model, data, options


def _training_data(data, data_options: dict, *, seed: int):
    """(splits, the "data" entry of config.json) for a source name, a path, or arrays from Python."""
    if is_in_memory(data):  # x or (x, y) from Python: checked and split here; config.json describes, not stores it
        splits, data_info = load_in_memory(data, binarize=data_options.get("binarize", "none"), seed=seed,
                                           val_size=data_options.get("val_size"))
        data_info["train_size"] = data_options.get("train_size")
        return splits.with_train_size(data_options.get("train_size")), data_info
    if data not in available_sources():
        data = str(Path(data).resolve())
    data_dir = data_options.get("data_dir")
    data_info = {"source": data, "binarize": data_options.get("binarize", "none"), "seed": seed,
                 "val_size": data_options.get("val_size"),
                 "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
                 "train_size": data_options.get("train_size")}
    return load_run_data(data_info), data_info


def _resume_settings(out: Path, model_name, data, options: dict):
    """The saved model name, data and options of the run in ``out``, with the options the user gave on top. Whether
    they may differ is checked in one place, when the run folder is opened (``run_folder.check_resume_settings``)."""
    saved = upgrade_run_config(runs.read_json(out / runs.CONFIG))
    if model_name is not None and model_name != saved.get("model"):
        raise CheckpointError(f"--resume: the run in {out} is a {saved.get('model')!r} model, got {model_name!r}")
    if data is not None and not isinstance(data, str):
        raise CheckpointError("--resume: in-memory data cannot be checked against the run; pass no data to resume")
    saved_data = saved.get("data", {})
    if data is not None and (data if data in available_sources() else str(Path(data).resolve())) != \
            saved_data.get("source"):  # before any data is loaded
        raise CheckpointError(f"--resume: the run in {out} was trained on {saved_data.get('source')!r}, got {data!r}")
    cls = get_model_class(saved["model"])
    merged = {k: v for k, v in saved.get("model_config", {}).items() if k not in cls.config_class.data_fields}
    merged.update(saved.get("train_config", {}))
    merged.update({k: saved_data.get(k) for k in DATA_OPTIONS})
    merged.update(options)
    return saved["model"], saved_data.get("source") if data is None else data, merged


def _run_schedules(out: Path) -> dict:
    """The schedules the run in ``out`` trained with (config.json), for advice that is not already followed."""
    try:
        return dict(upgrade_run_config(runs.read_json(out / runs.CONFIG)).get("train_config", {}).get("schedules")
                    or {})
    except (CheckpointError, AttributeError):
        return {}


def _training_summary(model, val, history: list[dict], out: Path, seconds: float) -> dict:
    """Best validation ELBO over the whole run (every session, from metrics.jsonl), the last epoch, this session's
    wall time and a posterior-collapse check; saved in manifest.json, returned with the lines to print."""
    records, _ = runs.read_metrics(out / runs.METRICS)
    val_records = [r for r in records if r.get("split") == "val" and isinstance(r.get("elbo"), (int, float))]
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), int)]
    summary: dict = {"session_seconds": round(seconds, 3), "last_epoch": max(epochs, default=0)}
    lines = []
    if val_records:
        best = max(val_records, key=lambda r: r["elbo"])
        summary.update(best_val_elbo=best["elbo"], best_epoch=best["epoch"])
    if val is not None and len(val):
        summary.update(collapse_check(model, val, schedules=_run_schedules(out)))
    warnings = [w for w in [summary.get("collapse_warning"), *model.training_warnings(val)] if w]
    if warnings:
        summary["warnings"] = warnings
    minutes, secs = divmod(seconds, 60)
    line = f"done in {int(minutes)}m{secs:04.1f}s"
    if val_records:
        line += f"; best val ELBO {summary['best_val_elbo']:.2f} at epoch {summary['best_epoch']}"
    lines.append(line + f"; report: {(out / 'index.html').resolve()}")
    lines += [f"warning: {warning}" for warning in warnings]
    manifest_path = out / runs.MANIFEST
    if manifest_path.is_file():
        manifest = runs.read_json(manifest_path)
        manifest["summary"] = summary
        runs.write_json(manifest_path, manifest)
    return {**summary, "lines": lines}


def evaluate(run_dir, *, k: int = 5000, split: str = "test", naive_k: int | None = None, data_dir=None,
             seed: int = 0, progress: bool = False, compare=None, weights: str = "last", device: str = "cpu",
             limit: int | None = None, refresh_report: bool = True, precision: str = "fp32",
             disentanglement: bool = False, compile: bool = False, ais_steps: int = 0, ais_chains: int = 16,
             ais_leapfrog: int = 10, ais_examples: int = 100, bdmc_examples: int = 0,
             disentanglement_protocol: str = "quick", full: bool = False) -> dict:
    """Importance-sampled log p(x) (with its Monte-Carlo s.e.), ELBO, active units and KL per dimension, and model
    metrics. Every evaluation is kept: a new file in RUN_DIR/evaluations (see ``runs.save_evaluation``; its path is
    returned under ``"saved_to"``), eval.json is the latest, and the report is refreshed. ``limit``: only the first N
    examples of the split (a quick first look before a long K = 5000 run). Without ``limit`` the default budget
    applies: when all the split's examples would take more than about two minutes here, the first N that fit about
    one (at least 500) are scored, and the record says so; ``full=True`` scores every example (the papers'
    protocol). ``compare``: another run, evaluated on
    the same examples with the same settings, reported as the paired difference of log p(x) (this run minus the
    other). ``weights``: "last" (the end of training) or "best" (the best validation ELBO, with --keep-best);
    ``device``: where to compute; ``precision``: fp32, or bf16 matrix products (see ``elbolab.precision``);
    ``disentanglement``: also the beta-VAE, FactorVAE and MIG metrics (``elbolab.disentanglement``; sprites data),
    with ``disentanglement_protocol`` "quick" (about 0.6 M images) or "full" (Locatello et al.'s, about 2.9 M);
    ``compile``: importance sampling through torch.compile (faster for long runs; ``estimators.CompiledLogWeights``).
    ``ais_steps``: also annealed importance sampling with that many steps (``ais_chains`` chains, ``ais_leapfrog``
    leapfrog steps per HMC transition) on the first ``ais_examples`` examples; ``bdmc_examples``: also bidirectional
    Monte Carlo with the same settings on that many examples simulated from the model (``elbolab.ais``)."""
    if split not in ("test", "train", "val"):
        raise ElbolabError(f"expected --split test, train or val, got {split!r}")
    if k < 1:
        raise ElbolabError(f"expected --iw-samples >= 1, got {k}")
    target = check_device(device)
    model, config = load_run(run_dir, weights)
    model.to(target)
    splits = load_run_data(config["data"], data_dir)
    data = getattr(splits, split)
    if disentanglement:  # refused before the long log p(x) run when the data have no known factors
        factors = run_factor_data(config["data"], data_dir)
    split_size, limit_reason = len(data), None
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ElbolabError(f"expected --limit N >= 1 examples, got {limit!r}")
        if full:
            raise ElbolabError("--full scores every example and --limit the first N: give one of the two")
        data, limit_reason = data.head(min(limit, len(data))), "--limit"
    _check_writable(Path(run_dir))
    if compare is not None:  # refused before any evaluation when the two runs do not score the same examples
        other, other_config = load_run(compare)
        other.to(target)
        _check_comparable(config, other_config, compare, split, data, data_dir, seed)
    warn_if_cores_busy(progress)
    data, budget = _log_px_budget(model, data, k, progress, full=full or limit is not None)
    if budget is not None:
        limit, limit_reason = budget, "budget"
    evaluated_at = time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime())
    result, estimate = evaluate_model(model, data, k=k, naive_k=naive_k, seed=seed, progress=progress,
                                      return_estimate=True, precision=precision, compile=compile)
    mine = estimate.per_example
    if compare is not None:
        _, theirs = evaluate_model(other, data, k=k, seed=seed, progress=progress, return_per_example=True,
                                   precision=precision, compile=compile)
        result["compare"] = {"other_run": str(compare), **paired_difference(mine, theirs)}
    epoch = runs.read_json(Path(run_dir) / runs.MANIFEST).get("summary", {}).get(
        "best_epoch" if weights == "best" else "last_epoch") if (Path(run_dir) / runs.MANIFEST).is_file() else None
    result.update(split=split, dataset=data.name, model=config["model"], device=str(target), seed=seed,
                  limit=limit, limit_reason=limit_reason, split_size=split_size, evaluated_at=evaluated_at,
                  weights=f"{runs.WEIGHTS if weights == 'last' else runs.BEST_WEIGHTS} ({weights}"
                          + (f", epoch {epoch})" if epoch else ")"))
    diagnostics = importance_diagnostics(model, data, k=k, estimate=estimate, seed=seed)
    plots.plot_is_diagnostics(diagnostics, Path(run_dir) / runs.FIGURES / f"is_diagnostics_{split}.png",
                              split=split)
    if disentanglement:
        result["disentanglement"] = disentanglement_scores(model_encoder(model), factors, seed=seed,
                                                           protocol=disentanglement_protocol, progress=progress)
    result = Evaluation.from_dict({**result, "schema_version": SCHEMA_VERSION}).to_dict()  # the written schema
    if ais_steps or bdmc_examples:
        result.update(_sandwich(model, data, ais_steps=ais_steps, ais_chains=ais_chains, ais_leapfrog=ais_leapfrog,
                                ais_examples=ais_examples, bdmc_examples=bdmc_examples, seed=seed))
    saved = runs.save_evaluation(Path(run_dir), result)
    if refresh_report:
        report(run_dir)
    return {**result, "saved_to": str(saved)}


def _check_writable(run_dir: Path) -> None:
    """Refuse before a long evaluation whose result could not be saved (a probe file, not os.access: root passes
    that on a read-only mount)."""
    import os
    import tempfile

    folder = run_dir / runs.EVALUATIONS
    target = folder if folder.is_dir() else run_dir
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=target)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ElbolabError(f"eval: cannot write into {target} ({error.strerror or error}); the evaluation would be "
                           "lost. Make it writable, or copy the run folder somewhere writable") from None


def _check_comparable(config: dict, other_config: dict, other_run, split: str, data, data_dir, seed: int) -> None:
    """A paired difference needs the same examples, binarised the same way, scored by the same kind of likelihood:
    checked on the examples themselves (two MNIST runs with other seeds share the t10k test set), not on settings."""
    mine = (config.get("model_config") or {}).get("likelihood")
    theirs = (other_config.get("model_config") or {}).get("likelihood")
    if LIKELIHOODS.get(mine) is None or LIKELIHOODS.get(theirs) is None or \
            LIKELIHOODS[mine].support != LIKELIHOODS[theirs].support:
        raise ElbolabError(f"--compare: this run's likelihood is {mine!r} and {other_run}'s is {theirs!r}; a "
                           "difference of log-likelihoods is meaningful only for likelihoods on the same support "
                           "(a Bernoulli score against a Gaussian density is not)")
    try:
        other_data = getattr(load_run_data(other_config["data"], data_dir), split).head(len(data))
    except ElbolabError as error:
        raise ElbolabError(f"--compare: the data of {other_run} could not be loaded ({error})") from None
    rows = torch.arange(len(data))
    same = len(other_data) == len(data) and torch.equal(
        data.batch(rows, torch.Generator().manual_seed(seed)).x,
        other_data.batch(rows, torch.Generator().manual_seed(seed)).x)
    if not same:
        raise ElbolabError(f"--compare: {other_run} has other {split} examples than this run (another data source, "
                           "split seed or binarisation); a paired comparison needs the same examples")


def _log_px_budget(model, data, k: int, progress: bool, *, full: bool):
    """``(data, n)``: the examples log p(x) will score and, when the default budget cut them, how many. The cost is
    timed on a small block first: what cannot finish within a week is refused; what would take more than about
    two minutes is cut to the first examples that fit about one (``evaluate.quick_budget_examples``) unless
    ``full``; what still takes more than a few seconds is announced."""
    seconds = estimated_log_px_seconds(model, data, k)
    if seconds is None:
        return data, None  # the estimator itself says why it cannot run
    if seconds > 7 * 24 * 3600:
        raise ElbolabError(f"--iw-samples {k:,} on {len(data):,} examples would take about {seconds / 86400:,.0f} "
                           "days on this machine; use a smaller --iw-samples (5000 is the papers' choice) or --limit")
    n = len(data) if full else quick_budget_examples(len(data), seconds)
    if n < len(data):
        say(f"log p(x): all {len(data):,} examples at K = {k:,} would take about {format_duration(seconds)} here; the "
            f"default budget scores the first {n:,} (about {format_duration(seconds * n / len(data))}; the s.e. over "
            "examples says what that costs in precision). --full scores every example", progress)
        return data.head(n), n
    if seconds > 10:
        say(f"log p(x): {len(data):,} examples x K = {k:,} importance samples, about {format_duration(seconds)} here",
            progress)
    return data, None


def _sandwich(model, data, *, ais_steps: int, ais_chains: int, ais_leapfrog: int, ais_examples: int,
              bdmc_examples: int, seed: int) -> dict:
    """AIS on the evaluated examples and BDMC on simulated ones (``eval --ais-steps``, ``--bdmc``)."""
    if not getattr(model, "has_posterior", True) or not hasattr(model, "prior"):
        raise ElbolabError("--ais-steps / --bdmc need a model with a prior and a decoder (not an autoencoder)")
    steps = ais_steps or 100
    for name, value in (("--ais-steps", steps), ("--ais-chains", ais_chains), ("--ais-leapfrog", ais_leapfrog),
                        ("--ais-examples", ais_examples)):
        if value < 1:
            raise ElbolabError(f"expected {name} >= 1, got {value}")
    out = {}
    if ais_steps:
        out["log_px_ais"] = ais_evaluation(model, data, steps=ais_steps, chains=ais_chains,
                                           leapfrog_steps=ais_leapfrog, n_examples=ais_examples, seed=seed)
    if bdmc_examples:
        out["bdmc"] = bdmc_evaluation(model, n_examples=bdmc_examples, steps=steps, chains=ais_chains,
                                      leapfrog_steps=ais_leapfrog, seed=seed)
    return out


def make_figures(run_dir, *, model=None, splits=None) -> list[Path]:
    """The run's figures, through the model's ``figures`` hook."""
    if model is None:
        model, config = load_run(run_dir)
        splits = load_run_data(config["data"])
    model.eval()
    return model.figures(Path(run_dir), splits)


def sample(run_dir, n: int = 64, out="samples.png", seed: int = 0, *, overwrite: bool = False) -> Path:
    """Draw ``n`` samples of the run's model (decoder means of z ~ p(z)) into ``out`` (default samples.png in the
    current folder; the run folder is never changed): a PNG grid of images, or with a .npy name the array itself,
    float32 ``[n, D]`` (any data, images or not). An existing ``out`` is replaced only with ``overwrite=True``;
    ``n`` is refused when the samples and their picture would not fit in memory."""
    if n < 1:
        raise ElbolabError(f"expected -n >= 1, got {n}")
    model, _ = load_run(run_dir)
    out = Path("samples.png" if out is None else out)
    as_array = out.suffix.lower() == ".npy"
    if model.config.image_shape is None and not as_array:
        raise ElbolabError("sample: this run's data are not images, so there is no picture to draw; write the "
                           "samples as an array instead: --out samples.npy")
    out = check_output_file(out, ".npy" if as_array else ".png", overwrite=overwrite)
    # bytes per sample: the decoder's activations and output (float32, the likelihood's parameters counted twice)
    # and the picture (the float64 mosaic of (H+1) x (W+1) cells and matplotlib's copies of it); 6.4 KB measured
    # per 8x8 digit sample of a 256,128-hidden VAE at n = 400,000, 6.6 KB estimated
    channels, height, width = model.config.image_shape or (1, 0, 0)
    floats = model.config.latent_dim + sum(getattr(model.config, "hidden", ()) or ()) + 2 * model.config.input_dim
    per_sample = 4 * floats + (0 if as_array else 56 * channels * (height + 1) * (width + 1))
    check_memory(n * per_sample, f"-n {n}", lambda budget: f"use -n {max(round_down(budget // per_sample), 1)} or "
                 "fewer (a grid of more than a few hundred samples is hard to look at anyway)")
    torch.manual_seed(seed)
    with torch.no_grad():
        samples = model.sample(n)  # [n, D]
    if as_array:
        import numpy as np

        np.save(out, samples.float().reshape(n, -1).numpy())
        return out
    return plots.plot_image_grid(samples, model.config.image_shape, out, title=f"{n} samples")


def traverse_run(run_dir, *, dims: Sequence[int] | None = None, steps: int = 9, span: float = 3.0, index: int = 0,
                 split: str = "test", out_dir=None, n_kl: int = 500, weights: str = "last",
                 data_dir=None) -> list[Path]:
    """``elbolab traverse RUN``: traversals of a trained run around image ``index`` of its ``split``, written into
    ``out_dir`` (default RUN/figures); the KL labels average over the first ``n_kl`` images of the split.
    ``data_dir`` overrides the run's (as for ``elbolab eval``)."""
    if split not in ("train", "val", "test"):
        raise ElbolabError(f"traverse: expected --split train, val or test, got {split!r}")
    model, config = load_run(run_dir, weights)
    data = getattr(load_run_data(config["data"], data_dir), split)
    if not 0 <= index < len(data):
        raise ElbolabError(f"traverse: expected --index between 0 and {len(data) - 1}, got {index}")
    rows = torch.cat([torch.tensor([index]), torch.arange(min(n_kl, len(data)))])
    batch = data.batch(rows, torch.Generator().manual_seed(0))
    out_dir = Path(run_dir) / runs.FIGURES if out_dir is None else Path(out_dir)
    return traverse(model, Batch(batch.x), out_dir, dims, steps, span)


def encode(run_dir, out, *, split: str = "test", data_dir=None, overwrite: bool = False) -> tuple[Path, tuple]:
    """Write the latent means E[z|x] (the model's ``latent_means``, its first group) of a split, with its labels
    when it has them, to ``out``: .npy (codes only), .npz (``z`` and ``y``) or .csv (z1..zd, y). Returns (path, shape).
    The run folder is never written."""
    import numpy as np

    suffix = Path(out).suffix.lower()
    if suffix not in (".npy", ".npz", ".csv"):
        raise ElbolabError(f"encode: expected --out ending in .npy, .npz or .csv, got {out}")
    if split not in ("train", "val", "test"):
        raise ElbolabError(f"encode: expected --split train, val or test, got {split!r}")
    out = check_output_file(out, suffix, overwrite=overwrite)
    model, config = load_run(run_dir)
    data = getattr(load_run_data(config["data"], data_dir), split)
    param = next(model.parameters())
    codes, labels = [], []
    with torch.no_grad(), Progress(f"encode: E[z|x] of the {len(data):,} {split} examples", total=len(data),
                                   unit="examples") as bar:  # minutes for a large split and a conv encoder
        for rows in torch.arange(len(data)).split(1000):
            batch = data.batch(rows, torch.Generator().manual_seed(0))
            codes.append(next(iter(model.latent_means(batch.to(param)).values())).float().cpu())
            if batch.y is not None:
                labels.append(batch.y.cpu())
            bar.update(len(rows))
    z = torch.cat(codes).numpy()  # [N, d]
    y = torch.cat(labels).numpy() if labels else None
    if suffix == ".npy":
        np.save(out, z)
    elif suffix == ".npz":
        np.savez(out, **({"z": z, "y": y} if y is not None else {"z": z}))
    else:
        columns = [f"z{j + 1}" for j in range(z.shape[1])]
        table = z if y is None or y.ndim != 1 else np.column_stack([z, y])
        np.savetxt(out, table, delimiter=",", header=",".join(columns + (["y"] if table is not z else [])),
                   comments="", fmt="%.7g")
    return Path(out), z.shape


def _runnable_now() -> int | None:
    """Threads runnable on the machine at this moment, this one included (/proc/loadavg's fourth field), the
    fewest of three looks 20 ms apart; None off Linux."""
    seen = []
    for look in range(3):
        try:
            seen.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if look < 2:
            time.sleep(0.02)
    return min(seen)


def warn_if_cores_busy(progress: bool = True) -> None:
    """``busy_cores_warning`` on stderr, once the work is about to start (after the cheap checks, so that a refused
    command stays one line); not with progress off, nor when OMP_NUM_THREADS says how many threads (a choice made),
    nor on the other ranks of a torchrun job, nor with ELBOLAB_BUSY_WARNING=0 (the test suite: its one-line-error
    checks must not depend on the machine's load)."""
    import os
    import sys

    if not progress or os.environ.get("OMP_NUM_THREADS") or int(os.environ.get("RANK", "0")) != 0 or \
            os.environ.get("ELBOLAB_BUSY_WARNING", "1") == "0":
        return
    line = busy_cores_warning()
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def busy_cores_warning(threads: int | None = None) -> str | None:
    """One line when torch would run ``threads`` threads (default: its current number) while other processes keep
    the cores they need busy: each parallel step then waits for a thread that has no core, and a small model
    trained ~50x slower with 2 threads than with 1 beside a busy core on a 2-core machine (2.7 s against 0.15 s per
    epoch). Busy: the 1-minute load average above ``cpus - threads + 0.5`` and, where Linux says, more other
    threads runnable right now than the ``cpus - threads`` cores left over (the load average alone still counts an
    elbolab command that has just ended). None otherwise, or when the load is unknown."""
    import math
    import os

    threads = torch.get_num_threads() if threads is None else threads
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    spare = cpus - threads  # cores our threads leave to others
    if threads <= 1 or load <= spare + 0.5:
        return None
    runnable = _runnable_now()
    if runnable is not None and runnable - 1 < spare + 1:  # nothing but this process wants a core now
        return None
    others = max(load, runnable - 1 if runnable is not None else 0)
    suggested = max(1, min(threads - 1, cpus - math.ceil(others - 0.5)))
    return (f"warning: torch will use {threads} threads, but the machine is busy (load average {load:.1f} over the "
            f"last minute on {cpus} cores), so its threads wait for cores and this can run many times slower "
            f"(~50x measured on 2 cores). Use --threads {suggested} (or OMP_NUM_THREADS={suggested}; in Python "
            f"torch.set_num_threads({suggested}))")


def report(run_dir) -> Path:
    """Rebuild RUN/index.html from what the run folder holds (figures are drawn by ``make_figures``)."""
    return write_report(run_dir)
