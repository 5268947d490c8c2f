"""What every CLI command shares: turning user-facing errors into one clear line."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer

F = TypeVar("F", bound=Callable)

# Errors that describe bad input or a bad file: shown as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def fail_cleanly(fn: F) -> F:
    """Run a command; a user error prints ``error: ...`` on stderr and exits 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
