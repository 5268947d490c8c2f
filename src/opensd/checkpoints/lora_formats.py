"""LoRA file formats: every key of a file -> (layer, part), grouped into :class:`LayerWeights`.

A LoRA key is ``<layer>.<suffix>``; the suffix says the format and which tensor it is:

* kohya / A1111 / LyCORIS, layers named ``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``,
  ``lora_te2_*`` (see :mod:`opensd.checkpoints.lora_names`):

  - LoRA / LoCon: ``lora_down.weight`` (r, in[, kh, kw]), ``lora_up.weight`` (out, r[, 1, 1]),
    optional Tucker core ``lora_mid.weight`` (r, r, kh, kw), ``alpha``;
  - LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optional Tucker cores
    ``hada_t1``, ``hada_t2``, ``alpha``;
  - LoKr: ``lokr_w1`` or ``lokr_w1_a`` + ``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a`` +
    ``lokr_w2_b``, optional ``lokr_t2``, ``alpha``;
  - full: ``diff`` (a whole ΔW) and optional ``diff_b`` (a bias change);

* PEFT (diffusers >= 0.22), layers named ``unet.<diffusers path>``, ``text_encoder.<path>``,
  ``text_encoder_2.<path>``: ``lora_A.weight`` (down), ``lora_B.weight`` (up), optional
  ``alpha``; or an alpha per layer in the ``lora_adapter_metadata`` JSON of the
  safetensors header (diffusers' PEFT ``LoraConfig``: ``<prefix>.lora_alpha``,
  ``<prefix>.alpha_pattern``, ``<prefix>.use_rslora``);
* diffusers before PEFT: ``lora.down.weight`` / ``lora.up.weight``,
  ``lora_linear_layer.down.weight`` / ``.up.weight``, and the attention-processor format
  ``<attention>.processor.to_q_lora.down.weight`` (``to_q_lora``, ``to_k_lora``,
  ``to_v_lora``, ``to_out_lora`` -> ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; in a text
  encoder ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``). U-Net names may lack the
  ``unet.`` prefix (what ``unet.load_attn_procs`` read).

Scale: kohya and LyCORIS multiply by ``alpha / rank`` (alpha missing or 0: ``rank``); a
LoKr layer with both halves full ignores alpha (LyCORIS); PEFT's alpha is ``rank`` unless
the file says otherwise (``alpha / sqrt(rank)`` with ``use_rslora``). The alpha stored in
:class:`LayerWeights` is the one that gives ``scale = alpha / rank`` in all of them.

LyCORIS' ``scalar`` keys are skipped (LyCORIS folds the scalar into the weights when
saving and resets it to 1 when loading); DoRA, IA3, OFT, GLoRA and norm-layer files are
refused by name. Reading is one dict lookup per key and suffix length.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from opensd.checkpoints.io import CheckpointError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
# first path parts of a diffusers U-Net module: a name starting with one lacks its "unet." prefix
BARE_UNET_ROOTS = frozenset({"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding",
                             "add_embedding", "conv_norm_out"})


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One layer of a LoRA file. ``kind``: ``"lora"`` (down/up, optional mid), ``"loha"``
    (w1a, w1b, w2a, w2b, optional t1, t2), ``"lokr"`` (w1 or w1a/w1b, w2 or w2a/w2b,
    optional t2) or ``"full"`` (diff, optional diff_b). ``tensors`` by those names;
    ``alpha`` None when the file has none (alpha = rank)."""

    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None


@dataclass(frozen=True)
class Part:
    """What a key suffix is: its format ``family`` (``"kohya"``, ``"lycoris"``, ``"peft"``,
    ``"diffusers"``; ``""`` for ``alpha``, which every format has), the layer ``kind`` and
    the tensor ``name`` in it; ``rename``: the processor format's layer (U-Net, text encoder)."""

    family: str
    kind: str
    name: str
    rename: tuple[str, str] | None = None


def _processor_parts() -> dict[str, Part]:
    out = {}
    for proj, unet, text in (("to_q", "to_q", "q_proj"), ("to_k", "to_k", "k_proj"), ("to_v", "to_v", "v_proj"),
                             ("to_out", "to_out.0", "out_proj")):
        for side, name in (("down", "down"), ("up", "up")):
            out[f"{proj}_lora.{side}.weight"] = Part("diffusers", "lora", name, (unet, text))
    return out


SUFFIXES: dict[str, Part] = {
    "alpha": Part("", "", "alpha"),
    "lora_down.weight": Part("kohya", "lora", "down"),
    "lora_up.weight": Part("kohya", "lora", "up"),
    "lora_mid.weight": Part("kohya", "lora", "mid"),
    **{f"hada_{k}": Part("lycoris", "loha", k.replace("_", "")) for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{k}": Part("lycoris", "lokr", k.replace("_", "")) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "diff": Part("lycoris", "full", "diff"),
    "diff_b": Part("lycoris", "full", "diff_b"),
    "lora_A.weight": Part("peft", "lora", "down"),
    "lora_B.weight": Part("peft", "lora", "up"),
    "lora.down.weight": Part("diffusers", "lora", "down"),
    "lora.up.weight": Part("diffusers", "lora", "up"),
    "lora_linear_layer.down.weight": Part("diffusers", "lora", "down"),
    "lora_linear_layer.up.weight": Part("diffusers", "lora", "up"),
    **_processor_parts(),
}
SKIPPED = frozenset({"scalar"})
REFUSED = {
    "dora_scale": "DoRA (dora_scale: a weight-decomposed LoRA)",
    "lora_magnitude_vector": "DoRA (PEFT lora_magnitude_vector)",
    "lora_B.bias": "a PEFT LoRA with bias (lora_B.bias)",
    "on_input": "LyCORIS (IA)^3",
    "oft_blocks": "LyCORIS OFT/BOFT",
    "a1.weight": "LyCORIS GLoRA",
    "w_norm": "LyCORIS norm-layer",
    "b_norm": "LyCORIS norm-layer",
}
KNOWN = "kohya/LyCORIS lora_down/lora_up/lora_mid/hada_*/lokr_*/diff/alpha, PEFT lora_A/lora_B, diffusers lora.down/lora.up"
# per kind, the tensors a layer needs: one of each group
NEED = {"lora": (("down",), ("up",)), "loha": (("w1a",), ("w1b",), ("w2a",), ("w2b",)), "full": (("diff",),),
        "lokr": (("w1", "w1a"), ("w2", "w2a"))}


class LoRAError(CheckpointError):
    """A LoRA or embedding file cannot be read, or does not fit the model."""

    kind = "LoRAError"


class FormatError(LoRAError):
    """A file's keys do not make a LoRA (one line; :mod:`opensd.checkpoints.lora` adds the file's name)."""


def split_key(key: str) -> tuple[str, str] | None:
    """``key`` -> (layer, suffix) for the longest known suffix (of 3, 2 or 1 dotted parts); None if none fits."""
    parts = key.split(".")
    for n in (3, 2, 1):
        if len(parts) > n:
            suffix = ".".join(parts[-n:])
            if suffix in SUFFIXES or suffix in REFUSED or suffix in SKIPPED:
                return ".".join(parts[:-n]), suffix
    return None


def _naming(layer: str) -> str:
    return "kohya" if layer.startswith(KOHYA_PREFIXES) else "diffusers"


def _diffusers_layer(layer: str, part: Part) -> str:
    """A diffusers-named layer as :func:`lora_targets` spells it: ``unet.`` + path, text encoders
    with ``text_model.``, the processor format's attention projection named."""
    root, _, rest = layer.partition(".")
    if root in BARE_UNET_ROOTS:
        root, rest = "unet", layer
    if part.rename is not None:
        rest = f"{rest.removesuffix('.processor')}.{part.rename[0] if root == 'unet' else part.rename[1]}"
    if root in ("text_encoder", "text_encoder_2") and not rest.startswith("text_model."):
        rest = "text_model." + rest  # transformers 5 saves CLIPTextModel's modules without text_model.
    return f"{root}.{rest}"


def _format_of(naming: str, family: str) -> str:
    if naming == "kohya":
        if family in ("peft", "diffusers"):
            raise FormatError(f"a {family} suffix on a kohya-named layer")
        return "kohya"
    if family in ("kohya", "lycoris"):
        raise FormatError(f"a kohya/LyCORIS suffix on a diffusers-named layer (kohya names start with {KOHYA_PREFIXES[0]} "
                          "or lora_te)")
    return {"peft": "PEFT", "diffusers": "diffusers (pre-PEFT)"}.get(family, "")


def read_layers(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, LayerWeights]:
    """``state``'s keys grouped by layer (named as :func:`lora_targets` spells it) with their
    scale's alpha. Raises :class:`FormatError` for an unknown, refused or misplaced key, a file
    mixing formats, a layer missing a tensor or mixing kinds, and a file with no layers."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    formats: dict[str, str] = {}  # format -> its first key
    for key, tensor in state.items():
        split = split_key(key)
        if split is None:
            raise FormatError(f"key {key!r} is not a LoRA weight opensd knows ({KNOWN})")
        layer, suffix = split
        if suffix in SKIPPED:
            continue
        if suffix in REFUSED:
            raise FormatError(f"key {key!r}: {REFUSED[suffix]} files are not supported; opensd reads LoRA, LoCon, "
                              "LoHa, LoKr and full-diff layers")
        part = SUFFIXES[suffix]
        naming = _naming(layer)
        try:
            fmt = _format_of(naming, part.family)
        except FormatError as e:
            raise FormatError(f"key {key!r}: {e}") from None
        if fmt:
            formats.setdefault(fmt, key)
        if naming == "diffusers":
            layer = _diffusers_layer(layer, part)
        if part.kind:
            had = kinds.setdefault(layer, part.kind)
            if had != part.kind:
                raise FormatError(f"layer {layer!r} mixes {had} and {part.kind} tensors (key {key!r})")
        groups.setdefault(layer, {})[part.name] = tensor
    if len(formats) > 1:
        (f1, k1), (f2, k2) = list(formats.items())[:2]
        raise FormatError(f"mixes formats: {k1!r} is {f1}, {k2!r} is {f2}; a LoRA file holds one format")
    peft = peft_alphas(metadata)
    out = {layer: _layer(layer, kinds.get(layer), parts, peft) for layer, parts in groups.items()}
    if not out:
        raise FormatError("holds no LoRA layers")
    return out


def _layer(layer: str, kind: str | None, parts: dict[str, torch.Tensor], peft: PeftAlphas | None) -> LayerWeights:
    alpha_t = parts.pop("alpha", None)
    if kind is None:
        raise FormatError(f"layer {layer!r} has an alpha but no weights")
    for options in NEED[kind]:
        if not any(o in parts for o in options):
            raise FormatError(f"layer {layer!r} ({kind}) lacks its {' or '.join(options)} tensor")
    if kind == "lokr":
        for half in ("w1", "w2"):
            if half not in parts and f"{half}b" not in parts:
                raise FormatError(f"layer {layer!r} (lokr) has lokr_{half}_a but no lokr_{half}_b")
    if kind == "loha" and ("t1" in parts) != ("t2" in parts):
        raise FormatError(f"layer {layer!r} (loha) has one Tucker core of hada_t1/hada_t2 but not the other")
    for k, t in parts.items():
        if not t.is_floating_point():
            raise FormatError(f"layer {layer!r}: its {k} tensor is {str(t.dtype).replace('torch.', '')}, not float")
    alpha = None
    if alpha_t is not None:
        if alpha_t.numel() != 1:
            raise FormatError(f"layer {layer!r}: alpha must be one number, got shape {tuple(alpha_t.shape)}")
        alpha = float(alpha_t.reshape(()).item())
        alpha = None if alpha == 0 or not math.isfinite(alpha) else alpha  # kohya/LyCORIS: 0 means rank
    elif peft is not None and kind == "lora" and not layer.startswith(KOHYA_PREFIXES):
        alpha = peft.alpha(layer, parts["down"].shape[0])
    return LayerWeights(kind, parts, alpha)


# ----------------------------------------------------------------------------- PEFT metadata


@dataclass(frozen=True)
class PeftAlphas:
    """The alphas of diffusers' ``lora_adapter_metadata`` (PEFT ``LoraConfig`` per network prefix)."""

    configs: Mapping[str, Mapping[str, object]]  # "unet" / "text_encoder" / "text_encoder_2" -> config

    def alpha(self, layer: str, rank: int) -> float | None:
        """The alpha giving ``scale = alpha / rank`` for ``layer`` (``unet.<module>``), None: rank."""
        prefix, _, module = layer.partition(".")
        cfg = self.configs.get(prefix)
        if cfg is None:
            return None
        alpha = cfg.get("lora_alpha")
        patterns: Any = cfg.get("alpha_pattern") or {}  # a JSON value from the header, as PEFT reads it
        for pattern, value in dict(patterns).items():  # PEFT's get_pattern_key
            try:
                hit = re.match(rf"(.*\.)?({pattern})$", module) or re.match(rf"(.*\.)?({pattern})$", module.removeprefix("text_model."))
            except re.error:
                raise FormatError(f"lora_adapter_metadata: alpha_pattern {pattern!r} is no regular expression") from None
            if hit:
                alpha = value
                break
        if alpha is None:
            return None
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise FormatError(f"lora_adapter_metadata: {prefix} lora_alpha must be a number, got {alpha!r:.40}")
        return float(alpha) * math.sqrt(rank) if cfg.get("use_rslora") else float(alpha)  # rsLoRA: alpha / sqrt(r)


def peft_alphas(metadata: Mapping[str, str]) -> PeftAlphas | None:
    """The PEFT configs in a safetensors header's ``lora_adapter_metadata`` (None: there is none)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        flat = json.loads(raw)
    except ValueError:
        raise FormatError("lora_adapter_metadata in the header is not valid JSON") from None
    if not isinstance(flat, dict):
        raise FormatError("lora_adapter_metadata in the header must be a JSON object")
    configs: dict[str, dict[str, object]] = {}
    for key, value in flat.items():  # diffusers packs each network's config as "<prefix>.<field>"
        prefix, _, field = str(key).partition(".")
        if prefix in PEFT_PREFIXES and field:
            configs.setdefault(prefix, {})[field] = value
    return PeftAlphas(configs)


# ----------------------------------------------------------------------------- family guess


CONTEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


def guess_family(layers: Mapping[str, LayerWeights]) -> tuple[str, str] | None:
    """(family, why) a file's layers look made for, from their names and cross-attention width; None: no clue."""
    for name, layer in layers.items():
        for prefix in ("lora_te1_", "lora_te2_", "text_encoder_2."):
            if name.startswith(prefix):
                return "SDXL", f"{prefix}* keys"
        if "input_blocks_4_1_transformer_blocks_1" in name or "down_blocks_1_attentions_0_transformer_blocks_1" in name:
            return "SDXL", "two transformer blocks at 64x64"
        if name.endswith(("attn2_to_k", "attn2.to_k")) and layer.kind == "lora":
            width = layer.tensors["down"].shape[1]
            if width in CONTEXT_WIDTH:
                return CONTEXT_WIDTH[width], f"{width}-wide cross-attention"
    return None
