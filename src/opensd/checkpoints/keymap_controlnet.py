"""ControlNet weights and config: the original ``cldm`` layout <-> diffusers ``ControlNetModel``.

opensd's :class:`~opensd.models.controlnet.ControlNet` uses the original keys (those
under ``control_model.`` in lllyasviel's files). Its encoder (``time_embed``,
``label_emb``, ``input_blocks``, ``middle_block``) is the U-Net's, so its diffusers names
are :func:`opensd.checkpoints.keymap_unet.unet_key_map`'s (``conv_in``,
``time_embedding``, ``down_blocks.*``, ``mid_block.*``). The rest is one table:

=================================  ==========================================
original                           diffusers ``ControlNetModel``
=================================  ==========================================
``input_hint_block.0``             ``controlnet_cond_embedding.conv_in``
``input_hint_block.{2 + 2j}``      ``controlnet_cond_embedding.blocks.{j}``
``input_hint_block.{last}``        ``controlnet_cond_embedding.conv_out``
``zero_convs.N.0``                 ``controlnet_down_blocks.N``
``middle_block_out.0``             ``controlnet_mid_block``
=================================  ==========================================

Shapes are equal in both, so converting is renaming only. The config is diffusers'
U-Net config (:func:`~opensd.checkpoints.keymap_unet.from_diffusers_unet_config`) without
a decoder, plus ``conditioning_channels`` and ``conditioning_embedding_out_channels``
(the hint block's widths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from opensd.checkpoints.io import CheckpointError
from opensd.checkpoints.keymap_unet import DiffusersConfigError, from_diffusers_unet_config, to_diffusers_unet_config, unet_key_map
from opensd.models.controlnet import SD_HINT_CHANNELS, ControlNetConfig

ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
# diffusers' ControlNetModel takes the U-Net config's entries but these (it has no decoder)
_NOT_IN_CONTROLNET = ("sample_size", "out_channels", "center_input_sample", "up_block_types")
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def _pair(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"}


def hint_block_key_map(n_widths: int) -> dict[str, str]:
    """``input_hint_block`` -> ``controlnet_cond_embedding`` for a block of ``n_widths`` widths:
    conv_in, 2 (n_widths - 1) blocks, conv_out, at the even indices."""
    out = _pair("input_hint_block.0", "controlnet_cond_embedding.conv_in")
    blocks = 2 * (n_widths - 1)
    for j in range(blocks):
        out |= _pair(f"input_hint_block.{2 + 2 * j}", f"controlnet_cond_embedding.blocks.{j}")
    return out | _pair(f"input_hint_block.{2 + 2 * blocks}", "controlnet_cond_embedding.conv_out")


def controlnet_key_map(cfg: ControlNetConfig) -> dict[str, str]:
    """Every original ControlNet key (without ``control_model.``) -> its diffusers key."""
    encoder = {k: v for k, v in unet_key_map(cfg.unet).items() if k.startswith(ENCODER_PREFIXES)}
    zeros: dict[str, str] = {}
    for n in range(cfg.outputs - 1):
        zeros |= _pair(f"zero_convs.{n}.0", f"controlnet_down_blocks.{n}")
    return encoder | hint_block_key_map(len(cfg.hint_block_channels)) | zeros | _pair("middle_block_out.0", "controlnet_mid_block")


def _rename(state: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    missing = sorted(set(table) - set(state))
    extra = sorted(set(state) - set(table))
    if missing or extra:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... and {len(keys) - 5} more" if len(keys) > 5 else "")
        parts = ([f"{len(missing)} missing key(s) ({few(missing)})"] if missing else []) + (
            [f"{len(extra)} unexpected key(s) ({few(extra)})"] if extra else [])
        raise CheckpointError(f"{what} does not fit the ControlNet: {'; '.join(parts)}")
    return {table[k]: v for k, v in state.items()}


def diffusers_to_original(state: Mapping[str, torch.Tensor], cfg: ControlNetConfig, what: str = "the state dict") -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel`` state dict in the original layout; missing or extra keys
    are one :class:`CheckpointError` naming them."""
    return _rename(state, {d: o for o, d in controlnet_key_map(cfg).items()}, what)


def original_to_diffusers(state: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`diffusers_to_original`."""
    return _rename(state, controlnet_key_map(cfg), "the state dict")


def to_diffusers_controlnet_config(cfg: ControlNetConfig, size_embed_dim: int | None = None) -> dict[str, Any]:
    """The ``ControlNetModel`` config (``config.json``) of ``cfg``."""
    out = {k: v for k, v in to_diffusers_unet_config(cfg.unet, size_embed_dim=size_embed_dim).items() if k not in _NOT_IN_CONTROLNET}
    return out | {
        "_class_name": "ControlNetModel",
        "conditioning_channels": cfg.hint_channels,
        "conditioning_embedding_out_channels": list(cfg.hint_block_channels),
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }


def from_diffusers_controlnet_config(d: Mapping[str, Any], where: str = "config.json") -> ControlNetConfig:
    """A diffusers ``ControlNetModel`` config as a :class:`ControlNetConfig`; what opensd's
    ControlNet cannot run (BGR control images, pooled "shuffle" conditions, other blocks) is
    one :class:`CheckpointError` naming the entry."""
    d = dict(d)
    order = d.pop("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise CheckpointError(f"{where}: controlnet_conditioning_channel_order={order!r} is not supported (only 'rgb')")
    if d.pop("global_pool_conditions", False):
        raise CheckpointError(f"{where}: global_pool_conditions=true (a pooled 'shuffle' ControlNet) is not supported")
    hint = d.pop("conditioning_channels", 3)
    widths = d.pop("conditioning_embedding_out_channels", list(SD_HINT_CHANNELS))
    if not isinstance(widths, (list, tuple)):
        raise CheckpointError(f"{where}: conditioning_embedding_out_channels must be a list of widths, got {widths!r}")
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    if isinstance(down, (list, tuple)):
        d["up_block_types"] = [_UP_OF_DOWN.get(t, t) if isinstance(t, str) else t for t in reversed(down)]
    d.setdefault("out_channels", d.get("in_channels", 4))
    d.pop("_class_name", None)
    try:
        return ControlNetConfig(from_diffusers_unet_config(d), hint, tuple(widths))
    except (DiffusersConfigError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    except Exception as e:  # any value of an untrusted config that the converter trips over
        raise CheckpointError(f"{where}: unsupported configuration: {' '.join(str(e).split())[:200] or type(e).__name__}") from None
