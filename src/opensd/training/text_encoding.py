"""Captions through the text encoders *with* gradients, as the pipeline encodes a prompt.

Fine-tuning that trains inside the text encoders (a text-encoder LoRA, textual inversion)
needs the encoding in the autograd graph; the pipeline's encoder
(:meth:`opensd.pipelines.conditioning.Conditioner.encode_tokenized`) runs without
gradients. :func:`encode_ids` is the same computation for captions of one chunk with every
weight 1 (plain text, no A1111 emphasis), per family:

* SD 1.x: CLIP's last layer through the final LayerNorm (clip skip 1);
* SD 2.x: OpenCLIP's penultimate layer through ``ln_final``, on zero-padded ids;
* SDXL (and the refiner): each encoder's penultimate layer without the final norm,
  concatenated on the width; ``pooled`` is bigG's projected end-of-text state;
* a BERT text encoder (sd1): its last layer, padding masked out of attention and zeroed
  (:func:`opensd.pipelines.conditioning.bert_context`); it takes no ``token_embeds``
  (textual inversion and text-encoder LoRA are CLIP's), a :class:`ConfigError` says so.

``token_embeds(i, encoder, ids)`` may give encoder ``i``'s token embeddings (B, L, width)
for the ids it sees (textual inversion puts its vectors there); None: the lookup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from opensd.config import ConfigError, to_dict
from opensd.models.bert import BertTextModel
from opensd.models.open_clip import OpenCLIPTextModel
from opensd.models.stable_diffusion import ModelFamily, StableDiffusion
from opensd.pipelines.conditioning import OPEN_CLIP_PAD_ID, bert_context, repad
from opensd.training.data import CaptionEncoder, state_hash, tokenizer_hash

TokenEmbeds = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


def encode_ids(model: StableDiffusion, tokenizer: Any, ids: torch.Tensor,
               token_embeds: TokenEmbeds | None = None) -> dict[str, torch.Tensor]:
    """``ids`` (B, L) (the tokenizer's framing) -> ``{"context": (B, L, D)[, "pooled": (B, P)]}``."""
    family = model.cfg.family

    def embeds(i: int, enc: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return None if token_embeds is None else token_embeds(i, enc, x)

    if model.cfg.has_bert:
        if token_embeds is not None:
            raise ConfigError("this model's text encoder is a BERT: textual inversion and text-encoder training need CLIP")
        return {"context": bert_context(model, ids, tokenizer.eos_id)}
    encoders = model.text_encoders
    if family is ModelFamily.SD1:
        return {"context": encoders[0](ids, skip_layers=0, token_embeds=embeds(0, encoders[0], ids))}
    zero_padded = repad(ids, tokenizer.eos_id, OPEN_CLIP_PAD_ID)
    if family is ModelFamily.SD2:
        return {"context": encoders[0](zero_padded, skip_layers=1, token_embeds=embeds(0, encoders[0], zero_padded))}
    parts, pooled = [], None
    for i, enc in enumerate(encoders):
        if isinstance(enc, OpenCLIPTextModel):
            hidden, pooled = enc.hidden_and_pooled(zero_padded, 1, token_embeds=embeds(i, enc, zero_padded))
        else:
            hidden = enc(ids, skip_layers=1, final_norm=False, token_embeds=embeds(i, enc, ids))
        parts.append(hidden)  # (B, L, D_i)
    assert pooled is not None
    return {"context": torch.cat(parts, dim=-1), "pooled": pooled}


def caption_encoder(conditioner, tokenizer) -> CaptionEncoder:
    """Captions -> ``{"context": (B, L, D)[, "pooled": (B, P)]}``, as the pipeline encodes
    a prompt of one chunk (the family's text layers, SDXL's two encoders and re-padding),
    but read as plain text: the tokenizer's framing and truncation, no A1111 syntax, every
    weight 1 (so an SD 1.x context is the text encoder's output, bit for bit)."""
    from opensd.prompts.syntax import Chunk, TokenizedPrompt

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        ids = tokenizer(captions)  # (B, ctx)
        n = ids.shape[1]
        prompts = [TokenizedPrompt([Chunk(row, [1.0] * n, [-1] * n)], [], n, n) for row in ids.tolist()]
        text = conditioner.encode_tokenized(prompts)
        return {"context": text.context} if text.pooled is None else {"context": text.context, "pooled": text.pooled}

    return encode


def text_cache_hash(encoders: Sequence[nn.Module], tokenizer, family: ModelFamily) -> str:
    """What names the cache's text part: the encoders' weights and configs and the tokenizer
    (for SD 1.x exactly what opensd hashed before families, so its caches are found again)."""
    configs = [to_dict(e.cfg) for e in encoders]
    described: dict[str, Any] = configs[0] if family is ModelFamily.SD1 else {"family": family.value, "text": configs}
    if any(isinstance(e, BertTextModel) for e in encoders):  # its context: last layer, padding zeroed
        described = {"text_encoder": "bert", "text": configs, "padding": "zeroed"}
    return state_hash(*encoders, extra=json.dumps(described).encode() + tokenizer_hash(tokenizer).encode())
