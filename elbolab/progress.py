"""Progress of a long computation, for the person waiting: a bar on a terminal; otherwise (a log file, a scheduler)
a plain line every 10 seconds, so that nothing that takes longer than that is silent.

    with Progress("prior holes: densities", total=n, unit="points") as progress:
        for chunk in chunks:
            ...
            progress.update(len(chunk))

Off a terminal a line reads ``DESC: DONE of TOTAL UNIT, SECONDS s``. The environment variable
``ELBOLAB_PROGRESS_EVERY`` sets the seconds between those lines (default 10; 0: a line at every update, as the
tests use to see every phase of a quick command; read when a Progress starts, so it may change within a process).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

LINE_EVERY_S = 10.0
EVERY_VARIABLE = "ELBOLAB_PROGRESS_EVERY"
_quiet_depth = 0  # > 0 inside quiet(): every Progress is off


@contextlib.contextmanager
def quiet(on: bool = True):
    """Within it (when ``on``), every Progress is off: a run started with --no-progress also silences the progress a
    model reports from inside (local-vi's fits of q(z), VaDE's EM), which no flag of the model carries."""
    global _quiet_depth
    _quiet_depth += bool(on)
    try:
        yield
    finally:
        _quiet_depth -= bool(on)


def line_every() -> float:
    """Seconds between plain progress lines: ``ELBOLAB_PROGRESS_EVERY`` when it is a number >= 0, else 10."""
    text = os.environ.get(EVERY_VARIABLE, "").strip()
    try:
        seconds = float(text) if text else LINE_EVERY_S
    except ValueError:
        return LINE_EVERY_S
    return seconds if seconds >= 0 and seconds == seconds else LINE_EVERY_S


class Progress:
    """``initial``: work already done (a resumed epoch); ``set_postfix_str``: running figures shown after the count
    (the bar's postfix on a terminal, the end of each plain line otherwise)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "steps", *, enabled: bool = True,
                 initial: int = 0):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled and not _quiet_depth
        self.done = initial
        self.postfix = ""
        self._bar = None
        self.every = line_every()
        self._began = self._last = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm  # only on a terminal

            self._bar = tqdm(total=self.total, initial=self.done, desc=self.desc, unit=self.unit, leave=False,
                             dynamic_ncols=True)
        return self

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=refresh)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if now - self._last >= self.every or (finished and now - self._began >= self.every):
            self._last = now
            of = f" of {self.total:,}" if self.total is not None else ""
            postfix = f", {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {self.done:,}{of} {self.unit}, {now - self._began:.0f} s{postfix}", flush=True)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
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

