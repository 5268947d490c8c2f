"""``opensd layout``: draw a layout control map from boxes, for a layout ControlNet.

Each box is ``COLOR:x0,y0,x1,y1`` in fractions of the image side (x right, y down), COLOR a
shapes-world colour name (the default model's layout ControlNet was trained on that
palette: :mod:`opensd.shapes.layout`), ``#rrggbb`` or ``[r,g,b]``. The map is the boxes,
filled, on black (:func:`opensd.pipelines.layout.draw_layout`); give it to
``opensd generate --controlnet ... --control-image MAP --control-preprocessor layout``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from opensd.cli.common import fail_cleanly


def register(app: typer.Typer) -> None:
    @app.command("layout")
    @fail_cleanly
    def layout(
        boxes: list[str] = typer.Argument(..., help="COLOR:x0,y0,x1,y1 per object (fractions of the side), e.g. "
                                                    "red:0.1,0.1,0.45,0.45 blue:0.55,0.5,0.9,0.85."),
        size: int = typer.Option(32, "--size", help="The map's side in pixels (the image size you generate at)."),
        out: Path = typer.Option(..., "--out", "-o", help="The PNG to write."),
    ) -> None:
        """Draw a layout control map: each object's box filled with its colour on black."""
        from opensd.pipelines.layout import LayoutError, draw_layout, parse_box
        from opensd.shapes.layout import COLORS

        image = draw_layout([parse_box(b, COLORS) for b in boxes], size)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            image.save(out, format="PNG")
        except OSError as e:
            raise LayoutError(f"cannot write {out}: {e.strerror or e}") from None
        typer.echo(f"wrote {out} ({size}x{size}, {len(boxes)} box{'es' if len(boxes) != 1 else ''})")
