"""OpenCLIP text tower <-> transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.

opensd's :class:`~opensd.models.open_clip.OpenCLIPTextModel` keeps OpenCLIP's names (the
keys of SD 2.x and SDXL single files); diffusers folders hold the same network as a
transformers CLIP text model (Cherti et al. 2023 trained it with OpenCLIP; diffusers'
converters re-express it). The two layouts differ in three ways, besides the names:

- attention: OpenCLIP's ``attn.in_proj_weight`` (3 width, width) stacks q, k, v; the
  transformers model has ``self_attn.{q,k,v}_proj``, one (width, width) each (biases alike);
- ``text_projection``: OpenCLIP's (width, projection_dim) parameter multiplies from the
  right (``pooled @ P``); transformers' ``text_projection`` is a bias-free Linear whose
  weight is ``P.T`` (only in ``CLIPTextModelWithProjection``, SDXL's ``text_encoder_2``);
- what is kept: SD 2.x's ``text_encoder`` has 23 of ViT-H's 24 blocks (SD 2 conditions on
  the penultimate block, so diffusers drops the last) and no projection; neither layout
  of transformers has OpenCLIP's ``logit_scale``.

Loading fills what a folder lacks with values that change no output: the missing last
block with zeros, a missing ``text_projection`` with zeros, and ``logit_scale`` with
log(100), the value every trained OpenCLIP model reaches (its clamp). Pooling agrees:
OpenCLIP pools at the highest id in each row, transformers at the first
``eos_token_id``; with CLIP's vocabulary (end-of-text the last id, padding 0) that is the
same token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from opensd.checkpoints.keymap_clip import from_transformers_clip_config, to_transformers_clip_config
from opensd.config import ConfigError
from opensd.models.clip import CLIPTextConfig

LOGIT_SCALE = math.log(100.0)  # OpenCLIP clamps exp(logit_scale) at 100; trained models sit there

_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# per block, without the in_proj (split in three): OpenCLIP -> transformers
_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")
PROJECTION_KEY = "text_projection.weight"


def _block_keys(n: int) -> dict[str, str]:
    """Renamed keys of block ``n``: OpenCLIP -> transformers."""
    src, dst = f"transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}."
    return {f"{src}{o}.{p}": f"{dst}{t}.{p}" for o, t in _BLOCK.items() for p in ("weight", "bias")}


def transformers_key_names(cfg: CLIPTextConfig, layers: int, projection: bool) -> list[str]:
    """Every key of the transformers model holding the first ``layers`` blocks of ``cfg``."""
    keys = list(_TOP.values())
    for n in range(layers):
        keys += _block_keys(n).values()
        keys += [f"text_model.encoder.layers.{n}.self_attn.{q}.{p}" for q in _QKV for p in ("weight", "bias")]
    return keys + ([PROJECTION_KEY] if projection else [])


def to_transformers(
    state: Mapping[str, torch.Tensor], cfg: CLIPTextConfig, *, layers: int | None = None, projection: bool = False
) -> dict[str, torch.Tensor]:
    """An OpenCLIPTextModel state dict (its own keys) -> a transformers one.

    ``layers``: blocks to keep (default all; SD 2.x's ``text_encoder`` keeps
    ``cfg.layers - 1``). ``projection``: write ``text_projection.weight`` (= ours.T), as
    ``CLIPTextModelWithProjection``. ``logit_scale`` is not written.
    """
    layers = cfg.layers if layers is None else layers
    out = {dst: state[src] for src, dst in _TOP.items()}
    for n in range(layers):
        out |= {dst: state[src] for src, dst in _block_keys(n).items()}
        p = f"transformer.resblocks.{n}.attn."
        for name, w in (("weight", state[p + "in_proj_weight"]), ("bias", state[p + "in_proj_bias"])):
            for q, part in zip(_QKV, w.chunk(3, dim=0), strict=False):  # (3 width, ...) -> 3 x (width, ...)
                out[f"text_model.encoder.layers.{n}.self_attn.{q}.{name}"] = part.contiguous()
    if projection:
        if "text_projection" not in state:
            raise ConfigError("this OpenCLIP text encoder has no text_projection to write (projection_dim is None)")
        out[PROJECTION_KEY] = state["text_projection"].t().contiguous()  # (width, P) -> Linear weight (P, width)
    return out


def _normalised(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers keys with the ``text_model.`` prefix (transformers >= 5 writes a
    ``CLIPTextModel`` without it), ``position_ids`` dropped."""
    out = {}
    for key, value in state.items():
        if key == PROJECTION_KEY:
            out[key] = value
            continue
        name = key.removeprefix("text_model.")
        if name != "embeddings.position_ids":
            out["text_model." + name] = value
    return out


def from_transformers(
    state: Mapping[str, torch.Tensor], cfg: CLIPTextConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A transformers CLIP text model's state dict -> (OpenCLIPTextModel keys, notes).

    Blocks the file lacks up to ``cfg.layers`` (SD 2.x's 24th) are zeros; so is a missing
    ``text_projection``; ``logit_scale`` is log(100). ``notes`` says which were filled.
    Keys this table does not know are kept under ``<transformers>.<key>``, so that a
    strict load reports them.
    """
    src = _normalised(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor | None:
        if key in src:
            used.add(key)
            return src[key]
        return None

    notes = []
    for o, t in _TOP.items():
        if (v := take(t)) is not None:
            out[o] = v
    held = [n for n in range(cfg.layers) if any(k.startswith(f"text_model.encoder.layers.{n}.") for k in src)]
    for n in held:
        p = f"text_model.encoder.layers.{n}.self_attn."
        out |= {o: v for o, t in _block_keys(n).items() if (v := take(t)) is not None}
        for name in ("weight", "bias"):
            parts = [take(f"{p}{q}.{name}") for q in _QKV]
            present = [x for x in parts if x is not None]
            if len(present) == len(parts):
                out[f"transformer.resblocks.{n}.attn.in_proj_{name}"] = torch.cat(present, dim=0)  # 3 x (w, ...) -> (3w, ...)
    # blocks after the file's last (SD 2.x's 24th): zeros shaped as that block (a file holding
    # none fills none: the strict load then names every missing key)
    zero_blocks = [n for n in range(max(held, default=cfg.layers) + 1, cfg.layers)]
    for n in zero_blocks:
        last = f"transformer.resblocks.{held[-1]}."
        out |= {f"transformer.resblocks.{n}.{k[len(last):]}": torch.zeros_like(v) for k, v in out.items() if k.startswith(last)}
    if zero_blocks:
        notes.append(f"block(s) {zero_blocks} are not in the file: zeros (unused: SD 2.x conditions on the penultimate block)")
    w = cfg.width
    if cfg.projection_dim is not None:
        proj = take(PROJECTION_KEY)
        if proj is None:
            out["text_projection"] = torch.zeros(w, cfg.projection_dim)
            notes.append("text_projection is not in the file: zeros (unused by SD 2.x)")
        else:
            out["text_projection"] = proj.t().contiguous()  # Linear weight (P, width) -> (width, P)
        out["logit_scale"] = torch.tensor(LOGIT_SCALE)
    for key in sorted(set(src) - used):
        out[f"<transformers>.{key}"] = src[key]
    return out, notes


# ---------------------------------------------------------------------------------------
# config.json


def to_transformers_open_clip_config(
    cfg: CLIPTextConfig, *, layers: int | None = None, projection: bool = False, **token_ids: int | None
) -> dict[str, Any]:
    """transformers config.json of the OpenCLIP tower ``cfg`` with its first ``layers``
    blocks; ``projection``: a ``CLIPTextModelWithProjection`` (``projection_dim`` = ours).
    ``token_ids``: bos/eos/pad_token_id as :func:`to_transformers_clip_config`."""
    out = to_transformers_clip_config(cfg, **token_ids)
    out["num_hidden_layers"] = cfg.layers if layers is None else layers
    if cfg.projection_dim is not None:
        out["projection_dim"] = cfg.projection_dim
    if projection:
        out["architectures"] = ["CLIPTextModelWithProjection"]
    return out


def from_transformers_open_clip_config(d: dict[str, Any], *, extra_layers: int = 0) -> CLIPTextConfig:
    """The OpenCLIP tower of a transformers config.json: ``extra_layers`` more blocks than
    the file holds (1 for SD 2.x, whose 24th block diffusers dropped), ``projection_dim``
    from the file (transformers' default 512 when absent)."""
    cfg = from_transformers_clip_config(d)
    if not isinstance(d, dict):
        raise ConfigError(f"expected a config.json dict, got {type(d).__name__}")
    proj = d.get("projection_dim", 512)
    if isinstance(proj, bool) or not isinstance(proj, int) or proj < 1:
        raise ConfigError(f"projection_dim must be a positive integer, got {proj!r}")
    return dataclasses.replace(cfg, layers=cfg.layers + extra_layers, projection_dim=proj)


__all__ = [
    "from_transformers_open_clip_config",
    "LOGIT_SCALE",
    "to_transformers",
    "from_transformers",
    "transformers_key_names",
    "to_transformers_open_clip_config",
]
