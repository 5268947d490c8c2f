"""The Stable Diffusion denoising U-Net (LDM's and SGM's ``openaimodel.UNetModel``).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models":
the U-Net of Ho et al. 2020 / Dhariwal & Nichol 2021 (ResBlocks conditioned on a
sinusoidal timestep embedding) with a :class:`SpatialTransformer` after the ResBlocks
of chosen resolution levels, through which the text context enters by cross-attention.

``UNetModel(cfg)(x, timesteps, context, y=None)`` maps noisy latents (B, C, H, W),
timesteps (B,), text context (B, L, context_dim) and, for SDXL, the vector ``y`` (B,
adm_in_channels) to a prediction (B, out_channels, H, W) (noise, or v, as the training
objective decides). The names are the original code's. ``control=`` takes a ControlNet's
residuals (:class:`ControlResiduals`, :mod:`opensd.models.controlnet`), added to the skip
connections and the middle block's output; without them the U-Net is unchanged.

One class covers the family:

- SD 1.x: attention at levels 0-2, 8 heads, 1x1-conv ``proj_in/proj_out``;
- SD 2.x: heads of 64 channels (``head_channels``), Linear ``proj_in/proj_out``;
- SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution
  Image Synthesis"): a transformer depth per level (``transformer_depth`` a tuple, 0-10
  blocks), no attention at the first level, and ``label_emb``, an MLP on ``y`` (the
  pooled text embedding and the Fourier-embedded size conditioning) whose output is
  added to the timestep embedding.

Attribute paths equal the original checkpoint keys under ``model.diffusion_model.``
(``time_embed``, ``label_emb``, ``input_blocks.N.M``, ``middle_block``,
``output_blocks.N.M``, ``out``), so an original state dict loads with
``load_state_dict`` as is.

Latent sizes need not be multiples of ``2 ** (levels - 1)``: downsampling rounds up
(stride-2 conv, padding 1) and each upsampling interpolates (nearest) to the exact
size of the skip connection it is concatenated with, as diffusers does. For sizes
that are multiples this is LDM's plain 2x nearest upsampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from opensd import upsample_kernels
from opensd.config import ConfigError
from opensd.models.adapters import Conv2d, Linear
from opensd.models.layers import add_fresh, group_norm, silu_fresh, timestep_embedding
from opensd.models.transformer import SpatialTransformer

if TYPE_CHECKING:
    from opensd.models.controlnet import ControlNet

# --------------------------------------------------------------------------- config


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the U-Net; field names follow LDM's ``unet_config.params``.

    ``attention_levels``: the resolution levels (0 = full resolution) whose blocks
    get a SpatialTransformer; the middle block always has one. Heads: ``num_heads``
    per transformer (SD 1), or, when ``head_channels`` is set, ``channels //
    head_channels`` heads of that width (SD 2, SDXL). ``transformer_depth``: blocks per
    transformer, one number or one per level (SDXL); ``transformer_depth_middle`` that of
    the middle block (default: the last level's). ``adm_in_channels``: width of the
    vector ``y`` that ``label_emb`` embeds (SDXL: 2816 base, 2560 refiner); None: no ``y``.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = 8
    head_channels: int | None = None
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    norm_groups: int = 32
    use_linear_in_transformer: bool = False
    transformer_depth_middle: int | None = None
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attention_levels", "transformer_depth"):  # lists (from JSON) become tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks",
                     "num_heads", "context_dim", "norm_groups"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"UNetConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("head_channels", "transformer_depth_middle", "adm_in_channels"):
            if getattr(self, name) is not None and not _positive_int(getattr(self, name)):
                raise ConfigError(f"UNetConfig.{name} must be None or a positive integer, got {getattr(self, name)!r}")
        if not self.channel_mult or not all(_positive_int(m) for m in self.channel_mult):
            raise ConfigError(
                f"UNetConfig.channel_mult must be a non-empty tuple of positive integers, got {self.channel_mult!r}"
            )
        levels = len(self.channel_mult)
        if len(set(self.attention_levels)) != len(self.attention_levels) or not all(
            isinstance(lv, int) and 0 <= lv < levels for lv in self.attention_levels
        ):
            raise ConfigError(
                f"UNetConfig.attention_levels must be distinct levels in 0..{levels - 1} "
                f"(one per channel_mult entry), got {self.attention_levels!r}"
            )
        for level, ch in enumerate(self.level_channels):
            if ch % self.norm_groups:
                raise ConfigError(
                    f"UNetConfig: level {level} has {ch} channels, not divisible by norm_groups={self.norm_groups}"
                )
        depth = self.transformer_depth
        if isinstance(depth, tuple):
            if len(depth) != levels or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in depth):
                raise ConfigError(
                    f"UNetConfig.transformer_depth must be a positive integer or {levels} integers >= 0 "
                    f"(one per level), got {depth!r}"
                )
        elif not _positive_int(depth):
            raise ConfigError(f"UNetConfig.transformer_depth must be a positive integer, got {depth!r}")
        for level in self.attention_levels:
            if self.depth_at(level) < 1:
                raise ConfigError(f"UNetConfig: level {level} has attention but transformer_depth 0 there")
        for level in sorted({*self.attention_levels, levels - 1}):  # levels - 1: the middle block
            self.heads_at(level)  # raises when the heads do not divide the channels

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at ``level``."""
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d

    @property
    def middle_depth(self) -> int:
        """Transformer blocks of the middle block's SpatialTransformer."""
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return max(self.depth_at(len(self.channel_mult) - 1), 1)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels at each resolution level: ``model_channels * channel_mult[level]``."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads_at(self, level: int) -> int:
        """Attention heads of a transformer at ``level`` (the middle block is the last level)."""
        ch = self.level_channels[level]
        if self.head_channels is None:
            if ch % self.num_heads:
                raise ConfigError(
                    f"UNetConfig: level {level} has {ch} channels, not divisible by num_heads={self.num_heads}"
                )
            return self.num_heads
        if ch % self.head_channels:
            raise ConfigError(
                f"UNetConfig: level {level} has {ch} channels, not divisible by head_channels={self.head_channels}"
            )
        return ch // self.head_channels

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (v1-inference.yaml): 859,520,964 parameters."""
        return cls()

    @classmethod
    def sd21(cls) -> UNetConfig:
        """Stable Diffusion 2.x (v2-inference(-v).yaml): 865,910,724 parameters."""
        return cls(head_channels=64, context_dim=1024, use_linear_in_transformer=True)

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        """SDXL base (sd_xl_base.yaml): 2,567,463,684 parameters."""
        return cls(
            channel_mult=(1, 2, 4), attention_levels=(1, 2), head_channels=64, transformer_depth=(0, 2, 10),
            context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
        )

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """SDXL refiner (sd_xl_refiner.yaml): 2,259,526,660 parameters."""
        return cls(
            model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(1, 2), head_channels=64,
            transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4, context_dim=1280,
            use_linear_in_transformer=True, adm_in_channels=2560,
        )

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A very small model for tests (~1M parameters, milliseconds at 16x16)."""
        return cls(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            num_heads=4,
            context_dim=32,
            norm_groups=8,
        )

    @classmethod
    def small(cls) -> UNetConfig:
        """A CPU-trainable model (~17M parameters) for small data sets."""
        return cls(
            model_channels=64,
            channel_mult=(1, 2, 4),
            num_res_blocks=1,
            attention_levels=(1, 2),
            num_heads=4,
            context_dim=256,
            norm_groups=16,
        )


# --------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv,
    plus a skip (1x1 conv when the channel count changes). Keys as LDM's ``ResBlock``."""

    def __init__(
        self, channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels, groups, eps=1e-5), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, groups, eps=1e-5),
            nn.SiLU(),
            nn.Dropout(dropout),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The containers are unpacked here, and their parameter-free activations called as
        # functions, to spare a small model's steps Python calls (the same ops, bit for bit).
        norm, _, conv = self.in_layers
        h = conv(silu_fresh(norm(x)))
        e = self.emb_layers[1](F.silu(emb))  # (B, C_out)
        h = add_fresh(h, e.view(*e.shape, 1, 1))  # broadcast over H, W
        norm, _, dropout, conv = self.out_layers
        assert isinstance(dropout, nn.Dropout)
        h = silu_fresh(norm(h))
        if dropout.p > 0:  # p = 0 is the identity
            h = dropout(h)
        return add_fresh(conv(h), self.skip_connection(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (padding 1): H -> ceil(H / 2). Key ``op``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.op(x)
        return out


class Upsample(nn.Module):
    """Nearest upsampling to ``size`` (default 2x), then a 3x3 conv. Key ``conv``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return upsample_kernels.upsample_conv(self.conv, x, size)  # conv(nearest(x)), or its sub-pixel form


class EmbedSequential(nn.Sequential):
    """A U-Net block: children run in order, each given what it needs (LDM's
    ``TimestepEmbedSequential``): ResBlocks the timestep embedding, transformers the
    context, an Upsample the target size."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, eq=False)
class ControlResiduals:
    """What a ControlNet adds to a U-Net (Zhang et al. 2023, "Adding Conditional Control to
    Text-to-Image Diffusion Models"): ``skips``, one tensor per input block, added to that
    block's output where the decoder takes it as its skip connection (input-block order,
    each of that output's shape), and ``middle``, added to the middle block's output.
    diffusers calls them ``down_block_additional_residuals`` and ``mid_block_additional_residual``."""

    skips: tuple[torch.Tensor, ...]
    middle: torch.Tensor

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        return ControlResiduals(tuple(a + b for a, b in zip(self.skips, other.skips, strict=False)), self.middle + other.middle)


def _transformer(cfg: UNetConfig, level: int, depth: int | None = None) -> SpatialTransformer:
    ch = cfg.level_channels[level]
    heads = cfg.heads_at(level)
    return SpatialTransformer(
        ch, heads, ch // heads, cfg.context_dim, cfg.depth_at(level) if depth is None else depth, cfg.norm_groups,
        cfg.use_linear_in_transformer,
    )


def encoder_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The U-Net's ``input_blocks`` and the channels of each one's output (what the decoder's
    skips carry): conv_in, then per level num_res_blocks x (ResBlock [+ transformer]), then
    a Downsample but at the last level. A ControlNet copies exactly these."""
    mc, groups, emb_dim = cfg.model_channels, cfg.norm_groups, cfg.time_embed_dim
    blocks = nn.ModuleList([EmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_channels = [mc]
    ch = mc
    last = len(cfg.channel_mult) - 1
    for level, out_ch in enumerate(cfg.level_channels):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, out_ch, emb_dim, groups)]
            ch = out_ch
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, level))
            blocks.append(EmbedSequential(*layers))
            skip_channels.append(ch)
        if level != last:
            blocks.append(EmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return blocks, skip_channels


def middle_block(cfg: UNetConfig) -> EmbedSequential:
    """ResBlock, transformer, ResBlock at the last level's width."""
    ch, groups, emb_dim = cfg.level_channels[-1], cfg.norm_groups, cfg.time_embed_dim
    return EmbedSequential(
        ResBlock(ch, ch, emb_dim, groups), _transformer(cfg, len(cfg.channel_mult) - 1, cfg.middle_depth),
        ResBlock(ch, ch, emb_dim, groups),
    )


def time_embedding(cfg: UNetConfig) -> nn.Sequential:
    """``time_embed``: the MLP on the sinusoidal timestep embedding (keys 0 and 2)."""
    mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
    return nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))


def label_embedding(cfg: UNetConfig) -> nn.Sequential:
    """SGM's ``label_emb`` (num_classes="sequential"): the MLP on ``y``, keys ``0.0`` and ``0.2``."""
    assert cfg.adm_in_channels is not None
    emb_dim = cfg.time_embed_dim
    return nn.Sequential(nn.Sequential(Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim)))


class UNetModel(nn.Module):
    """The conditional denoiser ``eps_theta(x_t, t, c)`` of Stable Diffusion."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        groups, emb_dim = cfg.norm_groups, cfg.time_embed_dim

        self.time_embed = time_embedding(cfg)
        if cfg.adm_in_channels is not None:
            self.label_emb = label_embedding(cfg)
        self.input_blocks, skip_channels = encoder_blocks(cfg)
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg)

        # Decoder: per level (coarsest first) num_res_blocks + 1 x (ResBlock on [h, skip]
        # [+ transformer]), the last of each level but the finest followed by Upsample.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            out_ch = cfg.level_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skip_channels.pop(), out_ch, emb_dim, groups)]
                ch = out_ch
                if level in cfg.attention_levels:
                    layers.append(_transformer(cfg, level))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, groups, eps=1e-5), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    def _check_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNetModel: x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(
                f"UNetModel: timesteps must be a scalar or ({b},), got {tuple(timesteps.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"UNetModel: context must be ({b}, L, {cfg.context_dim}), got {tuple(context.shape)}"
            )
        if cfg.adm_in_channels is None and y is not None:
            raise ValueError("UNetModel: this U-Net takes no y (it has no label_emb)")
        if cfg.adm_in_channels is not None and (y is None or y.shape != (b, cfg.adm_in_channels)):
            got = None if y is None else tuple(y.shape)
            raise ValueError(f"UNetModel: y must be ({b}, {cfg.adm_in_channels}), got {got}")
        return timesteps

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
        control: ControlResiduals | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W), timesteps: (B,) or scalar, context: (B, L, context_dim),
        y: (B, adm_in_channels) for a U-Net with ``label_emb``, else None -> (B, out_channels, H, W).

        ``control``: a ControlNet's residuals (:class:`ControlResiduals`), added to the middle
        block's output and to every skip connection, where diffusers adds them; None: none."""
        timesteps = self._check_inputs(x, timesteps, context, y)
        emb = embed_time(self, self.cfg, timesteps, y, x.dtype)  # (B, 4 mc)

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            self._check_control(control, skips, h)
            h = h + control.middle.to(h.dtype)
            skips = [s + r.to(s.dtype) for s, r in zip(skips, control.skips, strict=False)]
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            size = tuple(skips[-1].shape[-2:]) if skips else None  # where an Upsample must land
            h = block(h, emb, context, size)
        result: torch.Tensor = self.out(h)
        return result

    def _check_control(self, control: ControlResiduals, skips: list[torch.Tensor], middle: torch.Tensor) -> None:
        if not isinstance(control, ControlResiduals) or len(control.skips) != len(skips):
            n = len(control.skips) if isinstance(control, ControlResiduals) else type(control).__name__
            raise ValueError(f"UNetModel: control must be ControlResiduals with {len(skips)} skips, got {n}")
        for i, (s, r) in enumerate([*zip(skips, control.skips, strict=False), (middle, control.middle)]):
            if s.shape != r.shape:
                where = "the middle block" if i == len(skips) else f"input block {i}"
                raise ValueError(f"UNetModel: the control residual of {where} is {tuple(r.shape)}, its output {tuple(s.shape)}")


def embed_time(
    model: UNetModel | ControlNet, cfg: UNetConfig, timesteps: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``time_embed(sinusoid(t))`` plus, with SDXL's ``y``, ``label_emb(y)``: the (B, 4 mc)
    embedding every ResBlock takes (``model``: a U-Net or a ControlNet, which share these)."""
    t_emb = timestep_embedding(timesteps, cfg.model_channels).to(dtype)  # (B, mc)
    emb: torch.Tensor = model.time_embed(t_emb)  # (B, 4 mc)
    if y is not None:
        emb = emb + model.label_emb(y.to(emb.dtype))
    return emb
