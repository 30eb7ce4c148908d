"""The registry of named data sources (``--data NAME``): one decorator per source module."""

from __future__ import annotations

from collections.abc import Callable

from elbolab.data.core import DataSplits

SOURCES: dict[str, Callable[..., DataSplits]] = {}


def register_source(name: str):
    """Function decorator: ``@register_source("sprites")`` makes ``--data sprites`` load it.

    The function takes ``(*, data_dir, binarize, seed, val_size)`` (val_size None: the source's default) and
    returns DataSplits. A new source is one module in this package that registers itself; it is imported the first
    time the sources are listed or loaded (keep heavy imports inside its functions).
    """

    def decorate(fn):
        if name in SOURCES and SOURCES[name] is not fn:
            raise ValueError(f"data source {name!r} is already registered")
        SOURCES[name] = fn
        return fn

    return decorate
