"""The shapes world as an endless, seeded, captioned dataset: ``ShapesDataset(seed)[i]``.

Item ``i`` depends only on ``(seed, i)``: a caption kind drawn by weight from ``KINDS``,
a spec of that kind that asserts nothing the holdout keeps out (:func:`sample_spec`), a
scene that makes it exactly true (:func:`opensd.shapes.world.realize`), the scene's
render, and a caption of the spec (:func:`opensd.shapes.captions.caption`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from opensd.shapes.captions import caption
from opensd.shapes.world import (
    BACKGROUNDS,
    DEFAULT_HOLDOUT,
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
    check_image_size,
    check_name,
    distinguishable,
    realize,
    render,
)

KINDS: tuple[str, ...] = ("single", "count", "pair", "relation")
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"single": 0.25, "count": 0.25, "pair": 0.25, "relation": 0.25}


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
    raise ShapesError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")


def sample_spec(kind: str, rng: random.Random, holdout: Holdout | None = None) -> PromptSpec:
    """A random spec of ``kind`` that asserts nothing ``holdout`` keeps out."""
    holdout = holdout or NO_HOLDOUT
    while True:
        spec = _draw_spec(kind, rng)
        if not holdout.touches(spec):
            return spec


# ----------------------------------------------------------------------------- samples and the dataset

@dataclass(frozen=True)
class Sample:
    """An image, a caption true of it, the exact scene graph, the caption's kind and spec."""

    image: Image.Image = field(compare=False)
    caption: str
    scene: Scene
    kind: str
    spec: PromptSpec


class ShapesDataset:
    """Endless, indexable shapes dataset: ``ds[i]`` depends only on ``(seed, i)``.

    Args:
        seed: the dataset's seed.
        image_size: side of the rendered square images (16..2048; 32/64/128 typical).
        kinds: caption kinds and their weights, from KINDS ("single", "count",
            "pair", "relation"); default equal weights.
        holdout: combinations kept out of every sample (default ``DEFAULT_HOLDOUT``;
            ``None`` keeps nothing out).
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        kinds: Mapping[str, float] | None = None,
        holdout: Holdout | None = DEFAULT_HOLDOUT,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ShapesError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.image_size = check_image_size(image_size)
        kinds = dict(DEFAULT_KIND_WEIGHTS if kinds is None else kinds)
        for k, w in kinds.items():
            check_name("kind", k, KINDS, optional=False)
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
        rng = random.Random(f"opensd-shapes:{self.seed}:{int(index)}")
        kind = rng.choices(self._names, self._weights)[0]
        spec = sample_spec(kind, rng, self.holdout)
        scene = realize(spec, rng, self.image_size, self.holdout)
        text = caption(spec, rng, say_one=(kind == "count" and rng.random() < 0.5))
        return Sample(render(scene), text, scene, kind, spec)

    def __iter__(self) -> Iterator[Sample]:
        i = 0
        while True:
            yield self[i]
            i += 1

    def take(self, n: int, start: int = 0) -> list[Sample]:
        """Samples ``start .. start + n - 1``."""
        return [self[i] for i in range(start, start + n)]
