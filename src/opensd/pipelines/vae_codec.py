"""The VAE as a pipeline runs it: the precision it runs in, tiles by size, stop checks.

Half precision: Stable Diffusion's autoencoders have activations beyond float16's 65504
(SDXL's most: Podell et al. 2023 retrained it, and it still overflows), which gives inf,
then NaN: a black image. So a float16 VAE decodes and encodes in float32, on a float32
copy of the VAE made on first use and kept by the codec (the model's own VAE keeps its
dtype, so a model shared between pipelines is never changed). The copy is used for every
call, not only when a float16 result is not finite: an overflow can also give finite
garbage, and one path gives one image. diffusers does the same (``force_upcast``, true in
the SD 1.x, 2.x and SDXL VAE configs). bfloat16 has float32's range and runs as it is
(``tests/test_precision.py`` decodes SD 1.5-size weights in it). Decoded images come back
in the VAE's dtype (float32 when upcast); an encoded posterior in the model's dtype (its
U-Net's input). Latents are mapped to the VAE's scale (``from_latent``) in float32.

Tiling (:mod:`opensd.pipelines.vae_tiling`): automatic above 1.5 times the model's
native size in latent cells (at least 96 cells: SD 1.x tiles above 768 px, SDXL above
1536 px).
"""

from __future__ import annotations

import copy

import torch

from opensd.diffusion.interruption import StopCheck, check_stop
from opensd.models.stable_diffusion import StableDiffusion
from opensd.models.vae import AutoencoderKL, DiagonalGaussian
from opensd.pipelines.vae_tiling import decode_tiled, encode_tiled, should_tile


class _StoppableVAE:
    """The VAE as the tiling functions see it: ``should_stop`` is checked before every tile."""

    def __init__(self, vae: AutoencoderKL, should_stop: StopCheck | None):
        self.vae, self.should_stop, self.cfg = vae, should_stop, vae.cfg

    def _check(self, where: str) -> None:
        check_stop(self.should_stop, where)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check("encoding the image")
        return self.vae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check("decoding the latent")
        return self.vae.decode(z)


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class VAECodec:
    """Decodes and encodes with ``model``'s VAE. ``upcast``: run a float16 VAE in float32
    (None or True: yes; False: never)."""

    def __init__(self, model: StableDiffusion, upcast: bool | None = None):
        self.model, self.upcast = model, upcast
        self._kept: tuple[AutoencoderKL, AutoencoderKL] | None = None  # (the model's VAE, its float32 copy)

    def upcasts(self) -> bool:
        """Whether the VAE runs in float32 on a copy (see the class docstring)."""
        return _dtype(self.model.vae) == torch.float16 and self.upcast is not False

    def vae(self) -> AutoencoderKL:
        """The VAE that runs: the model's, or its float32 copy, made on first use and kept
        (made again if the model's VAE is replaced or moves to another device)."""
        vae = self.model.vae
        if not self.upcasts():
            return vae
        device = next(vae.parameters()).device
        kept = self._kept
        if kept is None or kept[0] is not vae or next(kept[1].parameters()).device != device:
            kept = (vae, copy.deepcopy(vae).float().eval().requires_grad_(False))
            self._kept = kept
        return kept[1]

    def decode(self, latents: torch.Tensor, tiled: bool | None = None, should_stop: StopCheck | None = None) -> torch.Tensor:
        """Diffusion latents (B, C, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1]."""
        vae = self.vae()
        z = vae.from_latent(latents.float()).to(_dtype(vae))
        stoppable = _StoppableVAE(vae, should_stop)
        if should_tile(z.shape[2], z.shape[3], tiled, native=self.model.cfg.latent_size):
            return decode_tiled(stoppable, z)
        return stoppable.decode(z)

    def encode(self, pixels: torch.Tensor, tiled: bool | None = None, should_stop: StopCheck | None = None) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1] -> the posterior over (unscaled) latents, in the model's dtype."""
        vae = self.vae()
        stoppable = _StoppableVAE(vae, should_stop)
        f = vae.cfg.downsample_factor
        x = pixels.to(_dtype(vae))
        if should_tile(pixels.shape[2] // f, pixels.shape[3] // f, tiled, native=self.model.cfg.latent_size):
            posterior = encode_tiled(stoppable, x)
        else:
            posterior = stoppable.encode(x)
        if vae is self.model.vae:
            return posterior
        return DiagonalGaussian(posterior.moments.to(_dtype(self.model.vae)))
