"""From a run folder back to its model and its data: the one way a trained run is reloaded.

``load_run(run_dir)`` rebuilds the model from config.json and model.safetensors (no unpickling anywhere);
``load_run_data(config["data"])`` loads the splits the run was trained on, with the same binarisation and split seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from elbolab.config import option_defaults, upgrade_run_config
from elbolab.data import load_data
from elbolab.errors import CheckpointError, ElbolabError
from elbolab.models import get_model_class
from elbolab.runs import (
    BEST_WEIGHTS,
    CONFIG,
    WEIGHTS,
    config_mismatch,
    describe_nonfinite,
    load_tensors,
    nonfinite_tensors,
    read_json,
    tensors_misfit,
)


def load_run(run_dir, weights: str = "last") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a run folder from config.json and model.safetensors (``weights="last"``, the end of
    the last epoch) or model.best.safetensors (``"best"``, kept with --keep-best); no unpickling anywhere.

    Returns ``(model, config)``: the model in eval mode and config.json as a dict. Every way the two files can fail
    to fit (a key missing, a value of the wrong type, a tensor of another shape or dtype, a config.json edited since
    the weights were saved with theirs, weights holding NaN or inf) raises one CheckpointError saying what differs
    and what to do.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"expected a run folder, got {run_dir} which does not exist; pass the --out of 'elbolab train'"
        )
    if weights not in ("last", "best"):
        raise CheckpointError(f"expected weights 'last' or 'best', got {weights!r}")
    config_path, weights_path = run_dir / CONFIG, run_dir / (WEIGHTS if weights == "last" else BEST_WEIGHTS)
    if weights == "best" and not weights_path.is_file():
        raise CheckpointError(f"{run_dir} has no {BEST_WEIGHTS}: train with --keep-best to keep the best-on-validation "
                              "weights, or use the last ones (--weights last)")
    model, config = model_from_config(config_path)
    check_weights(model, config, load_tensors(weights_path), weights_path, config_path)
    model.eval()
    return model, config


RESTORE = "restore config.json from a copy of the run, or train again"


def model_from_config(config_path: Path) -> tuple[torch.nn.Module, dict]:
    """The model a run's config.json describes, freshly initialised, and the config (upgraded to today's form)."""
    restore = RESTORE
    config = upgrade_run_config(read_json(config_path))
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path}: expected a JSON object with 'model' and 'model_config', got a JSON "
            f"{type(config).__name__}; {restore}"
        )
    missing_keys = [key for key in ("model", "model_config") if key not in config]
    if missing_keys:
        raise CheckpointError(
            f"{config_path} lacks {' and '.join(repr(k) for k in missing_keys)}: expected 'model' (the model's name, "
            f"e.g. \"vae\") and 'model_config' (its options, as written by 'elbolab train'); {restore}"
        )
    name, options = config["model"], config["model_config"]
    if not isinstance(name, str) or not isinstance(options, dict):
        raise CheckpointError(
            f"{config_path}: expected 'model' as a string and 'model_config' as an object, got "
            f"{type(name).__name__} and {type(options).__name__}; {restore}"
        )
    try:
        cls = get_model_class(name)
        model = cls(cls.config_class.from_dict(options))
    except (ElbolabError, TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path} does not describe a valid model ({error}); {restore}") from None
    return model, config


def check_weights(model: torch.nn.Module, config: dict, loaded: tuple[dict, dict | None], weights_path: Path,
                  config_path: Path) -> None:
    """Load the saved tensors into ``model`` after checking that they fit it: names, shapes, dtypes, the config
    they were saved with, finite values; every misfit is one CheckpointError saying what differs."""
    restore, (weights, meta) = RESTORE, loaded
    name, options, cls = config["model"], config["model_config"], type(model)
    settings = ", ".join(f"{k}={options[k]!r}" for k in ("input_dim", "latent_dim", "hidden") if k in options)
    misfit = tensors_misfit(weights, model.state_dict(), needs=f"the model config.json describes ({settings})")
    if misfit is not None:
        kind, phrase = misfit
        if kind == "names":
            raise CheckpointError(f"{weights_path} does not match the {name!r} model in config.json ({phrase}); the "
                                  f"two files come from different runs or config.json was edited: {restore}")
        if kind == "shape":
            raise CheckpointError(f"{weights_path} does not match config.json: {phrase}; config.json was edited or "
                                  f"comes from another run: {restore}")
        raise CheckpointError(f"{weights_path}: {phrase}; the file was converted or damaged and its values would be "
                              "cast silently: restore it from a copy of the run, or train again")
    differs = config_mismatch((meta or {}).get("config"), name, model.config.to_dict(),
                              option_defaults(cls.config_class), weights_path.name)
    if differs:
        raise CheckpointError(
            f"{config_path} does not match the weights: it was edited or comes from another run ({differs}); "
            f"{restore}"
        )
    bad = nonfinite_tensors(weights)
    if bad:
        raise CheckpointError(
            f"{weights_path}: {describe_nonfinite(bad)}; the weights are unusable: training diverged (train again, "
            "e.g. with a lower --lr) or the file is damaged (restore it from a copy)"
        )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:  # e.g. a dtype torch cannot copy
        raise CheckpointError(f"{weights_path} does not fit the model in config.json ({error}); {restore}") from None



def load_run_data(data_info: dict, data_dir=None):
    """The splits a run was trained on, from config.json's "data" entry (``data_dir`` overrides the saved folder)."""
    return load_data(
        data_info["source"], data_dir=data_dir or data_info.get("data_dir"), binarize=data_info["binarize"],
        seed=data_info["seed"], val_size=data_info.get("val_size"),
    ).with_train_size(data_info.get("train_size"))
