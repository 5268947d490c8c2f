"""The shapes world as an endless, seeded, captioned dataset: ``ShapesDataset(seed)[i]``.

Item ``i`` depends only on ``(seed, i)``: a caption kind drawn by weight from the world's
kinds (``KINDS``; the rich world's ``RICH_KINDS``), a spec of that kind that asserts nothing
the holdout keeps out (:func:`sample_spec`), a scene that makes it exactly true
(:func:`opensd.shapes.world.realize`), the scene's render, and a caption of the spec
(:func:`opensd.shapes.captions.caption`; in the rich world :func:`~opensd.shapes.captions.write`
with a :func:`~opensd.shapes.captions.draw_wording` that uses no held-out form or word).

The rich world (``world=World.RICH``) draws from its own random streams: the classic
world's items are what they were.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from opensd.shapes.captions import Wording, caption, draw_wording, write
from opensd.shapes.world import (
    BACKGROUNDS,
    DEFAULT_HOLDOUT,
    MAX_COUNT,
    NO_HOLDOUT,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZES,
    Holdout,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapesError,
    World,
    check_image_size,
    check_name,
    distinguishable,
    realize,
    render,
)

KINDS: tuple[str, ...] = ("single", "count", "pair", "relation")
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"single": 0.25, "count": 0.25, "pair": 0.25, "relation": 0.25}
RICH_KINDS: tuple[str, ...] = (*KINDS, "triple", "count_pair")
RICH_KIND_WEIGHTS: dict[str, float] = {"single": 0.1, "count": 0.15, "pair": 0.15, "relation": 0.2, "triple": 0.2,
                                       "count_pair": 0.2}
WORLD_KINDS: dict[World, tuple[str, ...]] = {World.CLASSIC: KINDS, World.RICH: RICH_KINDS}
WORLD_KIND_WEIGHTS: dict[World, dict[str, float]] = {World.CLASSIC: DEFAULT_KIND_WEIGHTS,
                                                      World.RICH: RICH_KIND_WEIGHTS}


def as_world(world: World | str) -> World:
    """``world`` as a :class:`~opensd.shapes.world.World`; a one-line error naming the worlds if it is none."""
    try:
        return World(world)
    except ValueError:
        raise ShapesError(f"unknown world {world!r}; allowed: {', '.join(World)}") from None


# ----------------------------------------------------------------------------- drawing specs

def _maybe(rng: random.Random, p: float, value):
    return value if rng.random() < p else None


def _draw_spec(kind: str, rng: random.Random) -> PromptSpec:
    """One spec of ``kind`` (holdout not applied)."""
    background = rng.choice(tuple(BACKGROUNDS)) if rng.random() < 0.3 else None
    colors, sizes = tuple(PALETTE), tuple(SIZES)
    if kind == "single":
        o = ObjectSpec(rng.choice(SHAPES), _maybe(rng, 0.8, rng.choice(colors)), _maybe(rng, 0.5, rng.choice(sizes)))
        return PromptSpec((o,), None, background)
    if kind == "count":
        n = rng.choice((1, 2, 2, 3, 3, 4, 4))
        o = ObjectSpec(rng.choice(SHAPES), _maybe(rng, 0.7, rng.choice(colors)), _maybe(rng, 0.4, rng.choice(sizes)), n)
        return PromptSpec((o,), None, background)
    if kind in ("pair", "relation"):
        while True:
            mode = rng.random()  # both colours stated (0.6) / none (0.25) / one (0.15)
            c: tuple[str | None, str | None] = (rng.choice(colors), rng.choice(colors))
            if mode >= 0.6:
                c = (None, None) if mode < 0.85 else (c[0], None)
            if rng.random() < 0.5:
                c = (c[1], c[0])
            a = ObjectSpec(rng.choice(SHAPES), c[0], _maybe(rng, 0.4, rng.choice(sizes)))
            b = ObjectSpec(rng.choice(SHAPES), c[1], _maybe(rng, 0.4, rng.choice(sizes)))
            if distinguishable(a, b):
                break
        relation = rng.choice(RELATIONS) if kind == "relation" else None
        return PromptSpec((a, b), relation, background)
    if kind in ("triple", "count_pair"):
        return draw_rich_spec(kind, rng, background)
    raise ShapesError(f"unknown kind {kind!r}; allowed: {', '.join(RICH_KINDS)}")


def _group(rng: random.Random, count: int, p_color: float = 0.7, p_size: float = 0.3) -> ObjectSpec:
    return ObjectSpec(rng.choice(SHAPES), _maybe(rng, p_color, rng.choice(tuple(PALETTE))),
                      _maybe(rng, p_size, rng.choice(tuple(SIZES))), count)


def draw_rich_spec(kind: str, rng: random.Random, background: str | None = None) -> PromptSpec:
    """A spec (holdout not applied) of the rich world's own kinds: ``triple``, three groups (one of them of two
    objects 30% of the time), or ``count_pair``, two or three objects of a shape beside a group
    of one or two (MAX_COUNT objects at most), in either order."""
    if kind == "triple":
        counts = [1, 1, 1]
        if rng.random() < 0.3:
            counts[rng.randrange(3)] = 2
    else:
        n = rng.choice((2, 2, 3))
        counts = [n, 1 if n + 2 > MAX_COUNT else rng.choice((1, 1, 2))]
        if rng.random() < 0.5:
            counts.reverse()
    while True:
        groups = [_group(rng, c) for c in counts]
        if all(distinguishable(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]):
            return PromptSpec(tuple(groups), None, background)


def sample_spec(
    kind: str, rng: random.Random, holdout: Holdout | None = None, world: World = World.CLASSIC
) -> PromptSpec:
    """A random spec of ``kind`` (one of ``world``'s kinds) that asserts nothing ``holdout`` keeps out."""
    check_name("kind", kind, WORLD_KINDS[as_world(world)], optional=False)
    holdout = holdout or NO_HOLDOUT
    while True:
        spec = _draw_spec(kind, rng)
        if not holdout.touches(spec):
            return spec


# ----------------------------------------------------------------------------- samples and the dataset

@dataclass(frozen=True)
class Sample:
    """An image, a caption true of it, the exact scene graph, the caption's kind and spec (and in
    the rich world the caption's wording, :class:`~opensd.shapes.captions.Wording`)."""

    image: Image.Image = field(compare=False)
    caption: str
    scene: Scene
    kind: str
    spec: PromptSpec
    wording: Wording | None = None


class ShapesDataset:
    """Endless, indexable shapes dataset: ``ds[i]`` depends only on ``(seed, i)``.

    Args:
        seed: the dataset's seed.
        image_size: side of the rendered square images (16..2048; 32/64/128 typical).
        kinds: caption kinds and their weights, from the world's kinds (KINDS: "single",
            "count", "pair", "relation"; RICH_KINDS adds "triple" and "count_pair");
            default ``DEFAULT_KIND_WEIGHTS`` (equal) or ``RICH_KIND_WEIGHTS``.
        holdout: combinations kept out of every sample (default ``DEFAULT_HOLDOUT``;
            ``None`` keeps nothing out).
        world: ``World.CLASSIC`` (the default model's world) or ``World.RICH``.
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        kinds: Mapping[str, float] | None = None,
        holdout: Holdout | None = DEFAULT_HOLDOUT,
        world: World = World.CLASSIC,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ShapesError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.image_size = check_image_size(image_size)
        self.world = as_world(world)
        kinds = dict(WORLD_KIND_WEIGHTS[self.world] if kinds is None else kinds)
        for k, w in kinds.items():
            check_name("kind", k, WORLD_KINDS[self.world], optional=False)
            if not (isinstance(w, (int, float)) and w >= 0 and math.isfinite(w)):
                raise ShapesError(f"weight of kind {k!r} must be a finite number >= 0, got {w!r}")
        if not kinds or sum(kinds.values()) <= 0:
            raise ShapesError(f"kinds needs at least one positive weight; kinds are {', '.join(KINDS)}")
        self.kinds = kinds
        self.holdout = holdout
        self._names = list(kinds)
        self._weights = [kinds[k] for k in self._names]

    def __getitem__(self, index: int) -> Sample:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"ShapesDataset index must be an integer >= 0, got {index!r}")
        if self.world is World.RICH:
            return self._rich(int(index))
        rng = random.Random(f"opensd-shapes:{self.seed}:{int(index)}")
        kind = rng.choices(self._names, self._weights)[0]
        spec = sample_spec(kind, rng, self.holdout)
        scene = realize(spec, rng, self.image_size, self.holdout)
        text = caption(spec, rng, say_one=(kind == "count" and rng.random() < 0.5))
        return Sample(render(scene), text, scene, kind, spec)

    def _rich(self, index: int) -> Sample:
        rng = random.Random(f"opensd-shapes-rich:{self.seed}:{index}")
        kind = rng.choices(self._names, self._weights)[0]
        spec = sample_spec(kind, rng, self.holdout, World.RICH)
        scene = realize(spec, rng, self.image_size, self.holdout)
        wording = draw_wording(spec, rng, self.holdout, say_one=0.4 if kind in ("count", "count_pair") else 0.1)
        return Sample(render(scene), write(spec, wording), scene, kind, spec, wording)

    def __iter__(self) -> Iterator[Sample]:
        i = 0
        while True:
            yield self[i]
            i += 1

    def take(self, n: int, start: int = 0) -> list[Sample]:
        """Samples ``start .. start + n - 1``."""
        return [self[i] for i in range(start, start + n)]
