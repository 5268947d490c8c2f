"""Inpainting's mask handling: mask blur, the latent mask, and A1111's "masked content".

A mask is white (1) where the image is repainted, as in A1111. Before sampling:

1. **Mask blur** (:func:`blur_mask`): a Gaussian blur of ``blur`` pixels (A1111's
   ``mask_blur``) softens the mask's edge; the decoded result is blended into the
   original through the blurred mask, so the seam fades instead of cutting.
2. **The latent mask** (:func:`latent_mask`): a latent cell is repainted when any pixel
   it covers is at least half masked (the blurred mask's max over the cell, rounded).
   Sampling a nearest-neighbour subsample instead (what opensd did before) shifts the
   mask by up to ``f - 1`` pixels, so the new object was drawn partly where the paste
   then restores the original, and came out cut.
3. **Masked content** (:class:`MaskedContent`, A1111's ``inpainting_fill``): what the
   masked part of the starting latent holds. At strength 1 the start is
   ``init + sigma_max * noise``, so the choice matters little there (on the default
   model all four modes draw the requested object in 0.38 to 0.42 of the cases of
   ``scripts/inpaint_success.py``, within its noise); below strength 1 it decides what
   the sampler starts from. The default, ``original``, tied for the best measured.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from opensd.errors import OpenSDError

MAX_MASK_BLUR = 64


class InpaintError(OpenSDError):
    """A bad inpainting option (mask blur or masked content)."""


class MaskedContent(enum.Enum):
    """What the masked area starts from (A1111's ``inpainting_fill`` 0..3, in that order)."""

    FILL = "fill"  # the image's colours from around the mask, blurred in
    ORIGINAL = "original"  # the image as it is
    LATENT_NOISE = "latent-noise"  # random latent values (the seed's noise)
    LATENT_NOTHING = "latent-nothing"  # zero latents

    @classmethod
    def parse(cls, value: "MaskedContent | str | int") -> "MaskedContent":
        """An enum member from itself, its name (``"latent-noise"``, ``"latent noise"``,
        ``"LATENT_NOISE"``) or A1111's ``inpainting_fill`` number 0..3."""
        if isinstance(value, cls):
            return value
        members = list(cls)
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(members):
                return members[value]
        elif isinstance(value, str):
            key = value.strip().lower().replace("_", "-").replace(" ", "-")
            for m in members:
                if key == m.value:
                    return m
        allowed = ", ".join(f"{i} or {m.value!r}" for i, m in enumerate(members))
        raise InpaintError(f"masked content must be one of {allowed}; got {value!r}")


DEFAULT_MASKED_CONTENT = MaskedContent.ORIGINAL  # measured: see the module docstring
DEFAULT_MASK_BLUR = 0


@dataclass(frozen=True)
class InpaintMask:
    """A mask (white: repaint) and how to inpaint under it; :meth:`StableDiffusionPipeline.generate` takes one."""

    image: Image.Image
    blur: int = DEFAULT_MASK_BLUR
    content: MaskedContent = DEFAULT_MASKED_CONTENT

    def __post_init__(self) -> None:
        if not isinstance(self.image, Image.Image):
            raise InpaintError(f"the mask must be an image, got {type(self.image).__name__}")
        check_mask_blur(self.blur)
        object.__setattr__(self, "content", MaskedContent.parse(self.content))


def check_mask_blur(blur: int) -> int:
    """``blur`` when it is a whole number of pixels from 0 to MAX_MASK_BLUR, else :class:`InpaintError`."""
    if isinstance(blur, bool) or not isinstance(blur, int) or not 0 <= blur <= MAX_MASK_BLUR:
        raise InpaintError(f"mask blur must be a whole number of pixels from 0 to {MAX_MASK_BLUR}, got {blur!r}")
    return blur


def blur_mask(mask: Image.Image, blur: int) -> Image.Image:
    """The mask as 8-bit gray, blurred by a Gaussian of ``blur`` pixels (0: unchanged)."""
    m = mask.convert("L")
    return m.filter(ImageFilter.GaussianBlur(blur)) if blur else m


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel mask in [0, 1] -> (B, 1, h, w) binary latent mask: a cell is 1
    when any pixel it covers is at least half masked."""
    return (F.adaptive_max_pool2d(mask.float(), size) >= 0.5).to(mask.dtype)


def fill_masked(pixels: torch.Tensor, mask: torch.Tensor, smooth: int = 2) -> torch.Tensor:
    """A1111's "fill": the masked pixels (``mask >= 0.5``) painted with the colours around them.

    ``pixels`` (B, 3, H, W), ``mask`` (B or 1, 1, H, W). Unknown pixels take the mean of
    their known 3x3 neighbours, ring by ring from the mask's edge inwards; then the filled
    area is smoothed ``smooth`` times (a 3x3 mean over it), so it holds blurred colours,
    not streaks. A mask covering everything leaves mid-gray (0). Pixels outside the mask
    are returned unchanged.
    """
    hole = (mask >= 0.5).to(pixels.dtype).expand(pixels.shape[0], 1, -1, -1)
    known = 1 - hole
    x = pixels * known
    if known.sum() == 0:
        return torch.zeros_like(pixels)

    def mean3(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)

    for _ in range(max(pixels.shape[2:])):  # each pass fills one more ring
        todo = (known == 0)
        if not todo.any():
            break
        weight = mean3(known)
        mean = mean3(x) / weight.clamp_min(1e-8)
        grow = todo & (weight > 0)
        x = torch.where(grow, mean, x)
        known = torch.where(grow, torch.ones_like(known), known)
    x = torch.where(known > 0, x, torch.zeros_like(x))  # an image with no known pixel at all
    for _ in range(smooth):
        x = torch.where(hole > 0, mean3(x), x)
    return hole * x + (1 - hole) * pixels


def masked_init_latent(
    content: MaskedContent, init_latent: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The starting latent with its masked cells (``mask`` 1) set as ``content`` says.

    ``original`` and ``fill`` (done on the pixels before encoding, see
    :func:`fill_masked`) leave the latent as it is; ``latent-noise`` puts the seed's
    noise there (as A1111 does), ``latent-nothing`` zeros.
    """
    if content is MaskedContent.LATENT_NOISE:
        return mask * noise.to(init_latent) + (1 - mask) * init_latent
    if content is MaskedContent.LATENT_NOTHING:
        return (1 - mask) * init_latent
    return init_latent
