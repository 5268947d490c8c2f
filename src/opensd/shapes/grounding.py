"""Grounding targets on the shapes world: which caption words name which object, and where it is.

TokenCompose (Wang et al. 2024) supervises each noun's cross-attention with its object's
segmentation mask. The shapes world knows every object's exact mask, so for each object
group of a caption's spec :func:`grounding_targets` gives the context positions of its
shape, colour and size words (synonyms too: "big" names its objects as "large" does;
articles are left free, and so are numbers unless asked for: in words or digits, "three" and
"3" then name the group's objects too) and the group's mask at the latent's resolution (the
covered share of each latent cell, in [0, 1]). The losses that use them are generic:
:func:`opensd.training.grounding.grounding_loss`.

A caption's groups are found in order; one the caption's sentence form writes before the
group it follows ("above the blue square is a red circle") is found anywhere the others
are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from opensd.shapes.captions import find_wording, noun_phrase
from opensd.shapes.world import (
    MAX_GROUPS,
    NUMBERS,
    PALETTE,
    PLURALS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Form,
    PromptSpec,
    Scene,
    masks,
)

CLASSIC_GROUPS = 2  # a classic caption states one or two object groups (a rich one up to MAX_GROUPS, three)
MAX_WORDS = 3  # size, colour, shape (and the number with numbers=True)
GROUNDED_WORDS = frozenset([*SHAPES, *PLURALS.values(), *PALETTE, *SIZES, *SYNONYMS])
NUMBER_WORDS = frozenset([*(NUMBERS[n] for n in NUMBERS if n > 1), *(str(n) for n in NUMBERS if n > 1)])


def _find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int:
    """First index >= ``start`` where ``needle`` occurs in ``haystack``, or -1."""
    haystack, needle = list(haystack), list(needle)
    n = len(needle)
    for i in range(start, len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return -1


def _claim(ids: Sequence[int], needle: Sequence[int], start: int, taken: list[tuple[int, int]]) -> int:
    """First index of ``needle`` in ``ids`` from ``start``, else anywhere not overlapping ``taken``; -1 if none."""
    at = _find(ids, needle, start)
    if at >= 0 or not taken:
        return at
    at = _find(ids, needle, 0)
    while at >= 0 and any(a < at + len(needle) and at < b for a, b in taken):
        at = _find(ids, needle, at + 1)
    return at


def _word_starts(phrase: str, tokenizer, n_tokens: int) -> list[tuple[int, str]]:
    """(offset of its first token within the phrase's ``n_tokens`` tokens, word) for each word of
    ``phrase``: a word a subword tokenizer splits ("cyan" -> "cy ##an" in BERT's WordPiece) is
    grounded at its first piece. Empty when the words' tokens do not add up to the phrase's."""
    out, k = [], 0
    for word in phrase.split():
        out.append((k, word))
        k += len(tokenizer.encode(word))
    return out if k == n_tokens else []


def grounding_targets(
    caption: str, spec: PromptSpec, scene: Scene, tokenizer, latent_size: tuple[int, int],
    max_groups: int = CLASSIC_GROUPS, numbers: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions (max_groups, MAX_WORDS + numbers) long (-1: none) and masks (max_groups, h, w) float.

    Positions index the framed context ``[bos, words..., eos, pad...]`` the tokenizer
    makes of ``caption``. Scene objects are in spec order (``spec.objects[0]``'s
    ``count`` objects first), as :func:`opensd.shapes.world.realize` makes them; a
    group's mask is the union of its objects'. A noun phrase that cannot be found in
    the caption (a caption not made from ``spec``) grounds nothing. ``numbers``: a
    group's number ("three", "3") is one of its grounded words. A word the tokenizer splits
    into pieces is grounded at its first piece.
    """
    if not 1 <= max_groups <= MAX_GROUPS:
        raise ValueError(f"max_groups must be 1..{MAX_GROUPS}, got {max_groups!r}")
    h, w = latent_size
    words_per_group = MAX_WORDS + bool(numbers)
    grounded = GROUNDED_WORDS | NUMBER_WORDS if numbers else GROUNDED_WORDS
    tokens = torch.full((max_groups, words_per_group), -1, dtype=torch.long)
    out_masks = torch.zeros(max_groups, h, w)
    ids = tokenizer.encode(caption)
    limit = tokenizer.context_length - 2  # words past this are truncated away
    obj_masks = masks(scene, scene.image_size)
    wording = find_wording(spec, caption)
    first_obj, search = 0, 0
    taken: list[tuple[int, int]] = []
    for g, group in enumerate(spec.objects[:max_groups]):
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
        if wording is None:
            phrases = [noun_phrase(group, say_one) for say_one in (False, True)]
        else:  # the caption's own words for the group ("the" for both objects of "the A is above the B")
            form = wording.form_for(spec)
            definite = form is Form.COPULA or (form is Form.INVERTED and g == 1)
            phrases = [noun_phrase(group, wording=wording, definite=definite)]
        for phrase in phrases:
            needle = tokenizer.encode(phrase)
            at = _claim(ids, needle, search, taken) if wording is not None else _find(ids, needle, search)
            if at >= 0:
                break
        if at < 0:
            continue
        search = at + len(needle)
        taken.append((at, at + len(needle)))
        slots = [at + k for k, word in _word_starts(phrase, tokenizer, len(needle)) if word in grounded and at + k < limit]
        for k, pos in enumerate(slots[:words_per_group]):
            tokens[g, k] = pos + 1  # + 1: bos
    return tokens, out_masks
