"""Which network turns the final latent into pixels: the model's VAE, or a tiny one (TAESD).

``decoder="full"`` (the default) decodes with the model's KL-VAE; ``decoder="tiny"``
with a tiny autoencoder (:mod:`opensd.models.taesd`), A1111's "VAE type for decode:
TAESD" (``sd_vae_decode_method``; the infotext then says ``VAE Decoder: TAESD``). The
tiny decoder is many times cheaper (docs/benchmarks.md, "Decoding") and a little less
exact; it decodes the diffusion latent as it is (after its own ``from_latent``, the
identity for SD's and SDXL's TAESD), in one piece (``tiled_vae`` is the full VAE's).

A pipeline's tiny autoencoder (:func:`resolve_tiny`) is the one it is given (a
:class:`~opensd.models.taesd.TinyAutoencoder` or a path that
:func:`~opensd.checkpoints.taesd.load_tiny_autoencoder` reads), else the one saved in the
model's own folder (``taesd_decoder.safetensors``: the default model has one), else none.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import torch

from opensd.checkpoints.taesd import TinyAutoencoderError, load_tiny_autoencoder, tiny_autoencoder_beside
from opensd.diffusion.interruption import StopCheck, check_stop
from opensd.errors import OpenSDError
from opensd.models.taesd import TinyAutoencoder


class DecoderError(OpenSDError):
    """A bad decoder choice, or ``tiny`` for a pipeline without a tiny autoencoder."""


class Decoder(enum.Enum):
    """The final decode: ``full`` (the model's VAE) or ``tiny`` (TAESD)."""

    FULL = "full"
    TINY = "tiny"

    @classmethod
    def parse(cls, value: Decoder | str) -> Decoder:
        """A member from itself, its value (``"full"``, ``"tiny"``) or A1111's label (``"Full"``, ``"TAESD"``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            found = {"full": cls.FULL, "tiny": cls.TINY, "taesd": cls.TINY}.get(key)
            if found is not None:
                return found
        raise DecoderError(f"decoder must be 'full' or 'tiny' (A1111: 'Full' or 'TAESD'), got {value!r}")

    @property
    def a1111(self) -> str:
        """A1111's label: ``Full`` or ``TAESD``."""
        return "TAESD" if self is Decoder.TINY else "Full"


def check_fits(tiny: TinyAutoencoder, vae_cfg: Any, where: str) -> None:
    """``tiny`` must decode the model's latents: same channels, same downsampling."""
    if tiny.cfg.latent_channels != vae_cfg.embed_dim or tiny.cfg.downsample_factor != vae_cfg.downsample_factor:
        raise TinyAutoencoderError(
            f"{where} does not fit this model: it decodes {tiny.cfg.latent_channels}-channel latents x"
            f"{tiny.cfg.downsample_factor}, the model's VAE makes {vae_cfg.embed_dim}-channel latents x{vae_cfg.downsample_factor}"
        )


def resolve_tiny(given: TinyAutoencoder | str | Path | None, model_path: Path, vae_cfg: Any) -> TinyAutoencoder | None:
    """The pipeline's tiny autoencoder (module doc), checked against the model's VAE config."""
    tiny: TinyAutoencoder | None
    if isinstance(given, TinyAutoencoder):
        tiny, where = given, "the tiny autoencoder"
    elif given is not None:
        tiny, where = load_tiny_autoencoder(given), f"the tiny autoencoder {given}"
    else:
        tiny, where = tiny_autoencoder_beside(model_path), f"the tiny autoencoder in {model_path}"
        if tiny is None:
            return None
    if tiny.decoder is None:
        raise TinyAutoencoderError(f"{where} has no decoder (an encoder-only file); give its decoder")
    check_fits(tiny, vae_cfg, where)
    return tiny if tiny is given else tiny.eval().requires_grad_(False)  # a module given stays as it is


def require_tiny(tiny: TinyAutoencoder | None) -> TinyAutoencoder:
    """``tiny``, or the one-line error of a ``decoder="tiny"`` request without one."""
    if tiny is None:
        raise DecoderError("decoder 'tiny' needs a tiny autoencoder (TAESD) and this model has none: load one "
                           "with tiny_vae=PATH (CLI: --tiny-vae PATH; a taesd_decoder.pth/.safetensors or a diffusers "
                           "AutoencoderTiny folder), or use decoder 'full'")
    return tiny


def decode_tiny(tiny: TinyAutoencoder, latents: torch.Tensor, should_stop: StopCheck | None = None) -> torch.Tensor:
    """Diffusion latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32 in about [-1, 1], on
    the tiny autoencoder's device and dtype. ``should_stop`` is checked first."""
    check_stop(should_stop, "decoding the latent")
    p = next(tiny.parameters())
    return tiny.decode(tiny.from_latent(latents.to(p.device, p.dtype))).float()
