"""The shapes world's distribution report: Fréchet distance, precision/recall and memorization
of a generator's images in the shapes feature net's space (and the same net at random), next
to the real-vs-real baseline, and the sanity check of those metrics on corrupted scenes.

The metrics themselves are generic (:mod:`opensd.eval.distribution`); what is the world's here
is the feature space (:mod:`opensd.shapes.features`) and the corruptions of its scenes.
``python -m opensd.shapes.distribution --n 1000`` prints :func:`corruption_table`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from opensd.eval.distribution import (
    DistributionError,
    feature_metrics,
    frechet_distance,
    memorization_threshold,
    nearest_distances,
    precision_recall,
)
from opensd.shapes.dataset import Sample, ShapesDataset
from opensd.shapes.features import ShapesFeatureNet, extract_features, load_feature_net
from opensd.shapes.world import SIZES, render

Images = Sequence[Image.Image] | torch.Tensor | np.ndarray


def distribution_report(
    generated_images: Images,
    reference_images: Images,
    train_images: Images | None = None,
    *,
    nets: Mapping[str, ShapesFeatureNet] | None = None,
    k: int = 3,
    percentile: float = 1.0,
    batch_size: int = 256,
    random_seed: int = 0,
) -> dict:
    """All distribution metrics for ``generated_images``, next to the real-vs-real baseline.

    With ``n = len(generated_images)``, ``reference_images`` (real, not in the
    training set, i.i.d. in order) must hold at least ``2 n`` images: ``R1 =
    reference[:n]`` is the set everything is compared with and ``R2 =
    reference[n:2n]`` plays a perfect generator (the baseline). Per feature net
    (default ``{"shapes": trained, "random": same architecture at random_seed}``):

    * ``generated``: FD(generated, R1), precision/recall of generated against R1,
      and, when ``train_images`` is given, the memorization rate of generated;
    * ``real_baseline``: the same for R2 in place of generated (its memorization is R1's);
    * ``fd_ratio``: generated FD over baseline FD (1 is as good as real data; None if the baseline is 0);
    * ``memorization_threshold``: the ``percentile``-th percentile of R2's
      nearest-train distances (R2 is the held-out test set).

    Returns a JSON-able dict ``{"n", "k", "percentile", "n_train", "nets": {name: {...}}}``.
    """
    n = len(generated_images)
    if n <= k:
        raise DistributionError(f"need more than k={k} generated images, got {n}")
    if len(reference_images) < 2 * n:
        raise DistributionError(
            f"reference_images must hold at least 2 x {n} = {2 * n} real images (two disjoint sets of the "
            f"generated size for the real-vs-real baseline), got {len(reference_images)}"
        )
    if train_images is not None and len(train_images) < 1:
        raise DistributionError("train_images is empty; pass None to skip memorization")
    if nets is None:
        nets = {"shapes": load_feature_net("shapes"), "random": load_feature_net("random", seed=random_seed)}
    r1_images, r2_images = reference_images[:n], reference_images[n : 2 * n]
    report: dict = {"n": n, "k": k, "percentile": percentile, "n_train": None if train_images is None else len(train_images), "nets": {}}
    for name, net in nets.items():
        gen = extract_features(net, generated_images, batch_size)
        r1 = extract_features(net, r1_images, batch_size)
        r2 = extract_features(net, r2_images, batch_size)
        train = threshold = None
        if train_images is not None:
            train = extract_features(net, train_images, batch_size)
            threshold = memorization_threshold(train, r2, percentile)
        generated = feature_metrics(gen, r1, k, train, threshold)
        baseline = feature_metrics(r2, r1, k, None, None)
        if train is not None:
            baseline["memorization"] = float((nearest_distances(r1, train) < threshold).mean())
        entry = {
            "feature_dim": int(gen.shape[1]),
            "generated": generated,
            "real_baseline": baseline,
            "fd_ratio": generated["fd"] / baseline["fd"] if baseline["fd"] > 0 else None,
        }
        if threshold is not None:
            entry["memorization_threshold"] = threshold
        report["nets"][name] = entry
    return report


# ----------------------------------------------------------------------------- sanity check on the shapes world

def _replace_objects(s: Sample, **changes: Any) -> Image.Image:
    """``s``'s scene re-rendered with every object's fields replaced by ``changes``."""
    objects = tuple(dataclasses.replace(o, **changes) for o in s.scene.objects)
    return render(dataclasses.replace(s.scene, objects=objects))


def _noise(s: Sample) -> Image.Image:
    rng = np.random.default_rng(zlib.crc32(repr(s.scene).encode()))  # the same noise in every run
    a = np.asarray(s.image, np.float32) + rng.normal(0, 8, (*s.image.size[::-1], 3))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


# name -> (world sample -> corrupted image); the first two are mild, the rest are failures
CORRUPTIONS: dict[str, Callable[[Sample], Image.Image]] = {
    "noise 8/255": _noise,
    "blurred, sigma 1/32 side": lambda s: s.image.filter(ImageFilter.GaussianBlur(s.image.size[0] / 32)),
    "blurred, sigma 1/16 side": lambda s: s.image.filter(ImageFilter.GaussianBlur(s.image.size[0] / 16)),
    "all circles": lambda s: _replace_objects(s, shape="circle"),
    "all small": lambda s: _replace_objects(s, size="small", r=SIZES["small"]),
    "all red": lambda s: _replace_objects(s, color="red"),
    "grayscale": lambda s: s.image.convert("L").convert("RGB"),
    "blank (background only)": lambda s: render(dataclasses.replace(s.scene, objects=())),
}
SANITY_SEED = 5150


def corruption_table(
    n: int = 1000,
    image_size: int = 64,
    seed: int = SANITY_SEED,
    k: int = 3,
    corruptions: Sequence[str] | None = None,
) -> dict:
    """Real-vs-real and real-vs-corrupted metrics on the shapes world, in both feature spaces.

    Samples ``0..3n`` of ``ShapesDataset(seed, image_size)`` (default holdout): R1
    = the first n, R2 = the next n (the real-vs-real baseline), and the last n,
    clean ("fresh real") and under each of ``corruptions`` (names from
    ``CORRUPTIONS``, default all), compared with R1.
    Returns ``{"n", "image_size", "seed", "k", "nets": {net: {row: {"fd", "fd_ratio",
    "precision", "recall"}}}}`` with rows "real baseline", "fresh real" and the corruptions.
    """
    if n < k + 2:
        raise DistributionError(f"n must be at least k + 2 = {k + 2}, got {n}")
    names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    unknown = [c for c in names if c not in CORRUPTIONS]
    if unknown:
        raise DistributionError(f"unknown corruptions {unknown}; allowed: {', '.join(CORRUPTIONS)}")
    samples = ShapesDataset(seed=seed, image_size=image_size).take(3 * n)
    r1 = [s.image for s in samples[:n]]
    r2 = [s.image for s in samples[n : 2 * n]]
    sets = {"real baseline": r2, "fresh real": [s.image for s in samples[2 * n :]]}
    for name in names:
        sets[name] = [CORRUPTIONS[name](s) for s in samples[2 * n :]]
    nets = {"shapes": load_feature_net("shapes"), "random": load_feature_net("random", seed=0)}
    out: dict = {"n": n, "image_size": image_size, "seed": seed, "k": k, "nets": {}}
    for net_name, net in nets.items():
        real = extract_features(net, r1)
        rows = {}
        for name, images in sets.items():
            fake = extract_features(net, images)
            precision, recall = precision_recall(real, fake, k)
            rows[name] = {"fd": frechet_distance(fake, real), "precision": precision, "recall": recall}
        base = rows["real baseline"]["fd"]
        for row in rows.values():
            row["fd_ratio"] = row["fd"] / base
        out["nets"][net_name] = rows
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m opensd.shapes.distribution --n 1000``: print :func:`corruption_table` as markdown."""
    ap = argparse.ArgumentParser(description="Distribution metrics on the shapes world: real vs real vs corrupted.")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SANITY_SEED)
    ap.add_argument("--json", action="store_true", help="print the dict as JSON instead of a table")
    args = ap.parse_args(argv)
    t0 = time.time()
    table = corruption_table(args.n, args.size, args.seed)
    if args.json:
        print(json.dumps(table, indent=1))
        return
    print(f"n = {args.n} per set, {args.size} px, seed {args.seed}, k = {table['k']} ({time.time() - t0:.0f} s)\n")
    nets = list(table["nets"])
    print("| set vs R1 | " + " | ".join(f"FD {n} (x baseline) | P / R {n}" for n in nets) + " |")
    print("|---" * (1 + 2 * len(nets)) + "|")
    for row in table["nets"][nets[0]]:
        cells = []
        for n in nets:
            r = table["nets"][n][row]
            cells += [f"{r['fd']:.4g} ({r['fd_ratio']:.1f}x)", f"{r['precision']:.2f} / {r['recall']:.2f}"]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
