"""Pictures for the explain tools: heatmap overlays, labelled grids and strips, animated GIFs.

Plain PIL and numpy (no plotting library). Heatmaps use a built-in perceptual
colormap (dark purple -> red -> yellow, close to matplotlib's "inferno"). Every GIF
frame gets a thin progress bar under it, so consecutive frames never coincide (PIL
would merge identical frames) and a GIF of n frames has n frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from opensd.errors import OpenSDError

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
LABEL_HEIGHT = 14
PROGRESS_HEIGHT = 3

# (position, RGB) stops of the heat colormap
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


class RenderError(OpenSDError):
    """Bad input to a rendering function (empty list, wrong map shape, bad path)."""


def colormap(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W) values in [0, 1] (clipped) -> (H, W, 3) uint8 heat colours."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLORS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def upscale(image: Image.Image, min_side: int) -> Image.Image:
    """``image`` enlarged by an integer factor (nearest) until its short side is >= ``min_side``."""
    factor = max(1, -(-min_side // min(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def resize_map(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) map -> (H, W) by bilinear interpolation (``size`` = (W, H) as PIL writes it)."""
    if heat.ndim != 2:
        raise RenderError(f"a heat map must be (H, W), got {tuple(heat.shape)}")
    w, h = size
    if tuple(heat.shape) == (h, w):
        return heat.float()
    return F.interpolate(heat.float()[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def heatmap_overlay(image: Image.Image, heat: torch.Tensor, *, alpha: float = 0.6, normalize: bool = True) -> Image.Image:
    """``heat`` (h, w), resized to the image, colour-mapped and blended over ``image`` in grey.

    ``normalize`` divides by the map's maximum (DAAM's per-word normalization), else
    the values are taken as already in [0, 1].
    """
    m = resize_map(heat.detach().cpu(), image.size)
    if normalize:
        top = float(m.max())
        m = m / top if top > 0 else m
    base = np.asarray(image.convert("L").convert("RGB"), dtype=np.float64)  # grey, so the heat colours read
    blended = (1 - alpha) * base + alpha * colormap(m.numpy())
    return Image.fromarray(np.rint(blended).astype(np.uint8))


def with_label(image: Image.Image, text: str, height: int = LABEL_HEIGHT) -> Image.Image:
    """``image`` with ``text`` written in a white strip under it (cut to fit)."""
    out = Image.new("RGB", (image.width, image.height + height), BACKGROUND)
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > image.width - 2:
        text = text[:-1]
    draw.text((1, image.height + 1), text, fill=TEXT, font=font)
    return out


def grid(
    images: Sequence[Image.Image], cols: int | None = None, *, labels: Sequence[str] | None = None, gap: int = 2
) -> Image.Image:
    """Images in rows of ``cols`` (default: all in one row), each optionally labelled."""
    if not images:
        raise RenderError("grid needs at least one image")
    if labels is not None:
        if len(labels) != len(images):
            raise RenderError(f"grid got {len(labels)} labels for {len(images)} images")
        images = [with_label(im, t) for im, t in zip(images, labels, strict=False)]
    cols = len(images) if cols is None else cols
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise RenderError(f"cols must be an integer >= 1, got {cols!r}")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    rows = -(-len(images) // cols)
    out = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), BACKGROUND)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im.convert("RGB"), (c * (w + gap), r * (h + gap)))
    return out


def with_progress(frames: Sequence[Image.Image]) -> list[Image.Image]:
    """Each frame with a bar under it whose length shows its place in the sequence."""
    n = len(frames)
    out = []
    for i, im in enumerate(frames):
        f = Image.new("RGB", (im.width, im.height + PROGRESS_HEIGHT), BACKGROUND)
        f.paste(im.convert("RGB"), (0, 0))
        length = max(1, round((i + 1) / n * im.width))
        ImageDraw.Draw(f).rectangle([0, im.height, length - 1, im.height + PROGRESS_HEIGHT - 1], fill=(220, 40, 40))
        out.append(f)
    return out


def save_gif(frames: Sequence[Image.Image], path: str | Path, *, duration_ms: int = 250, loop: int = 0) -> Path:
    """An animated GIF of ``frames`` (one size; a progress bar is added under each)."""
    if not frames:
        raise RenderError("a GIF needs at least one frame")
    if len({im.size for im in frames}) != 1:
        raise RenderError(f"GIF frames must share one size, got {sorted({im.size for im in frames})}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = with_progress(frames)
    shown[0].save(path, save_all=True, append_images=shown[1:], duration=duration_ms, loop=loop, disposal=1)
    return path


__all__ = [
    "RenderError",
    "colormap",
    "grid",
    "heatmap_overlay",
    "resize_map",
    "save_gif",
    "upscale",
    "with_label",
    "with_progress",
]
