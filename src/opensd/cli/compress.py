"""``opensd compress``: a smaller copy of a model folder (8-bit weights, a pruned BERT vocabulary).

Storage only: the copy loads anywhere the original does and computes in floating point
(:mod:`opensd.checkpoints.compress`). Score both with ``opensd eval`` to see what it costs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from opensd.cli.common import fail_cleanly


def register(app: typer.Typer) -> None:
    @app.command("compress")
    @fail_cleanly
    def compress(
        model: Path = typer.Argument(..., help="The model: an opensd or diffusers folder or an original SD file."),
        out: Path = typer.Option(..., "--out", "-o", help="The new opensd folder to write (the model is not touched)."),
        int8: bool = typer.Option(True, "--int8/--fp16", help="Store the U-Net's and text encoders' large weights "
                                                             "in 8 bits with a scale per row (else all in float16)."),
        vocab: int | None = typer.Option(None, "--vocab", min=1, help="Prune a BERT text encoder's vocabulary to its "
                                         "first N ids (plus every character and every --keep-text token)."),
        keep_text: list[Path] = typer.Option([], "--keep-text", help="A text file (each line) or an imagefolder "
                                             "metadata.jsonl (each caption) whose tokens --vocab keeps; repeatable."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder."),
    ) -> None:
        """Write a smaller copy of a model: 8-bit weights, and with --vocab a pruned BERT vocabulary."""
        from opensd.checkpoints.compress import compress as run
        from opensd.checkpoints.compress import read_keep_texts

        report = run(model, out, int8_weights=int8, vocab=vocab, keep_texts=read_keep_texts(keep_text),
                     overwrite=overwrite)
        typer.echo(report.render())
