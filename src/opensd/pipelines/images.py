"""Images in and out of the pipelines: PIL <-> tensors in [-1, 1], masks, validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from opensd.errors import InputFileError

ImageInput = Image.Image | str | Path


def load_image(image: ImageInput, *, what: str = "image") -> Image.Image:
    """A PIL image from a path or an image; a clear ValueError when it cannot be read."""
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.exists():
        raise InputFileError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputFileError(f"cannot read {what} {path}: not a readable image ({e})") from None


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
