"""Grounded cross-attention: teach each word of a caption to look at its object.

TokenCompose (Wang et al. 2024, "TokenCompose: Text-to-Image Diffusion with
Token-level Supervision") adds to the diffusion loss a term that pulls the U-Net's
cross-attention of every noun token into that object's segmentation mask, and
reports better multi-object composition. A data source that knows where each
caption word's object is (the shapes world: :mod:`opensd.shapes.grounding`) gives, per
caption, the context positions of its grounded words and each object group's mask at
the latent's resolution (the covered share of each latent cell, in [0, 1]); here:

* :class:`AttentionCapture` collects the probabilities of every cross-attention
  layer (``attn2``) of a U-Net during one forward pass, with their gradients
  (:mod:`opensd.models.capture`: only that thread's calls record);
* :func:`grounding_loss` gives TokenCompose's two terms per sample. The token loss:
  for a grounded token with attention ``A`` (over the layer's positions, mean of
  its heads) and mask ``M`` pooled to the layer's grid, ``(1 - sum(A * M) / sum(A)) ** 2``,
  averaged over the sample's grounded tokens and over the layers. It only asks
  where a word's attention goes, not how much there is: a layer can meet it by
  giving the word almost no attention at all. The pixel loss asks for the amount:
  the binary cross-entropy between each grounded word's attention at each position
  and ``M / n`` (``n``: the group's grounded words), averaged over positions, words
  and layers; inside its object a group's words should share the attention equally,
  outside they should take none (:class:`PixelTarget` ``word``). TokenCompose grounds
  one noun per object, with target ``M``; ``group`` asks that of the group's words
  summed.

Samples whose caption was dropped (classifier-free guidance) or that have no
grounded token add zero.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from opensd.models.capture import (
    AttentionSink,
    CaptureError,
    capture_attention,
    cross_attention_layers,
    feature_grid,
    is_cross_attention,
)


class PixelTarget(enum.Enum):
    """What the pixel loss asks of an object's grounded words at each position.

    ``word``: each word takes an equal share of the object's attention (target ``M / n``);
    ``group``: the words together take it (target ``M`` for their summed attention), so
    one word (say the colour) may take it all.
    """

    WORD = "word"
    GROUP = "group"


class AttentionCapture:
    """Context manager: the chosen layers of ``unet`` (default: every ``attn2``) hand their
    probabilities (B, heads, N, L) to ``probs``, and their names to ``names``, for the
    calls this thread makes inside the ``with`` block.

    The attention is then computed explicitly (:mod:`opensd.models.capture`), so the
    probabilities carry gradients. Nothing is set on the network, so copies of it (EMA,
    evaluation) and calls outside the block run the fused kernel. ``probs`` is emptied on
    entry; the layers are found once, here.
    """

    def __init__(self, unet: nn.Module, select: Callable[[str], bool] = is_cross_attention) -> None:
        self.sink = AttentionSink(cross_attention_layers(unet, select), self._record)
        self.probs: list[torch.Tensor] = []
        self.names: list[str] = []
        self._scope: AbstractContextManager[AttentionSink | None] | None = None

    @property
    def layers(self) -> list[nn.Module]:
        """The recording layers, in module order."""
        return list(self.sink.layers)

    def _record(self, layer: str, probs: torch.Tensor) -> None:
        self.names.append(layer)
        self.probs.append(probs)

    def __enter__(self) -> AttentionCapture:
        if self._scope is not None:
            raise CaptureError("this attention capture is already active; make one per concurrent forward pass")
        self.probs.clear()
        self.names.clear()
        self._scope = capture_attention(self.sink)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        scope, self._scope = self._scope, None
        assert scope is not None  # set by __enter__
        scope.__exit__(*exc)


def grounding_loss(
    probs: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    masks_: torch.Tensor,
    keep: torch.Tensor,
    pixel_target: PixelTarget = PixelTarget.WORD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (token loss, pixel loss), each (B,); see the module docstring.

    ``probs``: each layer's (B, heads, N, L); ``tokens`` (B, G, K) long, -1 for none;
    ``masks_`` (B, G, h, w) covered share at the latent size; ``keep`` (B,) bool,
    False for samples whose caption was dropped. ``pixel_target``: see :class:`PixelTarget`.
    """
    b, g, k = tokens.shape
    h, w = masks_.shape[-2:]
    if not probs:
        raise ValueError("no cross-attention probabilities were captured")
    valid = (tokens >= 0) & keep[:, None, None]  # (B, G, K)
    count = valid.sum((1, 2)).clamp(min=1)  # (B,): grounded words
    words = valid.sum(-1)  # (B, G): grounded words per group
    groups = words > 0  # (B, G)
    idx = tokens.clamp(min=0).flatten(1)  # (B, G*K)
    token = torch.zeros(b, device=tokens.device)
    pixel = torch.zeros(b, device=tokens.device)
    for p in probs:
        a = p.float().mean(1)  # (B, N, L)
        n = a.shape[1]
        hl, wl = feature_grid(n, h, w)
        m = F.adaptive_avg_pool2d(masks_.float(), (hl, wl)).flatten(2)  # (B, G, N)
        a_tok = a.gather(2, idx[:, None, :].expand(-1, n, -1)).transpose(1, 2).reshape(b, g, k, n)  # (B, G, K, N)
        inside = (a_tok * m[:, :, None]).sum(-1) / a_tok.sum(-1).clamp_min(1e-12)  # (B, G, K)
        token = token + ((1 - inside).pow(2) * valid).sum((1, 2)) / count
        if pixel_target is PixelTarget.WORD:
            target = m[:, :, None] / words.clamp(min=1)[..., None, None]  # (B, G, 1, N): each word's share
            bce = F.binary_cross_entropy(a_tok.clamp(1e-6, 1 - 1e-6), target.expand_as(a_tok), reduction="none")
            pixel = pixel + (bce.mean(-1) * valid).sum((1, 2)) / count
        else:
            together = (a_tok * valid[..., None]).sum(2).clamp(1e-6, 1 - 1e-6)  # (B, G, N)
            bce = F.binary_cross_entropy(together, m, reduction="none").mean(-1)  # (B, G)
            pixel = pixel + (bce * groups).sum(1) / groups.sum(1).clamp(min=1)
    return token / len(probs), pixel / len(probs)
