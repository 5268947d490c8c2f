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
  ``MIN_GAP`` apart (Chebyshev distance), so objects separate even at 32 px.

Coordinates in a :class:`Scene` are fractions of the image side (x right, y down),
so one scene renders at any resolution. A :class:`PromptSpec` is what a caption
asserts and :func:`realize` draws a scene that makes it exactly true (the stated
objects and nothing else); :mod:`opensd.shapes.captions` words a spec in varied
English, and :class:`opensd.shapes.dataset.ShapesDataset` ties both to ``(seed, index)``.
"""

from __future__ import annotations

import math
import random
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
MAX_COUNT = 4
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048


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
    """What a caption asserts: object groups, an optional relation, an optional background.

    ``relation`` relates ``objects[0]`` (A) to ``objects[1]`` (B): "A left of B".
    Groups must be distinguishable (see :func:`distinguishable`). A relation needs
    exactly two single objects.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ShapesError(f"a PromptSpec has 1 or 2 object groups, got {len(self.objects)}")
        if sum(o.count for o in self.objects) > MAX_COUNT:
            raise ShapesError(f"at most {MAX_COUNT} objects in a scene")
        if len(self.objects) == 2 and not distinguishable(*self.objects):
            raise ShapesError(f"the two objects must differ in shape, stated colour or stated size: {self.objects}")
        check_name("relation", self.relation, RELATIONS)
        if self.relation is not None and (len(self.objects) != 2 or any(o.count != 1 for o in self.objects)):
            raise ShapesError("a relation needs exactly two single objects")
        check_name("background", self.background, BACKGROUNDS)


# ----------------------------------------------------------------------------- holdout

@dataclass(frozen=True)
class Holdout:
    """Combinations kept out of training, to test compositional generalisation.

    ``color_shapes``: ``(color, shape)`` pairs that no training *image* shows.
    ``relations``: ``(shape_a, relation, shape_b)`` triples that no training
    *caption* asserts, in either wording ("triangle left of circle" also blocks
    "circle right of triangle"); images may still show the arrangement unstated.
    """

    color_shapes: tuple[tuple[str, str], ...] = ()
    relations: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "color_shapes", tuple(tuple(p) for p in self.color_shapes))
        object.__setattr__(self, "relations", tuple(tuple(t) for t in self.relations))
        for pair in self.color_shapes:
            if len(pair) != 2:
                raise ShapesError(f"a held-out colour-shape pair is (color, shape), got {pair!r}")
            check_name("color", pair[0], PALETTE, optional=False)
            check_name("shape", pair[1], SHAPES, optional=False)
        for triple in self.relations:
            if len(triple) != 3:
                raise ShapesError(f"a held-out relation is (shape_a, relation, shape_b), got {triple!r}")
            check_name("shape", triple[0], SHAPES, optional=False)
            check_name("relation", triple[1], RELATIONS, optional=False)
            check_name("shape", triple[2], SHAPES, optional=False)
        for shape in SHAPES:
            if all((c, shape) in self.color_shapes for c in PALETTE):
                raise ShapesError(f"holdout blocks every colour of {shape}; leave at least one")

    def blocks_object(self, color: str | None, shape: str) -> bool:
        return (color, shape) in self.color_shapes

    def blocks_relation(self, shape_a: str, relation: str, shape_b: str) -> bool:
        converse = (shape_b, CONVERSE[relation], shape_a)
        return (shape_a, relation, shape_b) in self.relations or converse in self.relations

    def touches(self, spec: PromptSpec) -> bool:
        """Whether ``spec`` asserts a held-out colour-shape pair or a held-out relation."""
        if any(self.blocks_object(o.color, o.shape) for o in spec.objects):
            return True
        if spec.relation is not None:
            return self.blocks_relation(spec.objects[0].shape, spec.relation, spec.objects[1].shape)
        return False

    def blocks_scene(self, scene: Scene) -> bool:
        return any(self.blocks_object(o.color, o.shape) for o in scene.objects)

    def allowed_colors(self, shape: str) -> list[str]:
        return [c for c in PALETTE if not self.blocks_object(c, shape)]


DEFAULT_HOLDOUT = Holdout(
    color_shapes=(("purple", "triangle"), ("orange", "circle"), ("cyan", "square")),
    relations=(("triangle", "left of", "circle"), ("square", "above", "triangle")),
)
NO_HOLDOUT = Holdout()


# ----------------------------------------------------------------------------- realizing a spec

def _place_free(
    radii: list[float], rng: random.Random, restarts: int = 10, tries: int = 30
) -> list[tuple[float, float]] | None:
    """Uniform positions with every pairwise box gap >= MIN_GAP, by rejection; None if none found.

    Objects are placed one by one, each with up to ``tries`` draws, and the layout
    restarts when one finds no room.
    """
    for _ in range(restarts):
        pts: list[tuple[float, float]] = []
        for r in radii:
            lo, hi = BORDER + r, 1 - BORDER - r
            for _ in range(tries):
                x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
                if all(max(abs(x - px), abs(y - py)) - r - pr >= MIN_GAP for (px, py), pr in zip(pts, radii, strict=False)):
                    pts.append((x, y))
                    break
            else:
                break
        if len(pts) == len(radii):
            return pts
    return None


def _place_grid(radii: list[float], rng: random.Random) -> list[tuple[float, float]]:
    """Positions in a randomly split 2x2 (or 1x2 / 2x1) grid: always fits up to 4 large objects."""
    n = len(radii)
    if n <= 2:
        cells = [(0, 0), (0, 1)] if rng.random() < 0.5 else [(0, 0), (1, 0)]
        cells = cells[:n]
    else:
        cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], n)
    rng.shuffle(cells)

    def splits(axis: int) -> list[tuple[float, float]]:
        """[lo, hi] per grid index along ``axis`` of the (row, col) cells: 0 = rows (y), 1 = columns (x)."""
        used = sorted({c[axis] for c in cells})
        if len(used) == 1:
            return [(BORDER, 1 - BORDER)] * 2
        big = [max(r for r, c in zip(radii, cells, strict=False) if c[axis] == k) for k in (0, 1)]
        slack = 1 - 2 * BORDER - 2 * big[0] - 2 * big[1] - MIN_GAP
        cut = BORDER + 2 * big[0] + rng.uniform(0, max(slack, 0))
        return [(BORDER, cut), (cut + MIN_GAP, 1 - BORDER)]

    xs, ys = splits(1), splits(0)
    out = []
    for r, (row, col) in zip(radii, cells, strict=False):
        (x_lo, x_hi), (y_lo, y_hi) = xs[col], ys[row]
        out.append((rng.uniform(x_lo + r, max(x_hi - r, x_lo + r)), rng.uniform(y_lo + r, max(y_hi - r, y_lo + r))))
    return out


def _place_relation(ra: float, rb: float, relation: str, rng: random.Random) -> list[tuple[float, float]]:
    """Centres for A and B with "A relation B" unambiguous.

    Along the relation's axis the boxes are >= MIN_GAP apart; across it the offset is
    at most 0.35 of the main offset, so :func:`relations_between` gives exactly
    ``{relation}`` with room to spare (main >= 0.75, cross <= 0.35 against 0.5).
    """
    a_first = relation in ("left of", "above")  # A has the smaller main coordinate
    r1, r2 = (ra, rb) if a_first else (rb, ra)
    d = rng.uniform(r1 + r2 + MIN_GAP, 1 - 2 * BORDER - r1 - r2)
    first = rng.uniform(BORDER + r1, 1 - BORDER - r2 - d)
    a_main, b_main = (first, first + d) if a_first else (first + d, first)
    # across the axis: both centres inside [BORDER + r, 1 - BORDER - r], |offset| <= 0.35 d
    lo_a, hi_a = BORDER + ra, 1 - BORDER - ra
    lo_b, hi_b = BORDER + rb, 1 - BORDER - rb
    a_cross = rng.uniform(lo_a, hi_a)
    b_cross = rng.uniform(max(lo_b, a_cross - 0.35 * d), min(hi_b, a_cross + 0.35 * d))
    if relation in ("left of", "right of"):
        return [(a_main, a_cross), (b_main, b_cross)]
    return [(a_cross, a_main), (b_cross, b_main)]


def realize(
    spec: PromptSpec,
    rng: random.Random,
    image_size: int = 64,
    holdout: Holdout | None = None,
) -> Scene:
    """A scene that makes ``spec`` exactly true: the stated objects and nothing else.

    Unstated colours and sizes are drawn per object (colours avoiding ``holdout``'s
    pairs); an unstated background is ``DEFAULT_BACKGROUND``. A spec that states a
    held-out colour-shape pair is realized as stated (holdout filtering happens
    when specs are drawn, see :func:`sample_spec`).
    """
    check_image_size(image_size)
    holdout = holdout or NO_HOLDOUT
    attrs: list[tuple[str, str, str]] = []
    for o in spec.objects:
        for _ in range(o.count):
            color = o.color or rng.choice(holdout.allowed_colors(o.shape))
            size = o.size or rng.choice(tuple(SIZES))
            attrs.append((o.shape, color, size))
    radii = [SIZES[s] for _, _, s in attrs]
    if spec.relation is not None:
        pts = _place_relation(radii[0], radii[1], spec.relation, rng)
    else:
        crowded = sum(r >= SIZES["large"] for r in radii) >= 3  # free placement almost never fits these
        pts = (None if crowded else _place_free(radii, rng)) or _place_grid(radii, rng)
    objects = tuple(
        SceneObject(shape, color, size, round(x, 6), round(y, 6), r)
        for (shape, color, size), (x, y), r in zip(attrs, pts, radii, strict=False)
    )
    return Scene(objects, spec.background or DEFAULT_BACKGROUND, image_size)


def check_true(spec: PromptSpec, scene: Scene) -> list[str]:
    """Structural check that ``scene`` makes ``spec`` exactly true; returns the problems (empty if true).

    Each group has exactly ``count`` matching objects, there are no other objects,
    the relation holds (and is the only one) on the true boxes, and the background
    is the stated one (white when unstated).
    """
    problems = []
    used = 0
    for o in spec.objects:
        n = sum(o.matches(s.shape, s.color, s.size) for s in scene.objects)
        used += n
        if n != o.count:
            problems.append(f"{o.describe()}: found {n}")
    if used != len(scene.objects):
        problems.append(f"{len(scene.objects) - used} object(s) the caption does not mention")
    if spec.relation is not None and len(scene.objects) == 2 and len(spec.objects) == 2:
        # A is whichever object matches the spec's first object, B the other (either, when both match both).
        first, second = spec.objects
        pairs = [
            (a, b)
            for a, b in (scene.objects, scene.objects[::-1])
            if first.matches(a.shape, a.color, a.size) and second.matches(b.shape, b.color, b.size)
        ]
        found = [relations_between(a.box(), b.box()) for a, b in pairs]
        if {spec.relation} not in found:
            problems.append(f"relation {spec.relation!r} but boxes give {sorted(set().union(*found)) if found else 'no A/B pair'}")
    if scene.background != (spec.background or DEFAULT_BACKGROUND):
        problems.append(f"background {scene.background} but caption says {spec.background or 'nothing'}")
    for i, p in enumerate(scene.objects):
        if min(p.cx - p.r, p.cy - p.r, 1 - p.cx - p.r, 1 - p.cy - p.r) < BORDER - 1e-6:
            problems.append(f"object {i} crosses the border")
        for q in scene.objects[i + 1 :]:
            if max(abs(p.cx - q.cx), abs(p.cy - q.cy)) - p.r - q.r < MIN_GAP - 1e-6:
                problems.append(f"objects closer than MIN_GAP: {p} {q}")
    return problems
