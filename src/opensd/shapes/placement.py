"""Realizing a spec: a scene that makes a :class:`~opensd.shapes.world.PromptSpec` exactly true,
and the structural check that one does (re-exported by :mod:`opensd.shapes.world`).

Every object stays ``BORDER`` inside the image and any two boxes are ``MIN_GAP`` apart.
Positions are uniform by rejection; crowded scenes (three or more large objects, or when
rejection finds no room) use a randomly split 2x2 grid, which holds any MAX_COUNT = 4
objects, large ones included (``4 * 0.21 + MIN_GAP + 2 * BORDER = 0.97``): so a scene of
three groups fits as surely as one of a single group of four.
"""

from __future__ import annotations

import random

from opensd.shapes.holdout import NO_HOLDOUT, Holdout
from opensd.shapes.world import (
    BORDER,
    DEFAULT_BACKGROUND,
    MIN_GAP,
    SIZES,
    PromptSpec,
    Scene,
    SceneObject,
    check_image_size,
    relations_between,
)


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
