"""Helpers shared by the command modules: consoles, JSON output, the redacted command line, state paths."""

from __future__ import annotations

import contextlib
import shlex
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from rich.console import Console

from flowtame.errors import FlowtameError
from flowtame.io.fileio import check_output_path, write_json_atomic

console = Console(stderr=False)
err_console = Console(stderr=True)


def is_interactive(quiet: bool = False) -> bool:
    """True when progress should be drawn live (a terminal on stdout and not --quiet)."""
    return not quiet and sys.stdout.isatty()


@contextlib.contextmanager
def warnings_after(show: bool = True) -> Iterator[None]:
    """Warnings raised in the block, printed once it succeeds as ``warning:`` lines on stderr (each one, even
    repeats); with ``show`` False (a torchrun rank other than 0, which meets the same ones) dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught if show else ():
        err_console.print(f"[yellow]warning:[/] {w.message}")


def check_outputs(force: bool, *paths: str | Path | None, inputs: Sequence[str | Path | None] = ()) -> None:
    """Refuse (OutputExistsError) to overwrite any of ``paths`` without ``force``, and any path that is one of
    the command's ``inputs`` whatever ``force`` says; None (not asked for) and ``-`` (stdout) are skipped."""
    for path in paths:
        if path is not None and path != "-":
            check_output_path(path, force, inputs)


def emit_json(path: str | None, obj) -> None:
    """Write ``obj`` as JSON to ``path`` (``-`` = stdout); no-op when path is None."""
    if path is not None:
        write_json_atomic(path, obj)


def state_path_for(output: Path) -> Path:
    """Where an interrupted run keeps its resumable state: beside the output."""
    return output.with_name(output.name + ".resume.safetensors")


def redacted_command(argv: Sequence[str], placeholders: Mapping[str, str] | None = None,
                     keep_names: Sequence[str] = ()) -> str:
    """``flowtame`` + ``argv`` (the words after the program name) as one shell-quoted line, for provenance,
    with the value of every option in ``placeholders`` replaced by its placeholder (``--opt VALUE`` and
    ``--opt=VALUE``). For the options in ``keep_names`` a ``NAME=VALUE`` value keeps its ``NAME=``."""
    placeholders = placeholders or {}
    out: list[str] = []
    pending: str | None = None
    for arg in argv:
        if pending is not None:
            out.append(_redacted_value(arg, placeholders[pending], pending in keep_names))
            pending = None
            continue
        option, sep, value = arg.partition("=")
        if sep and option in placeholders:
            out.append(f"{option}={_redacted_value(value, placeholders[option], option in keep_names)}")
        else:
            out.append(arg)
            pending = arg if arg in placeholders else None
    return shlex.join(["flowtame", *out])


def _redacted_value(value: str, placeholder: str, keep_name: bool) -> str:
    name, sep, _ = value.partition("=")
    return f"{name}={placeholder}" if keep_name and sep else placeholder


def command_line(placeholders: Mapping[str, str] | None = None, keep_names: Sequence[str] = ()) -> str:
    """This process's command line (``sys.argv``), redacted with :func:`redacted_command`: what the CLI passes
    to the library, which never reads ``sys.argv`` itself."""
    return redacted_command(sys.argv[1:], placeholders, keep_names)


#: Config keys whose flag is not ``--`` + the key with dashes.
_FLAGS = {"architecture": "--arch", "affine": "--affine/--additive", "conv_lu": "--lu/--no-lu",
          "threshold_gradient": "--threshold-gradient/--no-threshold-gradient",
          "check_draw": "--check-draw/--no-check-draw", "n_samples": "-n", "json_path": "--json"}


def flag_for(key: str) -> str:
    """The command-line flag that sets config key ``key`` (``batch_size`` -> ``--batch-size``)."""
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def error_line(exc: FlowtameError) -> str:
    """A library error as the CLI prints it: the message, then the flags of the keys it names (``[--lr]``)."""
    if not exc.keys:
        return str(exc)
    return f"{exc} [{', '.join(flag_for(key) for key in exc.keys)}]"
