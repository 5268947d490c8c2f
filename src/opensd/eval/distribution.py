"""Distribution metrics in feature space: Fréchet distance, precision/recall, memorization.

All three compare sets of feature vectors (rows of ``(N, D)`` arrays, e.g. from
:func:`opensd.eval.features.extract_features`):

* :func:`frechet_distance`: the Fréchet (2-Wasserstein) distance between Gaussians
  fitted to two sets, FID when the features are Inception's (Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``.
* :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al.
  2019, "Improved Precision and Recall Metric for Assessing Generative Models"):
  each set's manifold is the union of balls reaching every point's k-th nearest
  neighbour; precision is the share of fakes inside the real manifold, recall the
  share of reals inside the fake manifold.
* :func:`memorization_rate`: the share of generated samples closer to their
  nearest training sample than all but ``percentile`` % of held-out real samples
  are (a copy detector in the spirit of Carlini et al. 2023, "Extracting Training
  Data from Diffusion Models", with the threshold calibrated on real test data).

:func:`distribution_report` computes all of them for a generator's images in two
feature spaces (the trained shapes net and the same architecture at random) and
always next to the real-vs-real baseline: the same metrics for a second real set
of the same size, which is what a perfect generator would score at this sample
size (Fréchet distance is biased upward for finite sets).

Pure numpy + torch; the matrix square root goes through symmetric
eigendecompositions in float64 (no scipy at run time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from opensd.data.shapes import SIZES, Sample, ShapesDataset, render
from opensd.errors import OpenSDError
from opensd.eval.features import ShapesFeatureNet, extract_features, load_feature_net


class DistributionError(OpenSDError):
    """Bad input to a distribution metric (wrong shapes, too few samples, bad parameters)."""


# ----------------------------------------------------------------------------- helpers

def _features(x: np.ndarray | torch.Tensor, name: str, min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite float64 (N, D) array with N >= ``min_rows``, else DistributionError."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise DistributionError(f"{name} must be a 2-D (N, D) feature array, got shape {a.shape}")
    if a.shape[0] < min_rows or a.shape[1] < 1:
        raise DistributionError(f"{name} needs at least {min_rows} rows and 1 column, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DistributionError(f"{name} contains NaN or infinite values")
    return a


def _same_dim(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise DistributionError(f"{names} have different feature sizes: {a.shape[1]} vs {b.shape[1]}")


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _sq_dists(q: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Q, C) in float64: |q|^2 + |c|^2 - 2 q.c, clipped at 0."""
    d = (q * q).sum(1, keepdim=True) + c_sq[None, :] - 2 * q @ c.T
    return d.clamp_(min=0)


# ----------------------------------------------------------------------------- Fréchet distance

def gaussian_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of ``feats`` (N >= 2 rows), float64."""
    a = _features(feats, "feats", min_rows=2)
    return a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``, where
    ``tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2)))``: S1 S2 is similar
    to that symmetric PSD matrix, so both symmetric eigendecompositions are stable
    (float64, tiny negative eigenvalues from round-off clipped to 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise DistributionError(
            f"expected means (D,) and covariances (D, D) of one D; got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}"
        )
    for name, m in (("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(m).all() or not np.allclose(m, m.T, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(m).max())):
            raise DistributionError(f"{name} must be a finite symmetric covariance matrix")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula; N >= 2 each)."""
    a, b = _features(feats_a, "feats_a", 2), _features(feats_b, "feats_b", 2)
    _same_dim(a, b, "feats_a and feats_b")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


# ----------------------------------------------------------------------------- nearest neighbours

def knn_radii(feats: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 1024) -> np.ndarray:
    """Distance from each row to its k-th nearest *other* row (N,), float64."""
    a = _features(feats, "feats", min_rows=2)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < a.shape[0]:
        raise DistributionError(f"k must be an integer in 1..{a.shape[0] - 1} (set size - 1), got {k!r}")
    x = torch.from_numpy(a)
    x_sq = (x * x).sum(1)
    out = []
    for i in range(0, len(x), chunk):
        d = _sq_dists(x[i : i + chunk], x, x_sq)  # (chunk, N); each row holds its own 0
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out).sqrt().numpy()


def nearest_distances(queries: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """Distance from each query row to its nearest reference row (Q,), float64."""
    q, r = _features(queries, "queries"), _features(reference, "reference")
    _same_dim(q, r, "queries and reference")
    qt, rt = torch.from_numpy(q), torch.from_numpy(r)
    r_sq = (rt * rt).sum(1)
    out = [_sq_dists(qt[i : i + chunk], rt, r_sq).min(1).values for i in range(0, len(qt), chunk)]
    return torch.cat(out).sqrt().numpy()


def _inside_manifold(queries: np.ndarray, centers: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Whether each query lies in some ball ``|q - c_j| <= r_j`` (Q,) bool."""
    qt, ct = torch.from_numpy(queries), torch.from_numpy(centers)
    c_sq, r_sq = (ct * ct).sum(1), torch.from_numpy(radii) ** 2
    out = [(_sq_dists(qt[i : i + chunk], ct, c_sq) <= r_sq[None, :]).any(1) for i in range(0, len(qt), chunk)]
    return torch.cat(out).numpy()


def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ``(precision, recall)``.

    The real manifold is the union over real points of balls whose radius reaches
    the point's k-th nearest other real point (likewise for fakes). Precision: the
    share of fakes inside the real manifold; recall: the share of reals inside the
    fake manifold. Pairwise distances go in ``chunk``-row blocks, float64.
    """
    r, f = _features(real, "real", k + 1), _features(fake, "fake", k + 1)
    _same_dim(r, f, "real and fake")
    precision = _inside_manifold(f, r, knn_radii(r, k, chunk), chunk).mean()
    recall = _inside_manifold(r, f, knn_radii(f, k, chunk), chunk).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- memorization

def memorization_threshold(
    train: np.ndarray | torch.Tensor, test: np.ndarray | torch.Tensor, percentile: float = 1.0
) -> float:
    """The ``percentile``-th percentile of held-out test samples' nearest-train distances."""
    if not 0 <= percentile <= 100:
        raise DistributionError(f"percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(nearest_distances(test, train), percentile))


def memorization_rate(
    generated: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    test: np.ndarray | torch.Tensor,
    percentile: float = 1.0,
) -> float:
    """Share of generated samples whose nearest-train distance is below the memorization threshold.

    The threshold is the ``percentile``-th percentile of the nearest-train distances
    of held-out real ``test`` samples (see :func:`memorization_threshold`), so fresh
    samples from the training distribution score about ``percentile / 100`` and
    copies of training samples score 1.
    """
    g = _features(generated, "generated")
    threshold = memorization_threshold(train, test, percentile)
    return float((nearest_distances(g, train) < threshold).mean())


# ----------------------------------------------------------------------------- the report

Images = Sequence[Image.Image] | torch.Tensor | np.ndarray


def _metrics(fake: np.ndarray, real: np.ndarray, k: int, train: np.ndarray | None, threshold: float | None) -> dict:
    precision, recall = precision_recall(real, fake, k)
    out = {"fd": frechet_distance(fake, real), "precision": precision, "recall": recall}
    if train is not None and threshold is not None:
        out["memorization"] = float((nearest_distances(fake, train) < threshold).mean())
    return out


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
        generated = _metrics(gen, r1, k, train, threshold)
        baseline = _metrics(r2, r1, k, None, None)
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

def _replace_objects(s: Sample, **changes: object) -> Image.Image:
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
    """``python -m opensd.eval.distribution --n 1000``: print :func:`corruption_table` as markdown."""
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
