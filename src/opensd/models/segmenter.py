"""A U-Net for semantic segmentation, built from the denoising U-Net's own blocks.

Ronneberger, Fischer and Brox 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation": a contracting path of convolutions and downsampling, an expanding path
that upsamples and concatenates the contracting path's features at the same resolution
(the skip connections), and a 1x1 convolution to per-pixel class scores. It is the
network the denoiser of :mod:`opensd.models.unet` grew from; here it is that network
before the diffusion model's additions: no timestep, no text, no attention.

``Segmenter(cfg)(x)`` maps RGB images (B, 3, H, W) in [-1, 1] to per-pixel class logits
(B, n_classes, H, W); ``softmax`` over dim 1 gives each pixel's class probabilities.
Any H, W work (downsampling rounds up, upsampling lands on the skip's exact size, as in
the denoiser).

The blocks are the denoiser's, imported, not copied: :class:`~opensd.models.unet.ResBlock`,
:class:`~opensd.models.unet.Downsample`, :class:`~opensd.models.unet.Upsample` in
:class:`~opensd.models.unet.EmbedSequential` containers, under the denoiser's attribute
paths (``input_blocks.N.M``, ``middle_block``, ``output_blocks.N.M``, ``out``). A ResBlock
adds a projected timestep embedding; a segmenter has none, so it is handed a zero
embedding of width 1, which makes each block's ``emb_layers`` a learned per-channel bias
(its weight sees only zeros and never changes). The middle block is two ResBlocks (the
denoiser puts a cross-attention transformer between them). Which classes the channels
mean is the data's business: the checkpoint names them (:mod:`opensd.checkpoints.segmenter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.models.adapters import Conv2d
from opensd.models.layers import group_norm
from opensd.models.unet import Downsample, EmbedSequential, ResBlock, Upsample

EMB_DIM = 1  # the width of the (zero) embedding the ResBlocks are given


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class SegmenterConfig:
    """Shape of the segmentation U-Net.

    ``model_channels`` at full resolution, times ``channel_mult[level]`` at each level
    (``len(channel_mult)`` levels; each but the last ends in a downsampling);
    ``num_res_blocks`` ResBlocks per level in the contracting path (one more in the
    expanding path, as in the denoiser); ``n_classes`` output channels;
    ``norm_groups`` the GroupNorm groups (must divide every level's channels)."""

    in_channels: int = 3
    n_classes: int = 4
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    norm_groups: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.channel_mult, list):  # from JSON
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        for name in ("in_channels", "model_channels", "num_res_blocks", "norm_groups"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"SegmenterConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _positive_int(self.n_classes) or self.n_classes < 2:
            raise ConfigError(f"SegmenterConfig.n_classes must be an integer >= 2, got {self.n_classes!r}")
        if not self.channel_mult or not all(_positive_int(m) for m in self.channel_mult):
            raise ConfigError(f"SegmenterConfig.channel_mult must be a non-empty tuple of positive integers, "
                              f"got {self.channel_mult!r}")
        for level, ch in enumerate(self.level_channels):
            if ch % self.norm_groups:
                raise ConfigError(f"SegmenterConfig: level {level} has {ch} channels, not divisible by "
                                  f"norm_groups={self.norm_groups}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @classmethod
    def shapes(cls) -> SegmenterConfig:
        """The shapes world's segmenter: four levels (32, 16, 8, 4 px for 32 px scenes), 0.68 M parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> SegmenterConfig:
        """For tests: two levels of 16 channels."""
        return cls(model_channels=16, channel_mult=(1, 1), norm_groups=4)


class Segmenter(nn.Module):
    """Images (B, in_channels, H, W) in [-1, 1] -> class logits (B, n_classes, H, W)."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        groups, mc = cfg.norm_groups, cfg.model_channels
        self.input_blocks = nn.ModuleList([EmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch, last = [mc], mc, len(cfg.channel_mult) - 1
        for level, out_ch in enumerate(cfg.level_channels):  # the contracting path
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(EmbedSequential(ResBlock(ch, out_ch, EMB_DIM, groups)))
                ch = out_ch
                skips.append(ch)
            if level != last:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = EmbedSequential(ResBlock(ch, ch, EMB_DIM, groups), ResBlock(ch, ch, EMB_DIM, groups))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):  # the expanding path
            out_ch = cfg.level_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), out_ch, EMB_DIM, groups)]
                ch = out_ch
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch, groups, eps=1e-5), nn.SiLU(), Conv2d(ch, cfg.n_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> logits (B, n_classes, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"Segmenter: x must be (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        emb = x.new_zeros(x.shape[0], EMB_DIM)  # no conditioning: see the module doc
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, None)
            skips.append(h)
        h = self.middle_block(h, emb, None)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H_l, W_l)
            size = tuple(skips[-1].shape[-2:]) if skips else None  # where an Upsample must land
            h = block(h, emb, None, size)
        result: torch.Tensor = self.out(h)
        return result

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_classes, H, W) per-pixel class probabilities (softmax of the logits), float32."""
        return self.forward(x).float().softmax(dim=1)
