"""The spatial transformer of the Stable Diffusion U-Net (LDM's ``attention.py``).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
Sec. 3.3: a feature map is flattened into a sequence of ``H*W`` tokens, each
transformer block applies self-attention, cross-attention to the text context
(queries from the image, keys and values from the text) and a GEGLU feed-forward
(Shazeer 2020), each pre-normed with LayerNorm and added back residually.

Attribute names equal the original checkpoint keys: ``norm``, ``proj_in``,
``transformer_blocks.D.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}``,
``transformer_blocks.D.ff.net.{0.proj,2}``, ``transformer_blocks.D.norm{1,2,3}``,
``proj_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opensd import attention_kernels
from opensd.models.adapters import Conv2d, Linear
from opensd.models.capture import AttentionSink, active_sink
from opensd.models.layers import add_fresh, group_norm, mul_fresh


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (B, N, query_dim) to ``context`` (B, L, context_dim).

    With ``context=None`` it is self-attention (``context_dim`` must then equal
    ``query_dim``). q, k, v have no bias; the output projection has one. Inside a
    :func:`opensd.models.capture.capture_attention` block whose sink names this layer,
    the attention is computed explicitly and its probabilities go to the sink.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.is_cross = heads, head_dim, context_dim is not None
        context_dim = query_dim if context_dim is None else context_dim
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_q(x)  # (B, N, inner)
        k = self.to_k(context)  # (B, L, inner)
        v = self.to_v(context)
        sink = active_sink()  # a capture of this thread/task (opensd.models.capture), usually None
        if sink is not None:
            name = sink.layers.get(self)
            if name is not None:
                out: torch.Tensor = self.to_out[0](self._attention_with_probs(q, k, v, sink, name))
                return out
        out = self.to_out[0](attention_kernels.attend(self, q, k, v, self.heads))  # (B, N, query_dim); to_out[1] is Dropout(0), the identity
        return out

    def attention_shape(self, queries: int, context: int) -> tuple[int, int, int, int]:
        """(heads, head dim, queries, keys) of this attention at ``queries`` image tokens and ``context`` text tokens."""
        return self.heads, self.head_dim, queries, context if self.is_cross else queries

    def _attention_with_probs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: AttentionSink, name: str
    ) -> torch.Tensor:
        """The same attention as :func:`opensd.models.attention.multihead_attention`, with the probabilities handed to ``sink``."""
        b, n, c = q.shape
        length, d = k.shape[1], c // self.heads
        q = q.view(b, n, self.heads, d).transpose(1, 2)  # (B, heads, N, d)
        k = k.view(b, length, self.heads, d).transpose(1, 2)  # (B, heads, L, d)
        v = v.view(b, length, self.heads, d).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * d**-0.5).float().softmax(dim=-1)  # (B, heads, N, L)
        sink.record(name, probs)
        out: torch.Tensor = probs.to(v.dtype) @ v  # (B, heads, N, d)
        return out.transpose(1, 2).reshape(b, n, c)  # (B, N, inner)


class GEGLU(nn.Module):
    """``a * gelu(b)`` where ``[a, b] = proj(x)`` (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return mul_fresh(F.gelu(gate), a)  # a * gelu(gate): the product commutes


class FeedForward(nn.Module):
    """GEGLU MLP with hidden width ``mult * dim``; keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net[2](self.net[0](x))  # net[1] is Dropout(0), the identity
        return out


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to ``context``, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = add_fresh(self.attn1(self.norm1(x)), x)
        x = add_fresh(self.attn2(self.norm2(x), context), x)
        return add_fresh(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a (B, C, H, W) feature map, residual around the whole.

    GroupNorm (eps 1e-6), then ``proj_in`` to ``heads * head_dim`` channels (a 1x1 conv,
    or a Linear on tokens when ``use_linear`` as in SD 2), ``depth`` transformer blocks,
    ``proj_out`` back to ``channels``, plus the input.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        norm_groups: int = 32,
        use_linear: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = group_norm(channels, norm_groups, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = Linear(channels, inner)
            self.proj_out: nn.Module = Linear(inner, channels)
        else:
            self.proj_in = Conv2d(channels, inner, kernel_size=1)
            self.proj_out = Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C or inner)
        if self.use_linear:
            x = self.proj_in(x)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # (B, H*W, C)
        # (B, inner or C, H, W); contiguous, else the linear path hands the next convolutions a
        # channels-last view and they copy their weights into that layout on every call
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return add_fresh(x, residual)
