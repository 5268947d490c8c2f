"""CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"): the text encoder of Stable Diffusion.

A GPT-2-style stack of pre-LayerNorm blocks with causal self-attention over
token embeddings + learned position embeddings, then a final LayerNorm. SD1.x
conditions the U-Net on the whole last hidden state (B, 77, 768) of OpenAI's
ViT-L/14 text tower; "clip skip 2" (A1111) takes the output of the penultimate
block instead (still passed through the final LayerNorm). The pooled output (the
hidden state at the first end-of-text token) is what contrastive CLIP training
projects into the joint embedding space.

Parameter names equal transformers' ``CLIPTextModel`` and the original SD
checkpoint's ``cond_stage_model.transformer.*`` keys, so weights load without a
key map::

    text_model.embeddings.token_embedding.weight              (vocab, width)
    text_model.embeddings.position_embedding.weight           (max_length, width)
    text_model.encoder.layers.N.layer_norm1.{weight,bias}
    text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.N.layer_norm2.{weight,bias}
    text_model.encoder.layers.N.mlp.fc1.{weight,bias}         (mlp_width, width)
    text_model.encoder.layers.N.mlp.fc2.{weight,bias}         (width, mlp_width)
    text_model.final_layer_norm.{weight,bias}
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opensd.config import ConfigError
from opensd.models.adapters import Linear
from opensd.models.attention import multihead_attention


class Activation(enum.Enum):
    """MLP activation: ``quick_gelu`` (OpenAI CLIP, SD1) or exact ``gelu`` (OpenCLIP, SD2)."""

    QUICK_GELU = "quick_gelu"
    GELU = "gelu"


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer. ``max_length`` is the number of positions."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: Activation = Activation.QUICK_GELU
    layer_norm_eps: float = 1e-5
    # Width of the pooled output's projection (OpenCLIP's ``text_projection``); None: none.
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_length", "width", "layers", "heads", "mlp_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads != 0:
            raise ConfigError(
                f"CLIPTextConfig: width {self.width} must be divisible by heads {self.heads} "
                f"(head size = width / heads)"
            )
        if not isinstance(self.activation, Activation):
            allowed = ", ".join(repr(a.value) for a in Activation)
            raise ConfigError(f"CLIPTextConfig.activation must be an Activation ({allowed}), got {self.activation!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"CLIPTextConfig.layer_norm_eps must be a number in (0, 1), got {eps!r}")
        p = self.projection_dim
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ConfigError(f"CLIPTextConfig.projection_dim must be None or a positive integer, got {p!r}")

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14 text tower, SD1.x's text encoder (123,060,480 parameters)."""
        return cls()

    @classmethod
    def open_clip_vit_h(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H/14 text tower, SD 2.x's text encoder (354,032,641 parameters)."""
        return cls(width=1024, layers=24, heads=16, mlp_width=4096, activation=Activation.GELU, projection_dim=1024)

    @classmethod
    def open_clip_vit_bigg(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG/14 text tower, SDXL's second text encoder (694,659,841 parameters)."""
        return cls(width=1280, layers=32, heads=20, mlp_width=5120, activation=Activation.GELU, projection_dim=1280)

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """About 21 k parameters, for unit tests."""
        return cls(vocab_size=99, max_length=16, width=32, layers=2, heads=4, mlp_width=64)

    @classmethod
    def small(cls) -> CLIPTextConfig:
        """About 3.7 M parameters, for CPU training with a :class:`WordTokenizer` of <= 2048 words."""
        return cls(
            vocab_size=2048, max_length=32, width=256, layers=4, heads=4, mlp_width=1024, activation=Activation.GELU
        )


# ---- helpers ---------------------------------------------------------------------------


def check_text_input(cfg: CLIPTextConfig, input_ids: torch.Tensor, skip_layers: int) -> None:
    """Raise ValueError unless ``input_ids`` is a (B, L <= max_length) integer tensor and
    ``skip_layers`` leaves at least one block."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (B, L) tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if not 1 <= input_ids.shape[1] <= cfg.max_length:
        raise ValueError(f"input_ids length {input_ids.shape[1]} must be in 1..{cfg.max_length} (max_length)")
    if isinstance(skip_layers, bool) or not isinstance(skip_layers, int) or not 0 <= skip_layers < cfg.layers:
        raise ValueError(f"skip_layers must be an integer in 0..{cfg.layers - 1}, got {skip_layers!r}")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def activation_fn(activation: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    return quick_gelu if activation is Activation.QUICK_GELU else F.gelu


# ---- blocks ----------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding.weight[:length]  # (B, L, C)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = Linear(cfg.width, cfg.width)
        self.k_proj = Linear(cfg.width, cfg.width)
        self.v_proj = Linear(cfg.width, cfg.width)
        self.out_proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out: torch.Tensor = self.out_proj(multihead_attention(q, k, v, self.heads, causal=True))
        return out


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = activation_fn(cfg.activation)
        self.fc1 = Linear(cfg.width, cfg.mlp_width)
        self.fc2 = Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        out: torch.Tensor = x + self.mlp(self.layer_norm2(x))
        return out


class CLIPEncoder(nn.Module):
    """The block stack (a container: :class:`CLIPTextModel` runs it, so it can stop early)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, blocks, final LayerNorm under the ``text_model.`` prefix (a container)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


# ---- model -----------------------------------------------------------------------------


class CLIPTextModel(nn.Module):
    """CLIP text encoder: ``forward(input_ids) -> (B, L, width)`` hidden states."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        if not isinstance(cfg, CLIPTextConfig):
            raise ConfigError(f"CLIPTextModel expects a CLIPTextConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(
        self, input_ids: torch.Tensor, skip_layers: int = 0, final_norm: bool = True,
        token_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, L, width), after the final LayerNorm unless ``final_norm=False``.

        ``input_ids``: (B, L) integer ids, L <= ``cfg.max_length``. ``skip_layers``: how
        many of the last blocks to skip; 1 is A1111's "clip skip 2" (the penultimate
        block's output, then the final LayerNorm). SDXL takes the penultimate block's
        output without the final LayerNorm (``skip_layers=1, final_norm=False``).
        ``token_embeds`` (B, L, width) replaces the token-embedding lookup (textual
        inversion puts its vectors there); ``input_ids`` still gives the length.
        """
        check_text_input(self.cfg, input_ids, skip_layers)
        tm = self.text_model
        x = tm.embeddings(input_ids.long(), token_embeds)  # (B, L, C)
        for layer in tm.encoder.layers[: self.cfg.layers - skip_layers]:
            x = layer(x)
        out: torch.Tensor = tm.final_layer_norm(x) if final_norm else x
        return out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.text_model.final_layer_norm(hidden)
        return out

    @staticmethod
    def pooled(hidden: torch.Tensor, input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        """(B, width): ``hidden`` (B, L, width) at the first ``eos_id`` in each row of ``input_ids`` (B, L).

        Every row must contain ``eos_id`` (the tokenizers always put one).
        """
        if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2]:
            raise ValueError(
                f"pooled expects hidden (B, L, C) and input_ids (B, L), got {tuple(hidden.shape)} "
                f"and {tuple(input_ids.shape)}"
            )
        is_eos = input_ids == eos_id  # (B, L)
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"pooled: some rows of input_ids hold no eos token (id {eos_id})")
        first = is_eos.int().argmax(dim=1)  # (B,) argmax returns the first maximum
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
