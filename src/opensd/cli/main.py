"""The ``opensd`` command line. Commands stay thin: they build configs and call the library."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from opensd.cli.common import DEBUG_ENV, PREDICTION, PredictionChoice, fail_cleanly, set_debug


class _OpenSDTyper(typer.Typer):
    """The app; run as a program it first refuses arguments that are not UTF-8.

    Python hands bytes that are not UTF-8 to the program as lone surrogates, which any
    later step (the tokenizer, a JSON infotext, printing) may trip on; they are refused
    here, one line naming the argument, before anything runs.
    """

    def __call__(self, *args, **kwargs):
        argv = kwargs.get("args", args[0] if args else None)
        bad = non_utf8_argument(sys.argv[1:] if argv is None else list(argv))
        if bad is not None:
            typer.echo(f"error: {bad}", err=True)
            raise SystemExit(2)
        return super().__call__(*args, **kwargs)


def non_utf8_argument(argv: list[str]) -> str | None:
    """A message naming the first argument that is not valid UTF-8 text, or None."""
    for i, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            return f"argument {i} ('{shown}') is not valid UTF-8; opensd takes its arguments (prompts, file names, options) as UTF-8 text"
    return None


app = _OpenSDTyper(
    name="opensd",
    help="Stable Diffusion, complete: generate, train, inspect and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback of an unexpected error (or set {DEBUG_ENV}=1)."),
) -> None:
    """Stable Diffusion, complete: generate, train, inspect and serve."""
    set_debug(debug)


@app.command()
@fail_cleanly
def info(
    path: Path = typer.Argument(..., help="A diffusers folder, an opensd model folder or an original SD 1.x/2.x/SDXL file."),
    prediction: PredictionChoice = PREDICTION,
) -> None:
    """Print a model's family, parameterization, architecture, parameter counts, dtype and short SHA-256 hash."""
    from opensd.checkpoints.info import describe

    typer.echo(describe(path, prediction=prediction.value).render())


def _mount_subapps() -> None:
    from opensd.cli import compress, data, eval, explain, generate, hires, layout, serve, train

    generate.register(app)
    hires.register(app)
    layout.register(app)
    explain.register(app)
    serve.register(app)
    train.register(app)
    compress.register(app)
    eval.register(app)
    app.add_typer(data.app, name="data", help="Make datasets (the shapes world).")


_mount_subapps()


if __name__ == "__main__":  # pragma: no cover
    app()
