"""The KL-regularised autoencoder of Stable Diffusion 1.x (``AutoencoderKL``).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
section 3.1 and appendix G: a convolutional encoder maps an image x in [-1, 1] of
size (3, H, W) to the moments of a diagonal Gaussian over latents of size
(z, H/f, W/f); a decoder maps a latent back to an image. A small KL penalty to
N(0, I) keeps the latent space smooth. Stable Diffusion 1.x uses f = 8, z = 4 and
scales latents by 0.18215 so that they have roughly unit variance.

The module paths here equal the keys of the original CompVis checkpoints under
``first_stage_model.`` (``encoder.down.0.block.1.conv1.weight``, ...), so an SD 1.x
``.ckpt``/``.safetensors`` loads with ``load_state_dict`` after stripping that prefix.
``opensd.checkpoints.keymap_vae`` maps these keys to diffusers' ``AutoencoderKL``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opensd import attention_kernels, upsample_kernels
from opensd.config import ConfigError
from opensd.models.adapters import Conv2d
from opensd.models.layers import add_fresh, group_norm, silu_fresh

# LDM uses eps 1e-6 in every GroupNorm of the autoencoder (``Normalize``).
NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an ``AutoencoderKL``; field names follow LDM's ``ddconfig``.

    Level ``i`` of the encoder works at ``ch * ch_mult[i]`` channels; every level
    but the last halves the resolution, so ``downsample_factor = 2 ** (len(ch_mult) - 1)``.
    ``z_channels`` is the width of the encoder output / decoder input, ``embed_dim``
    the width of the latent after ``quant_conv`` (both 4 in SD). Latents are fed
    to the diffusion model as ``(z - shift_factor) * scale_factor``.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        ints = ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "embed_dim", "norm_groups")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"VAEConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.ch_mult, tuple) or len(self.ch_mult) == 0:
            raise ConfigError(f"VAEConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        for m in self.ch_mult:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ConfigError(f"VAEConfig.ch_mult must hold positive ints, got {self.ch_mult!r}")
        for c in (self.ch, *self.block_channels):
            if c % self.norm_groups != 0:
                raise ConfigError(
                    f"VAEConfig: width {c} (ch={self.ch}, ch_mult={self.ch_mult}) is not divisible by "
                    f"norm_groups={self.norm_groups}; ch and every ch * ch_mult[i] must be multiples of it"
                )
        for name in ("scale_factor", "shift_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"VAEConfig.{name} must be a finite number, got {v!r}")
        if self.scale_factor <= 0:
            raise ConfigError(f"VAEConfig.scale_factor must be > 0, got {self.scale_factor!r}")

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent (8 for SD)."""
        return int(2 ** (len(self.ch_mult) - 1))

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Channel width of each level: ``ch * ch_mult[i]``."""
        return tuple(self.ch * m for m in self.ch_mult)

    @classmethod
    def sd15(cls) -> VAEConfig:
        """Stable Diffusion 1.x VAE (``kl-f8``): 83,653,863 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A toy autoencoder (2x downsampling) for unit tests."""
        return cls(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)

    @classmethod
    def small(cls) -> VAEConfig:
        """4x-downsampling VAE for 32 px images (channels 32, 64, 128; about 2.7M parameters)."""
        return cls(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8)


# ----------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))).

    ``moments``: (B, 2C, ...) holding mean and logvar stacked on dim 1. logvar is
    clamped to [-30, 20] as in LDM.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        if moments.ndim < 2 or moments.shape[1] % 2 != 0:
            raise ValueError(
                f"DiagonalGaussian: moments must be (B, 2C, ...) with an even channel count, "
                f"got shape {tuple(moments.shape)}"
            )
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def _event_dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. eps is drawn on the generator's device (float32), then
        moved, so a seed gives the same latents on every device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent (the mean)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dims -> (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=self._event_dims())

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under q, summed over non-batch dims -> (B,)."""
        if sample.shape != self.mean.shape:
            raise ValueError(
                f"DiagonalGaussian.nll: sample shape {tuple(sample.shape)} != mean shape {tuple(self.mean.shape)}"
            )
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(
            log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=self._event_dims()
        )


# ----------------------------------------------------------------------------- blocks


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 ``nin_shortcut`` if widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, NORM_EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, NORM_EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut: nn.Conv2d | None = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu_fresh(self.norm1(x)))
        h = self.conv2(silu_fresh(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return add_fresh(h, skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 conv projections."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups, NORM_EPS)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)

        out = attention_kernels.attend(self, tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)), heads=1)
        out = out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        result = add_fresh(self.proj_out(out), x)
        return result

    def attention_shape(self, queries: int, context: int) -> tuple[int, int, int, int]:
        """(heads, head dim, queries, keys) of this attention at ``queries`` latent positions (``context`` unused)."""
        return 1, self.q.out_channels, queries, queries


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, then conv3x3 with stride 2 (LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return out


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_kernels.upsample_conv(self.conv, x)  # conv(nearest(x)), or its sub-pixel form


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block_2(self.attn_1(self.block_1(x)))
        return out


class DownLevel(nn.Module):
    """One encoder level: ``block`` (ResnetBlocks), ``attn`` (empty: SD's VAE has no
    attention outside the mid block) and ``downsample`` (None on the last level)."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder level: ``block`` (ResnetBlocks), ``attn`` (empty, as above) and
    ``upsample`` (None on level 0, the full-resolution one)."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        widths = cfg.block_channels
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, block_out in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            last = i == len(widths) - 1
            self.down.append(DownLevel(blocks, None if last else Downsample(block_in)))
        self.mid = MidBlock(block_in, g)
        self.norm_out = group_norm(block_in, g, NORM_EPS)
        self.conv_out = Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        out: torch.Tensor = self.conv_out(silu_fresh(self.norm_out(h)))
        return out


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out, h*f, w*f).

    ``up`` is indexed by level as in LDM: ``up[0]`` is the full-resolution level and
    runs last; each level has ``num_res_blocks + 1`` ResnetBlocks.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        widths = cfg.block_channels
        block_in = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        levels: list[UpLevel] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i], g))
                block_in = widths[i]
            # insert at 0 so that up[i] is level i, as in LDM's checkpoints
            levels.insert(0, UpLevel(blocks, None if i == 0 else Upsample(block_in)))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, g, NORM_EPS)
        self.conv_out = Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
        out: torch.Tensor = self.conv_out(silu_fresh(self.norm_out(h)))
        return out


# ----------------------------------------------------------------------------- model


class AutoencoderKL(nn.Module):
    """Encoder, 1x1 ``quant_conv`` to the posterior's moments, 1x1 ``post_quant_conv``, decoder.

    ``encode(x)`` takes images in [-1, 1] and returns the posterior; ``decode(z)``
    maps an (unscaled) latent to an image. Scaling for the diffusion model is the
    caller's job: ``to_latent``/``from_latent``.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of the downsample factor."""
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"AutoencoderKL.encode: expected (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"AutoencoderKL.encode: H and W must be multiples of {f}, got {tuple(x.shape[2:])}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) unscaled latent -> (B, out_channels, h*f, w*f)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(
                f"AutoencoderKL.decode: expected (B, {self.cfg.embed_dim}, h, w), got {tuple(z.shape)}"
            )
        out: torch.Tensor = self.decoder(self.post_quant_conv(z))
        return out

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x from a posterior sample (or its mode); returns (recon, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> diffusion latent: (z - shift) * scale."""
        return (z - self.cfg.shift_factor) * self.cfg.scale_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Diffusion latent -> VAE latent: latent / scale + shift."""
        return latent / self.cfg.scale_factor + self.cfg.shift_factor
