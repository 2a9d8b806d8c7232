"""Errors a user can cause while training: one readable line, no traceback needed (STYLE 8).

TrainError derives from the project's FFError, so the CLI prints every stage's user errors
the same way.
"""

from cache.errors import FFError


class TrainError(FFError):
    """A user-facing training error; its message is one line that says what to do next."""


class NonFiniteLossError(TrainError):
    """The loss became NaN or inf; the last good checkpoint in RUN/checkpoints is kept."""
