"""Training checkpoints in one safetensors file: model weights, optimiser state and RNG state as tensors,
the rest of the trainer state as JSON metadata. Written atomically, so the previous checkpoint survives a crash."""

from __future__ import annotations

from pathlib import Path

import torch

from elbolab.config import option_defaults
from elbolab.errors import CheckpointError
from elbolab.runs import config_mismatch, load_tensors, save_tensors, tensors_misfit

_RESTORE = "restore the run folder from a copy, or start again with --overwrite"
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # Adam's state tensors shaped and typed like their parameter


def _flatten_optimizer(group: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{group}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(group: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    prefix = f"optimizer.{group}."
    for name, value in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    trainer_state: dict, extra: dict[str, torch.Tensor] | None = None,
                    config: dict | None = None) -> None:
    """One file: ``model.*`` weights, ``optimizer.{group}.{index}.{key}`` state of every optimiser, the RNG, and
    ``extra.*`` tensors of the trainer (e.g. a data generator's state in a mid-epoch checkpoint). ``config``
    (``runs.model_config_metadata``) ties the checkpoint to the model config it was trained with."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    meta = {}
    for group, optimizer in optimizers.items():
        opt_tensors, meta[group] = _flatten_optimizer(group, optimizer)
        tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {"trainer": trainer_state, "optimizers": meta}
    if config is not None:
        metadata["config"] = config
    save_tensors(path, tensors, metadata)


def _check_model_tensors(path: Path, weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """One line for the first way the checkpoint's ``model.*`` tensors do not fit the model: names, shapes,
    dtypes (torch's load_state_dict would print a dump of every tensor, or cast a dtype silently)."""
    misfit = tensors_misfit(weights, model.state_dict(), prefix="model.", held_in="the checkpoint")
    if misfit is None:
        return
    kind, phrase = misfit
    if kind == "names":
        raise CheckpointError(f"{path} does not match the model config.json describes ({phrase}); config.json was "
                              f"edited or comes from another run: {_RESTORE}")
    if kind == "shape":
        raise CheckpointError(f"{path} does not match config.json: {phrase}; config.json was edited or comes from "
                              f"another run: {_RESTORE}")
    raise CheckpointError(f"{path}: {phrase}; the file was converted or damaged and a resume would not continue the "
                          f"saved state: {_RESTORE}")


def _check_optimizer_tensors(path: Path, tensors: dict[str, torch.Tensor], group: str,
                             optimizer: torch.optim.Optimizer) -> None:
    """Adam's moments must have their parameter's shape and dtype (load_state_dict casts and never checks)."""
    params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    prefix = f"optimizer.{group}."
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        index, key = name[len(prefix):].split(".", 1)
        if key not in _MOMENTS or not index.isdigit() or int(index) >= len(params):
            continue  # a count, or a layout load_state_dict refuses itself
        param = params[int(index)]
        if value.shape != param.shape or value.dtype != param.dtype:
            raise CheckpointError(
                f"{path}: optimiser tensor {name!r} is {str(value.dtype).replace('torch.', '')} of shape "
                f"{list(value.shape)}, expected {str(param.dtype).replace('torch.', '')} of shape "
                f"{list(param.shape)} (its parameter's); the file was converted or damaged: {_RESTORE}"
            )


def load_checkpoint(path: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    model_name: str | None = None) -> dict:
    """Restore model, every optimiser and the torch RNG in place; return the trainer state saved with them (its
    ``extra`` entry holds the extra tensors). Every check (tensor names, shapes and dtypes, and, given the run's
    ``model_name``, the model config the checkpoint was trained with) runs before anything is restored, and each
    failure is one CheckpointError line."""
    tensors, meta = load_tensors(path)
    if meta is None or "trainer" not in meta or "optimizers" not in meta:
        raise CheckpointError(f"{path} has no trainer state; it is not an elbolab checkpoint of this version")
    saved_groups, own_groups = sorted(meta["optimizers"]), sorted(optimizers)
    if saved_groups != own_groups:
        raise CheckpointError(
            f"{path} holds optimisers for the parameter groups {saved_groups}, this model has {own_groups}; "
            "was the model changed?"
        )
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_model_tensors(path, weights, model)
    if model_name is not None:
        differs = config_mismatch(meta.get("config"), model_name, model.config.to_dict(),
                                  option_defaults(type(model.config)), Path(path).name)
        if differs:
            raise CheckpointError(
                f"{Path(path).parent / 'config.json'} does not match the weights: it was edited or comes from "
                f"another run ({differs}); restore config.json from a copy of the run, or start again with --overwrite"
            )
    for group, optimizer in optimizers.items():
        _check_optimizer_tensors(path, tensors, group, optimizer)
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        found = "no tensor 'rng.torch'" if rng is None else f"'rng.torch' as {rng.dtype} of shape {list(rng.shape)}"
        raise CheckpointError(f"{path}: expected the random number generator's state as a 1-D uint8 tensor "
                              f"'rng.torch', found {found}; the file was converted or damaged: {_RESTORE}")
    try:
        model.load_state_dict(weights, strict=True)
        for group, optimizer in optimizers.items():
            optimizer.load_state_dict(_unflatten_optimizer(group, tensors, meta["optimizers"][group]))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not match this model/optimiser ({first}); was the config changed?"
                              ) from None
    try:
        torch.set_rng_state(rng)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the saved random number generator state is not usable ({e}); "
                              f"{_RESTORE}") from None
    return {**meta["trainer"], "extra": {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}}
