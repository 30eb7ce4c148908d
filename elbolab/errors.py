"""One error type for bad input: the CLI prints its message on one line and exits with code 2.

Messages follow one pattern: what was expected, what was got, and what to try.
"""

from __future__ import annotations


class ElbolabError(ValueError):
    """Bad input or an unusable file. Subclass of ValueError so library users can catch either."""


class DataError(ElbolabError):
    """A dataset is missing, corrupt, truncated or of the wrong shape."""


class CheckpointError(ElbolabError):
    """A run folder or checkpoint is missing, incomplete or does not match the model."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training at a safe point; a checkpoint was written and the message says how to continue."""
