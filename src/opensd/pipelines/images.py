"""Images <-> tensors, the one place for it: PIL images and 8-bit pixels <-> float tensors in
[-1, 1] (the VAE's range), masks and ControlNet hints in [0, 1], and reading image files.

Every room converts here: the pipelines, training (``opensd.training.data`` re-exports
:func:`pil_to_tensor` and :func:`tensor_to_pil`), the shapes world, explain and eval. The
8-bit level of a value ``x`` is ``round((x + 1) * 127.5)`` (half to even, as diffusers'
image processor rounds ``(x + 1) / 2 * 255``, which is the same float32 number), and
level ``v`` reads back as ``v / 127.5 - 1``, so 8-bit images make the round trip exactly.
"""

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


def to_tensor(image: Image.Image, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """RGB image -> (1, 3, height, width) float32 in [-1, 1], resized with Lanczos if needed
    (None: the image's own width or height)."""
    image = image.convert("RGB")
    size = (image.size[0] if width is None else width, image.size[1] if height is None else height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1], at its own size."""
    return to_tensor(image)[0]


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [0, 1] (a ControlNet's hint), at its own size."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def unit_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] (an upscaler model's output) -> PIL images, each value rounded to its 8-bit level."""
    x = (images.detach().cpu().float().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(a) for a in x]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape) -> uint8, the 8-bit level nearest each value."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit pixels (any shape) -> float32 in [-1, 1]; the inverse of :func:`to_uint8`."""
    return pixels.float() / 127.5 - 1.0


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask -> (1, 1, height, width) in [0, 1]; white (1) marks what to repaint, as in A1111."""
    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(m, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers' image processor does."""
    x = to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in x]


tensor_to_pil = to_pil  # the name training and the shapes world use
