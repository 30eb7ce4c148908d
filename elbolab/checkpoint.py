"""Training checkpoints in one safetensors file: model weights, optimiser state and RNG state as tensors,
the rest of the trainer state as JSON metadata. Written atomically, so the previous checkpoint survives a crash."""

from __future__ import annotations

from pathlib import Path

import torch

from elbolab.errors import CheckpointError
from elbolab.runs import load_tensors, save_tensors


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(path, tensors, {"trainer": trainer_state, "optimizer": opt_meta})


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimiser and torch RNG in place; return the trainer state saved with them."""
    tensors, meta = load_tensors(path)
    if meta is None or "trainer" not in meta:
        raise CheckpointError(f"{path} has no trainer state; it is not an elbolab checkpoint")
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not match this model/optimiser ({e}); was the config changed?") from None
    torch.set_rng_state(tensors["rng.torch"])
    return meta["trainer"]
