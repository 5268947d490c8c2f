"""The ``opensd`` command line. Commands stay thin: they build configs and call the library."""

from __future__ import annotations

from pathlib import Path

import typer

from opensd.cli.common import DEBUG_ENV, fail_cleanly, set_debug

app = typer.Typer(
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
def info(path: Path = typer.Argument(..., help="A diffusers folder, an opensd model folder or an SD 1.x file.")) -> None:
    """Print a model's architecture, parameter counts, dtype and short SHA-256 hash."""
    from opensd.checkpoints.info import describe

    typer.echo(describe(path).render())


def _mount_subapps() -> None:
    from opensd.cli import data, eval, explain, generate, serve, train

    generate.register(app)
    explain.register(app)
    serve.register(app)
    train.register(app)
    eval.register(app)
    app.add_typer(data.app, name="data", help="Make datasets (the shapes world).")


_mount_subapps()


if __name__ == "__main__":  # pragma: no cover
    app()
