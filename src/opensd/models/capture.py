"""Attention capture: the probabilities of chosen attention layers, for one scope of calls.

Reading attention (DAAM maps in :mod:`opensd.explain`, TokenCompose's grounding losses in
:mod:`opensd.training.grounding`) needs ``softmax(QK^T / sqrt(d))``, which the fused
scaled-dot-product kernel never materializes. A capture is an :class:`AttentionSink`
(which layers record, each with its name, and where the records go), entered with
:func:`capture_attention`:

>>> sink = AttentionSink(cross_attention_layers(unet), lambda layer, probs: seen.append((layer, probs)))
>>> with capture_attention(sink):
...     unet(x, t, context)        # each attn2 hands its (B, heads, N, L) probabilities to the sink

The active sink lives in a context variable, as a request's LoRA deltas do
(:func:`opensd.models.adapters.use_adapters`): it is private to a thread and to an asyncio
task, and nothing is written on the (shared) network. So:

* only the calls made inside the ``with`` block, by that thread or task, record; a
  generation on the same model in another thread or task runs as if no capture existed;
* nested blocks replace, not add: the inner sink gets the inner calls, the outer sink
  the calls before and after;
* a layer that is not in the active sink's ``layers`` (and every layer when no sink is
  active: one ``ContextVar.get``) keeps the fused kernel, bit for bit; a recording
  layer computes the same attention explicitly (equal up to float rounding), and its
  probabilities carry gradients when the call does.

Layers are named by their module path in the network the sink was made for
(``input_blocks.1.1.transformer_blocks.0.attn2``): the attribute paths are the
checkpoint keys, and the cross-attention layers are the ``attn2`` of every transformer
block (Rombach et al. 2022, Sec. 3.3). :func:`feature_grid` places a layer's ``N``
query positions back on its level's (h, w) grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from opensd.errors import OpenSDError


class CaptureError(OpenSDError):
    """A capture entered twice at once, or captured attention that does not fit the latent it is placed on."""


@dataclass(frozen=True, eq=False)
class AttentionSink:
    """One capture: ``layers`` {module: name} record, each call handing ``record(name, probs)``
    its probabilities ``probs`` (B, heads, N, L) float32, ``softmax(QK^T / sqrt(d))``."""

    layers: Mapping[nn.Module, str]
    record: Callable[[str, torch.Tensor], None]


_SINK: ContextVar[AttentionSink | None] = ContextVar("opensd_attention_sink", default=None)

def active_sink() -> AttentionSink | None:
    """The sink of this thread/task's innermost :func:`capture_attention` block, or None; always
    None inside a graph that ``torch.compile`` traces (TorchDynamo cannot read a context variable,
    and a compiled U-Net runs eagerly whenever a sink is active: :mod:`opensd.pipelines.compiled`)."""
    return None if torch.compiler.is_compiling() else _SINK.get()


@contextmanager
def capture_attention(sink: AttentionSink | None) -> Iterator[AttentionSink | None]:
    """Inside the block, this thread/task's calls of ``sink.layers`` record to ``sink``
    (None: nothing records). The previous sink is back on exit, also on error."""
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


def is_cross_attention(name: str) -> bool:
    """True for a U-Net transformer block's cross-attention layer (its path ends in ``attn2``)."""
    return name.rpartition(".")[2] == "attn2"


def cross_attention_layers(root: nn.Module, select: Callable[[str], bool] = is_cross_attention) -> dict[nn.Module, str]:
    """{module: path in ``root``} of the modules of ``root`` whose path ``select`` accepts
    (default: every cross-attention layer), in ``named_modules`` order."""
    return {m: name for name, m in root.named_modules() if name and select(name)}


def feature_grid(n: int, h: int, w: int) -> tuple[int, int]:
    """The (h_l, w_l) of a U-Net level with ``n`` positions: halve (rounding up) from the latent's (h, w)."""
    hh, ww = h, w
    while hh * ww > n and (hh > 1 or ww > 1):
        hh, ww = -(-hh // 2), -(-ww // 2)
    if hh * ww != n:
        raise CaptureError(f"cannot place {n} attention positions on a grid derived from the {h}x{w} latent")
    return hh, ww


__all__ = [
    "AttentionSink",
    "CaptureError",
    "active_sink",
    "capture_attention",
    "cross_attention_layers",
    "feature_grid",
    "is_cross_attention",
]
