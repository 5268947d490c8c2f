"""TAESD: the Tiny AutoEncoder for Stable Diffusion (Ollin Boer Bohan, 2023).

A small convolutional encoder and decoder distilled from a model's KL-VAE: the same
latent space, a fraction of the work. No normalisation, no attention: 3x3 convolutions,
ReLU and residual :class:`Block` s (three convs and a skip, fused by a ReLU), with a
stride-2 conv per downsampling stage and nearest upsampling plus a conv per upsampling
stage. The decoder first soft-clamps its input to (-3, 3) (``tanh(z / 3) * 3``).

Conventions (the original ``taesd.py`` and diffusers' ``AutoencoderTiny`` agree):

- **pixels**: the networks themselves map images in [0, 1]; :meth:`TinyAutoencoder.encode`
  and :meth:`~TinyAutoencoder.decode` take and give [-1, 1], as the KL-VAE's do;
- **latents**: a TAESD latent is the *diffusion* latent, not the KL-VAE's raw one.
  TAESD and TAESDXL are trained on the scaled latents (SD's ``z * 0.18215``, SDXL's
  ``z * 0.13025``), so their ``scaling_factor`` is 1 and they decode what the U-Net
  makes as it is; later TAESDs (SD3's, FLUX's) work on the raw latent and carry the
  VAE's scale and shift instead. Either way ``from_latent(diffusion latent) = latent /
  scaling_factor + shift_factor`` is what :meth:`~TinyAutoencoder.decode` takes, as
  diffusers' pipelines compute it for any VAE;
- **storage**: :meth:`~TinyAutoencoder.scale_latents` maps a latent to [0, 1]
  (``z / (2 * 3) + 0.5``, clamped) so it fits an 8-bit image, :meth:`unscale_latents` back.

The module paths are those of the original files: ``encoder`` and ``decoder`` are the
``nn.Sequential`` s whose state dicts ``taesd_encoder.pth`` and ``taesd_decoder.pth``
hold (``1.conv.0.weight``, ...; index 0 of the decoder is the clamp).
:mod:`opensd.checkpoints.keymap_taesd` maps diffusers' ``encoder.layers.N`` /
``decoder.layers.N`` to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opensd.config import ConfigError


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """Shape of a TAESD.

    ``stages`` downsamplings of 2 (f = 2 ** stages: 3 for SD's x8, 2 for a x4 VAE),
    every layer ``width`` channels wide, ``blocks`` residual blocks per stage (the
    encoder's full-resolution level and the decoder's last have one, as in TAESD).
    ``encoder`` / ``decoder``: which halves exist (a decoder-only file is common).
    ``scaling_factor`` / ``shift_factor``: the diffusion latent is
    ``(taesd latent - shift) * scale`` (1 and 0 for TAESD and TAESDXL, see the module doc).
    ``latent_magnitude`` / ``latent_shift``: the 8-bit storage map.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    stages: int = 3
    width: int = 64
    blocks: int = 3
    encoder: bool = True
    decoder: bool = True
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels", "stages", "width", "blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"TinyAutoencoderConfig.{name} must be a positive integer, got {v!r}")
        for name in ("encoder", "decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TinyAutoencoderConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.encoder or self.decoder):
            raise ConfigError("TinyAutoencoderConfig: encoder and decoder are both off; keep at least one")
        for name in ("scaling_factor", "shift_factor", "latent_magnitude", "latent_shift"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"TinyAutoencoderConfig.{name} must be a finite number, got {v!r}")
        for name in ("scaling_factor", "latent_magnitude"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TinyAutoencoderConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent (8 for SD's TAESD)."""
        return int(2**self.stages)

    @classmethod
    def sd(cls) -> TinyAutoencoderConfig:
        """TAESD for SD 1.x / 2.x (``taesd_*.pth``): 4 channels, x8, width 64; 1.22 M parameters per half."""
        return cls()

    @classmethod
    def sdxl(cls) -> TinyAutoencoderConfig:
        """TAESDXL (``taesdxl_*.pth``): the same network, trained on SDXL's scaled latents."""
        return cls()

    @classmethod
    def shapes(cls) -> TinyAutoencoderConfig:
        """For the default model's 4x VAE (32 px <-> 8x8x4): x4, width 32."""
        return cls(stages=2, width=32)

    @classmethod
    def tiny(cls) -> TinyAutoencoderConfig:
        """A toy one (x2, width 8) for unit tests."""
        return cls(stages=1, width=8, blocks=1)


def conv(n_in: int, n_out: int, **kw: Any) -> nn.Conv2d:
    """3x3 convolution, padding 1 (TAESD's only kernel besides the skips' 1x1)."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
    """Soft clamp to (-3, 3): ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """``relu(conv(relu(conv(relu(conv(x))))) + skip(x))``; the skip is a bias-free 1x1 conv
    when the widths differ, else the identity."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fuse(self.conv(x) + self.skip(x))
        return out


def tiny_encoder(cfg: TinyAutoencoderConfig) -> nn.Sequential:
    """Image (B, in, H, W) in [0, 1] -> latent (B, latent_channels, H/f, W/f)."""
    w = cfg.width
    layers: list[nn.Module] = [conv(cfg.in_channels, w), Block(w, w)]
    for _ in range(cfg.stages):
        layers += [conv(w, w, stride=2, bias=False), *(Block(w, w) for _ in range(cfg.blocks))]
    layers.append(conv(w, cfg.latent_channels))
    return nn.Sequential(*layers)


def tiny_decoder(cfg: TinyAutoencoderConfig) -> nn.Sequential:
    """Latent (B, latent_channels, h, w) -> image (B, out, h*f, w*f) in about [0, 1]."""
    w = cfg.width
    layers: list[nn.Module] = [Clamp(), conv(cfg.latent_channels, w), nn.ReLU()]
    for _ in range(cfg.stages):
        layers += [*(Block(w, w) for _ in range(cfg.blocks)), nn.Upsample(scale_factor=2), conv(w, w, bias=False)]
    layers += [Block(w, w), conv(w, cfg.out_channels)]
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD's ``encoder`` and ``decoder`` (either may be absent: ``cfg.encoder`` / ``cfg.decoder``).

    ``encode(x)``: images in [-1, 1] -> TAESD latents (deterministic, no posterior).
    ``decode(z)``: TAESD latents -> images in about [-1, 1] (not clamped).
    ``from_latent`` / ``to_latent`` convert from / to the diffusion latent (module doc).
    """

    def __init__(self, cfg: TinyAutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = tiny_encoder(cfg) if cfg.encoder else None
        self.decoder = tiny_decoder(cfg) if cfg.decoder else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> (B, latent_channels, H/f, W/f)."""
        if self.encoder is None:
            raise ValueError("TinyAutoencoder.encode: this tiny autoencoder has no encoder (a decoder-only file)")
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"TinyAutoencoder.encode: expected (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"TinyAutoencoder.encode: H and W must be multiples of {f}, got {tuple(x.shape[2:])}")
        out: torch.Tensor = self.encoder(x.add(1).div(2))
        return out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w) TAESD latent -> (B, out_channels, h*f, w*f) in about [-1, 1]."""
        if self.decoder is None:
            raise ValueError("TinyAutoencoder.decode: this tiny autoencoder has no decoder (an encoder-only file)")
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"TinyAutoencoder.decode: expected (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        out: torch.Tensor = self.decoder(z).mul(2).sub(1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Round trip through an 8-bit latent, as diffusers' ``AutoencoderTiny.forward``:
        encode, :meth:`scale_latents`, round to 1/255, :meth:`unscale_latents`, decode."""
        stored = self.scale_latents(self.encode(x)).mul(255).round().byte()
        return self.decode(self.unscale_latents(stored / 255.0))

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """TAESD latent -> diffusion latent: (z - shift) * scale."""
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Diffusion latent -> TAESD latent: latent / scale + shift."""
        return latent / self.cfg.scaling_factor + self.cfg.shift_factor

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """TAESD latent -> [0, 1]: ``z / (2 * magnitude) + shift``, clamped (for 8-bit storage)."""
        return z.div(2 * self.cfg.latent_magnitude).add(self.cfg.latent_shift).clamp(0, 1)

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> TAESD latent (the inverse of :meth:`scale_latents` inside its range)."""
        return x.sub(self.cfg.latent_shift).mul(2 * self.cfg.latent_magnitude)
