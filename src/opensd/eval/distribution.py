"""Distribution metrics in feature space: Fréchet distance, precision/recall, memorization.

All three compare sets of feature vectors (rows of ``(N, D)`` arrays, e.g. from
:func:`opensd.shapes.features.extract_features`):

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

:func:`feature_metrics` gives the three for one set of features against a real set. The
shapes world's report in its own feature spaces, next to the real-vs-real baseline, is
:func:`opensd.shapes.distribution.distribution_report`.

Pure numpy + torch; the matrix square root goes through symmetric
eigendecompositions in float64 (no scipy at run time).
"""

from __future__ import annotations

import numpy as np
import torch

from opensd.errors import OpenSDError


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


def feature_metrics(fake: np.ndarray, real: np.ndarray, k: int, train: np.ndarray | None = None,
                    threshold: float | None = None) -> dict:
    """``fd``, ``precision``, ``recall`` of features ``fake`` against ``real`` (and ``memorization``
    against ``train`` at ``threshold``, when both are given)."""
    precision, recall = precision_recall(real, fake, k)
    out = {"fd": frechet_distance(fake, real), "precision": precision, "recall": recall}
    if train is not None and threshold is not None:
        out["memorization"] = float((nearest_distances(fake, train) < threshold).mean())
    return out
