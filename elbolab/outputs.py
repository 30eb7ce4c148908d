"""Checks made before a command does any work: is ``--out`` of the right kind, would it replace earlier results,
would the job fit in memory. Standard library only, so a refusal is instant (no torch, no NumPy).

Every refusal is one ElbolabError (the CLI prints it on one line and exits with code 2) saying what was expected,
what was got and what to try.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from elbolab.errors import ElbolabError


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder (else mkdir fails half-way with an OS error)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ElbolabError(f"expected {flag} inside a folder, got {path}, but {parent} is a file; "
                                   f"choose another {flag}")
            return


def check_output_folder(out, names: Iterable[str], *, overwrite: bool = False, flag: str = "--out") -> Path:
    """``out`` will be a folder receiving the files ``names``: refuse a file there, and refuse to replace any of
    ``names`` already in it unless ``overwrite``. Other files in the folder are left alone either way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ElbolabError(f"expected {flag} to be a folder (it is created if missing), got the file {out}; "
                           f"give a folder name, e.g. {flag} {out.with_suffix('')}-out")
    _check_parents(out, flag)
    if out.is_dir() and not overwrite:
        present = [name for name in names if (out / name).exists()]
        if present:
            raise ElbolabError(f"{out} already holds {', '.join(present)} from an earlier run; pass --overwrite to "
                               f"replace them, or choose another {flag}")
    return out


def check_output_file(out, suffix: str = ".png", *, overwrite: bool = False, flag: str = "--out") -> Path:
    """``out`` will be one file named ``*suffix``: refuse a folder, another suffix, or (unless ``overwrite``) an
    existing file."""
    out = Path(out)
    if out.is_dir():
        raise ElbolabError(f"expected {flag} to be a {suffix} file, got the folder {out}; give a file name, e.g. "
                           f"{flag} {out / ('samples' + suffix)}")
    if out.suffix.lower() != suffix:
        raise ElbolabError(f"expected {flag} to name a {suffix} file, got {str(out)!r}; e.g. {flag} "
                           f"{out.with_suffix(suffix)}")
    _check_parents(out, flag)
    if out.exists() and not overwrite:
        raise ElbolabError(f"{out} already exists; pass --overwrite to replace it, or choose another {flag}")
    return out


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get without swapping: the kernel's MemAvailable, capped by a cgroup v2
    limit (containers); ``None`` when neither can be read (then no memory check is made)."""
    found = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            found = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            left = max(int(limit) - used, 0)
            found = left if found is None else min(found, left)
    except (OSError, ValueError):
        pass
    return found


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def round_down(count: float) -> int:
    """``count`` rounded down to two significant digits (12449 -> 12000), for limits quoted in messages."""
    count = int(count)
    if count < 100:
        return max(count, 0)
    scale = 10 ** (len(str(count)) - 2)
    return count // scale * scale


# A job may take at most this share of the available memory: the rest is for the interpreter, libraries, the OS.
MEMORY_SHARE = 0.8


def check_memory(need: float, what: str, hint) -> None:
    """Refuse a job needing ``need`` bytes when that is more than MEMORY_SHARE of the available memory.

    ``what`` says what was asked (``"--size 100000"``); ``hint(budget)`` says what to try within ``budget`` bytes
    (``"use --size 9000 or less"``)."""
    available = available_memory()
    if available is not None and need > MEMORY_SHARE * available:
        raise ElbolabError(f"{what} would need about {format_bytes(need)} of memory, but {format_bytes(available)} "
                           f"is available; {hint(MEMORY_SHARE * available)}")
