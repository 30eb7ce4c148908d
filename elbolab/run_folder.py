"""The run folder as the trainer uses it: checked before anything is written, locked while training, the settings
of a resumed run compared with the saved ones in one place, the manifest kept up to date.

``RunFolder`` is the only writer of config.json and manifest.json; the file names and the low-level reading and
writing live in ``elbolab.runs``.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from elbolab import runs
from elbolab.config import option_defaults, upgrade_run_config
from elbolab.errors import CheckpointError
from elbolab.manifest import collect_manifest

# What a run folder holds besides config.json and the checkpoint: --overwrite removes exactly these, and a folder
# holding any of them but no config.json is someone else's: training refuses to write into it.
RUN_FILES = (runs.WEIGHTS, runs.BEST_WEIGHTS, runs.METRICS, runs.EVAL, runs.EVALUATIONS, runs.MANIFEST, "index.html",
             runs.FIGURES, "tensorboard")
# Settings that may differ on --resume (they do not change the trajectory).
RESUMABLE_CHANGES = ("epochs", "progress", "tensorboard", "checkpoint_every", "keep_best", "device")


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json written by elbolab (not some other program's file of that name)."""
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "model_config", "train_config"} <= set(config)


def check_resume_settings(run_dir: Path, saved: dict, mine: dict, model_config_class) -> None:
    """Refuse a resume whose settings differ from the saved run's: the model, its config, the data and every train
    setting except RESUMABLE_CHANGES. ``mine`` is the config.json the resumed run would write."""
    mine = json.loads(json.dumps(mine))  # tuples -> lists, as saved
    for key in ("model", "model_config", "data"):
        theirs = saved.get(key)
        if key == "model_config" and isinstance(theirs, dict):  # options added since the run was saved
            theirs = {**json.loads(json.dumps(option_defaults(model_config_class))), **theirs}
        if isinstance(theirs, dict) and isinstance(mine[key], dict):
            differ = sorted(k for k in set(theirs) | set(mine[key]) if theirs.get(k) != mine[key].get(k))
            if differ:
                k = differ[0]
                raise CheckpointError(
                    f"--resume: {key}.{k} differs from the run in {run_dir} (saved {theirs.get(k)!r}, got "
                    f"{mine[key].get(k)!r}); resume with the saved settings (--resume needs only --out) or use a "
                    "new --out"
                )
        elif theirs != mine[key]:
            raise CheckpointError(f"--resume: the {key} differs from the run in {run_dir} (saved {theirs!r}, got "
                                  f"{mine[key]!r}); resume with the saved settings or a new --out")
    saved_train = {"schedules": {}, **saved.get("train_config", {})}
    for key, value in mine["train_config"].items():
        if key not in RESUMABLE_CHANGES and key in saved_train and saved_train[key] != value:
            raise CheckpointError(
                f"--resume: train_config.{key} differs from the saved run (saved {saved_train[key]!r}, got "
                f"{value!r}); --resume needs only --out (and --epochs to extend it); only "
                f"{', '.join(RESUMABLE_CHANGES)} may change"
            )


class RunFolder:
    """One run's folder, as the process that trains in it sees it (rank 0 writes; every rank checks)."""

    def __init__(self, path, *, rank: int = 0):
        self.path, self.rank = Path(path), rank
        self._lock = None

    def open(self) -> None:
        """Create the folder and, on rank 0, lock it and remove temporaries a killed process left."""
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"--out {self.path} is a file; expected a folder for the run (new or existing)")
        self.path.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self._lock = runs.RunLock(self.path).acquire()
            runs.remove_stale_temporaries(self.path)  # only the process holding the lock may touch them

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / runs.CHECKPOINT).is_file()

    def saved_config(self) -> dict:
        """config.json of the run, in today's form (``upgrade_run_config``)."""
        return upgrade_run_config(runs.read_json(self.path / runs.CONFIG))

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse what would lose work or touch someone else's files; nothing is written here."""
        has_config, has_checkpoint = is_run_config(self.path / runs.CONFIG), self.has_checkpoint
        if resume:
            if not has_checkpoint:
                what = "an incomplete run (no checkpoint yet)" if has_config else "no run"
                raise CheckpointError(f"--resume: {self.path} holds {what}; train without --resume to start it (an "
                                      "incomplete run is replaced)")
        elif has_checkpoint and not overwrite:
            raise CheckpointError(
                f"{self.path} already holds a run; add --resume (resume=True in Python) to continue it, --overwrite "
                "(overwrite=True) to start it again, or choose another --out (nothing was overwritten)"
            )
        elif not has_config:  # a config.json that elbolab did not write counts as the user's file too
            foreign = [name for name in (runs.CONFIG, *RUN_FILES) if (self.path / name).exists()]
            if foreign:
                raise CheckpointError(
                    f"{self.path} is not a run folder but holds {', '.join(foreign)}, which training would "
                    "overwrite; choose another --out (nothing was touched)"
                )

    def start(self, config: dict, *, seed: int, resume_from: dict | None = None) -> None:
        """Rank 0 writes config.json and the manifest: a new run clears the folder's own files first; a resumed
        one appends to the manifest's list of resumes (``resume_from``: the checkpoint's epoch and step)."""
        if self.rank != 0:
            return
        manifest_path = self.path / runs.MANIFEST
        if resume_from is not None:
            manifest = runs.read_json(manifest_path) if manifest_path.is_file() else collect_manifest(seed)
            manifest.setdefault("resumes", []).append(
                {"time_utc": now_utc(), "command": sys.argv, "from_epoch": resume_from["epoch"],
                 "from_step": resume_from["step"], "to_epochs": config["train_config"]["epochs"]})
        else:
            removed = []
            for name in RUN_FILES + (runs.CHECKPOINT, runs.CONFIG):  # our own files only
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                else:
                    continue
                removed.append(name)
            if removed and config["train_config"].get("progress") is not False:
                print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self.path}", flush=True)
            manifest = collect_manifest(seed, extra=None)
            manifest["command"] = sys.argv
        runs.write_json(self.path / runs.CONFIG, config)
        runs.write_json(manifest_path, manifest)

    def keep_metrics_through(self, epoch: int) -> None:
        """Drop metric records written after the checkpoint (an interrupted epoch) and unreadable lines."""
        path = self.path / runs.METRICS
        if self.rank == 0 and path.exists():
            records, _ = runs.read_metrics(path)
            kept = [r for r in records if isinstance(r.get("epoch"), int) and r["epoch"] <= epoch]
            runs.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def add_wall_time(self, seconds: float) -> None:
        """Add this session's training time to the manifest and stamp its end."""
        path = self.path / runs.MANIFEST
        if self.rank == 0 and path.is_file():
            manifest = runs.read_json(path)
            manifest["wall_time_s"] = round(manifest.get("wall_time_s", 0.0) + seconds, 3)
            manifest["finished_utc"] = now_utc()
            runs.write_json(path, manifest)

    def update_manifest(self, **entries) -> None:
        path = self.path / runs.MANIFEST
        if self.rank == 0 and path.is_file():
            manifest = runs.read_json(path)
            manifest.update(entries)
            runs.write_json(path, manifest)

