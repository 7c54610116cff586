"""Domain exceptions. The CLI maps each class to one line on stderr and an exit code.

Messages speak the library's terms: a setting is named by its config key (``lr must be positive``) and the key
is listed in ``keys``; the command line adds the flag that sets it when it renders the error.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Sequence
from typing import Any


class FlowtameError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI exits with; ``keys`` are the
    config keys (settings, arguments) the message is about, in the library's spelling (e.g. ``"lr"``)."""

    exit_code = 2

    def __init__(self, message: str = "", *, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


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


class OutOfMemory(FlowtameError):
    """The device ran out of memory: torch could not allocate a tensor (CUDA's or MPS's out-of-memory error, the
    CPU allocator's failure). The message names the device, the allocation and where it happened."""


class TrainingDivergedError(FlowtameError):
    """The loss became NaN or infinite (or the remember NLL blew up) and the bounded number of learning-rate
    reductions ran out."""


class CheckFailedError(FlowtameError):
    """A requested check failed (``evaluate --check``, or ``tame --require-converged``)."""

    exit_code = 1


class InterruptedRun(FlowtameError):
    """A stop request — Ctrl-C (SIGINT), SIGTERM or SIGHUP: state was saved where the command is resumable.

    ``exit_code`` is 128 + the signal's number, as a shell reports a process the signal ended: 130 for SIGINT,
    143 for SIGTERM, 129 for SIGHUP. ``partial_report``: the job's report up to the interruption (iterations,
    trajectory), set by the job that was running; None when there is none.
    """

    exit_code = 130

    def __init__(self, message: str = "", signum: int = signal.SIGINT, *, keys: Sequence[str] = (),
                 partial_report: dict[str, Any] | None = None):
        super().__init__(message, keys=keys)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.partial_report = partial_report


class StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP delivered like Ctrl-C's KeyboardInterrupt, carrying the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def stop_signals() -> list[signal.Signals]:
    """The signals flowtame treats as a request to stop: SIGINT, SIGTERM and (where it exists) SIGHUP."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def signal_number(exc: BaseException) -> int:
    """The signal behind an interruption: a StopSignal's, else SIGINT (a plain KeyboardInterrupt is Ctrl-C)."""
    return getattr(exc, "signum", int(signal.SIGINT))


def config_error(what: str, problems: Sequence[str], known_keys: Iterable[str]) -> InputError:
    """One InputError for the ``problems`` found in a ``what`` configuration; its ``keys`` are the known config
    keys the problems name (so the CLI can add their flags)."""
    text = "; ".join(problems)
    keys = [key for key in known_keys if re.search(rf"\b{re.escape(key)}\b", text)]
    return InputError(f"bad {what} configuration: {text}", keys=keys)
