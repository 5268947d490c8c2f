"""Layout control maps: where each object of a prompt goes, as flat-coloured boxes.

A layout map is the control image of a layout ControlNet (the default model's
``models/controlnets/controlnet-layout.safetensors``; docs/controlnet.md, "The layout ControlNet"): a black
background with one filled, axis-aligned box per object, in that object's colour. The
box says where the object goes and how large it is; the prompt says what it is. Boxes
are fractions of the image side (``x0, y0, x1, y1``, x right, y down), so one layout
draws at any size: a pixel is inside a box when its centre is (:func:`box_pixels`), the
rule by which a box read off a pixel mask (:meth:`LayoutBox.from_mask`) draws back to
exactly that mask's bounding box. Boxes are drawn in order, a later one over an earlier.

The map is flat colours: give it to a unit with the ``segmentation`` (``layout``)
preprocessor so that any resizing keeps it so (:mod:`opensd.pipelines.control_resize`).
Colours are RGB triples here; :func:`opensd.shapes.layout.palette_color` gives the shapes
world's named ones, which the default model's layout ControlNet was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from opensd.errors import OpenSDError

BACKGROUND: tuple[int, int, int] = (0, 0, 0)  # where no object goes
MAX_SIDE = 4096


class LayoutError(OpenSDError):
    """A layout box or map that cannot be drawn (a box outside the image, a bad colour or size)."""

    kind = "LayoutError"


def _rgb(color: object, what: str) -> tuple[int, int, int]:
    if isinstance(color, (tuple, list)) and len(color) == 3 and all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
        return (int(color[0]), int(color[1]), int(color[2]))
    raise LayoutError(f"{what} must be an RGB triple of integers 0..255, got {color!r}")


@dataclass(frozen=True)
class LayoutBox:
    """One object's region: ``box = (x0, y0, x1, y1)`` in fractions of the image side
    (0 <= x0 < x1 <= 1, the same for y) and its fill colour (RGB)."""

    box: tuple[float, float, float, float]
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        box = self.box
        if not isinstance(box, (tuple, list)) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            raise LayoutError(f"a layout box is four numbers x0, y0, x1, y1 (fractions of the image side), got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise LayoutError(f"layout box {box!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                              "(fractions of the image side, x right, y down)")
        object.__setattr__(self, "box", (x0, y0, x1, y1))
        object.__setattr__(self, "color", _rgb(self.color, "a layout box's colour"))

    @staticmethod
    def from_mask(mask: np.ndarray, color: tuple[int, int, int]) -> LayoutBox:
        """The bounding box of a boolean (H, W) mask's pixels, as fractions (pixel edges)."""
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            raise LayoutError("an empty mask has no layout box")
        h, w = mask.shape
        return LayoutBox((xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h), color)

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` pixel bounds (end exclusive) of :func:`box_pixels` on a ``width`` x ``height`` grid."""
        return box_pixels(self.box, width, height)


def box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels of ``width`` x ``height`` whose centres lie inside ``box`` (fractions), as
    ``(x0, y0, x1, y1)`` bounds with exclusive ends; at least one pixel each way."""

    def span(lo: float, hi: float, n: int) -> tuple[int, int]:
        a = max(0, math.ceil(lo * n - 0.5))  # first centre (i + 0.5) / n >= lo
        b = min(n, math.floor(hi * n - 0.5) + 1)  # last centre <= hi, exclusive end
        if b <= a:  # thinner than a pixel: the pixel under its middle
            a = min(n - 1, max(0, int((lo + hi) / 2 * n)))
            b = a + 1
        return a, b

    (x0, x1), (y0, y1) = span(box[0], box[2], width), span(box[1], box[3], height)
    return x0, y0, x1, y1


def draw_layout(boxes: Sequence[LayoutBox], width: int, height: int | None = None,
                background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """The layout map of ``boxes`` (in order, later over earlier) on ``background``, an RGB image."""
    height = width if height is None else height
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_SIDE:
            raise LayoutError(f"a layout map's {name} must be an integer 1..{MAX_SIDE}, got {v!r}")
    boxes = list(boxes)
    for i, b in enumerate(boxes):
        if not isinstance(b, LayoutBox):
            raise LayoutError(f"layout box {i} must be a LayoutBox, got {type(b).__name__}")
    out = np.empty((height, width, 3), np.uint8)
    out[:] = _rgb(background, "the layout background")
    for b in boxes:
        x0, y0, x1, y1 = b.pixel_box(width, height)
        out[y0:y1, x0:x1] = b.color
    return Image.fromarray(out, "RGB")


def parse_box(text: str, colors: dict[str, tuple[int, int, int]] | None = None) -> LayoutBox:
    """``"COLOR:x0,y0,x1,y1"`` (the command line's form) as a :class:`LayoutBox`. COLOR is a
    name of ``colors``, ``#rrggbb`` or ``r,g,b`` in brackets (``[230,30,50]``)."""
    colors = colors or {}
    name, sep, coords = text.rpartition(":")
    if not sep or not name:
        raise LayoutError(f"layout box {text!r}: give COLOR:x0,y0,x1,y1, e.g. red:0.1,0.1,0.45,0.45")
    try:
        values = tuple(float(v) for v in coords.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise LayoutError(f"layout box {text!r}: the box is four numbers x0,y0,x1,y1 after the colon, got {coords!r}")
    return LayoutBox(values, parse_color(name, colors))


def parse_color(name: str, colors: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    """A colour of :func:`parse_box`: a name of ``colors``, ``#rrggbb`` or ``[r,g,b]``."""
    key = name.strip().lower()
    if key in colors:
        return colors[key]
    if len(key) == 7 and key.startswith("#"):
        try:
            return (int(key[1:3], 16), int(key[3:5], 16), int(key[5:7], 16))
        except ValueError:
            pass
    if key.startswith("[") and key.endswith("]"):
        try:
            return _rgb(tuple(int(v) for v in key[1:-1].split(",")), f"colour {name!r}")
        except ValueError:
            pass
    known = ", ".join(colors) + ", " if colors else ""
    raise LayoutError(f"unknown layout colour {name!r}; use {known}#rrggbb or [r,g,b]")
