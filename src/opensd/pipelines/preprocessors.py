"""Control-image preprocessors that need no downloaded weights (A1111's "Preprocessor").

A ControlNet is trained on one kind of control map (edges, scribbles, a segmentation);
a preprocessor turns an ordinary image into that map. These are computed here with numpy
and torch only (no OpenCV, no detector weights); each returns an 8-bit RGB image:

========================  =============================================================
name (aliases)            what it makes
========================  =============================================================
``none``                  the image as it is: a ready-made control map (depth, pose...)
``canny``                 Canny edges (Canny 1986), white on black: 3x3 Sobel gradients
                          (L1 magnitude, the strongest colour channel, as OpenCV's
                          ``cv2.Canny``), non-maximum suppression, hysteresis between
                          ``low`` and ``high`` (threshold_a, threshold_b; A1111's 100, 200)
``scribble``              A1111's ``scribble_xdog``: pixels darker than their surroundings
(``scribble_xdog``)       by more than threshold_a / 2 (default 32) in a difference of
                          Gaussians (sigma 0.5 and 5), white strokes on black
``lineart``               A1111's ``lineart_standard``: how much darker each pixel is than a
(``lineart_standard``)    sigma-6 blur of the image, normalised by its median: gray lines on
                          black, from a drawing's black lines on white
``invert``                255 - image: a black-on-white drawing as the white-on-black
                          scribble or lineart map ControlNets take
``segmentation``          the image as it is, marked as a map of flat colours (a
(``seg``, ``layout``)     segmentation or layout map): resized with nearest neighbours only,
                          so no new colour appears (:mod:`opensd.pipelines.control_resize`)
========================  =============================================================

``resolution`` (A1111's "Preprocessor resolution"): the image is first resized so its
shorter side has that many pixels; None: it is processed at its own size. Unknown names
are a :class:`PreprocessorError` listing the known ones.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from opensd.errors import OpenSDError


class PreprocessorError(OpenSDError):
    """An unknown preprocessor or a bad setting of one; the message lists what is allowed."""

    kind = "PreprocessorError"


class MapKind(enum.Enum):
    """What a control map holds, which decides how it may be resized."""

    IMAGE = "image"  # continuous tones: area (down) or bicubic (up)
    EDGES = "edges"  # binary lines: resized, then thresholded again
    FLAT = "flat"  # flat colours (segmentation, layout): nearest neighbours only


@dataclass(frozen=True)
class Preprocessor:
    name: str
    kind: MapKind
    run: Callable[[np.ndarray, float | None, float | None], np.ndarray]  # (H, W, 3) uint8 -> (H, W, 3) uint8


# ----------------------------------------------------------------------------- filters


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) float32 blurred by a Gaussian of ``sigma`` (radius 4 sigma, OpenCV's for float
    images), mirrored at the borders (OpenCV's default, BORDER_REFLECT_101)."""
    r = max(1, int(round(4 * sigma)))
    r = min(r, x.shape[0] - 1, x.shape[1] - 1) if min(x.shape[:2]) > 1 else 0
    if r < 1:
        return x.copy()
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).float()
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[:, None]  # (C, 1, H, W)
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return t[:, 0].numpy().transpose(1, 2, 0)


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (dx, dy) of (H, W) float32, replicated borders."""
    p = np.pad(gray, 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a[y + dy, x + dx]`` at every (y, x) (|dy|, |dx| <= 1), 0 outside."""
    h, w = a.shape
    return np.pad(a, 1)[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def canny(image: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Canny edges of an (H, W, 3) uint8 image, 255 on 0, as ``cv2.Canny(image, low, high)``
    computes them (without its integer shortcuts, so a few edge pixels may differ)."""
    low, high = (100.0 if low is None else low), (200.0 if high is None else high)
    if not 0 <= low <= high:
        raise PreprocessorError(f"canny: the thresholds must satisfy 0 <= low <= high, got low {low}, high {high}")
    grads = [_sobel(image[..., c].astype(np.float32)) for c in range(image.shape[2])]
    mags = np.stack([np.abs(dx) + np.abs(dy) for dx, dy in grads])  # (C, H, W)
    best = mags.argmax(0)
    mag = np.take_along_axis(mags, best[None], 0)[0]
    dx = np.take_along_axis(np.stack([g[0] for g in grads]), best[None], 0)[0]
    dy = np.take_along_axis(np.stack([g[1] for g in grads]), best[None], 0)[0]
    ax, ay = np.abs(dx), np.abs(dy)
    tan22, tan67 = np.tan(np.pi / 8), np.tan(3 * np.pi / 8)
    horizontal = ay <= ax * tan22  # the gradient points along x: compare left and right
    vertical = ay > ax * tan67
    s = np.where(dx * dy > 0, 1, -1)
    diag_a = np.where(s > 0, _shift(mag, 1, 1), _shift(mag, 1, -1))
    diag_b = np.where(s > 0, _shift(mag, -1, -1), _shift(mag, -1, 1))
    before = np.where(horizontal, _shift(mag, 0, -1), np.where(vertical, _shift(mag, -1, 0), diag_b))
    after = np.where(horizontal, _shift(mag, 0, 1), np.where(vertical, _shift(mag, 1, 0), diag_a))
    peak = (mag > before) & (mag >= after) & (mag > low)
    strong = torch.from_numpy(peak & (mag > high))[None, None].float()
    weak = torch.from_numpy(peak)[None, None].float()
    while True:  # hysteresis: weak pixels 8-connected to a strong one become strong
        grown = F.max_pool2d(strong, 3, stride=1, padding=1) * weak
        if torch.equal(grown, strong):
            break
        strong = grown
    edges = (strong[0, 0].numpy() > 0).astype(np.uint8) * 255
    return np.repeat(edges[..., None], 3, axis=2)


def scribble_xdog(image: np.ndarray, threshold: float | None = None, _: float | None = None) -> np.ndarray:
    """White strokes where the image is darker than its surroundings (difference of Gaussians)."""
    threshold = 32.0 if threshold is None else threshold
    x = image.astype(np.float32)
    dog = np.min(_gaussian(x, 5.0) - _gaussian(x, 0.5), axis=2)  # > 0 where darker than around
    out = np.where(2 * dog > threshold, 255, 0).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


def lineart_standard(image: np.ndarray, _a: float | None = None, _b: float | None = None) -> np.ndarray:
    """Dark lines as light ones: ``min_c(blur6 - x)``, scaled so its median line pixel is 127."""
    x = image.astype(np.float32)
    intensity = np.min(_gaussian(x, 6.0) - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity = intensity / max(16.0, float(np.median(lines)) if lines.size else 16.0) * 127
    out = intensity.clip(0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


def _same(image: np.ndarray, _a: float | None = None, _b: float | None = None) -> np.ndarray:
    return image


def _invert(image: np.ndarray, _a: float | None = None, _b: float | None = None) -> np.ndarray:
    return 255 - image


PREPROCESSORS = {p.name: p for p in (
    Preprocessor("none", MapKind.IMAGE, _same),
    Preprocessor("canny", MapKind.EDGES, canny),
    Preprocessor("scribble", MapKind.EDGES, scribble_xdog),
    Preprocessor("lineart", MapKind.IMAGE, lineart_standard),
    Preprocessor("invert", MapKind.IMAGE, _invert),
    Preprocessor("segmentation", MapKind.FLAT, _same),
)}
ALIASES = {"scribble_xdog": "scribble", "lineart_standard": "lineart", "seg": "segmentation", "layout": "segmentation"}


def preprocessor(name: str) -> Preprocessor:
    """The preprocessor called ``name`` (or an alias; case and ``-`` vs ``_`` do not matter)."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else ""
    key = ALIASES.get(key, key)
    if key not in PREPROCESSORS:
        known = ", ".join(list(PREPROCESSORS) + [f"{a} ({t})" for a, t in ALIASES.items()])
        raise PreprocessorError(f"unknown control preprocessor {name!r}; known: {known}")
    return PREPROCESSORS[key]


def preprocess(
    name: str, image: Image.Image, *, resolution: int | None = None,
    threshold_a: float | None = None, threshold_b: float | None = None,
) -> Image.Image:
    """``image`` as the control map preprocessor ``name`` makes (RGB, 8 bits); ``resolution``:
    its shorter side first resized to that many pixels; thresholds as the table says."""
    pre = preprocessor(name)
    image = image.convert("RGB")
    if resolution is not None:
        if not isinstance(resolution, int) or isinstance(resolution, bool) or not 64 <= resolution <= 4096:
            raise PreprocessorError(f"the preprocessor resolution must be an integer from 64 to 4096, got {resolution!r}")
        k = resolution / min(image.size)
        size = (max(1, round(image.size[0] * k)), max(1, round(image.size[1] * k)))
        image = image.resize(size, Image.Resampling.BICUBIC if k > 1 else Image.Resampling.BOX)
    return Image.fromarray(pre.run(np.asarray(image), threshold_a, threshold_b))
