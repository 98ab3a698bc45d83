"""Why a run stopped: each error says what went wrong and what was kept on disk.

Messages name Python parameters in backquotes (`resume=True`, `out_dir`); the command
line rewrites those into its flags.
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what was kept on disk."""


class NonFiniteLoss(TrainingError):
    """The loss, the gradients or the updated state became NaN or infinite; the update
    was not applied."""


class Collapsed(TrainingError):
    """Test accuracy fell back to chance after being above it."""


class OutputError(TrainingError):
    """The output folder cannot be used: not a folder, not writable, or locked by another run."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to a different model or optimiser."""


class Interrupted(TrainingError):
    """SIGINT/SIGTERM arrived; a checkpoint of the state at the last full step was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class TrainingWarning(UserWarning):
    """A run goes on, but something in it deserves a look (e.g. chance-level accuracy)."""


class NonFiniteWarning(TrainingWarning, RuntimeWarning):
    """Some relaxation phases of an epoch ended with NaN or infinite states."""
