"""An exact GenEval-style scorer for the shapes world (numpy + PIL, no torch).

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating
Text-to-Image Alignment") detects objects in a generated image and checks the
prompt's objects, counts, colours and positions. In the shapes world the detector
is exact geometry instead of a learned model:

1. **Colour.** Every pixel gets opponent coordinates ``a = R - (G + B) / 2``,
   ``b = sqrt(3) / 2 * (G - B)``, chroma ``|(a, b)|`` and hue ``atan2(b, a)``.
   Blending a colour with any neutral (white, black, gray: the backgrounds, and the
   anti-aliased or blurred edges on them) scales chroma and keeps hue exactly, so a
   pixel with chroma >= ``CHROMA_MIN`` takes the palette colour of nearest hue.
   The background is the neutral pixels' median level, nearest of BACKGROUNDS.
2. **Objects.** An image whose neutral pixels are under ``BACKGROUND_MIN_FRAC`` of it has
   no background for objects to stand on (a flat colour, coloured noise): no objects.
   Otherwise 8-connected components of same-colour pixels (a union-find in numpy).
   Each gets its core chroma (the median of its pixels above 0.75 of the 90th
   percentile: the flat interior) and a coverage map ``alpha = chroma / core``;
   components are split again at ``alpha >= 0.5`` so objects that blur together
   separate. Components under ``MIN_AREA_FRAC`` of the image, whose 90th percentile
   chroma is weak (< ``CORE_CHROMA_MIN``), or whose interior is not one colour
   (:func:`_is_flat`: noise) are dropped.
3. **Shape, size, place** from the coverage map: width and height are the sums of
   the column- and row-maxima of alpha (sub-pixel), fill = area / (width x height)
   (square 1, circle pi/4, triangle 1/2), and a triangle's area centroid sits h/6
   below its box centre. Size is small/large by the box extent against
   ``SIZE_SPLIT`` of the side; the box feeds GenEval's relation rule
   (:func:`opensd.shapes.world.relations_between`).
4. **Checked against the ideal shape** (:func:`_read_blob`): the reading stands when
   the ideal shape drawn in its box covers the blob with soft IoU >= ``FIT_MIN`` and
   its size is in ``R_RANGE``. Otherwise the blob is objects that touch or overlap
   and merged (same colour): :func:`opensd.shapes.shape_fit.decompose` finds the ideal
   shapes that explain it together, each read as an object; if none do, it is one
   object of unknown shape. A blob cut by the image's edge (:func:`_is_cut`: noise,
   gradients) has no shape.

:func:`judge` then applies GenEval's rules per category (see its docstring), and
:func:`score_images` averages: per-category accuracy over images, overall = mean of
the category accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from opensd.errors import OpenSDError
from opensd.shapes.components import dilate, label_components, merge_close_hues
from opensd.shapes.shape_fit import decompose, soft_iou, template
from opensd.shapes.world import (
    BACKGROUNDS,
    MAX_COUNT,
    PALETTE,
    PLURALS,
    SIZES,
    ObjectSpec,
    PromptSpec,
    relations_between,
)


class ScorerError(OpenSDError):
    """Bad input to the scorer (not an image, wrong shape or dtype, bad spec)."""


CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RICH_CATEGORIES: tuple[str, ...] = ("three_objects", "count_pair")  # specs only the rich world states
ALL_CATEGORIES: tuple[str, ...] = (*CATEGORIES, *RICH_CATEGORIES)
CHROMA_MIN = 40.0  # opponent chroma (0..~255) below which a pixel is neutral
CORE_CHROMA_MIN = 70.0  # an object's 90th-percentile chroma must reach this
HUE_TOL = 20.0  # degrees: an object whose mean hue is further from every palette hue has colour None
MIN_AREA_FRAC = 0.01  # of the image area; the smallest object (small triangle) covers 0.034
SIZE_SPLIT = math.sqrt(4 * SIZES["small"] * SIZES["large"])  # geometric mean of the two box extents
SQUARE_FILL = 0.89  # fill >= this: square (1.0); circle is pi / 4
CIRCLE_FILL = 0.66  # fill >= this (and no shift): circle; below: nothing we know
TRIANGLE_SHIFT = 0.05  # |area centroid - box centre| / height over this: triangle (1/6; circles, squares 0)
BACKGROUND_TOL = 48.0  # neutral median level further than this from every background: None
BACKGROUND_MIN_FRAC = 0.2  # objects need a background: under this neutral fraction of the image, none are read
FIT_MIN = 0.75  # soft IoU with the ideal shape in its box that a reading of a shape stands on without question
FIT_LOOSE = 0.5  # ... and the least it needs when no set of touching shapes explains the blob better
RING_LOOSE = 0.75  # ... if at least this much of the pixel ring around it is background
RING_MIN = 0.5  # any reading of one object needs this much background around it (a patch of noise has other colours)
HUE_MERGE = 25.0  # degrees: touching components of neighbouring palette hues closer than this are one object
EDGE_ALPHA = 0.9  # coverage at the image's edge above which an object runs off the image (see _is_cut)
R_RANGE = (0.05, 0.27)  # an object's half box side, / image side (small 0.13, large 0.21)
R_STRICT_MIN = 0.08  # below this half side only a loose reading (RING_LOOSE) stands
HUE_SPREAD_MAX = 20.0  # degrees: a flat-coloured object's interior hue varies less (circular std)
CHROMA_SPREAD_MAX = 0.2  # ... and its interior chroma's std / median less than this


def _opponent(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) opponent coordinates of float RGB (..., 3)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return r - (g + b) / 2, (math.sqrt(3) / 2) * (g - b)


_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_HUES = np.array(
    [math.degrees(math.atan2(*_opponent(np.array(c, np.float64))[::-1])) % 360 for c in PALETTE.values()]
)


def _hue_distance(h: np.ndarray | float, ref: np.ndarray) -> np.ndarray:
    d = np.abs(h - ref) % 360
    return np.minimum(d, 360 - d)


# nearest palette colour per half-degree hue bin: pixel labelling is a table look-up
_HUE_LUT = _hue_distance((np.arange(720)[:, None] + 0.5) / 2, _PALETTE_HUES).argmin(axis=1).astype(np.int8)


# ----------------------------------------------------------------------------- parsing an image

@dataclass(frozen=True)
class DetectedObject:
    """One object read from an image. Lengths in pixels; ``area`` in fractions of the image.

    ``shape`` / ``color`` are None when the geometry / hue fits nothing in the world.
    """

    shape: str | None
    color: str | None
    size: str
    box: tuple[float, float, float, float]
    center: tuple[float, float]
    area: float
    fill: float
    hue: float
    fit: float = 1.0  # soft IoU of the object's coverage with its ideal shape (0 for a blob)

    def describe(self) -> str:
        return f"{self.size} {self.color or 'off-palette'} {self.shape or 'blob'}"


@dataclass(frozen=True)
class Parsed:
    """All objects of an image and its background (None if no neutral dominates)."""

    objects: tuple[DetectedObject, ...]
    background: str | None


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ScorerError(f"an array image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return image.astype(np.float32)
    raise ScorerError(f"image must be a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")


def _classify_shape(fill: float, shift: float, aspect: float) -> str | None:
    """square (fill 1), triangle (centroid shifted by h/6), circle (fill pi/4), or None."""
    if not 0.6 <= aspect <= 1 / 0.6:
        return None
    if fill >= SQUARE_FILL:
        return "square"
    if abs(shift) >= TRIANGLE_SHIFT:
        return "triangle"
    if fill >= CIRCLE_FILL:
        return "circle"
    return None


def _measure(
    alpha: np.ndarray,
    strong: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    x0: int,
    y0: int,
    side: float,
    image_area: float,
) -> DetectedObject:
    """Features of one object from its coverage crop ``alpha`` (h, w) at offset (x0, y0)."""
    area = float(alpha.sum())
    clipped = np.minimum(alpha, 1.0)
    colprof, rowprof = clipped.max(axis=0), clipped.max(axis=1)  # (w,), (h,)
    width, height = float(colprof.sum()), float(rowprof.sum())
    xs, ys = np.arange(alpha.shape[1]) + 0.5, np.arange(alpha.shape[0]) + 0.5
    bx = float(xs @ colprof) / width + x0  # box centre: centre of the max-coverage profiles
    by = float(ys @ rowprof) / height + y0
    cx = float(alpha.sum(axis=0) @ xs) / area + x0  # area centroid
    cy = float(alpha.sum(axis=1) @ ys) / area + y0
    fill = area / (width * height)
    shape = _classify_shape(fill, (cy - by) / height, width / height)
    hue = math.degrees(math.atan2(float(b[strong].mean()), float(a[strong].mean()))) % 360
    dist = _hue_distance(np.float64(hue), _PALETTE_HUES)
    color = _PALETTE_NAMES[int(dist.argmin())] if dist.min() <= HUE_TOL else None
    size = "large" if max(width, height) / side >= SIZE_SPLIT else "small"
    box = (bx - width / 2, by - height / 2, bx + width / 2, by + height / 2)
    return DetectedObject(shape, color, size, box, (cx, cy), area / image_area, fill, hue)


def _background(rgb: np.ndarray, coloured: np.ndarray) -> tuple[str | None, float]:
    """(name of the background, or None if no neutral level dominates; neutral fraction of the image)."""
    neutral = rgb[~coloured].mean(axis=-1) if (~coloured).any() else np.empty(0)
    if not neutral.size:
        return None, 0.0
    level = float(np.median(neutral))
    name, ref = min(BACKGROUNDS.items(), key=lambda kv: abs(kv[1][0] - level))
    return (name if abs(ref[0] - level) <= BACKGROUND_TOL else None), neutral.size / coloured.size


def _is_flat(a: np.ndarray, b: np.ndarray, chroma: np.ndarray) -> bool:
    """Whether interior pixels (opponent a, b and chroma, 1-D) have one colour, as a drawn object
    does: hue spread (circular std) <= HUE_SPREAD_MAX and chroma std / median <= CHROMA_SPREAD_MAX.
    Noise that happens to pass the chroma threshold in a patch varies far more."""
    if chroma.size < 2:
        return True
    resultant = math.hypot(float((a / chroma).mean()), float((b / chroma).mean()))
    spread = math.degrees(math.sqrt(-2 * math.log(min(max(resultant, 1e-9), 1.0))))
    return spread <= HUE_SPREAD_MAX and float(chroma.std()) <= CHROMA_SPREAD_MAX * float(np.median(chroma))


def _fit_of(obj: DetectedObject, alpha: np.ndarray, x0: int, y0: int) -> float:
    """Soft IoU of ``alpha`` (a crop at (x0, y0)) with the ideal ``obj.shape`` in ``obj.box``."""
    if obj.shape is None:
        return 0.0
    bx0, by0, bx1, by1 = obj.box
    h, w = alpha.shape
    tmpl = template(obj.shape, (bx0 + bx1) / 2 - x0, (by0 + by1) / 2 - y0, (bx1 - bx0) / 2, (by1 - by0) / 2, h, w)
    return soft_iou(alpha, tmpl)


def _in_size_range(obj: DetectedObject, side: float, r_min: float = R_RANGE[0]) -> bool:
    r = max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]) / 2 / side
    return r_min <= r <= R_RANGE[1]


def _is_cut(alpha: np.ndarray, x0: int, y0: int, h: int, w: int) -> bool:
    """Whether a blob (crop ``alpha`` at (x0, y0) of an (h, w) image) runs off the image: at least
    2 pixels of an image edge, and a quarter of the blob's extent along it, fully covered
    (>= EDGE_ALPHA). Scenes keep objects BORDER inside, so their edge pixels are partly covered
    at most; noise and gradients cut by the frame have straight edges that read as squares."""
    ch, cw = alpha.shape
    edges = []
    if y0 == 0:
        edges.append((alpha[0], cw))
    if y0 + ch == h:
        edges.append((alpha[-1], cw))
    if x0 == 0:
        edges.append((alpha[:, 0], ch))
    if x0 + cw == w:
        edges.append((alpha[:, -1], ch))
    return any((n := int((e >= EDGE_ALPHA).sum())) >= 2 and n >= extent / 4 for e, extent in edges)


def _read_blob(alpha: np.ndarray, obj: DetectedObject, x0: int, y0: int, side: float, min_px: float,
               shape: tuple[int, int], ring: float) -> list[DetectedObject]:
    """The objects one same-coloured blob holds (``obj``: the blob measured as one object;
    ``ring``: the neutral fraction of the pixels around the blob).

    1. The blob itself if it looks like the shape it was read as (:func:`_fit_of` >= FIT_MIN,
       half side R_STRICT_MIN..R_RANGE[1], ``ring >= RING_MIN``: a patch of noise borders
       other colours).
    2. Else the ideal shapes that explain it better, with IoU >= FIT_MIN (objects that touch
       or overlap and merged, :func:`opensd.shapes.shape_fit.decompose`; or one shape whose
       bitten or blurred outline the fill rule misread), each with the blob's colour.
    3. Else the blob as one object, of the shape it was read as if that still fits with IoU
       >= FIT_LOOSE and ``ring >= RING_LOOSE`` (small objects at 32 px, blurred by a VAE),
       else of unknown shape.

    A blob cut by the image's edge (:func:`_is_cut`) is never read as a shape.
    """
    image_area = shape[0] * shape[1]
    fit = _fit_of(obj, alpha, x0, y0)
    if _is_cut(alpha, x0, y0, *shape):
        return [replace(obj, shape=None, fit=fit)]
    single = obj.shape is not None and _in_size_range(obj, side) and ring >= RING_MIN
    if single and fit >= FIT_MIN and _in_size_range(obj, side, R_STRICT_MIN):
        return [replace(obj, fit=fit)]
    fits = decompose(alpha, R_RANGE[0] * side, R_RANGE[1] * side, MAX_COUNT, min_px / 2)
    union = np.minimum(sum(f.coverage for f in fits), 1) if fits else np.zeros_like(alpha)
    whole = soft_iou(alpha, union)
    if whole < FIT_MIN or whole <= fit or (len(fits) == 1 and ring < RING_MIN):
        # one object after all: a small or blurred one fits its ideal shape less well
        loose = single and ring >= RING_LOOSE and fit >= FIT_LOOSE
        return [replace(obj, fit=fit) if loose else replace(obj, shape=None, fit=fit)]
    out = []
    for f in fits:
        mass = float(f.coverage.sum())
        ys, xs = np.arange(alpha.shape[0]) + 0.5, np.arange(alpha.shape[1]) + 0.5
        centre = (float(f.coverage.sum(axis=0) @ xs) / mass + x0, float(f.coverage.sum(axis=1) @ ys) / mass + y0)
        box = (f.cx - f.r + x0, f.cy - f.r + y0, f.cx + f.r + x0, f.cy + f.r + y0)
        size = "large" if 2 * f.r / side >= SIZE_SPLIT else "small"
        out.append(DetectedObject(f.shape, obj.color, size, box, centre, mass / image_area, mass / (4 * f.r * f.r),
                                  obj.hue, whole))
    return out


def parse(image: Image.Image | np.ndarray) -> Parsed:
    """Read every object of a shapes-world image (PIL or uint8 (H, W, 3) array).

    An image without a background (under BACKGROUND_MIN_FRAC of it neutral: a flat colour,
    coloured noise) holds no objects; nor does a coloured patch whose inside is not one
    colour (:func:`_is_flat`: noise). A same-coloured blob is read by :func:`_read_blob`.
    """
    rgb = _as_array(image)  # (H, W, 3) float32
    h, w = rgb.shape[:2]
    if min(h, w) < 8:
        raise ScorerError(f"image is too small to score: {w}x{h}")
    a, b = _opponent(rgb)
    chroma = np.hypot(a, b)
    coloured = chroma >= CHROMA_MIN
    background, neutral_frac = _background(rgb, coloured)
    if neutral_frac < BACKGROUND_MIN_FRAC:
        return Parsed((), background)
    hue = np.degrees(np.arctan2(b[coloured], a[coloured])) % 360
    nearest = np.full((h, w), -1, np.int8)  # (H, W) palette index of the nearest hue, -1 if neutral
    nearest[coloured] = _HUE_LUT[(hue * 2).astype(np.int64) % 720]

    labels, n = label_components(coloured, nearest)
    labels, n = merge_close_hues(labels, n, a, b, HUE_MERGE)
    min_px = MIN_AREA_FRAC * h * w
    counts = np.bincount(labels[labels >= 0], minlength=n)
    side = math.sqrt(h * w)
    objects = []
    for comp in np.flatnonzero(counts >= min_px):
        ys, xs = np.nonzero(labels == comp)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        mask = labels[y0:y1, x0:x1] == comp
        ch, ca, cb = chroma[y0:y1, x0:x1], a[y0:y1, x0:x1], b[y0:y1, x0:x1]
        vals = ch[mask]
        top = float(np.percentile(vals, 90))
        if top < CORE_CHROMA_MIN:
            continue
        inner = mask & (ch >= 0.75 * top)
        core = float(np.median(ch[inner]))  # the flat interior's chroma, noise averaged out
        if not _is_flat(ca[inner], cb[inner], ch[inner]):
            continue
        alpha = np.where(mask, ch / core, 0).astype(np.float32)  # unclipped: sums keep blurred mass
        whole = labels == comp
        ring = dilate(whole) & ~whole
        ring_frac = float((~coloured[ring]).mean()) if ring.any() else 0.0
        sub, m = label_components(alpha >= 0.5)  # split objects that blurred together
        for s in range(m):
            strong = sub == s
            if strong.sum() < min_px / 2:
                continue
            support = np.where(dilate(strong) & mask if m > 1 else mask, alpha, 0)
            obj = _measure(support, strong, ca, cb, x0, y0, side, h * w)
            if obj.area * h * w >= min_px:
                objects.extend(_read_blob(support, obj, x0, y0, side, min_px, (h, w), ring_frac))
    objects.sort(key=lambda o: (o.center[1], o.center[0]))
    return Parsed(tuple(objects), background)


# ----------------------------------------------------------------------------- judging

def category_of(spec: PromptSpec) -> str:
    """The GenEval category a spec belongs to.

    One group: ``counting`` if it asks for 2+ objects, else ``colors`` if it states a
    colour, else ``single_object``. Two groups: ``position`` with a relation, else
    ``count_pair`` if one asks for 2+ objects, else ``color_attr`` if a colour is stated,
    else ``two_objects``. Three groups: ``three_objects``.
    """
    if not isinstance(spec, PromptSpec):
        raise ScorerError(f"spec must be a PromptSpec, got {type(spec).__name__}")
    if len(spec.objects) == 1:
        o = spec.objects[0]
        return "counting" if o.count > 1 else "colors" if o.color else "single_object"
    if len(spec.objects) == 3:
        return "three_objects"
    if spec.relation is not None:
        return "position"
    if any(o.count > 1 for o in spec.objects):
        return "count_pair"
    return "color_attr" if any(o.color for o in spec.objects) else "two_objects"


@dataclass(frozen=True)
class Judgement:
    """GenEval's verdict for one image: ``reason`` is "ok" or "; "-joined problems.

    Each problem starts with one of: "missing object", "wrong color", "wrong size",
    "wrong count", "wrong relation", "wrong background".
    """

    correct: bool
    category: str
    reason: str
    detected: list[DetectedObject]
    background: str | None = None


def _summary(dets: Sequence[DetectedObject]) -> str:
    return ", ".join(d.describe() for d in dets) if dets else "nothing"


def _why_short(o: ObjectSpec, dets: Sequence[DetectedObject]) -> str:
    """Why fewer than ``o.count`` detections match ``o``."""
    want = o.describe()
    same = [d for d in dets if d.shape == o.shape]
    if not same:
        return f"missing object: expected {want}, found no {o.shape} (detected: {_summary(dets)})"
    coloured = [d for d in same if o.color is None or d.color == o.color]
    if not coloured:
        found = sorted({d.color or "off-palette" for d in same})
        return f"wrong color: expected {want}, found {PLURALS[o.shape]} coloured {', '.join(found)}"
    sized = [d for d in coloured if o.size is None or d.size == o.size]
    if not sized:
        return f"wrong size: expected {want}, found only {coloured[0].size} ones"
    return f"missing object: expected {want}, found {len(sized)}"


def judge(image: Image.Image | np.ndarray, spec: PromptSpec) -> Judgement:
    """GenEval's rules, reading objects with :func:`parse`.

    * every group needs a matching object (shape, and colour / size where the spec
      states them); extra, unrelated objects are allowed;
    * a group of two or more (``counting``, and a count group of ``count_pair`` or
      ``three_objects``) needs *exactly* ``count`` matching objects (GenEval's include
      ``>= N`` and exclude ``>= N + 1``);
    * ``position``: some object of A and some object of B stand in the relation
      by GenEval's box rule with ``RELATION_MARGIN``;
    * a stated background must be the detected one.

    GenEval ranks detections by confidence and checks the top ones; an exact
    detector has no ranking, so a group passes when *any* ``count`` detections
    satisfy it. Groups of a spec are distinguishable, so no detection serves two.
    """
    category = category_of(spec)
    parsed = parse(image)
    dets = list(parsed.objects)
    problems: list[str] = []
    matches = [[d for d in dets if o.matches(d.shape, d.color, d.size)] for o in spec.objects]
    for o, found in zip(spec.objects, matches, strict=False):
        if o.count > 1:
            if len(found) != o.count:
                noun = o.describe().split(" ", 1)[1]
                problems.append(f"wrong count: expected exactly {o.count} {noun}, found {len(found)}")
        elif not found:
            problems.append(_why_short(o, dets))
    if spec.relation is not None and not problems:
        pairs = [(x, y) for x in matches[0] for y in matches[1] if x is not y]
        seen = [relations_between(x.box, y.box) for x, y in pairs]
        if not any(spec.relation in rels for rels in seen):
            got = sorted(set().union(*seen)) if seen else []
            a, b = (o.describe() for o in spec.objects)
            told = ", ".join(got) or "no clear relation"
            problems.append(f"wrong relation: expected {a} {spec.relation} {b}, found {told}")
    if spec.background is not None and parsed.background != spec.background:
        problems.append(f"wrong background: expected {spec.background}, found {parsed.background or 'none'}")
    return Judgement(not problems, category, "; ".join(problems) or "ok", dets, parsed.background)


def score_images(items: Iterable[tuple[Image.Image | np.ndarray, PromptSpec]]) -> dict:
    """Judge ``(image, spec)`` pairs; GenEval's summary.

    Returns ``{"overall": mean of the category accuracies present,
    "accuracy": {category: fraction correct}, "n": {category: images},
    "items": [{"category", "correct", "reason"}, ...]}`` (items in input order).
    """
    rows: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ScorerError(f"item {i} must be an (image, PromptSpec) pair")
        j = judge(item[0], item[1])
        rows.append({"category": j.category, "correct": j.correct, "reason": j.reason})
    if not rows:
        raise ScorerError("score_images needs at least one (image, spec) pair")
    n = {c: sum(r["category"] == c for r in rows) for c in ALL_CATEGORIES}
    acc = {c: sum(r["correct"] for r in rows if r["category"] == c) / n[c] for c in ALL_CATEGORIES if n[c]}
    counts = {c: k for c, k in n.items() if k}
    return {"overall": sum(acc.values()) / len(acc), "accuracy": acc, "n": counts, "items": rows}
