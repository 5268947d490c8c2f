"""Attention: one multi-head kernel (SDPA) shared by every network in opensd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over ``heads`` heads.

    q: (B, Nq, C), k and v: (B, Nk, C) -> (B, Nq, C). ``mask`` is an additive or
    boolean mask broadcastable to (B, heads, Nq, Nk).
    """
    b, nq, c = q.shape
    nk = k.shape[1]
    d = c // heads
    q = q.view(b, nq, heads, d).transpose(1, 2)  # (B, H, Nq, d)
    k = k.view(b, nk, heads, d).transpose(1, 2)  # (B, H, Nk, d)
    v = v.view(b, nk, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(b, nq, c)  # (B, Nq, C)
