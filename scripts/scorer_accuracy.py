"""How exactly the shapes-world scorer reads scenes: the command behind docs/shapes.md's scorer numbers.

    python scripts/scorer_accuracy.py [--n 2000] [--size 32 64]

Three measurements, each over fresh seeded scenes (seeds differ from the tests'):

* ``ground truth``: shapes-world samples (``ShapesDataset(seed=10_000)``, every kind of caption);
  a scene is read right when :func:`opensd.shapes.scorer.parse` finds exactly its objects
  (the multiset of shape, colour and size) and its background;
* ``touching``: two to four objects whose boxes touch or overlap a little (gap -0.03..0.01
  of the side), same or different colours (:func:`opensd.shapes.stress_scenes.touching_scene`); read right as above;
* ``non-scenes``: noise of several kinds, flat colours, gradients and random blobs
  (:func:`opensd.shapes.stress_scenes.non_scene`); read right when no object of a known shape is found;

and the CPU time a parse takes (process time, so a busy machine changes it little).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import numpy as np
from PIL import Image

import opensd.shapes as S
from opensd.shapes.scorer import parse
from opensd.shapes.stress_scenes import NON_SCENE_KINDS, non_scene, touching_scene


def _key(objs) -> Counter:
    return Counter((o.shape, o.color, o.size) for o in objs)


def read_right(scene: S.Scene, image: Image.Image | None = None) -> bool:
    """Whether the scorer finds exactly the scene's objects (shape, colour, size) and background."""
    parsed = parse(S.render(scene) if image is None else image)
    return parsed.background == scene.background and _key(parsed.objects) == _key(scene.objects)


def ground_truth_accuracy(n: int, size: int, seed: int = 10_000) -> float:
    ds = S.ShapesDataset(seed=seed, image_size=size)
    ok = 0
    for i in range(n):
        sample = ds[i]
        ok += read_right(sample.scene, sample.image)
    return ok / n


def touching_accuracy(n: int, size: int, seed: int = 20_000) -> tuple[float, float, float]:
    """(all, same colour, different colours) fractions read right."""
    rng = random.Random(seed + size)
    res = {True: [], False: []}
    for _ in range(n):
        sc = touching_scene(rng, size)
        res[len({o.color for o in sc.objects}) == 1].append(read_right(sc))
    both = res[True] + res[False]
    return sum(both) / len(both), float(np.mean(res[True])), float(np.mean(res[False]))


def non_scene_accuracy(n: int, size: int, seed: int = 30_000) -> dict[str, float]:
    out = {}
    for k, kind in enumerate(NON_SCENE_KINDS):
        rng = np.random.default_rng(seed + 100 * k + size)
        ok = [not any(o.shape for o in parse(non_scene(kind, rng, size)).objects) for _ in range(n)]
        out[kind] = sum(ok) / n
    return out


def parse_cost_ms(images: list) -> float:
    """CPU milliseconds (this process, one thread's worth) per :func:`parse` of ``images``."""
    start = time.process_time()
    for im in images:
        parse(im)
    return 1000 * (time.process_time() - start) / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="scenes per measurement and size")
    ap.add_argument("--size", type=int, nargs="+", default=[32, 64])
    args = ap.parse_args()
    for size in args.size:
        print(f"{size} px: ground truth {ground_truth_accuracy(args.n, size):.4f} of {args.n} scenes")
        t = touching_accuracy(args.n // 2, size)
        print(f"{size} px: touching/overlapping {t[0]:.3f} of {args.n // 2} (same colour {t[1]:.3f}, "
              f"different colours {t[2]:.3f})")
        ns = non_scene_accuracy(max(args.n // 20, 10), size)
        print(f"{size} px: non-scenes with no object " + ", ".join(f"{k} {v:.2f}" for k, v in ns.items()))
        rng = random.Random(size)
        plain = [s.image for s in S.ShapesDataset(seed=40_000, image_size=size).take(200)]
        touching = [S.render(touching_scene(rng, size)) for _ in range(50)]
        print(f"{size} px: parse costs {parse_cost_ms(plain):.1f} ms of CPU per scene, "
              f"{parse_cost_ms(touching):.1f} ms per touching scene")


if __name__ == "__main__":
    main()
