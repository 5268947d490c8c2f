"""Fitting a control map to the output size: A1111's ControlNet resize modes.

A control image of another size (or aspect ratio) than the image to generate is fitted
as sd-webui-controlnet's ``detectmap_proc`` does, by :class:`ResizeMode`:

- ``Just Resize``: stretched to the output size (the aspect ratio may change);
- ``Crop and Resize`` (A1111's default): scaled to cover the output, the overflow cut off
  equally on both sides;
- ``Resize and Fill``: scaled to fit inside the output, the rest filled with the median
  colour of the map's border.

How it is scaled depends on what the map holds (:class:`~opensd.pipelines.preprocessors.MapKind`,
after A1111's ``high_quality_resize``): a map of flat colours (a segmentation or layout
map, or any image of 3 to 199 colours) with nearest neighbours, so no new colour appears;
a binary edge map (two colours, one below 16, one above 240) smoothly, then thresholded
at 128 again; anything else with area averaging when shrinking and bicubic when growing.
(A1111 thresholds edges with Otsu's method and thins one-pixel edges; that is left out.)
"""

from __future__ import annotations

import enum

import numpy as np
from PIL import Image

from opensd.pipelines.preprocessors import MapKind
from opensd.pipelines.request import RequestError


class ResizeMode(enum.Enum):
    """How a control map of another size is fitted (A1111's names; API ints 0, 1, 2)."""

    RESIZE = "Just Resize"
    CROP = "Crop and Resize"
    FILL = "Resize and Fill"

    @classmethod
    def parse(cls, value: ResizeMode | str | int) -> ResizeMode:
        """The mode for an enum, its A1111 name, its short name (``crop``), or A1111's int."""
        if isinstance(value, ResizeMode):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(cls):
            return list(cls)[value]
        if isinstance(value, str):
            key = value.strip().lower().replace("_", " ").replace("-", " ")
            for mode in cls:
                if key in (mode.value.lower(), mode.name.lower()):
                    return mode
        allowed = ", ".join(f"{m.value!r} ({m.name.lower()}, {i})" for i, m in enumerate(cls))
        raise RequestError(f"unknown control resize mode {value!r}; allowed: {allowed}")


def _colours(a: np.ndarray) -> int:
    packed = (a[..., 0].astype(np.uint32) << 16) | (a[..., 1].astype(np.uint32) << 8) | a[..., 2]
    return len(np.unique(packed))


def scale_map(image: Image.Image, size: tuple[int, int], kind: MapKind = MapKind.IMAGE) -> Image.Image:
    """``image`` (RGB) at ``size`` (width, height), interpolated as the module doc says."""
    if image.size == size:
        return image
    a = np.asarray(image)
    n = _colours(a)
    binary = n == 2 and a.min() < 16 and a.max() > 240
    if kind is MapKind.FLAT or 2 < n < 200:
        return image.resize(size, Image.Resampling.NEAREST)
    smaller = size[0] * size[1] < image.size[0] * image.size[1]
    out = image.resize(size, Image.Resampling.BOX if smaller else Image.Resampling.BICUBIC)
    if binary or kind is MapKind.EDGES and n <= 2:
        gray = np.asarray(out.convert("L"))
        out = Image.fromarray(np.where(gray >= 128, 255, 0).astype(np.uint8)).convert("RGB")
    return out


def fit_map(image: Image.Image, width: int, height: int, mode: ResizeMode, kind: MapKind = MapKind.IMAGE) -> Image.Image:
    """The control map ``image`` fitted to ``width`` x ``height`` by ``mode`` (RGB)."""
    image = image.convert("RGB")
    if mode is ResizeMode.RESIZE or image.size == (width, height):
        return scale_map(image, (width, height), kind)
    w0, h0 = image.size
    k = (min if mode is ResizeMode.FILL else max)(height / h0, width / w0)
    scaled = scale_map(image, (max(1, round(w0 * k)), max(1, round(h0 * k))), kind)
    sw, sh = scaled.size
    if mode is ResizeMode.CROP:
        left, top = max(0, (sw - width) // 2), max(0, (sh - height) // 2)
        return scaled.crop((left, top, left + width, top + height))
    a = np.asarray(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]], axis=0)  # (n, 3) the map's edge pixels
    colour = tuple(int(c) for c in np.median(border, axis=0).astype(np.uint8))
    out = Image.new("RGB", (width, height), colour)
    out.paste(scaled, (max(0, (width - sw) // 2), max(0, (height - sh) // 2)))
    return out
