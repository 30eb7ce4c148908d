"""Training checkpoints in one safetensors file: model weights, optimiser state and RNG state as tensors,
the rest of the trainer state as JSON metadata. Written atomically, so the previous checkpoint survives a crash."""

from __future__ import annotations

from pathlib import Path

import torch

from elbolab.errors import CheckpointError
from elbolab.runs import load_tensors, save_tensors


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
                    trainer_state: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
    """One file: ``model.*`` weights, ``optimizer.{group}.{index}.{key}`` state of every optimiser, the RNG, and
    ``extra.*`` tensors of the trainer (e.g. a data generator's state in a mid-epoch checkpoint)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    meta = {}
    for group, optimizer in optimizers.items():
        opt_tensors, meta[group] = _flatten_optimizer(group, optimizer)
        tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(path, tensors, {"trainer": trainer_state, "optimizers": meta})


def load_checkpoint(path: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore model, every optimiser and the torch RNG in place; return the trainer state saved with them (its
    ``extra`` entry holds the extra tensors)."""
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
    try:
        model.load_state_dict(weights, strict=True)
        for group, optimizer in optimizers.items():
            optimizer.load_state_dict(_unflatten_optimizer(group, tensors, meta["optimizers"][group]))
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not match this model/optimiser ({e}); was the config changed?") from None
    torch.set_rng_state(tensors["rng.torch"])
    return {**meta["trainer"], "extra": {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}}
