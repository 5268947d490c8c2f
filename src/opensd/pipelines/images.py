"""Images in and out of the pipelines: PIL <-> tensors in [-1, 1], masks, validation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from opensd.errors import InputFileError

ImageInput = Image.Image | str | Path

# The largest image file read as an input: 8192 x 8192 pixels (192 MiB decoded as RGB).
# PIL itself warns above 89M pixels and refuses above 179M ("decompression bomb").
MAX_INPUT_PIXELS = 8192 * 8192


def load_image(image: ImageInput, *, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """A PIL image from a path or an image.

    A missing or unreadable file, or one over ``max_pixels`` pixels (its header is read
    first; the pixels are then not decoded), is an :class:`InputFileError` naming the file.
    """
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.exists():
        raise InputFileError(f"{what} file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise _too_large(what, path, f"{w}x{h} ({w * h} pixels)", max_pixels)
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(what, path, _size_of_refused(path, e), max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, InputFileError):
            raise
        raise InputFileError(f"cannot read {what} {path}: not a readable image ({e})") from None


def _size_of_refused(path: Path, e: Exception) -> str:
    """The size of an image PIL refused to open: a PNG's from its header, else PIL's pixel count."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        return f"{w}x{h} ({w * h} pixels)"
    found = re.search(r"\((\d+) pixels\)", str(e))
    return f"{found.group(1)} pixels" if found else "too many pixels"


def _too_large(what: str, path: Path, size: str, max_pixels: int) -> InputFileError:
    return InputFileError(f"{what} {path} is {size}; at most {max_pixels} pixels are read")


def to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> (1, 3, height, width) float32 in [-1, 1], resized with Lanczos if needed."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask -> (1, 1, height, width) in [0, 1]; white (1) marks what to repaint, as in A1111."""
    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(m, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers' image processor does."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]
