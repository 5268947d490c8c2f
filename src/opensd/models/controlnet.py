"""ControlNet: a trainable copy of the U-Net's encoder that steers a frozen U-Net with an image.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models" (lllyasviel's ``cldm.ControlNet``). The network is the U-Net's encoder
(``time_embed``, ``input_blocks``, ``middle_block``: the same blocks, built by
:func:`opensd.models.unet.encoder_blocks` from the controlled U-Net's own
:class:`~opensd.models.unet.UNetConfig`) plus

- ``input_hint_block``: a small conv net (3x3 convs with SiLU between them, one stride-2
  conv per halving) that brings the control image (B, hint_channels, H, W), in [0, 1], to
  the latent's size and ``model_channels``; its output is added to the first input
  block's (conv_in's) output;
- ``zero_convs.N``: one 1x1 conv per input block, on that block's output, and
  ``middle_block_out``, one on the middle block's: zero-initialised, so an untrained
  ControlNet adds nothing.

``ControlNet(cfg)(x, hint, timesteps, context, y=None)`` returns
:class:`~opensd.models.unet.ControlResiduals`: what ``UNetModel(..., control=)`` adds to
its skips and middle block. Attribute paths equal the original checkpoint's keys under
``control_model.`` (``input_hint_block.14.weight`` for SD 1.x's eight convs,
``zero_convs.11.0.weight``, ``middle_block_out.0.bias``), so an original file loads with
``load_state_dict`` as is; diffusers' ``ControlNetModel`` names are
:mod:`opensd.checkpoints.keymap_controlnet`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.models.unet import (
    ControlResiduals,
    UNetConfig,
    embed_time,
    encoder_blocks,
    label_embedding,
    middle_block,
    time_embedding,
)

SD_HINT_CHANNELS = (16, 32, 96, 256)  # cldm's input_hint_block: three halvings, for the 8x VAE


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet for the U-Net of ``unet`` (whose ``in_channels`` must be the latent's).

    ``hint_channels``: channels of the control image (3: RGB). ``hint_block_channels``: the
    widths of ``input_hint_block`` (diffusers' ``conditioning_embedding_out_channels``);
    with n widths the control image is halved n - 1 times, so ``2 ** (n - 1)`` must be the
    VAE's downsampling factor (8 for Stable Diffusion, 2 for the tiny test models).
    """

    unet: UNetConfig
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = SD_HINT_CHANNELS

    def __post_init__(self) -> None:
        if isinstance(self.hint_block_channels, list):
            object.__setattr__(self, "hint_block_channels", tuple(self.hint_block_channels))
        if not isinstance(self.unet, UNetConfig):
            raise ConfigError(f"ControlNetConfig.unet must be a UNetConfig, got {type(self.unet).__name__}")
        if not isinstance(self.hint_channels, int) or isinstance(self.hint_channels, bool) or self.hint_channels < 1:
            raise ConfigError(f"ControlNetConfig.hint_channels must be a positive integer, got {self.hint_channels!r}")
        chans = self.hint_block_channels
        if not chans or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chans):
            raise ConfigError(f"ControlNetConfig.hint_block_channels must be positive integers, got {chans!r}")

    @property
    def downsample_factor(self) -> int:
        """How much smaller than the control image the latent is: 2 per halving."""
        return int(2 ** (len(self.hint_block_channels) - 1))

    @property
    def outputs(self) -> int:
        """How many residuals it makes: one per input block, and the middle block's."""
        return len(self.unet.channel_mult) * (self.unet.num_res_blocks + 1) + 1


def hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """``input_hint_block``: conv(hint -> c0), then per step i: conv(c_i -> c_i) and a stride-2
    conv(c_i -> c_i+1), then a zero-initialised conv(c_last -> model_channels); SiLU between
    every two convs. Its convs sit at the even indices 0, 2, ... (SD 1.x: 0 to 14)."""
    chans = cfg.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, chans[0], 3, padding=1), nn.SiLU()]
    for c_in, c_out in zip(chans, chans[1:], strict=False):
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(_zero(nn.Conv2d(chans[-1], cfg.unet.model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def zero_conv(channels: int) -> nn.Sequential:
    """A zero-initialised 1x1 conv, under index 0 (cldm's ``TimestepEmbedSequential`` of one conv)."""
    return nn.Sequential(_zero(nn.Conv2d(channels, channels, 1)))


class ControlNet(nn.Module):
    """The control network: residuals for a U-Net from a noisy latent, its timestep, the text
    context and a control image."""

    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ucfg = cfg.unet
        self.time_embed = time_embedding(ucfg)
        if ucfg.adm_in_channels is not None:
            self.label_emb = label_embedding(ucfg)
        self.input_blocks, skip_channels = encoder_blocks(ucfg)
        self.zero_convs = nn.ModuleList([zero_conv(ch) for ch in skip_channels])
        self.input_hint_block = hint_block(cfg)
        self.middle_block = middle_block(ucfg)
        self.middle_block_out = zero_conv(skip_channels[-1])

    def _check_inputs(self, x: torch.Tensor, hint: torch.Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.unet.in_channels:
            raise ValueError(f"ControlNet: x must be (B, {cfg.unet.in_channels}, h, w), got {tuple(x.shape)}")
        b, f = x.shape[0], cfg.downsample_factor
        want = (b, cfg.hint_channels, x.shape[2] * f, x.shape[3] * f)
        if tuple(hint.shape) != want:
            raise ValueError(f"ControlNet: hint must be {want} (the latent's size times {f}), got {tuple(hint.shape)}")

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> ControlResiduals:
        """x: (B, in_channels, h, w) the U-Net's input latent, hint: (B, hint_channels, h f, w f)
        in [0, 1], timesteps: (B,), context: (B, L, context_dim), y: SDXL's (B, adm) or None
        -> one residual per input block (each the shape of that block's output) and the middle's."""
        self._check_inputs(x, hint)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = embed_time(self, self.cfg.unet, timesteps, y, x.dtype)  # (B, 4 mc)
        guided = self.input_hint_block(hint.to(x.dtype))  # (B, mc, h, w)
        h = x
        outs = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=False)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero(h))
        h = self.middle_block(h, emb, context)
        return ControlResiduals(tuple(outs), self.middle_block_out(h))
