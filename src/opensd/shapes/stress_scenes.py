"""Hard inputs for the shapes-world scorer: scenes whose objects touch or overlap, and images
that are no scene at all. The scorer's tests and ``scripts/scorer_accuracy.py`` draw from here.

* :func:`touching_scene`: 2-4 objects in a chain, each box touching the previous one or
  overlapping it a little (the shapes world itself keeps boxes ``MIN_GAP`` apart; a
  generator does not);
* :func:`non_scene`: noise of several kinds, a flat colour, a gradient, random blobs.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

import opensd.shapes as S

NON_SCENE_KINDS = ("uniform noise", "gaussian noise", "blocky noise", "smooth noise", "blobs", "flat colour",
                   "gradient", "colour noise")


def touching_scene(rng: random.Random, size: int) -> S.Scene:
    """2-4 objects in a chain, each box a gap of -0.03..0.01 of the side from the previous one
    (0: the boxes touch; below: they overlap, the later object drawn over the earlier).

    Half the scenes use one colour for all objects. Objects are placed left to right or top to
    bottom (a random axis per scene) with a random offset across the chain; rejected and redrawn
    when a box would leave the image.
    """
    while True:
        n = rng.choice((2, 2, 3, 4))
        same = rng.random() < 0.5
        colour = rng.choice(list(S.PALETTE))
        horizontal = rng.random() < 0.5
        objs, pos = [], rng.uniform(0.05, 0.15)
        across = rng.uniform(0.3, 0.7)
        for _ in range(n):
            size_name = rng.choice(list(S.SIZES))
            r = S.SIZES[size_name]
            c = pos + r
            off = across + rng.uniform(-0.08, 0.08)
            cx, cy = (c, off) if horizontal else (off, c)
            objs.append(S.SceneObject(rng.choice(S.SHAPES), colour if same else rng.choice(list(S.PALETTE)),
                                      size_name, cx, cy, r))
            pos = c + r + rng.uniform(-0.03, 0.01)
        if all(min(o.box()) >= 0.01 and max(o.box()) <= 0.99 for o in objs):
            return S.Scene(tuple(objs), rng.choice(list(S.BACKGROUNDS)), size)


def non_scene(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image with no shapes-world object in it."""
    s = size
    if kind == "uniform noise":
        return rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    if kind == "gaussian noise":
        return np.clip(rng.normal(rng.uniform(60, 200), 60, (s, s, 3)), 0, 255).astype(np.uint8)
    if kind in ("blocky noise", "smooth noise", "blobs"):
        cells = {"blocky noise": s // 4, "smooth noise": s // 8, "blobs": 3}[kind]
        low = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        return np.asarray(low.resize((s, s), Image.Resampling.NEAREST if kind == "blocky noise" else Image.Resampling.BICUBIC))
    if kind == "flat colour":
        return np.broadcast_to(rng.integers(0, 256, 3), (s, s, 3)).astype(np.uint8)
    if kind == "gradient":
        c0, c1 = rng.integers(0, 256, (2, 3))
        ramp = c0 + (c1 - c0) * np.linspace(0, 1, s)[:, None]  # (s, 3)
        img = np.broadcast_to(ramp[:, None, :], (s, s, 3))
        return np.ascontiguousarray(img if rng.random() < 0.5 else img.transpose(1, 0, 2)).astype(np.uint8)
    if kind == "colour noise":
        return np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (s, s, 3)), 0, 255).astype(np.uint8)
    raise S.ShapesError(f"unknown non-scene kind {kind!r}; allowed: {', '.join(NON_SCENE_KINDS)}")
