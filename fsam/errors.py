"""Errors meant for people.

Anything a user can fix (a bad config value, a missing data folder, a checkpoint from another run) raises a
subclass of :class:`FsamError`. ``train.py`` catches this one type, prints its message on one line and exits
with status 2. Every other exception keeps its traceback: it is a bug, not a usage problem.
"""


class FsamError(Exception):
    """A problem the user can fix; the message names it and says how."""


class ConfigError(FsamError):
    """A config key has a value that is not allowed."""


class DataError(FsamError):
    """A data set is missing, incomplete, corrupt or does not fit the model."""


class CheckpointError(FsamError):
    """A checkpoint cannot be read or belongs to a different model or optimizer."""


class DivergedError(FsamError):
    """The training loss became NaN or infinite."""


class Interrupted(FsamError):
    """The run stopped on a signal after writing a checkpoint; relaunching the same command continues it.

    ``exit_status`` is the shell's convention for death by that signal (128 + number), so a batch script can
    tell a stop that should be requeued from a failure.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum

    def __reduce__(self) -> tuple:
        # A sweep's job sends its exception back to the launching process (submitit pickles it).
        return type(self), (str(self), self.signum)
