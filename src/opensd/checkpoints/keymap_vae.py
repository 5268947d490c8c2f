"""Key and config maps between the original SD autoencoder and diffusers' ``AutoencoderKL``.

Original (CompVis/LDM) keys are those of ``opensd.models.vae.AutoencoderKL`` and of SD
checkpoints under ``first_stage_model.`` (strip the prefix first). Diffusers renames
modules (``down.I.block.J`` -> ``down_blocks.I.resnets.J``, ``mid.attn_1.q`` ->
``mid_block.attentions.0.to_q``, ...), numbers the decoder's up blocks from the
lowest resolution (``up.I`` -> ``up_blocks.{L-1-I}``), and stores the mid attention
projections as Linear (out, in) instead of 1x1 conv (out, in, 1, 1).

The map is generated from the config by the tables below, one row per module,
then one row per parameter of that module's kind.
"""

from __future__ import annotations

from typing import Any

import torch

from opensd.config import ConfigError
from opensd.models.vae import VAEConfig

LDM_VAE_PREFIX = "first_stage_model."

# Parameters of each module kind: (original name, diffusers name).
_LEAF = (("weight", "weight"), ("bias", "bias"))
_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_SHORTCUT = (("nin_shortcut", "conv_shortcut"),)
_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
# 1x1 convs in the original, Linear in diffusers.
_ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")

# Modules outside the levels: (original, diffusers).
_TOP = (
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.norm_out", "encoder.conv_norm_out"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.norm_out", "decoder.conv_norm_out"),
    ("decoder.conv_out", "decoder.conv_out"),
)


def _module_rows(cfg: VAEConfig) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """(original module, diffusers module, its parameters' sub-names) for every module."""
    rows: list[tuple[str, str, tuple[tuple[str, str], ...]]] = [(o, d, ()) for o, d in _TOP]
    widths = cfg.block_channels
    n = len(widths)

    def resnet(o: str, d: str, c_in: int, c_out: int) -> None:
        rows.append((o, d, _RESNET + (_SHORTCUT if c_in != c_out else ())))

    for side in ("encoder", "decoder"):
        c = widths[-1]
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", c, c)
        rows.append((f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _ATTN))
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", c, c)

    for i in range(n):  # encoder level i == diffusers down block i
        for j in range(cfg.num_res_blocks):
            c_in = (cfg.ch if i == 0 else widths[i - 1]) if j == 0 else widths[i]
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, widths[i])
        if i != n - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ()))

    for i in range(n):  # decoder level i == diffusers up block n-1-i
        u = n - 1 - i
        for j in range(cfg.num_res_blocks + 1):
            c_in = widths[min(i + 1, n - 1)] if j == 0 else widths[i]
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", c_in, widths[i])
        if i != 0:
            rows.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv", ()))
    return rows


def vae_key_map(cfg: VAEConfig) -> dict[str, str]:
    """Every original state-dict key (no ``first_stage_model.`` prefix) -> its diffusers key."""
    out: dict[str, str] = {}
    for o_mod, d_mod, subs in _module_rows(cfg):
        for o_sub, d_sub in subs or (("", ""),):
            for o_leaf, d_leaf in _LEAF:
                o = ".".join(p for p in (o_mod, o_sub, o_leaf) if p)
                d = ".".join(p for p in (d_mod, d_sub, d_leaf) if p)
                out[o] = d
    return out


def needs_reshape(original_key: str) -> bool:
    """True for the mid-attention projection weights: (out, in, 1, 1) conv in the
    original, (out, in) Linear in diffusers. Biases and everything else match as is."""
    parts = original_key.split(".")
    return (
        len(parts) == 5
        and parts[0] in ("encoder", "decoder")
        and parts[1:3] == ["mid", "attn_1"]
        and parts[3] in _ATTN_PROJECTIONS
        and parts[4] == "weight"
    )


def _check_keys(got: set[str], want: set[str], what: str) -> None:
    missing, unexpected = sorted(want - got), sorted(got - want)
    if missing or unexpected:
        raise ValueError(
            f"{what}: state dict does not fit the config; "
            f"missing {len(missing)} key(s) {missing[:8]}, unexpected {len(unexpected)} key(s) {unexpected[:8]}"
        )


def ldm_to_diffusers_vae(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Original VAE state dict (prefix stripped) -> diffusers ``AutoencoderKL`` state dict."""
    key_map = vae_key_map(cfg)
    _check_keys(set(state_dict), set(key_map), "ldm_to_diffusers_vae")
    out = {}
    for o, d in key_map.items():
        t = state_dict[o]
        if needs_reshape(o):
            if t.ndim != 4 or t.shape[2:] != (1, 1):
                raise ValueError(
                    f"ldm_to_diffusers_vae: {o} should be an (out, in, 1, 1) conv weight, got {tuple(t.shape)}"
                )
            t = t[:, :, 0, 0]  # (out, in, 1, 1) -> (out, in)
        out[d] = t
    return out


def diffusers_to_ldm_vae(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> original VAE state dict (no prefix)."""
    key_map = vae_key_map(cfg)
    _check_keys(set(state_dict), set(key_map.values()), "diffusers_to_ldm_vae")
    out = {}
    for o, d in key_map.items():
        t = state_dict[d]
        if needs_reshape(o):
            if t.ndim != 2:
                raise ValueError(
                    f"diffusers_to_ldm_vae: {d} should be an (out, in) Linear weight, got {tuple(t.shape)}"
                )
            t = t[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
        out[o] = t
    return out


# ----------------------------------------------------------------------------- configs

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"
# Diffusers AutoencoderKL.__init__ defaults, used for keys a config dict leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (_DOWN,),
    "up_block_types": (_UP,),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def to_diffusers_vae_config(cfg: VAEConfig, sample_size: int = 512) -> dict[str, Any]:
    """Keyword arguments for ``diffusers.AutoencoderKL`` that build the same network.

    ``sample_size`` (the image size diffusers records; 512 for SD 1.5) does not change
    the weights. Diffusers needs ``ch_mult[0] == 1`` and ``z_channels == embed_dim``.
    """
    if cfg.ch_mult[0] != 1:
        raise ConfigError(
            f"to_diffusers_vae_config: diffusers needs ch_mult[0] == 1, got ch_mult={cfg.ch_mult}"
        )
    if cfg.z_channels != cfg.embed_dim:
        raise ConfigError(
            "to_diffusers_vae_config: diffusers needs z_channels == embed_dim, "
            f"got {cfg.z_channels} and {cfg.embed_dim}"
        )
    n = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": [_DOWN] * n,
        "up_block_types": [_UP] * n,
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor if cfg.shift_factor != 0.0 else None,
    }


def from_diffusers_vae_config(d: dict[str, Any]) -> VAEConfig:
    """A diffusers ``AutoencoderKL`` config (dict or ``config.json`` contents) -> ``VAEConfig``.

    Keys starting with ``_`` (``_class_name``, ...) and ``sample_size``/``force_upcast``
    are ignored; variants this model cannot express raise :class:`ConfigError`.
    """
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"from_diffusers_vae_config: unknown key(s) {', '.join(unknown)}; "
            f"allowed keys are {', '.join(_DIFFUSERS_DEFAULTS)}"
        )
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
    channels = tuple(c["block_out_channels"])
    n = len(channels)
    if n == 0:
        raise ConfigError("from_diffusers_vae_config: block_out_channels is empty")
    if list(c["down_block_types"]) != [_DOWN] * n:
        raise ConfigError(
            f"from_diffusers_vae_config: down_block_types must be {n} x {_DOWN!r}, got {c['down_block_types']}"
        )
    if list(c["up_block_types"]) != [_UP] * n:
        raise ConfigError(
            f"from_diffusers_vae_config: up_block_types must be {n} x {_UP!r}, got {c['up_block_types']}"
        )
    if c["act_fn"] != "silu":
        raise ConfigError(f"from_diffusers_vae_config: only act_fn 'silu' is supported, got {c['act_fn']!r}")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if c[flag] is not True:
            raise ConfigError(f"from_diffusers_vae_config: only {flag}=True is supported, got {c[flag]!r}")
    for stat in ("latents_mean", "latents_std"):
        if c[stat] is not None:
            raise ConfigError(f"from_diffusers_vae_config: per-channel {stat} is not supported (SD 1.x has none)")
    ch = channels[0]
    if any(w % ch for w in channels):
        raise ConfigError(f"from_diffusers_vae_config: block_out_channels {channels} are not multiples of {ch}")
    try:
        return VAEConfig(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            ch=ch,
            ch_mult=tuple(w // ch for w in channels),
            num_res_blocks=c["layers_per_block"],
            z_channels=c["latent_channels"],
            embed_dim=c["latent_channels"],
            norm_groups=c["norm_num_groups"],
            scale_factor=float(c["scaling_factor"]),
            shift_factor=float(c["shift_factor"] or 0.0),
        )
    except ValueError as e:
        raise ConfigError(f"from_diffusers_vae_config: {e}") from None
