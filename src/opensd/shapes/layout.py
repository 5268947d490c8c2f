"""The shapes world's layout maps: what the default model's layout ControlNet is trained on.

The colour code (:mod:`opensd.pipelines.layout`): a black background and, per object of
the scene, its region filled with the object's own palette colour (``PALETTE``), the
region being the bounding box of the object's mask (:func:`opensd.shapes.world.masks`,
pixels at least half covered) at the map's size. Boxes never overlap (scenes keep
``MIN_GAP`` between them), so the map tells every object's place, size and colour, and
nothing of its shape: that comes from the prompt. Two objects of one colour are two boxes
of that colour.

:func:`scene_layout` draws a scene's map; :func:`palette_color` and :data:`COLORS` name
the palette for a user drawing boxes by hand (``opensd layout red:0.1,0.1,0.45,0.45``).
"""

from __future__ import annotations

from PIL import Image

from opensd.pipelines.layout import LayoutBox, draw_layout
from opensd.shapes.world import PALETTE, Scene, ShapesError, check_image_size, masks

COLORS: dict[str, tuple[int, int, int]] = dict(PALETTE)


def palette_color(name: str) -> tuple[int, int, int]:
    """The RGB of a palette colour's name (``red``, ``orange``, ...)."""
    if name not in PALETTE:
        raise ShapesError(f"unknown color {name!r}; allowed: {', '.join(PALETTE)}")
    return PALETTE[name]


def scene_boxes(scene: Scene, size: int | None = None) -> list[LayoutBox]:
    """One :class:`LayoutBox` per object of ``scene`` (in its order): its mask's bounding box
    at ``size`` pixels (default ``scene.image_size``), in its colour."""
    size = check_image_size(scene.image_size if size is None else size)
    return [LayoutBox.from_mask(m, PALETTE[o.color]) for o, m in zip(scene.objects, masks(scene, size), strict=True)]


def scene_layout(scene: Scene, size: int | None = None) -> Image.Image:
    """The layout map of ``scene`` at ``size`` pixels (default ``scene.image_size``)."""
    size = check_image_size(scene.image_size if size is None else size)
    return draw_layout(scene_boxes(scene, size), size)
