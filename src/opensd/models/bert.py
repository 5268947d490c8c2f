"""BERT text encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding"), sized for MiniLM (Wang et al. 2020, "MiniLM:
Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
Transformers"): the 6-layer, 384-wide student that sentence-transformers fine-tuned into
``all-MiniLM-L6-v2``.

A stack of post-LayerNorm blocks with bidirectional self-attention over the sum of token,
absolute position and token-type (segment) embeddings, itself LayerNormed::

    x = LN(word[ids] + position[0..L) + token_type[types])
    per block:  x = LN(x + dense(attention(x, padding masked)))
                x = LN(x + dense(gelu(dense(x))))          (exact, erf GELU)

Padding is masked out of the keys, so a real token's hidden state does not depend on
the padding after it. Padded positions still get (meaningless) hidden states; a
consumer drops them by the attention mask (:func:`mean_pool`). There is no dropout: the
encoder is meant to run frozen.

Parameter names equal transformers' ``BertModel`` state dict (and so the checkpoint of
``all-MiniLM-L6-v2``), so weights load with no key map::

    embeddings.{word,position,token_type}_embeddings.weight   (vocab | positions | types, width)
    embeddings.LayerNorm.{weight,bias}
    encoder.layer.N.attention.self.{query,key,value}.{weight,bias}
    encoder.layer.N.attention.output.dense.{weight,bias}
    encoder.layer.N.attention.output.LayerNorm.{weight,bias}
    encoder.layer.N.intermediate.dense.{weight,bias}          (mlp_width, width)
    encoder.layer.N.output.dense.{weight,bias}                (width, mlp_width)
    encoder.layer.N.output.LayerNorm.{weight,bias}
    pooler.dense.{weight,bias}                                (only with ``pooler=True``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opensd.config import ConfigError
from opensd.models.adapters import Linear
from opensd.models.attention import multihead_attention


@dataclass(frozen=True)
class BertTextConfig:
    """Shape of a BERT encoder. ``max_positions``: the number of position embeddings
    (the longest input); ``type_vocab_size``: the number of segment types;
    ``pooler``: whether the model has BERT's pooler (a tanh layer on the first token).
    ``kind`` tags the config where it may be another text encoder's (``SDConfig.text``:
    ``{"kind": "bert", ...}`` in a model's config.json); it is always ``"bert"``."""

    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    width: int = 384
    layers: int = 6
    heads: int = 12
    mlp_width: int = 1536
    layer_norm_eps: float = 1e-12
    pooler: bool = False
    kind: str = "bert"

    def __post_init__(self) -> None:
        if self.kind != "bert":
            raise ConfigError(f"BertTextConfig.kind must be 'bert', got {self.kind!r:.40}")
        for name in ("vocab_size", "max_positions", "type_vocab_size", "width", "layers", "heads", "mlp_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BertTextConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads != 0:
            raise ConfigError(
                f"BertTextConfig: width {self.width} must be divisible by heads {self.heads} (head size = width / heads)"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"BertTextConfig.layer_norm_eps must be a number in (0, 1), got {eps!r}")
        if not isinstance(self.pooler, bool):
            raise ConfigError(f"BertTextConfig.pooler must be true or false, got {self.pooler!r}")

    @property
    def max_length(self) -> int:
        """The longest input in tokens (``max_positions``): the prompt chunk length's bound,
        as :attr:`CLIPTextConfig.max_length <opensd.models.clip.CLIPTextConfig.max_length>`."""
        return self.max_positions

    @classmethod
    def minilm_l6(cls, pooler: bool = True) -> BertTextConfig:
        """all-MiniLM-L6-v2 (22,713,216 parameters with its pooler, 22,565,376 without).

        Its checkpoint ships the pooler of the MiniLM it was fine-tuned from, unused by
        sentence-transformers' mean pooling; ``pooler=False`` builds the model without it."""
        return cls(pooler=pooler)

    @classmethod
    def tiny(cls) -> BertTextConfig:
        """About 22 k parameters, for unit tests."""
        return cls(vocab_size=99, max_positions=16, width=32, layers=2, heads=4, mlp_width=64, pooler=True)


# ---- helpers ---------------------------------------------------------------------------


def check_bert_input(
    cfg: BertTextConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
) -> None:
    """Raise ValueError unless ``input_ids`` is a (B, L <= max_positions) integer tensor and the
    mask and token types, when given, are integer or bool tensors of its shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (B, L) tensor, got {shape}")
    if not 1 <= input_ids.shape[1] <= cfg.max_positions:
        raise ValueError(f"input_ids length {input_ids.shape[1]} must be in 1..{cfg.max_positions} (max_positions)")
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")
        if t.dtype.is_floating_point or t.dtype.is_complex or (t.dtype == torch.bool and name == "input_ids"):
            raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, C): the mean of ``hidden`` (B, L, C) over the positions where ``attention_mask``
    (B, L) is nonzero: sentence-transformers' mean pooling (Reimers and Gurevych 2019,
    "Sentence-BERT"). A row without any such position gives zeros."""
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mean_pool expects hidden (B, L, C) and attention_mask (B, L), got {tuple(hidden.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    weights = (attention_mask != 0).to(hidden.dtype)[..., None]  # (B, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


# ---- blocks ----------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Token + absolute position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:length]  # (B, L, C)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # every token in segment 0
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        out: torch.Tensor = self.LayerNorm(x)
        return out


class BertSelfAttention(nn.Module):
    """The q/k/v projections; attention itself is :func:`multihead_attention` (SDPA)."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.query = Linear(cfg.width, cfg.width)
        self.key = Linear(cfg.width, cfg.width)
        self.value = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``keep``: bool (B, 1, 1, L), True at the keys a query may attend to; None: all."""
        return multihead_attention(self.query(x), self.key(x), self.value(x), self.heads, mask=keep)


class BertAddNorm(nn.Module):
    """``LN(residual + dense(x))``: the output of both sub-blocks (post-LayerNorm)."""

    def __init__(self, cfg: BertTextConfig, in_width: int) -> None:
        super().__init__()
        self.dense = Linear(in_width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(residual + self.dense(x))
        return out


class BertAttention(nn.Module):
    """Self-attention (``self``) and its add & norm (``output``), named as in transformers."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertAddNorm(cfg, cfg.width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(x, keep), x)
        return out


class BertIntermediate(nn.Module):
    """The MLP's first layer and exact GELU."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)), then x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAddNorm(cfg, cfg.mlp_width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, keep)
        out: torch.Tensor = self.output(self.intermediate(x), x)
        return out


class BertEncoder(nn.Module):
    """The block stack (a container: :class:`BertTextModel` runs it)."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))


class BertPooler(nn.Module):
    """BERT's pooled output: tanh(dense(hidden state of the first token, [CLS]))."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.width, cfg.width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C)


# ---- model -----------------------------------------------------------------------------


class BertTextModel(nn.Module):
    """BERT encoder: ``forward(input_ids, attention_mask) -> (B, L, width)`` hidden states."""

    def __init__(self, cfg: BertTextConfig) -> None:
        super().__init__()
        if not isinstance(cfg, BertTextConfig):
            raise ConfigError(f"BertTextModel expects a BertTextConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if cfg.pooler else None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last block's hidden states (B, L, width).

        ``input_ids``: (B, L) integer ids, L <= ``cfg.max_positions``, framed as
        ``[CLS] ... [SEP] [PAD]...`` by :class:`~opensd.tokenizers.wordpiece.WordPieceTokenizer`.
        ``attention_mask``: (B, L), nonzero (or True) at real tokens, 0 at padding, which
        no token attends to; every row needs one real token. None: no padding.
        ``token_type_ids``: (B, L) segment ids; None: all 0 (one sentence).
        """
        check_bert_input(self.cfg, input_ids, attention_mask, token_type_ids)
        keep = None
        if attention_mask is not None:
            real = attention_mask != 0  # (B, L)
            if not bool(real.any(dim=1).all()):
                raise ValueError("attention_mask has a row with no real token (all zeros)")
            keep = real[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries
        types = None if token_type_ids is None else token_type_ids.long()
        x: torch.Tensor = self.embeddings(input_ids.long(), types)  # (B, L, C)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output (B, width) from :meth:`forward`'s hidden states (transformers'
        ``pooler_output``). Only for a model built with ``pooler=True``."""
        if self.pooler is None:
            raise ValueError("this BertTextModel has no pooler (BertTextConfig.pooler is false)")
        out: torch.Tensor = self.pooler(hidden)
        return out

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, width): the unit-length mean of the real tokens' hidden states, as
        sentence-transformers' all-MiniLM-L6-v2 embeds a sentence (mean pooling, L2 normalize)."""
        hidden: torch.Tensor = self(input_ids, attention_mask)
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)
