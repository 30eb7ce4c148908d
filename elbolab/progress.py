"""Progress of a long computation, for the person waiting: a bar on a terminal; otherwise (a log file, a scheduler)
a plain line every 10 seconds, so that nothing that takes longer than that is silent.

    with Progress("prior holes: densities", total=n, unit="points") as progress:
        for chunk in chunks:
            ...
            progress.update(len(chunk))
"""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 10.0


class Progress:
    def __init__(self, desc: str, total: int | None = None, unit: str = "steps", *, enabled: bool = True):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.done = 0
        self._bar = None
        self._began = self._last = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm  # only on a terminal

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False, dynamic_ncols=True)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if now - self._last >= LINE_EVERY_S or (finished and now - self._began >= LINE_EVERY_S):
            self._last = now
            of = f" of {self.total:,}" if self.total is not None else ""
            print(f"{self.desc}: {self.done:,}{of} {self.unit}, {now - self._began:.0f} s", flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def seconds(self) -> float:
        return time.perf_counter() - self._began


def say(line: str, enabled: bool = True) -> None:
    """One plain line about what is starting (and how long it may take), flushed at once."""
    if enabled:
        print(line, flush=True)


def format_duration(seconds: float) -> str:
    """'42 s', '3.5 min' or '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"

