"""What a run needs to be reproduced: seed, time, software versions, hardware and the source commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = ["TRACKED_PACKAGES", "collect_manifest"]

# Distribution names (as pip knows them) whose versions go into every manifest.
TRACKED_PACKAGES = ("elbolab", "torch", "numpy", "scipy", "scikit-learn", "matplotlib", "safetensors")
_GIT_TIMEOUT_S = 5.0


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass  # not Linux: fall back to what the platform module knows
    return platform.processor() or platform.machine() or "unknown"


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))  # cores this process may run on (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count()


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _git(source_root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(source_root), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # git absent, hung, or not executable
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _git_state(source_root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit hash, dirty) of the checkout holding the elbolab package; (None, None) if not a checkout."""
    source_root = Path(__file__).resolve().parent.parent if source_root is None else source_root.resolve()
    toplevel = _git(source_root, "rev-parse", "--show-toplevel")
    # An installed copy inside some unrelated repository must not report that repository's commit.
    if toplevel is None or Path(toplevel).resolve() != source_root:
        return None, None
    commit = _git(source_root, "rev-parse", "HEAD")
    if commit is None:  # a fresh repository without commits
        return None, None
    status = _git(source_root, "status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def _json_safe(value):
    """Round-trip through JSON so the manifest can always be saved; unknown objects become strings."""
    return json.loads(json.dumps(value, default=str))


def collect_manifest(seed: int | None = None, extra: dict | None = None) -> dict:
    """Describe the current environment for a run folder's manifest.json.

    Keys: seed, timestamp_utc, python, platform, cpu_model, logical_cores, usable_cores, torch_threads,
    versions (distribution -> version or "not installed"), git_commit and git_dirty (None when the source
    is not a git checkout or git is unavailable), and extra (the caller's dict, JSON-safe) if given.
    """
    commit, dirty = _git_state()
    manifest = {
        "seed": None if seed is None else int(seed),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch_threads": _torch_threads(),
        "versions": _package_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if extra:
        manifest["extra"] = _json_safe(dict(extra))
    return manifest
