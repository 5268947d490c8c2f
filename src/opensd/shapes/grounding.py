"""Grounding targets on the shapes world: which caption words name which object, and where it is.

TokenCompose (Wang et al. 2024) supervises each noun's cross-attention with its object's
segmentation mask. The shapes world knows every object's exact mask, so for each object
group of a caption's spec :func:`grounding_targets` gives the context positions of its
shape, colour and size words (articles and numbers are left free) and the group's mask at
the latent's resolution (the covered share of each latent cell, in [0, 1]). The losses that
use them are generic: :func:`opensd.training.grounding.grounding_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from opensd.shapes.captions import noun_phrase
from opensd.shapes.world import PALETTE, PLURALS, SHAPES, SIZES, PromptSpec, Scene, masks

MAX_GROUPS = 2  # a shapes caption states one or two object groups
MAX_WORDS = 3  # size, colour, shape
GROUNDED_WORDS = frozenset([*SHAPES, *PLURALS.values(), *PALETTE, *SIZES])


def _find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int:
    """First index >= ``start`` where ``needle`` occurs in ``haystack``, or -1."""
    haystack, needle = list(haystack), list(needle)
    n = len(needle)
    for i in range(start, len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return -1


def grounding_targets(
    caption: str, spec: PromptSpec, scene: Scene, tokenizer, latent_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions (MAX_GROUPS, MAX_WORDS) long (-1: none) and masks (MAX_GROUPS, h, w) float.

    Positions index the framed context ``[bos, words..., eos, pad...]`` the tokenizer
    makes of ``caption``. Scene objects are in spec order (``spec.objects[0]``'s
    ``count`` objects first), as :func:`opensd.shapes.world.realize` makes them; a
    group's mask is the union of its objects'. A noun phrase that cannot be found in
    the caption (a caption not made from ``spec``) grounds nothing.
    """
    h, w = latent_size
    tokens = torch.full((MAX_GROUPS, MAX_WORDS), -1, dtype=torch.long)
    out_masks = torch.zeros(MAX_GROUPS, h, w)
    ids = tokenizer.encode(caption)
    limit = tokenizer.context_length - 2  # words past this are truncated away
    obj_masks = masks(scene, scene.image_size)
    first_obj, search = 0, 0
    for g, group in enumerate(spec.objects[:MAX_GROUPS]):
        union = np.zeros_like(obj_masks[0]) if obj_masks else None
        for m in obj_masks[first_obj : first_obj + group.count]:
            union |= m
        first_obj += group.count
        if union is not None:
            size = union.shape[0]
            if size % h or size % w:
                raise ValueError(f"image side {size} is not a multiple of the latent size {h}x{w}")
            cells = torch.from_numpy(union.astype(np.float32))[None, None]  # (1, 1, H, W)
            out_masks[g] = F.avg_pool2d(cells, (size // h, size // w))[0, 0]  # (h, w) covered share
        for say_one in (False, True):
            phrase = noun_phrase(group, say_one)
            at = _find(ids, tokenizer.encode(phrase), search)
            if at >= 0:
                break
        if at < 0:
            continue
        words = phrase.split()
        search = at + len(words)
        slots = [at + k for k, word in enumerate(words) if word in GROUNDED_WORDS and at + k < limit]
        for k, pos in enumerate(slots[:MAX_WORDS]):
            tokens[g, k] = pos + 1  # + 1: bos
    return tokens, out_masks
