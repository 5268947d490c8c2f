"""The OpenCLIP text tower (Cherti et al. 2023, "Reproducible scaling laws for
contrastive language-image learning"; Ilharco et al., OpenCLIP): SD 2.x's text encoder
(ViT-H/14) and SDXL's second one (ViT-bigG/14).

The same network as :class:`~opensd.models.clip.CLIPTextModel` (pre-LayerNorm blocks,
causal self-attention, learned positions, a final LayerNorm), written with OpenCLIP's
module names, which are the keys of SD 2.x (``cond_stage_model.model.*``) and SDXL
(``conditioner.embedders.1.model.*``) files::

    token_embedding.weight                              (vocab, width)
    positional_embedding                                (max_length, width)
    transformer.resblocks.N.ln_1.{weight,bias}
    transformer.resblocks.N.attn.in_proj_{weight,bias}  (3 width, width): q, k, v stacked
    transformer.resblocks.N.attn.out_proj.{weight,bias}
    transformer.resblocks.N.ln_2.{weight,bias}
    transformer.resblocks.N.mlp.c_fc.{weight,bias}      (mlp_width, width)
    transformer.resblocks.N.mlp.c_proj.{weight,bias}    (width, mlp_width)
    ln_final.{weight,bias}
    text_projection                                     (width, projection_dim)
    logit_scale                                         ()

SD 2 conditions on the penultimate block's output through ``ln_final``
(``skip_layers=1``); SDXL on the penultimate block's output as it is
(``final_norm=False``) plus the pooled, projected embedding of the last block's.
"""

from __future__ import annotations

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.models.adapters import Linear, adapted
from opensd.models.attention import multihead_attention
from opensd.models.clip import CLIPTextConfig, activation_fn, check_text_input


class OpenCLIPAttention(nn.Module):
    """Causal self-attention with ``nn.MultiheadAttention``'s parameter names. Adapters of the
    fused ``in_proj`` (q, k, v stacked) are keyed on this module (:func:`~opensd.models.adapters.adapted`)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = adapted(self, x, nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias))  # (B, L, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, L, C)
        out: torch.Tensor = self.out_proj(multihead_attention(q, k, v, self.heads, causal=True))
        return out


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = activation_fn(cfg.activation)
        self.c_fc = Linear(cfg.width, cfg.mlp_width)
        self.c_proj = Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.c_proj(self.act(self.c_fc(x)))
        return out


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class OpenCLIPTransformer(nn.Module):
    """The block stack under ``transformer.resblocks`` (a container)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP text encoder: ``forward(input_ids) -> (B, L, width)`` hidden states."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        if not isinstance(cfg, CLIPTextConfig):
            raise ConfigError(f"OpenCLIPTextModel expects a CLIPTextConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width).normal_(std=0.01))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim).normal_(std=cfg.width**-0.5))
            self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), OpenCLIP's initial value

    def _run(self, input_ids: torch.Tensor, stop: int, token_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hidden states after the embedding and after each of the first ``stop`` blocks."""
        length = input_ids.shape[1]
        tokens = self.token_embedding(input_ids.long()) if token_embeds is None else token_embeds
        x = tokens + self.positional_embedding[:length]  # (B, L, C)
        out = [x]
        for block in self.transformer.resblocks[:stop]:
            x = block(x)
            out.append(x)
        return out

    def forward(
        self, input_ids: torch.Tensor, skip_layers: int = 0, final_norm: bool = True,
        token_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, L, width) after block ``layers - skip_layers``, through
        ``ln_final`` unless ``final_norm=False`` (as :meth:`CLIPTextModel.forward`, and
        ``token_embeds`` as there)."""
        check_text_input(self.cfg, input_ids, skip_layers)
        x = self._run(input_ids, self.cfg.layers - skip_layers, token_embeds)[-1]
        return self.ln_final(x) if final_norm else x

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.ln_final(hidden)
        return out

    def hidden_and_pooled(
        self, input_ids: torch.Tensor, skip_layers: int = 1, token_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for SDXL: the hidden states (B, L, width) after block ``layers -
        skip_layers`` without ``ln_final``, and the pooled text embedding (B, projection_dim):
        the last block's output through ``ln_final`` at the end-of-text token (the highest
        id in each row, as OpenCLIP pools), times ``text_projection``. ``token_embeds`` as
        in :meth:`forward` (keep ``input_ids``' end-of-text the highest id of its row)."""
        check_text_input(self.cfg, input_ids, skip_layers)
        if self.cfg.projection_dim is None:
            raise ConfigError("this OpenCLIP text encoder has no text_projection (projection_dim is None)")
        states = self._run(input_ids, self.cfg.layers, token_embeds)
        last = self.ln_final(states[-1])  # (B, L, C)
        eot = input_ids.argmax(dim=-1)  # (B,)
        pooled = last[torch.arange(last.shape[0], device=last.device), eot] @ self.text_projection
        return states[self.cfg.layers - skip_layers], pooled
