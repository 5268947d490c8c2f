"""A small convolutional image encoder for contrastive (CLIP-style) training.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", section 2.4: the ResNet image towers replace global average pooling
with *attention pooling*, one multi-head attention layer whose query is the
globally averaged feature and whose keys/values are the feature map cells plus
position embeddings. This module is a scaled-down version for 32-64 px images:

    stem conv 3x3 (stride 1 or 2) -> levels of [ResBlock x n, stride-2 conv] -> GroupNorm, SiLU
      -> pool (attention over cells + mean query, or mean + linear) -> (B, width)

ResBlocks are the pre-activation GroupNorm-SiLU-conv blocks of the LDM autoencoder
(He et al. 2016, "Identity Mappings in Deep Residual Networks"). GroupNorm keeps at
least 4 channels per group: fewer behaves like instance norm and erases the
absolute colour the shapes world is about (see :func:`opensd.models.layers.group_norm`).

Cell positions enter the attention pool as sine/cosine features of the cell centre
in fractions of the image side, projected to the channel width, so one encoder
runs at any resolution and "left of" stays the same feature at 32 and 64 px.
Input: images in [-1, 1], (B, 3, H, W). Output: (B, width), not normalised.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opensd.config import ConfigError
from opensd.models.attention import multihead_attention
from opensd.models.layers import group_norm

MIN_CHANNELS_PER_GROUP = 4
POSITION_FREQUENCIES = 4  # sin/cos of x, y at pi * 2^0 .. pi * 2^3: 16 position features


class Pool(enum.Enum):
    """How the final feature map becomes one vector."""

    ATTENTION = "attention"  # CLIP's AttentionPool2d: mean query attends to the cells
    MEAN = "mean"  # global average, then a linear layer


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Shape of an :class:`ImageEncoder`.

    The stem conv runs at stride ``stem_stride`` (1, or 2 to quarter the cost of the
    first level). Level ``i`` works at ``channels[i]`` with ``blocks_per_level``
    ResBlocks; every level but the last halves the resolution, so the last feature
    map is ``H / downsample_factor`` cells high. Every width must split into
    ``norm_groups`` groups of at least 4 channels. ``width`` is the output size,
    ``heads`` the attention pool's heads (they divide ``channels[-1]``).
    """

    in_channels: int = 3
    stem_stride: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 1
    norm_groups: int = 8
    norm_eps: float = 1e-6
    width: int = 128
    pool: Pool = Pool.ATTENTION
    heads: int = 4

    def __post_init__(self) -> None:
        if self.stem_stride not in (1, 2) or isinstance(self.stem_stride, bool):
            raise ConfigError(f"ImageEncoderConfig.stem_stride must be 1 or 2, got {self.stem_stride!r}")
        for name in ("in_channels", "blocks_per_level", "norm_groups", "width", "heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ImageEncoderConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.channels, tuple) or not self.channels:
            raise ConfigError(f"ImageEncoderConfig.channels must be a non-empty tuple of ints, got {self.channels!r}")
        for c in self.channels:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ConfigError(f"ImageEncoderConfig.channels must hold positive ints, got {self.channels!r}")
            if c % self.norm_groups or c // self.norm_groups < MIN_CHANNELS_PER_GROUP:
                raise ConfigError(
                    f"ImageEncoderConfig: {c} channels do not split into norm_groups={self.norm_groups} groups "
                    f"of >= {MIN_CHANNELS_PER_GROUP} channels; use channels that are multiples of "
                    f"{MIN_CHANNELS_PER_GROUP * self.norm_groups} or fewer groups"
                )
        if not isinstance(self.pool, Pool):
            allowed = ", ".join(repr(p.value) for p in Pool)
            raise ConfigError(f"ImageEncoderConfig.pool must be a Pool ({allowed}), got {self.pool!r}")
        if self.channels[-1] % self.heads:
            raise ConfigError(
                f"ImageEncoderConfig: the last level's {self.channels[-1]} channels must be divisible by "
                f"heads={self.heads}"
            )
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"ImageEncoderConfig.norm_eps must be a number in (0, 1), got {eps!r}")

    @property
    def downsample_factor(self) -> int:
        return self.stem_stride * int(2 ** (len(self.channels) - 1))

    @classmethod
    def tiny(cls) -> ImageEncoderConfig:
        """About 28 k parameters; 32 px -> 8 x 8 cells (stride-2 stem, two levels). For tests and CPU toy runs."""
        return cls(stem_stride=2, channels=(16, 32), blocks_per_level=1, norm_groups=4, width=64, heads=4)

    @classmethod
    def small(cls) -> ImageEncoderConfig:
        """About 6 M parameters; 64 px -> 8 x 8 cells (32 px -> 4 x 4)."""
        return cls(channels=(64, 128, 256, 256), blocks_per_level=2, norm_groups=16, width=256, heads=8)


# ---- helpers ---------------------------------------------------------------------------


def position_features(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(height * width, 4 * POSITION_FREQUENCIES) sin/cos features of the cell centres, row-major.

    Centres are fractions of the side in (0, 1); frequency ``k`` is ``pi * 2**k``.
    """
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    coords = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)  # (HW, 2)
    freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, dtype=torch.float32, device=device)
    args = (coords[:, :, None] * freqs).reshape(height * width, -1)  # (HW, 2 * F)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (HW, 4 * F)


# ---- blocks ----------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on the skip when widths differ."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = group_norm(cin, groups, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        out: torch.Tensor = self.skip(x) + h
        return out


class Level(nn.Module):
    """ResBlocks at one width, then a stride-2 conv unless it is the last level."""

    def __init__(self, cin: int, cout: int, cfg: ImageEncoderConfig, downsample: bool) -> None:
        super().__init__()
        widths = [cin] + [cout] * cfg.blocks_per_level
        self.blocks = nn.ModuleList(
            ResBlock(a, b, cfg.norm_groups, cfg.norm_eps) for a, b in zip(widths[:-1], widths[1:], strict=False)
        )
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionPool(nn.Module):
    """CLIP's AttentionPool2d: the mean cell queries all cells (and itself); positions are added first."""

    def __init__(self, channels: int, out_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.position = nn.Linear(4 * POSITION_FREQUENCIES, channels)
        self.mean_embedding = nn.Parameter(torch.zeros(channels))
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        cells = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        cells = cells + self.position(position_features(h, w, x.device)).to(x.dtype)
        mean = cells.mean(dim=1, keepdim=True) + self.mean_embedding  # (B, 1, C)
        tokens = torch.cat([mean, cells], dim=1)  # (B, 1 + HW, C)
        out = multihead_attention(self.q_proj(mean), self.k_proj(tokens), self.v_proj(tokens), self.heads)
        result: torch.Tensor = self.out_proj(out[:, 0])  # (B, out_width)
        return result


class MeanPool(nn.Module):
    """Global average over the cells, then a linear layer."""

    def __init__(self, channels: int, out_width: int) -> None:
        super().__init__()
        self.out_proj = nn.Linear(channels, out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out_proj(x.mean(dim=(2, 3)))
        return out


# ---- model -----------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """Images in [-1, 1] (B, in_channels, H, W) -> features (B, width)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ImageEncoderConfig):
            raise ConfigError(f"ImageEncoder expects an ImageEncoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        ch = cfg.channels
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, stride=cfg.stem_stride, padding=1)
        self.levels = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg, downsample=i < len(ch) - 1) for i in range(len(ch))
        )
        self.norm_out = group_norm(ch[-1], cfg.norm_groups, cfg.norm_eps)
        self.pool: nn.Module
        if cfg.pool is Pool.ATTENTION:
            self.pool = AttentionPool(ch[-1], cfg.width, cfg.heads)
        else:
            self.pool = MeanPool(ch[-1], cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != cfg.in_channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, {cfg.in_channels}, H, W) tensor, got {shape}")
        if not images.dtype.is_floating_point:
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
        if min(images.shape[2:]) < cfg.downsample_factor:
            raise ValueError(
                f"images of {images.shape[2]} x {images.shape[3]} px are smaller than the encoder's "
                f"downsample factor {cfg.downsample_factor}"
            )
        x = self.stem(images)
        for level in self.levels:
            x = level(x)
        out: torch.Tensor = self.pool(F.silu(self.norm_out(x)))
        return out
