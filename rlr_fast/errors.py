"""rlr-fast's own error types: problems with what the user gave, not bugs.

The command line prints these as one line (``rlr-fast COMMAND: error: ...``) and exits with 2;
any other exception keeps its traceback, because it is a bug to report. Each subclasses
``ValueError`` so that code catching ``ValueError`` around the Python API keeps working.
"""
from __future__ import annotations


class RLRFastError(ValueError):
    """Base of the errors whose message alone tells the user what to fix."""


class UsageError(RLRFastError):
    """An option or a combination of options cannot be honoured; the message names the option."""


class DataError(RLRFastError):
    """A data file or folder is missing, empty or unreadable; the message names it."""


class CheckpointError(DataError):
    """A file is not a readable rlr-fast checkpoint (truncated, empty, foreign, or unsafe)."""


class StaleRunError(DataError):
    """A file derived from a run's model (thresholds, an export) was made from other weights than
    the ones the run serves now; the message names the command that makes it again."""


class TrainingDiverged(RLRFastError):
    """The training loss became non-finite: the run stopped; the message names the epoch, the step,
    the last finite checkpoint and what to change."""


class RunBusyError(UsageError):
    """Another process is training in the same run folder; two would mix their checkpoints and logs."""
