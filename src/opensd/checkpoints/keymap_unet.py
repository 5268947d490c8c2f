"""U-Net weights and config: original LDM/SD layout <-> diffusers ``UNet2DConditionModel``.

Our :class:`~opensd.models.unet.UNetModel` uses the original key names (those under
``model.diffusion_model.`` in an SD 1.x ``.ckpt``/``.safetensors``), so the original
format needs no renaming. This module maps those keys to diffusers' names, built from
three small tables expanded per level and block:

* ``_TOP``: the stem, time embedding and output head (and SDXL's ``label_emb``, the MLP
  on ``y``, which diffusers calls ``add_embedding``);
* ``_RESBLOCK``: ResBlock parameters (``in_layers.0`` -> ``norm1`` ...);
* where each block lives: ``input_blocks.N`` -> ``down_blocks.L.{resnets,attentions}.J``
  (or ``downsamplers.0``), ``middle_block.{0,1,2}`` -> ``mid_block.{resnets.0,
  attentions.0, resnets.1}``, ``output_blocks.N`` -> ``up_blocks.B.*``.

Transformer parameters keep their names in both formats; each level has as many
``transformer_blocks.D`` as its depth (SDXL: none at level 0, 2 and 10 below). Tensor
shapes are equal in both formats (``proj_in``/``proj_out`` are 1x1 convs, or Linears
when ``use_linear_in_transformer`` (SD 2.x, SDXL), in both), so converting is renaming
only.
"""

from __future__ import annotations

from typing import Any

import torch

from opensd.errors import OpenSDError
from opensd.models.unet import UNetConfig

# original key prefix -> diffusers key prefix, for the modules outside the blocks
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# SDXL's MLP on y (pooled text + Fourier-embedded sizes): SGM's label_emb, diffusers' add_embedding
_LABEL_EMB = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}

# ResBlock submodule: original -> diffusers (ResnetBlock2D)
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",  # only when the channel count changes
}

# SpatialTransformer submodules (same names in both formats), the second table once per
# ``transformer_blocks.D``
_TRANSFORMER = ("norm", "proj_in", "proj_out")
_TRANSFORMER_BLOCK = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3",
)
_NO_BIAS = ("to_q", "to_k", "to_v")


def _params(module: str) -> list[str]:
    """``weight`` and (unless a bias-free attention projection) ``bias`` of a module."""
    return ["weight"] if module.rsplit(".", 1)[-1] in _NO_BIAS else ["weight", "bias"]


def _expand(src: str, dst: str, modules: dict[str, str]) -> dict[str, str]:
    return {
        f"{src}.{m}.{p}": f"{dst}.{d}.{p}" for m, d in modules.items() for p in _params(m)
    }


def _resblock(src: str, dst: str, has_skip: bool) -> dict[str, str]:
    table = _RESBLOCK if has_skip else {k: v for k, v in _RESBLOCK.items() if k != "skip_connection"}
    return _expand(src, dst, table)


def _transformer(src: str, dst: str, depth: int) -> dict[str, str]:
    names = list(_TRANSFORMER) + [
        f"transformer_blocks.{d}.{m}" for d in range(depth) for m in _TRANSFORMER_BLOCK
    ]
    return _expand(src, dst, {n: n for n in names})


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """Every original U-Net key (without ``model.diffusion_model.``) -> its diffusers key.

    The keys are exactly ``UNetModel(cfg).state_dict()`` keys; the values exactly
    ``UNet2DConditionModel(**to_diffusers_unet_config(cfg)).state_dict()`` keys.
    """
    top = _TOP | (_LABEL_EMB if cfg.adm_in_channels is not None else {})
    out = {f"{src}.{p}": f"{dst}.{p}" for src, dst in top.items() for p in ("weight", "bias")}
    nrb, chans = cfg.num_res_blocks, cfg.level_channels
    last = len(chans) - 1

    # encoder: input_blocks.1.. ; level L holds nrb ResBlocks then (but the last level) a Downsample
    n, ch = 1, cfg.model_channels
    for level, out_ch in enumerate(chans):
        for j in range(nrb):
            out |= _resblock(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", ch != out_ch)
            if level in cfg.attention_levels:
                out |= _transformer(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", cfg.depth_at(level))
            ch = out_ch
            n += 1
        if level != last:
            out |= _expand(f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", {"op": "conv"})
            n += 1

    out |= _resblock("middle_block.0", "mid_block.resnets.0", False)
    out |= _transformer("middle_block.1", "mid_block.attentions.0", cfg.middle_depth)
    out |= _resblock("middle_block.2", "mid_block.resnets.1", False)

    # decoder: up block B = level (last - B) holds nrb + 1 ResBlocks (all with a skip conv,
    # their input being [h, skip]), the last one followed (but at level 0) by an Upsample
    n = 0
    for b, level in enumerate(reversed(range(len(chans)))):
        for j in range(nrb + 1):
            out |= _resblock(f"output_blocks.{n}.0", f"up_blocks.{b}.resnets.{j}", True)
            sub = 1
            if level in cfg.attention_levels:
                out |= _transformer(f"output_blocks.{n}.1", f"up_blocks.{b}.attentions.{j}", cfg.depth_at(level))
                sub = 2
            if level != 0 and j == nrb:
                up = f"up_blocks.{b}.upsamplers.0"
                out |= _expand(f"output_blocks.{n}.{sub}", up, {"conv": "conv"})
            n += 1
    return out


def convert_diffusers_unet_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: UNetConfig
) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict renamed to the original layout
    (loadable into ``UNetModel(cfg)``). Raises ``ValueError`` on missing or extra keys."""
    key_map = unet_key_map(cfg)
    expected = set(key_map.values())
    missing = sorted(expected - set(state_dict))
    extra = sorted(set(state_dict) - expected)
    if missing or extra:
        raise ValueError(
            f"diffusers U-Net state dict does not fit {cfg}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)})"
        )
    return {orig: state_dict[diff] for orig, diff in key_map.items()}


# --------------------------------------------------------------------------- configs

_DOWN = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
_UP = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}

# diffusers config entries we can represent, with the only value(s) we support
_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# entries that do not change the weights or the fp32 computation
_IGNORED = ("sample_size", "dropout", "upcast_attention", "addition_embed_type_num_heads")


class DiffusersConfigError(OpenSDError):
    """A diffusers U-Net config that opensd's UNetModel cannot represent."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"diffusers U-Net config: {msg}")


def _heads_per_level(cfg: UNetConfig) -> list[int]:
    if cfg.head_channels is None:
        return [cfg.num_heads] * len(cfg.channel_mult)
    return [max(ch // cfg.head_channels, 1) for ch in cfg.level_channels]


def _diffusers_depths(cfg: UNetConfig) -> int | list[int]:
    """diffusers' ``transformer_layers_per_block``: one depth per level, the last one also
    the middle block's (diffusers builds the middle block with ``[-1]``). A level without
    attention takes 1 (as SDXL's ``[1, 2, 10]``), or the middle depth when it is the last
    level (the refiner's ``4``). One int when all are equal."""
    n = len(cfg.channel_mult)
    last = n - 1
    if last in cfg.attention_levels and cfg.depth_at(last) != cfg.middle_depth:
        raise DiffusersConfigError(
            f"the last level's transformer depth ({cfg.depth_at(last)}) differs from the middle block's "
            f"({cfg.middle_depth}); diffusers' UNet2DConditionModel gives both one value"
        )
    depths = [cfg.depth_at(lv) if lv in cfg.attention_levels else 1 for lv in range(n)]
    depths[last] = cfg.middle_depth
    used = [depths[lv] for lv in sorted({*cfg.attention_levels, last})]
    return used[0] if len(set(used)) == 1 else depths


def to_diffusers_unet_config(cfg: UNetConfig, sample_size: int = 64, size_embed_dim: int | None = None) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config (``config.json``) of ``cfg``.

    ``attention_head_dim`` is diffusers' legacy name for the number of heads: an int
    when every level has the same, else one per level (SD 2: ``[5, 10, 20, 20]``; SDXL
    base ``[5, 10, 20]``). A U-Net with ``label_emb`` (SDXL) gets diffusers' "text_time"
    addition embedding: ``projection_class_embeddings_input_dim`` = ``adm_in_channels``
    and ``addition_time_embed_dim`` = ``size_embed_dim``, the width of each Fourier-embedded
    size number (SDConfig.size_embed_dim, 256 in SDXL).
    """
    levels = range(len(cfg.channel_mult))
    heads = _heads_per_level(cfg)
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": [_DOWN[lv in cfg.attention_levels] for lv in levels],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [_UP[lv in cfg.attention_levels] for lv in reversed(levels)],
        "only_cross_attention": False,
        "block_out_channels": list(cfg.level_channels),
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": _diffusers_depths(cfg),
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "upcast_attention": False,
    }
    if cfg.adm_in_channels is not None:
        if not isinstance(size_embed_dim, int) or isinstance(size_embed_dim, bool) or size_embed_dim < 1:
            raise DiffusersConfigError(
                f"a U-Net with label_emb (adm_in_channels={cfg.adm_in_channels}) needs size_embed_dim, "
                f"a positive int, for addition_time_embed_dim; got {size_embed_dim!r}"
            )
        out |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": size_embed_dim,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        }
    return out


def _as_int_list(value: Any, n: int, name: str) -> list[int]:
    vals = [value] * n if isinstance(value, int) else list(value)
    if len(vals) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise DiffusersConfigError(f"{name} must be an int or {n} ints, got {value!r}")
    return vals


def _one_int(d: dict[str, Any], key: str, default: int) -> int:
    v = d.get(key, default)
    if isinstance(v, (list, tuple)) and len(set(v)) == 1:
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise DiffusersConfigError(f"{key} must be one int (equal on all levels), got {v!r}")
    return v


_KNOWN = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", *_FIXED, *_IGNORED,
)


def _heads(d: dict[str, Any], block_out: list[int], attention_levels: tuple[int, ...]) -> tuple[int, int | None]:
    """(num_heads, head_channels): one head count everywhere (SD 1) or one head width
    everywhere (SD 2, SDXL: 64), judged on the levels that attend and the middle block."""
    n = len(block_out)
    heads = _as_int_list(d.get("attention_head_dim", 8), n, "attention_head_dim")
    used = sorted({*attention_levels, n - 1})  # n - 1: the middle block
    if any(heads[lv] < 1 for lv in used):
        raise DiffusersConfigError(f"attention_head_dim {heads} must be positive on the attention levels")
    if len({heads[lv] for lv in used}) == 1:
        return heads[used[0]], None
    widths = {block_out[lv] // heads[lv] for lv in used}
    if len(widths) != 1 or any(block_out[lv] % heads[lv] for lv in used):
        raise DiffusersConfigError(
            f"attention_head_dim {heads} gives neither one head count nor one head width on all attention levels"
        )
    return 8, widths.pop()


def _depths(d: dict[str, Any], n: int, attention_levels: tuple[int, ...]) -> tuple[int | tuple[int, ...], int | None]:
    """(transformer_depth, transformer_depth_middle) from ``transformer_layers_per_block``.

    One int stays one int. A list (SDXL's ``[1, 2, 10]``) becomes SGM's tuple, 0 where a
    level has no attention (``(0, 2, 10)``), or one int when the levels that attend and the
    middle block (diffusers' ``[-1]``) all have the same depth.
    """
    value = d.get("transformer_layers_per_block", 1)
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    per_level = _as_int_list(value, n, "transformer_layers_per_block")
    used = [per_level[lv] for lv in sorted({*attention_levels, n - 1})]
    if any(v < 1 for v in used):
        raise DiffusersConfigError(f"transformer_layers_per_block {per_level} must be positive on the attention levels")
    if len(set(used)) == 1:
        return used[0], None
    depth = tuple(per_level[lv] if lv in attention_levels else 0 for lv in range(n))
    middle = per_level[-1]
    return depth, (None if middle == max(depth[-1], 1) else middle)


def _addition(d: dict[str, Any]) -> tuple[int | None, int | None]:
    """(adm_in_channels, size_embed_dim) of SDXL's "text_time" addition embedding; (None, None) without one."""
    kind = d.get("addition_embed_type")
    adm, size = d.get("projection_class_embeddings_input_dim"), d.get("addition_time_embed_dim")
    if kind is None:
        if adm is not None or size is not None:
            raise DiffusersConfigError(
                "projection_class_embeddings_input_dim and addition_time_embed_dim need addition_embed_type='text_time'"
            )
        return None, None
    if kind != "text_time":
        raise DiffusersConfigError(f"addition_embed_type={kind!r} is not supported (only None or 'text_time', SDXL's)")
    for name, v in (("projection_class_embeddings_input_dim", adm), ("addition_time_embed_dim", size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DiffusersConfigError(f"addition_embed_type='text_time' needs {name}, a positive int; got {v!r}")
    return adm, size


def diffusers_size_embed_dim(d: dict[str, Any]) -> int | None:
    """``addition_time_embed_dim``: SDConfig.size_embed_dim of an SDXL U-Net config (None: no ``y``)."""
    return _addition(d)[1]


def from_diffusers_unet_config(d: dict[str, Any]) -> UNetConfig:
    """A :class:`UNetConfig` from a diffusers ``UNet2DConditionModel`` config dict.

    Missing entries take diffusers' defaults. The SD 1.x, SD 2.x and SDXL (base and
    refiner: per-level transformer depth, "text_time" addition embedding) architectures
    are supported; class embeddings, other block types etc. raise
    :class:`DiffusersConfigError` (a ``ValueError``) naming the entry.
    """
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _KNOWN)
    if unknown:
        raise DiffusersConfigError(f"unsupported entries {unknown}")
    for key, allowed in _FIXED.items():
        if key in d and d[key] not in allowed:
            raise DiffusersConfigError(
                f"{key}={d[key]!r} is not supported (only {allowed[0]!r}); "
                "opensd's UNetModel covers the SD 1.x/2.x/XL architecture"
            )

    block_out = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(block_out)
    if n == 0 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in block_out):
        raise DiffusersConfigError(f"block_out_channels must be positive ints, got {block_out}")
    mc = block_out[0]
    if any(ch % mc for ch in block_out):
        raise DiffusersConfigError(f"block_out_channels {block_out} are not multiples of the first, {mc}")
    down = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    if len(down) != n or any(t not in _DOWN.values() for t in down):
        raise DiffusersConfigError(f"down_block_types must be {n} of {sorted(_DOWN.values())}, got {down}")
    attention_levels = tuple(i for i, t in enumerate(down) if t == _DOWN[True])
    expected_up = [_UP[lv in attention_levels] for lv in reversed(range(n))]
    if up != expected_up:
        raise DiffusersConfigError(f"up_block_types must mirror down_block_types ({expected_up}), got {up}")

    num_heads, head_channels = _heads(d, block_out, attention_levels)
    depth, depth_middle = _depths(d, n, attention_levels)
    adm, _ = _addition(d)
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(ch // mc for ch in block_out),
        num_res_blocks=_one_int(d, "layers_per_block", 2),
        attention_levels=attention_levels,
        num_heads=num_heads,
        head_channels=head_channels,
        transformer_depth=depth,
        transformer_depth_middle=depth_middle,
        context_dim=_one_int(d, "cross_attention_dim", 1280),
        norm_groups=d.get("norm_num_groups", 32),
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        adm_in_channels=adm,
    )
