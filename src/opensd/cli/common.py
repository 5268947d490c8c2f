"""What every CLI command shares: user-facing errors as one clear line, bugs as one line and a hint.

A :class:`~opensd.errors.OpenSDError` (bad input, a bad file) and the OS's own "file not
found"/"permission denied" print ``error: <message>`` on stderr and exit 2. Any other
exception is a bug in opensd: it prints ``internal error: <type>: <message>`` with a hint
to rerun with ``--debug`` (or ``OPENSD_DEBUG=1``), which shows the traceback, and exits 1.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import typer

from opensd.errors import OpenSDError

F = TypeVar("F", bound=Callable)

# Errors that describe bad input or a bad file: shown as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (OpenSDError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

DEBUG_ENV = "OPENSD_DEBUG"

# The --device option every command that runs a model takes (opensd.devices.resolve_device reads it).
DEVICE = typer.Option(None, "--device", help="auto (CUDA, then MPS, else the CPU), cpu, cuda, cuda:N or mps. Default: auto.")


def set_debug(on: bool) -> None:
    """``opensd --debug``: let unexpected exceptions show their traceback."""
    if on:
        os.environ[DEBUG_ENV] = "1"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (multi-line messages are joined)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def fail_cleanly(fn: F) -> F:
    """Run a command; a user error prints ``error: ...`` and exits 2, a bug prints one line and exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except USER_ERRORS as e:
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if debug_enabled():
                raise
            typer.echo(f"internal error: {type(e).__name__}: {one_line(e)}", err=True)
            typer.echo(f"this is a bug in opensd; rerun with --debug (or {DEBUG_ENV}=1) to see the traceback", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
