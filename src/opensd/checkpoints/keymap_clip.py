"""CLIP text encoder: state-dict keys and config.json <-> :class:`CLIPTextConfig`.

opensd's :class:`~opensd.models.clip.CLIPTextModel` uses the parameter names of
transformers' ``CLIPTextModel`` checkpoints (``text_model.*``), so a diffusers
``text_encoder/`` folder maps by the identity, and the original SD1 checkpoint by
adding the prefix ``cond_stage_model.transformer.``. SDXL's first text encoder is the
same CLIP ViT-L under ``conditioner.embedders.0.transformer.`` (``SDXL_PREFIX``), and
diffusers' SDXL ``text_encoder/`` the same transformers model. OpenCLIP towers (SD 2.x,
SDXL's second) are converted by :mod:`opensd.checkpoints.keymap_open_clip`.

Two wrinkles that :func:`from_transformers_clip_state_dict` irons out:

- transformers >= 5 keeps ``CLIPTextModel`` parameters without the ``text_model.``
  prefix in memory and *writes them without it* in ``save_pretrained`` (it strips
  the prefix when loading older files). Both spellings occur on disk.
- older checkpoints store the ``position_ids`` buffer, which opensd does not have.

Writing with the ``text_model.`` prefix (the identity map) is read correctly by
every transformers version.
"""

from __future__ import annotations

from typing import Any

from opensd.config import ConfigError
from opensd.models.clip import Activation, CLIPTextConfig

SD1_PREFIX = "cond_stage_model.transformer."
SDXL_PREFIX = "conditioner.embedders.0.transformer."

# transformers CLIPTextConfig defaults, used for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def clip_key_names(cfg: CLIPTextConfig) -> list[str]:
    """All parameter keys of ``CLIPTextModel(cfg)``, in module order (computed, no model built)."""
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for n in range(cfg.layers):
        p = f"text_model.encoder.layers.{n}."
        for module in (
            "layer_norm1",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ):
            keys += [f"{p}{module}.weight", f"{p}{module}.bias"]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return keys


def clip_key_map(cfg: CLIPTextConfig, prefix: str = "") -> dict[str, str]:
    """opensd key -> checkpoint key: ``prefix + key`` (identity for a transformers/diffusers
    text_encoder; ``prefix=SD1_PREFIX`` for the original SD1 single-file checkpoint)."""
    return {k: prefix + k for k in clip_key_names(cfg)}


def from_transformers_clip_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A transformers/diffusers ``text_encoder`` state dict in opensd's keys.

    Accepts keys with or without the ``text_model.`` prefix (every key comes out with
    it) and drops ``position_ids``; a strict ``load_state_dict`` reports unknown keys.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        out["text_model." + name] = value
    return out


def to_transformers_clip_config(
    cfg: CLIPTextConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` config.json dict for ``cfg``.

    Token ids default to CLIP's layout (bos, eos = the last two ids; pad = eos, as
    SD1); pass the tokenizer's ids for other tokenizers. transformers pools at the
    first ``eos_token_id`` in each row.
    """
    bos = cfg.vocab_size - 2 if bos_token_id is None else bos_token_id
    eos = cfg.vocab_size - 1 if eos_token_id is None else eos_token_id
    pad = eos if pad_token_id is None else pad_token_id
    for name, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < cfg.vocab_size:
            raise ConfigError(f"{name} must be an integer in 0..{cfg.vocab_size - 1} (vocab_size - 1), got {value!r}")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_length,
        "hidden_act": cfg.activation.value,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.width,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def from_transformers_clip_config(d: dict[str, Any]) -> CLIPTextConfig:
    """:class:`CLIPTextConfig` from a transformers config.json dict.

    Accepts a ``clip_text_model`` config or a full ``clip`` config (its ``text_config``
    is used); keys it leaves out take transformers' defaults.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"expected a config.json dict, got {type(d).__name__}")
    model_type = d.get("model_type", "clip_text_model")
    if model_type == "clip" and isinstance(d.get("text_config"), dict):
        d = d["text_config"]
        model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ConfigError(
            f"unsupported text encoder model_type {model_type!r}; supported: 'clip_text_model' (or 'clip')"
        )
    get = lambda key: d.get(key, _HF_DEFAULTS[key])  # noqa: E731
    act = get("hidden_act")
    allowed = [a.value for a in Activation]
    if act not in allowed:
        raise ConfigError(f"unsupported hidden_act {act!r}; supported: {', '.join(allowed)}")
    return CLIPTextConfig(
        vocab_size=get("vocab_size"),
        max_length=get("max_position_embeddings"),
        width=get("hidden_size"),
        layers=get("num_hidden_layers"),
        heads=get("num_attention_heads"),
        mlp_width=get("intermediate_size"),
        activation=Activation(act),
        layer_norm_eps=float(get("layer_norm_eps")),
    )
