"""The run folder: one place for a trained model and everything needed to trust and reuse it.

    RUN_DIR/config.json          model name, model config, train config, data description (JSON)
    RUN_DIR/model.safetensors    latest weights (safetensors, never pickle)
    RUN_DIR/checkpoint.safetensors  weights + optimiser + RNG state, with the trainer state as JSON metadata
    RUN_DIR/metrics.jsonl        one JSON record per epoch and split
    RUN_DIR/eval.json            written by `elbolab eval`
    RUN_DIR/manifest.json        seed, package versions, git hash, hardware
    RUN_DIR/figures/*.png, RUN_DIR/index.html, RUN_DIR/tensorboard/
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elbolab.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
MANIFEST = "manifest.json"
FIGURES = "figures"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected {path} to exist; is {path.parent} a run folder written by 'elbolab train'?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it or train again") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    # safetensors refuses views sharing memory and non-contiguous tensors: store compact copies.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata)} if metadata is not None else None
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected {path} to exist; train first, or check the run folder path")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    return tensors, (json.loads(meta["json"]) if "json" in meta else None)


def load_run(run_dir) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a run folder from config.json and model.safetensors (no unpickling anywhere)."""
    from elbolab.models import get_model_class

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"expected a run folder, got {run_dir} which does not exist; pass the --out of 'elbolab train'"
        )
    config = read_json(run_dir / CONFIG)
    cls = get_model_class(config["model"])
    model = cls(cls.config_class.from_dict(config["model_config"]))
    weights, _ = load_tensors(run_dir / WEIGHTS)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{run_dir / WEIGHTS} does not match the model in config.json (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the files come from different runs"
        )
    model.eval()
    return model, config
