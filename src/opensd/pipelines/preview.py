"""A cheap latent-to-RGB preview: one linear map per latent cell.

SD's latent channels are close to a linear colour space: each latent cell of a
downsample-by-f VAE roughly codes the mean colour of its f x f pixels. A1111's
"Approx cheap" live preview multiplies the latent by a fixed (4, 3) matrix instead of
running the decoder; it costs a few hundred flops per cell instead of a full VAE pass
and shows colours and layout (at 1/f resolution), not texture.

Here the matrix is fitted to the loaded VAE rather than hard-coded, so it works for any
VAE: :func:`fit_linear_preview` encodes synthetic images of coloured shapes, average-pools
each image by f, and solves least squares for the affine map latent -> pooled RGB. The
fit is on the *unscaled* VAE latent (what ``vae.decode`` takes, i.e. after
``vae.from_latent``), so the same map works whatever the scale and shift factors are.

:func:`preview_image` draws a live preview in any of A1111's ``show_progress_type`` modes
that opensd has (:class:`PreviewMode`): ``Full`` (the VAE decode), ``Approx cheap`` (this
map) and ``TAESD`` (the pipeline's tiny autoencoder, :mod:`opensd.pipelines.decoders`:
full resolution at a fraction of the VAE's cost; the VAE decode when there is none).
"""

from __future__ import annotations

import enum
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from opensd.errors import OpenSDError
from opensd.models.vae import AutoencoderKL
from opensd.pipelines.images import from_uint8, to_pil, to_uint8

if TYPE_CHECKING:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline


class PreviewError(OpenSDError):
    """Bad arguments to the preview fit or decoder; the message names what is allowed."""


# ----------------------------------------------------------------------------- helpers


def synthetic_images(size: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images (n, 3, size, size) in [-1, 1]: a random background colour and 2-6
    rectangles and ellipses of random colours, drawn with PIL from a seeded numpy RNG."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            w, h = (int(v) for v in rng.integers(size // 8 + 1, size // 2 + 2, 2))
            box = (x0 - w // 2, y0 - h // 2, x0 + w // 2, y0 + h // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
        out.append(np.asarray(im))
    pixels = torch.from_numpy(np.stack(out))  # (n, size, size, 3) uint8
    return from_uint8(pixels).permute(0, 3, 1, 2).contiguous()  # (n, 3, size, size)


# ----------------------------------------------------------------------------- the map


@dataclass(frozen=True, eq=False)
class LinearPreview:
    """``rgb = clamp(z @ weight + bias, -1, 1)`` per latent cell.

    ``weight``: (C, 3), ``bias``: (3,), float32 on the CPU; ``downsample_factor``: f of
    the VAE it was fitted to (the default upscale of :meth:`to_pil`). Input ``z`` is the
    unscaled VAE latent (B, C, h, w).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    downsample_factor: int = 1

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.weight.shape[1] != 3:
            raise PreviewError(f"LinearPreview: weight must be (C, 3), got {tuple(self.weight.shape)}")
        if tuple(self.bias.shape) != (3,):
            raise PreviewError(f"LinearPreview: bias must be (3,), got {tuple(self.bias.shape)}")

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) unscaled latent -> (B, 3, h, w) float32 RGB in [-1, 1]."""
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.channels:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise PreviewError(f"LinearPreview: z must be a (B, {self.channels}, h, w) latent, got {got}")
        w, b = self.weight.to(z.device), self.bias.to(z.device)
        rgb = torch.einsum("bchw,cr->brhw", z.float(), w) + b[None, :, None, None]
        return rgb.clamp(-1.0, 1.0)

    def to_pil(self, z: torch.Tensor, upscale: int | None = None) -> list[Image.Image]:
        """One RGB image per latent, enlarged ``upscale`` times (default f, the image size)
        by nearest neighbour."""
        k = self.downsample_factor if upscale is None else upscale
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PreviewError(f"LinearPreview.to_pil: upscale must be a positive integer, got {upscale!r}")
        x = self(z).detach().cpu()
        if k > 1:
            x = F.interpolate(x, scale_factor=k, mode="nearest")
        pixels = to_uint8(x).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        return [Image.fromarray(a) for a in pixels]


def fit_linear_preview(vae: AutoencoderKL, size: int = 64, n: int = 16, seed: int = 0) -> LinearPreview:
    """Least-squares affine map from the VAE's unscaled latent to the f x f mean colour.

    ``vae``: anything with ``encode(x).mode()`` -> (B, C, size/f, size/f) and
    ``cfg.downsample_factor`` (an :class:`~opensd.models.vae.AutoencoderKL`). Encodes
    ``n`` :func:`synthetic_images` of ``size`` px (on the VAE's device and dtype), pools
    them by f, and solves ``[z, 1] @ X = rgb`` for X (C+1, 3) with ``torch.linalg.lstsq``
    in float64 on the CPU. Deterministic for a given ``seed``.
    """
    f = vae.cfg.downsample_factor
    for name, v in (("size", size), ("n", n), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise PreviewError(f"fit_linear_preview: {name} must be an integer, got {v!r}")
    if size < f or size % f:
        raise PreviewError(f"fit_linear_preview: size must be a positive multiple of the downsample factor {f}, got {size}")
    if n < 1:
        raise PreviewError(f"fit_linear_preview: n must be >= 1, got {n}")
    x = synthetic_images(size, n, seed)
    param = next(iter(vae.parameters()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        z = vae.encode(x.to(device, dtype)).mode()  # (n, C, size/f, size/f)
    if z.ndim != 4 or tuple(z.shape[2:]) != (size // f, size // f):
        raise PreviewError(f"fit_linear_preview: the VAE encoded {size} px to {tuple(z.shape)}; expected (n, C, {size // f}, {size // f})")
    c = z.shape[1]
    rgb = F.avg_pool2d(x.double(), f)  # (n, 3, size/f, size/f)
    a = z.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, c)  # (N, C)
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)  # (N, C+1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution  # (C+1, 3)
    return LinearPreview(sol[:c].float().contiguous(), sol[c].float().contiguous(), f)


# ----------------------------------------------------------------------------- modes


class PreviewMode(enum.Enum):
    """A1111's ``show_progress_type`` values that opensd draws (A1111 also has ``Approx NN``)."""

    FULL = "Full"
    APPROX_CHEAP = "Approx cheap"
    TAESD = "TAESD"

    @classmethod
    def parse(cls, value: PreviewMode | str) -> PreviewMode:
        if isinstance(value, cls):
            return value
        for m in cls:
            if value == m.value:
                return m
        raise PreviewError(f"preview mode must be one of {', '.join(m.value for m in cls)}; got {value!r}")


def preview_image(pipe: StableDiffusionPipeline, denoised: torch.Tensor, mode: PreviewMode | str) -> Image.Image:
    """The first image of ``denoised`` (B, C, h, w), the sampler's current x0 prediction (a
    diffusion latent), drawn by ``mode`` with ``pipe``'s networks (a
    :class:`~opensd.pipelines.stable_diffusion.StableDiffusionPipeline`): ``FULL`` decodes
    with the VAE, ``APPROX_CHEAP`` applies the fitted linear map (enlarged f times by nearest
    neighbour), ``TAESD`` decodes with ``pipe.tiny_vae`` (with the VAE when it is None)."""
    mode = PreviewMode.parse(mode)
    latent = denoised[:1]
    with torch.inference_mode():
        if mode is PreviewMode.APPROX_CHEAP:
            vae = pipe.model.vae
            return linear_preview_for(vae).to_pil(vae.from_latent(latent.float()))[0]
        decoder = "tiny" if mode is PreviewMode.TAESD and pipe.tiny_vae is not None else "full"
        return to_pil(pipe.decode_latents(latent.float().to(pipe.model.device), decoder=decoder))[0]  # cast at the VAE


# ----------------------------------------------------------------------------- cache

_cache: weakref.WeakKeyDictionary[torch.nn.Module, LinearPreview] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def linear_preview_for(vae: AutoencoderKL) -> LinearPreview:
    """The :class:`LinearPreview` of ``vae``, fitted on first use and kept while the VAE
    lives (one fit per loaded model; thread-safe)."""
    with _cache_lock:
        found = _cache.get(vae)
        if found is None:
            found = _cache[vae] = fit_linear_preview(vae)
        return found
