"""The ``flowtame`` command line: a thin layer that parses options, calls the library and renders results.

Each command lives in its own module of this package and registers itself on ``app``. Library errors
(:class:`flowtame.errors.FlowtameError`) become one line on stderr and their exit code; Ctrl-C exits 130,
SIGTERM 143, SIGHUP 129 (docs/exit-codes.md). Under torchrun every command runs inside
:func:`flowtame.engine.distributed.distributed_context`, and library errors are printed by rank 0 only
(a failure on another rank reaches rank 0 as a :class:`~flowtame.engine.distributed.PeerFailure`).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import warnings
from typing import Annotated

import typer

from flowtame import __version__
from flowtame.cli._common import error_line
from flowtame.engine.devices import out_of_memory
from flowtame.engine.distributed import distributed_context
from flowtame.engine.host_memory import retain_freed_host_memory
from flowtame.errors import FlowtameError, InputError, StopSignal, signal_number, stop_signals

app = typer.Typer(
    name="flowtame",
    help="Tame pretrained normalizing flows: forget or rebalance chosen images, and prove what changed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flowtame {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the "
                                                                                              "version.")] = False,
) -> None:
    """flowtame: tame normalizing flows."""


COMMAND_MODULES = ("info", "convert", "stats", "train", "tame", "evaluate", "sample", "debias", "demo")
for _name in COMMAND_MODULES:
    importlib.import_module(f"flowtame.cli.{_name}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings reach the terminal as ``flowtame: warning: <message>``, without source file and line."""
    print(f"flowtame: warning: {message}", file=file or sys.stderr)


def main() -> None:
    """Console-script entry point: run the app, map library errors to one line and an exit code."""
    warnings.showwarning = _one_line_warning
    retain_freed_host_memory()  # a run's passes reuse the memory the last one freed (engine/host_memory.py)
    previous = _stop_signals_interrupt()
    try:
        _check_distributed_command(sys.argv[1:])
        with distributed_context():
            app(standalone_mode=False)
    except FlowtameError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        failure = _failure_behind(exc)
        if failure is not None:
            _fail(failure)
        signum = signal_number(exc)
        typer.echo("flowtame: interrupted" + ("" if signum == signal.SIGINT else
                                              f" by {signal.Signals(signum).name}"), err=True)
        sys.exit(128 + signum)
    except typer.Abort:
        typer.echo("flowtame: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        oom = out_of_memory(exc)
        if oom is not None:
            _fail(oom)
        line = _usage_error_line(exc)
        if line is None:
            raise
        typer.echo(f"flowtame: error: {line}", err=True)
        sys.exit(2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(exc: FlowtameError) -> None:
    """Print a library error's one line (under torchrun on rank 0 only; another rank's error arrives there as a
    PeerFailure) and exit with its code."""
    if _rank() == 0:
        typer.echo(f"flowtame: error: {error_line(exc)}", err=True)
    sys.exit(exc.exit_code)


def _failure_behind(interrupt: BaseException) -> FlowtameError | None:
    """The library error the command was already failing with when a stop signal interrupted its way out, if
    any: under torchrun a rank that dies makes the others fail, and torchrun then sends them SIGTERM, which
    must not replace their error line."""
    seen = interrupt.__context__
    while seen is not None:
        if isinstance(seen, FlowtameError):
            return seen
        seen = seen.__context__
    return None


#: Commands that run under torchrun (their likelihood passes are sharded); the others refuse several ranks.
DISTRIBUTED_COMMANDS = ("stats", "evaluate", "tame", "debias", "train")


def _check_distributed_command(args: list[str]) -> None:
    """Under torchrun with several ranks, refuse (InputError) a command that does not run distributed yet:
    every rank would run all of it and write its outputs."""
    world = os.environ.get("WORLD_SIZE", "1")
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if world.isdigit() and int(world) > 1 and command is not None and command not in DISTRIBUTED_COMMANDS:
        raise InputError(f"{command} does not run under torchrun yet (world size {world}); only "
                         f"{', '.join(DISTRIBUTED_COMMANDS)} do: run it as one process (docs/scaling-out.md)")


def _rank() -> int:
    """This process's torchrun rank from its environment (0 without torchrun); valid after the group is gone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _stop_signals_interrupt() -> dict:
    """SIGTERM and SIGHUP interrupt like Ctrl-C (a :class:`StopSignal`, a KeyboardInterrupt): temporary files
    are removed on the way out and the exit code is 128 + the signal's number (143, 129). Inside a training
    loop the engine turns them into a clean stop with a resumable state. Ignored signals stay ignored.
    Returns the previous handlers (main thread only; elsewhere nothing changes)."""

    def interrupt(signum, frame) -> None:  # noqa: ANN001 - the signal-handler signature
        raise StopSignal(signum)

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, interrupt) for sig in stop_signals()
            if sig != signal.SIGINT and signal.getsignal(sig) is not signal.SIG_IGN}


def _usage_error_line(exc: Exception) -> str | None:
    """The one-line message of a command-line usage error, or None for any other exception.

    Typer's usage errors (click's classes up to Typer 0.2x, Typer's own since) are recognised by the interface
    they all share — ``format_message()`` and an integer ``exit_code`` — so no click import is needed.
    """
    format_message = getattr(exc, "format_message", None)
    if not (callable(format_message) and isinstance(getattr(exc, "exit_code", None), int)):
        return None
    message = " ".join(str(format_message()).split())
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None)
    return f"{command}: {message}" if command else message
