"""The shapes world: coloured shapes on a plain background, and what a caption asserts of them.

A tiny text-to-image world in which every caption is *true* of its image and the
image's scene graph is exact ground truth, so that a generator trained on it can be
scored exactly (see :mod:`opensd.shapes.scorer`, a GenEval-style judge, Ghosh et al.
2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment").

The world, in one place:

* ``PALETTE``: seven saturated colours whose hues are at least 31 degrees apart;
* ``BACKGROUNDS``: white, black, gray (a caption that names none means white);
* ``SHAPES``: circle, square, triangle (apex up), each filling a ``2r x 2r`` box;
* ``SIZES``: small and large, as ``r`` in fractions of the image side;
* ``RELATIONS``: left of, right of, above, below, read from boxes as GenEval does
  with ``RELATION_MARGIN``;
* scenes keep every object ``BORDER`` inside the image and any two objects' boxes
  ``MIN_GAP`` apart (Chebyshev distance), so objects separate even at 32 px;
* at most ``MAX_GROUPS`` object groups and ``MAX_COUNT`` objects in a scene;
* ``World``: the classic world or the rich one, whose captions also take the sentence
  forms of ``Form`` and the size words of ``SIZE_WORDS``.

Coordinates in a :class:`Scene` are fractions of the image side (x right, y down),
so one scene renders at any resolution. A :class:`PromptSpec` is what a caption
asserts and :func:`realize` (:mod:`opensd.shapes.placement`) draws a scene that makes it
exactly true (the stated objects and nothing else); :class:`Holdout`
(:mod:`opensd.shapes.holdout`) names what training never asserts; :mod:`opensd.shapes.captions`
and :mod:`opensd.shapes.wording` word a spec in varied English, and
:class:`opensd.shapes.dataset.ShapesDataset` ties all of it to ``(seed, index)``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from opensd.errors import OpenSDError


class ShapesError(OpenSDError):
    """Bad input to the shapes world (unknown name, bad size, impossible spec)."""


# ----------------------------------------------------------------------------- the world's spec

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 50),
    "orange": (245, 120, 20),
    "yellow": (235, 225, 25),
    "green": (30, 190, 50),
    "cyan": (30, 200, 220),
    "blue": (40, 70, 230),
    "purple": (160, 40, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
DEFAULT_BACKGROUND = "white"  # the background of every scene whose caption names none
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIZES: dict[str, float] = {"small": 0.13, "large": 0.21}  # r: half the box side, / image side
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CONVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_MARGIN = 0.1  # GenEval's POSITION_THRESHOLD: offsets shrink by 0.1 x summed box extents
MIN_GAP = 0.09  # the least Chebyshev gap between two objects' boxes, / image side
BORDER = 0.02  # the least gap between an object's box and the image edge, / image side
MAX_COUNT = 4  # objects in a scene, all groups together: four large ones fit a 2x2 grid, a fifth may not
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_GROUPS = 3  # object groups a caption states (the classic world states one or two)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048


class World(enum.StrEnum):
    """Which shapes world: ``classic``, the one the default model was trained on (one or two
    groups, four caption kinds, one wording of each thing), or ``rich`` (also three groups and
    a count beside another group, and more sentence forms, synonyms and digits; docs/shapes.md)."""

    CLASSIC = "classic"
    RICH = "rich"


class Form(enum.StrEnum):
    """How a caption's body is built from its noun phrases (the rich world's sentence forms).

    ``and``: "A and B and C" (one group: its noun phrase alone); ``list``: "A, B and C" (three
    groups); ``relation``: "A above B"; ``copula``: "the A is above the B"; ``inverted``: "above
    the B is A". The classic world writes only ``and`` and ``relation`` (:data:`CLASSIC_FORMS`).
    """

    AND = "and"
    LIST = "list"
    RELATION = "relation"
    COPULA = "copula"
    INVERTED = "inverted"


CLASSIC_FORMS: tuple[Form, ...] = (Form.AND, Form.RELATION)
RELATION_FORMS: tuple[Form, ...] = (Form.RELATION, Form.COPULA, Form.INVERTED)
# The words a rich caption may write for each size, the canonical one (SIZES' name) first.
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
SYNONYMS: dict[str, str] = {w: size for size, words in SIZE_WORDS.items() for w in words[1:]}  # "big" -> "large"


def check_name(kind: str, value: str | None, allowed: Mapping | tuple, optional: bool = True) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise ShapesError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def check_image_size(size: int) -> int:
    """``size`` as an int if it is a supported square side (16..2048 px), else ShapesError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ShapesError(f"image size must be an integer, got {size!r}")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ShapesError(f"image size {size} is not supported; use {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px")
    return int(size)


def relations_between(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> set[str]:
    """The relations of A to B among RELATIONS, from boxes ``(x0, y0, x1, y1)`` (y down).

    GenEval's rule: the centre offset A - B shrinks on each axis by
    ``RELATION_MARGIN * (extent_a + extent_b)``; a relation holds when the shrunk
    offset, over the length of the raw offset, passes 0.5 on its axis. A diagonal
    placement can hold two relations; overlapping centres hold none.
    """
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - RELATION_MARGIN * np.abs(dims), 0) * np.sign(offset)
    norm = float(np.linalg.norm(offset))
    if np.all(np.abs(revised) < 1e-3) or norm == 0:
        return set()
    dx, dy = revised / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class SceneObject:
    """One shape: centre ``(cx, cy)`` and half-side ``r`` in fractions of the image side."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float

    def __post_init__(self) -> None:
        check_name("shape", self.shape, SHAPES, optional=False)
        check_name("color", self.color, PALETTE, optional=False)
        check_name("size", self.size, SIZES, optional=False)
        if not (0 < self.r < 0.5):
            raise ShapesError(f"r must be in (0, 0.5) of the image side, got {self.r}")

    def box(self, size: int = 1) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in pixels of a ``size`` image (fractions for size=1)."""
        x0, y0, x1, y1 = self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r
        return (x0 * size, y0 * size, x1 * size, y1 * size)


@dataclass(frozen=True)
class Scene:
    """Objects on a background; ``image_size`` is the side the scene is rendered at by default."""

    objects: tuple[SceneObject, ...]
    background: str = DEFAULT_BACKGROUND
    image_size: int = 64

    def __post_init__(self) -> None:
        check_name("background", self.background, BACKGROUNDS, optional=False)
        check_image_size(self.image_size)
        object.__setattr__(self, "objects", tuple(self.objects))


def _coverage(obj: SceneObject, size: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of ``obj`` on a ``size`` grid, cropped to its box.

    Returns (alpha (h, w) float32 in [0, 1], x0, y0): coverage is the mean of the
    shape's indicator at ``ss x ss`` sub-pixel centres per pixel (a box filter).
    """
    ss = max(4, -(-256 // size))  # >= 256 sub-samples across the image
    x0 = max(int(math.floor((obj.cx - obj.r) * size)) - 1, 0)
    y0 = max(int(math.floor((obj.cy - obj.r) * size)) - 1, 0)
    x1 = min(int(math.ceil((obj.cx + obj.r) * size)) + 1, size)
    y1 = min(int(math.ceil((obj.cy + obj.r) * size)) + 1, size)
    # sub-pixel centres in units of the image side
    xs = (x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss) / size
    ys = (y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss) / size
    dx = xs[None, :] - obj.cx  # (1, W*ss)
    dy = ys[:, None] - obj.cy  # (H*ss, 1)
    r = obj.r
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif obj.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # triangle, apex up: half-width grows from 0 at the apex (dy = -r) to r at the base
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    h, w = y1 - y0, x1 - x0
    alpha = inside.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)  # (H*ss, W*ss) -> (H, W)
    return alpha, x0, y0


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """The scene as an anti-aliased RGB image of side ``size`` (default ``scene.image_size``)."""
    size = check_image_size(scene.image_size if size is None else size)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    for obj in scene.objects:
        alpha, x0, y0 = _coverage(obj, size)
        h, w = alpha.shape
        col = np.array(PALETTE[obj.color], np.float32)
        region = img[y0 : y0 + h, x0 : x0 + w]
        region += alpha[..., None] * (col - region)  # objects never overlap: blend over what is there
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def masks(scene: Scene, size: int | None = None) -> list[np.ndarray]:
    """One boolean ``(size, size)`` mask per object: pixels at least half covered."""
    size = check_image_size(scene.image_size if size is None else size)
    out = []
    for obj in scene.objects:
        alpha, x0, y0 = _coverage(obj, size)
        m = np.zeros((size, size), bool)
        m[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]] = alpha >= 0.5
        out.append(m)
    return out


# ----------------------------------------------------------------------------- what a caption asserts

@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``; ``color`` / ``size`` None means "not stated"."""

    shape: str
    color: str | None = None
    size: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        check_name("shape", self.shape, SHAPES, optional=False)
        check_name("color", self.color, PALETTE)
        check_name("size", self.size, SIZES)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ShapesError(f"count must be an integer in 1..{MAX_COUNT}, got {self.count!r}")

    def matches(self, shape: str | None, color: str | None, size: str | None) -> bool:
        """Whether an object with these attributes is one of the objects this spec asks for."""
        return (
            shape == self.shape
            and (self.color is None or color == self.color)
            and (self.size is None or size == self.size)
        )

    def describe(self) -> str:
        """A plain description for reasons: ``"3 small red circles"``, ``"a circle"``."""
        words = [w for w in (self.size, self.color) if w]
        if self.count == 1:
            return " ".join(["a", *words, self.shape])
        return " ".join([str(self.count), *words, PLURALS[self.shape]])


def distinguishable(a: ObjectSpec, b: ObjectSpec) -> bool:
    """No object can match both specs (so counts per spec are well defined)."""
    return (
        a.shape != b.shape
        or (a.color is not None and b.color is not None and a.color != b.color)
        or (a.size is not None and b.size is not None and a.size != b.size)
    )


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asserts: 1 to MAX_GROUPS object groups, an optional relation, an optional background.

    ``relation`` relates ``objects[0]`` (A) to ``objects[1]`` (B): "A left of B".
    Groups must be pairwise distinguishable (see :func:`distinguishable`) and hold at most
    MAX_COUNT objects together. A relation needs exactly two single objects.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_GROUPS:
            raise ShapesError(f"a PromptSpec has 1 to {MAX_GROUPS} object groups, got {len(self.objects)}")
        if not all(isinstance(o, ObjectSpec) for o in self.objects):
            raise ShapesError(f"a PromptSpec's objects are ObjectSpecs, got {self.objects!r}")
        if sum(o.count for o in self.objects) > MAX_COUNT:
            raise ShapesError(f"at most {MAX_COUNT} objects in a scene")
        for i, a in enumerate(self.objects):
            for b in self.objects[i + 1 :]:
                if not distinguishable(a, b):
                    raise ShapesError(f"the groups must differ in shape, stated colour or stated size: {a}, {b}")
        check_name("relation", self.relation, RELATIONS)
        if self.relation is not None and (len(self.objects) != 2 or any(o.count != 1 for o in self.objects)):
            raise ShapesError("a relation needs exactly two single objects")
        check_name("background", self.background, BACKGROUNDS)


# The holdout and the realizing of a spec live in their own modules (this one would pass 500
# lines) and build on the names above; they are the world's names too. opensd.shapes imports
# this module first, so the names they take from it are defined when they load.
from opensd.shapes.holdout import DEFAULT_HOLDOUT, NO_HOLDOUT, Holdout  # noqa: E402
from opensd.shapes.placement import check_true, realize  # noqa: E402

__all__ = [
    "BACKGROUNDS", "BORDER", "CLASSIC_FORMS", "CONVERSE", "DEFAULT_BACKGROUND", "DEFAULT_HOLDOUT", "MAX_COUNT",
    "MAX_GROUPS", "MIN_GAP", "NO_HOLDOUT", "NUMBERS", "PALETTE", "PLURALS", "RELATION_FORMS", "RELATION_MARGIN",
    "RELATIONS", "SHAPES", "SIZES", "SIZE_WORDS", "SYNONYMS", "Form", "Holdout", "ObjectSpec", "PromptSpec", "Scene",
    "SceneObject", "ShapesError", "World", "check_image_size", "check_name", "check_true", "distinguishable", "masks",
    "realize", "relations_between", "render",
]
