"""Ideal shapes against a coverage map: how well one shape explains an object, and which
shapes explain a blob of touching ones (numpy only).

The scorer (:mod:`opensd.shapes.scorer`) reads an object's shape from its coverage map
``alpha`` (0 = background, 1 = full colour). Two questions need the ideal shapes:

* does the shape it read really *look* like that shape? :func:`template` draws the ideal
  circle, square or apex-up triangle in a box and :func:`soft_iou` compares;
* what is a same-coloured blob made of, when objects touch or overlap and merge into one
  component? :func:`decompose` explains it greedily: the ideal shape (of any kind, of any
  size between ``r_min`` and ``r_max``, anywhere) that covers the most uncovered blob
  minus the background it would cover, then the next one on what is left, up to
  ``max_parts``. Every score is a correlation, computed with FFTs.

Coordinates are pixels of the map (x right, y down, pixel ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)``); ``r`` is half the box side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # sub-samples per pixel and axis when drawing a template
RADIUS_STEP = 1.06  # successive template radii grow by this factor
OUTSIDE_COST = 3.0  # what a template loses per background pixel it covers (it gains 1 per blob pixel)
EDGE_BONUS = 0.05  # a tie-break: extra weight of a blob pixel by how much background is around it (_best_fit)


def _box3(m: np.ndarray) -> np.ndarray:
    """3x3 mean (zero outside)."""
    p = np.pad(m, 1)
    h, w = m.shape
    out = np.zeros(m.shape, dtype=(p[:h, :w] + 0).dtype)  # the dtype the sum had starting from 0
    for i in range(3):  # the same order of additions
        for j in range(3):
            out += p[i:i + h, j:j + w]
    return out / 9


def template(shape: str, cx: float, cy: float, rx: float, ry: float, h: int, w: int) -> np.ndarray:
    """Coverage (h, w) float32 of the ideal ``shape`` in the box centred at (cx, cy) with
    half-sides (rx, ry): circle (an ellipse in a non-square box), square, or triangle with
    its apex at the top centre and its base along the bottom."""
    if shape not in SHAPE_NAMES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPE_NAMES)}")
    ss = SUPERSAMPLE
    xs = (np.arange(w * ss) + 0.5) / ss - cx
    ys = (np.arange(h * ss) + 0.5) / ss - cy
    u = xs[None, :] / max(rx, 1e-6)  # (1, W) in box half-widths
    v = ys[:, None] / max(ry, 1e-6)  # (H, 1)
    if shape == "circle":
        inside = u * u + v * v <= 1
    elif shape == "square":
        inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    else:
        inside = (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)


def soft_iou(alpha: np.ndarray, tmpl: np.ndarray) -> float:
    """Intersection over union of two coverage maps of the same shape (alpha clipped to [0, 1])."""
    a = np.clip(alpha, 0, 1)
    union = float(np.maximum(a, tmpl).sum())
    return float(np.minimum(a, tmpl).sum()) / union if union > 0 else 0.0


@dataclass(frozen=True)
class Fit:
    """One ideal shape: centre (cx, cy) and half-side r in pixels of the map, its coverage (h, w)."""

    shape: str
    cx: float
    cy: float
    r: float
    coverage: np.ndarray


def _radii(r_min: float, r_max: float) -> list[float]:
    n = max(1, int(math.floor(math.log(r_max / r_min) / math.log(RADIUS_STEP))) + 1)
    return [r_min * RADIUS_STEP**k for k in range(n)]


@lru_cache(maxsize=16)
def _candidates(r_min: float, r_max: float) -> tuple[tuple[tuple[str, float, float], ...], np.ndarray]:
    """Every template tried: ``((shape, r, centre), ...)`` and the kernels (n, K, K), each
    shape drawn with its centre at ``(centre, centre)`` of a common K x K grid (half-pixel
    offsets only where a pixel is a large part of the shape)."""
    big = 2 * int(math.ceil(r_max)) + 2
    meta, kernels = [], []
    for r in _radii(r_min, r_max):
        k = 2 * int(math.ceil(r)) + 2
        for off in ((0.0, 0.5) if r < 8 else (0.0,)):
            for shape in SHAPE_NAMES:
                meta.append((shape, r, k / 2 + off))
                kernels.append(template(shape, k / 2 + off, k / 2 + off, r, r, big, big))
    return tuple(meta), np.stack(kernels)


@lru_cache(maxsize=64)
def _kernel_spectra(r_min: float, r_max: float, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """FFTs (n, ...) of the flipped kernels at ``size``, and each kernel's mass (n,)."""
    kernels = _candidates(r_min, r_max)[1]
    return np.fft.rfft2(kernels[:, ::-1, ::-1], size), kernels.sum(axis=(1, 2)).astype(np.float64)


def _best_fit(residual: np.ndarray, r_min: float, r_max: float, pad: int) -> tuple[float, Fit | None]:
    """The template and placement of largest gain on ``residual`` (h, w), and that gain.

    A placement gains ``sum(kernel * ((1 + c) * weight - c))`` with ``c = OUTSIDE_COST``: the
    unexplained blob it covers minus ``c`` times the background it covers (a big circle over two
    squares covers most of both, but also much background); all placements of all kernels are
    one batch of FFT correlations.
    Pixels on the rim of what is left weigh up to ``1 + EDGE_BONUS``: a shape inside a longer
    blob (two same-coloured squares side by side) gains as much anywhere along it, and the
    rim makes the placement flush with one end win, so the rest is the other object."""
    h, w = residual.shape
    meta, kernels = _candidates(r_min, r_max)
    big = kernels.shape[1]
    padded = np.pad(residual, pad)  # room for shapes cut by the map's edge
    padded = padded * (1 + EDGE_BONUS * (1 - _box3(padded)))  # the blob's rim counts more
    size = (padded.shape[0] + big, padded.shape[1] + big)
    spectra, mass = _kernel_spectra(r_min, r_max, size)
    corr = np.fft.irfft2(spectra * np.fft.rfft2(padded, size)[None], size)  # (n, H, W)
    gain = (1 + OUTSIDE_COST) * corr - OUTSIDE_COST * mass[:, None, None]  # gain[n, i, j]: kernel n's grid top-left at (i - big + 1, j - big + 1)
    n, i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
    shape, r, centre = meta[n]
    cx, cy = float(j - big + 1 - pad + centre), float(i - big + 1 - pad + centre)
    return float(gain[n, i, j]), Fit(shape, cx, cy, r, template(shape, cx, cy, r, r, h, w))


def decompose(
    alpha: np.ndarray, r_min: float, r_max: float, max_parts: int, min_mass: float, rounds: int = 40
) -> list[Fit]:
    """Greedy explanation of coverage map ``alpha`` (h, w) by at most ``max_parts`` ideal shapes.

    Each step takes the template and placement of largest gain on what is still unexplained
    (``residual = clip(alpha) - sum of the chosen coverages``, floored at 0) and stops when no
    placement gains at least ``min_mass`` pixels. Then :func:`_polish` moves and resizes the
    shapes together (a greedy first pick can straddle two touching objects).
    Shapes may extend past the map's edge (their coverage is cut there). Returns the fits in
    the order found.
    """
    target = np.clip(alpha, 0, 1).astype(np.float64)
    pad = 2 * int(math.ceil(r_max)) + 2
    fits: list[Fit] = []
    residual = target
    for _ in range(max_parts):
        gain, fit = _best_fit(residual, r_min, r_max, pad)
        if fit is None or gain < min_mass:
            break
        fits.append(fit)
        residual = np.maximum(residual - fit.coverage, 0)
    return _polish(target, fits, rounds) if len(fits) > 1 else fits


def _error(target: np.ndarray, fits: list[Fit]) -> float:
    """L1 distance between the map and the union of the fits' coverages."""
    return float(np.abs(target - np.minimum(sum(f.coverage for f in fits), 1)).sum())


def _polish(target: np.ndarray, fits: list[Fit], rounds: int) -> list[Fit]:
    """Local search on :func:`_error`: move a shape half a pixel or resize it a radius step,
    keep the first change that lowers the error, until none does (or ``rounds`` changes)."""
    h, w = target.shape
    fits = list(fits)
    best = _error(target, fits)
    moves = ((0.5, 0, 1), (-0.5, 0, 1), (0, 0.5, 1), (0, -0.5, 1), (0, 0, RADIUS_STEP), (0, 0, 1 / RADIUS_STEP))
    for _ in range(rounds):
        improved = False
        for k, f in enumerate(fits):
            for dx, dy, scale in moves:
                cx, cy, r = f.cx + dx, f.cy + dy, f.r * scale
                trial = fits[:k] + [Fit(f.shape, cx, cy, r, template(f.shape, cx, cy, r, r, h, w))] + fits[k + 1:]
                err = _error(target, trial)
                if err < best - 1e-6:
                    fits, best, improved = trial, err, True
                    break
        if not improved:
            break
    return fits
