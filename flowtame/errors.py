"""Domain exceptions. The CLI maps each class to one line on stderr and an exit code."""

from __future__ import annotations


class FlowtameError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(FlowtameError):
    """Bad input: a file that cannot be read, a wrong shape, an empty folder, a bad flag value."""


class CheckpointError(InputError):
    """A checkpoint that is missing, truncated, corrupt, of a newer schema, or inconsistent."""


class DataError(InputError):
    """An image source that is empty, unreadable, or (with --strict) holds a bad file."""


class OutputExistsError(InputError):
    """An output file already exists and ``force`` was not given."""


class OutputWriteError(FlowtameError):
    """An output file could not be written (no space, read-only file system, permission, name too long, ...);
    the message names the file. Nothing half-written is left behind."""


class TrainingDivergedError(FlowtameError):
    """The loss became NaN or infinite (or the remember NLL blew up) and the bounded number of learning-rate
    reductions ran out."""


class CheckFailedError(FlowtameError):
    """A requested check failed (``evaluate --check``, or ``tame --require-converged``)."""

    exit_code = 1


class InterruptedRun(FlowtameError):
    """Ctrl-C: state was saved where the command is resumable."""

    exit_code = 130
