"""Keys and config between the original TAESD files and diffusers' ``AutoencoderTiny``.

opensd's :class:`~opensd.models.taesd.TinyAutoencoder` uses the original modules
(``encoder.N...`` / ``decoder.N...``: the state dicts of ``taesd_encoder.pth`` and
``taesd_decoder.pth`` under a part prefix). diffusers wraps each ``nn.Sequential`` as
``.layers`` and keeps the decoder's clamp out of it, so its decoder indices are one
lower. That is the whole map: one row per part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from opensd.checkpoints.io import CheckpointError
from opensd.models.taesd import TinyAutoencoderConfig

# (part, diffusers prefix, offset): diffusers' ``<prefix>N.rest`` is opensd's ``<part>.{N + offset}.rest``.
PARTS = (("encoder", "encoder.layers.", 0), ("decoder", "decoder.layers.", 1))
_INDEX = re.compile(r"(\d+)(\..+)")


def _renumber(key: str, src: str, dst: str, offset: int) -> str | None:
    """``src + "N.rest"`` -> ``dst + "{N + offset}.rest"``; None when ``key`` does not start with ``src``."""
    if not key.startswith(src):
        return None
    m = _INDEX.fullmatch(key[len(src):])
    return None if m is None else f"{dst}{int(m.group(1)) + offset}{m.group(2)}"


def diffusers_to_taesd(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderTiny`` keys -> opensd's; keys of neither part pass unchanged
    (a strict load then names them)."""
    out = {}
    for k, v in state.items():
        new = next((n for part, prefix, off in PARTS if (n := _renumber(k, prefix, f"{part}.", off)) is not None), k)
        out[new] = v
    return out


def taesd_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """opensd's keys -> diffusers ``AutoencoderTiny``'s (the inverse of :func:`diffusers_to_taesd`)."""
    out = {}
    for k, v in state.items():
        new = next((n for part, prefix, off in PARTS if (n := _renumber(k, f"{part}.", prefix, -off)) is not None), k)
        out[new] = v
    return out


def to_diffusers_tiny_config(cfg: TinyAutoencoderConfig) -> dict[str, Any]:
    """The ``AutoencoderTiny(**kwargs)`` of ``cfg`` (both halves are always built by diffusers)."""
    levels = cfg.stages + 1
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "encoder_block_out_channels": (cfg.width,) * levels,
        "decoder_block_out_channels": (cfg.width,) * levels,
        "act_fn": "relu",
        "upsample_fn": "nearest",
        "latent_channels": cfg.latent_channels,
        "upsampling_scaling_factor": 2,
        "num_encoder_blocks": (1,) + (cfg.blocks,) * cfg.stages,
        "num_decoder_blocks": (cfg.blocks,) * cfg.stages + (1,),
        "latent_magnitude": cfg.latent_magnitude,
        "latent_shift": cfg.latent_shift,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
    }


def from_diffusers_tiny_config(d: Mapping[str, Any], where: str = "config.json") -> TinyAutoencoderConfig:
    """A diffusers ``AutoencoderTiny`` config.json as a :class:`TinyAutoencoderConfig`; what
    TAESD's architecture cannot express (another activation, unequal widths) is refused."""

    def get(name: str, default: Any) -> Any:
        v = d.get(name, default)
        return tuple(v) if isinstance(v, list) else v

    fixed = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
    for name, want in fixed.items():
        if get(name, want) != want:
            raise CheckpointError(f"{where}: {name} = {get(name, want)!r} is not supported; TAESD uses {want!r}")
    enc_w, dec_w = get("encoder_block_out_channels", (64,) * 4), get("decoder_block_out_channels", (64,) * 4)
    enc_n, dec_n = get("num_encoder_blocks", (1, 3, 3, 3)), get("num_decoder_blocks", (3, 3, 3, 1))
    for name, v in (("encoder_block_out_channels", enc_w), ("decoder_block_out_channels", dec_w),
                    ("num_encoder_blocks", enc_n), ("num_decoder_blocks", dec_n)):
        if not isinstance(v, tuple) or len(v) < 2 or not all(isinstance(x, int) and x > 0 for x in v):
            raise CheckpointError(f"{where}: {name} must be a list of at least two positive integers, got {v!r}")
    if len(set(enc_w) | set(dec_w)) != 1:
        raise CheckpointError(f"{where}: block widths {list(enc_w)} / {list(dec_w)} are not supported; "
                              "opensd's TAESD has one width throughout")
    blocks = set(enc_n[1:]) | set(dec_n[:-1])
    if len(enc_n) != len(dec_n) or enc_n[0] != 1 or dec_n[-1] != 1 or len(blocks) != 1:
        raise CheckpointError(f"{where}: num_encoder_blocks {list(enc_n)} / num_decoder_blocks {list(dec_n)} are not "
                              "supported; opensd's TAESD has (1, b, ..., b) and (b, ..., b, 1)")
    try:
        return TinyAutoencoderConfig(
            in_channels=get("in_channels", 3), out_channels=get("out_channels", 3),
            latent_channels=get("latent_channels", 4), stages=len(enc_n) - 1, width=enc_w[0], blocks=blocks.pop(),
            scaling_factor=get("scaling_factor", 1.0), shift_factor=get("shift_factor", 0.0) or 0.0,
            latent_magnitude=get("latent_magnitude", 3.0), latent_shift=get("latent_shift", 0.5),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
