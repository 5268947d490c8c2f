"""Hard negatives on the shapes world: captions *false* for a scene that use nearly its words.

A batch of random captions can be told apart by the words they contain alone, so plain
CLIP learns little about which colour belongs to which shape or which object is left
(Yuksekgonul et al. 2023, "When and Why Vision-Language Models Behave like Bags-of-Words",
NegCLIP). :func:`hard_negatives` writes captions that are false for every scene realizing a
spec but use nearly the same words (swapped colours, swapped relation order, a count off by
one, ...), each built from a one-edit change of the :class:`~opensd.shapes.world.PromptSpec`
and worded by the world's own caption grammar like the true caption. The contrastive loss
takes them as extra text candidates (:func:`opensd.training.contrastive_loss.contrastive_loss`)
and retrieval reports accuracy against each kind (:func:`opensd.shapes.retrieval.retrieval_metrics`).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from opensd.shapes.captions import BACKGROUND_PHRASES, WRAPPERS, Wording, find_wording, write
from opensd.shapes.world import (
    BACKGROUNDS,
    CONVERSE,
    DEFAULT_BACKGROUND,
    MAX_COUNT,
    PALETTE,
    SHAPES,
    SIZES,
    Form,
    ObjectSpec,
    PromptSpec,
    ShapesError,
)

# Kinds of hard negative, the swaps first: they keep every word and change only the binding.
# count_swap (the counts of two groups exchanged) and drop (one of three groups left out) only
# come of the rich world's specs: a classic spec's negatives are what they were.
SWAP_KINDS: tuple[str, ...] = ("color_swap", "relation_swap", "relation_flip", "count_swap")
NEGATIVE_KINDS: tuple[str, ...] = (*SWAP_KINDS, "count", "color", "shape", "size", "background", "drop")
RICH_NEGATIVE_KINDS: tuple[str, ...] = ("count_swap", "drop")


@dataclass(frozen=True)
class HardNegative:
    """A caption false for the scene of the spec it was made from; ``kind`` is one of NEGATIVE_KINDS."""

    kind: str
    spec: PromptSpec
    text: str


_OTHER = "<other>"  # an attribute value no caption names: stands for "any value not mentioned"


def could_be_true(neg: PromptSpec, spec: PromptSpec) -> bool:
    """Whether some scene that makes ``spec`` exactly true (as :func:`~opensd.shapes.world.check_true`
    judges) could also make ``neg`` exactly true.

    Unstated colours and sizes of ``spec`` range over every value (the values ``neg``
    names plus one "other"); a stated relation fixes the only relation of object A to
    B (and the converse of B to A); an unstated relation leaves the layout free.
    """
    if (neg.background or DEFAULT_BACKGROUND) != (spec.background or DEFAULT_BACKGROUND):
        return False
    colors = sorted({o.color for o in neg.objects if o.color} | {_OTHER})
    options: list[list[tuple[str, str, str]]] = []  # per scene object, its possible (shape, color, size)
    for o in spec.objects:
        cs = [o.color] if o.color else colors
        ss = [o.size] if o.size else list(SIZES)
        options += [[(o.shape, c, s) for c in cs for s in ss]] * o.count
    for scene in itertools.product(*options):
        matched = [[i for i, obj in enumerate(scene) if g.matches(*obj)] for g in neg.objects]
        if any(len(m) != g.count for m, g in zip(matched, neg.objects, strict=False)):
            continue
        if sum(len(m) for m in matched) != len(scene):
            continue  # an object neg does not mention
        if neg.relation is None or spec.relation is None:
            return True  # no relation asserted, or a free layout that may show any relation
        a, b = matched[0][0], matched[1][0]
        if neg.relation == (spec.relation if (a, b) == (0, 1) else CONVERSE[spec.relation]):
            return True
    return False


def _replace_object(spec: PromptSpec, index: int, **changes) -> PromptSpec:
    objs = list(spec.objects)
    o = objs[index]
    objs[index] = ObjectSpec(
        changes.get("shape", o.shape), changes.get("color", o.color), changes.get("size", o.size),
        changes.get("count", o.count),
    )  # fmt: skip
    return PromptSpec(tuple(objs), spec.relation, spec.background)


def _modified_specs(spec: PromptSpec) -> dict[str, list[PromptSpec]]:
    """Every one-edit change of ``spec`` per kind, before checking validity or falsity."""
    out: dict[str, list] = {k: [] for k in NEGATIVE_KINDS}
    objs = spec.objects

    def attempt(kind: str, build) -> None:
        try:
            out[kind].append(build())
        except ShapesError:
            pass  # the edit breaks a PromptSpec rule (indistinguishable groups, > MAX_COUNT objects)

    for i, j in itertools.combinations(range(len(objs)), 2):
        a, b = objs[i], objs[j]
        if a.color and b.color and a.color != b.color:
            attempt("color_swap", lambda i=i, j=j, a=a, b=b: _replace_object(_replace_object(spec, i, color=b.color),
                                                                             j, color=a.color))
        if a.count != b.count:
            attempt("count_swap", lambda i=i, j=j, a=a, b=b: _replace_object(_replace_object(spec, i, count=b.count),
                                                                             j, count=a.count))
    if len(objs) == 3:
        for i in range(3):
            attempt("drop", lambda i=i: PromptSpec(objs[:i] + objs[i + 1:], None, spec.background))
    if spec.relation is not None:
        attempt("relation_swap", lambda: PromptSpec(objs[::-1], spec.relation, spec.background))
        attempt("relation_flip", lambda: PromptSpec(objs, CONVERSE[spec.relation], spec.background))
    for i, o in enumerate(objs):
        if spec.relation is None:
            for n in (o.count - 1, o.count + 1):
                if 1 <= n <= MAX_COUNT:
                    attempt("count", lambda i=i, n=n: _replace_object(spec, i, count=n))
        if o.color:
            for c in PALETTE:
                if c != o.color:
                    attempt("color", lambda i=i, c=c: _replace_object(spec, i, color=c))
        for s in SHAPES:
            if s != o.shape:
                attempt("shape", lambda i=i, s=s: _replace_object(spec, i, shape=s))
        if o.size:
            for z in SIZES:
                if z != o.size:
                    attempt("size", lambda i=i, z=z: _replace_object(spec, i, size=z))
    if spec.background is not None:
        for bg in BACKGROUNDS:
            if bg != spec.background:
                attempt("background", lambda bg=bg: PromptSpec(objs, spec.relation, bg))
    return out


def negative_specs(spec: PromptSpec) -> dict[str, list[PromptSpec]]:
    """Per kind (NEGATIVE_KINDS order), the one-edit changes of ``spec`` false for every scene realizing it.

    Kinds with no such change are left out. A spec appears under its first kind only.
    """
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"spec must be a PromptSpec, got {type(spec).__name__}")
    seen = {spec}
    out: dict[str, list[PromptSpec]] = {}
    for kind, specs in _modified_specs(spec).items():
        keep = []
        for s in specs:
            if s not in seen and not could_be_true(s, spec):
                seen.add(s)
                keep.append(s)
        if keep:
            out[kind] = keep
    return out


_WORDING_CHOICES = 84  # lcm of the grammar's choice list lengths (2, 3, 4, 7): a draw mod 84 is uniform for each


def _drawn_wording(spec: PromptSpec, rng: random.Random) -> Wording:
    """A classic wording drawn with ``rng`` (three draws, taken by the relation phrase if
    ``spec`` states a relation, the wrapper and the background phrase if it states one)."""
    draws = iter([rng.randrange(_WORDING_CHOICES) for _ in range(3)])
    rel = next(draws) if spec.relation is not None else 0
    wrapper = next(draws) % len(WRAPPERS)
    background = next(draws) % len(BACKGROUND_PHRASES) if spec.background is not None else 0
    return Wording(Form.RELATION if spec.relation is not None else Form.AND, wrapper, rel, background)


def hard_negatives(
    spec: PromptSpec, rng: random.Random, k: int | None = 3, *, like: str | None = None
) -> list[HardNegative]:
    """``k`` captions false for every scene realizing ``spec``, each one edit away from it.

    Kinds are taken round-robin, the swap kinds (colour swap, relation order swap,
    converse relation, count swap) first, then count +-1, colour, shape, size and background
    changes and a dropped group, in an order drawn from ``rng``; ``k=None`` gives one negative of every
    available kind. When fewer than ``k`` distinct negatives exist the list repeats.
    With ``like`` (a caption of ``spec``, classic or rich: :func:`~opensd.shapes.captions.find_wording`
    finds its wording) every negative copies its wording (sentence form, wrapper, relation
    phrase, background phrase, size words, digits, "one"/"a"); otherwise the negatives share
    one classic wording drawn from ``rng``.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    candidates = negative_specs(spec)
    swaps = [kd for kd in SWAP_KINDS if kd in candidates]
    others = [kd for kd in NEGATIVE_KINDS if kd in candidates and kd not in SWAP_KINDS]
    rng.shuffle(swaps)
    rng.shuffle(others)
    order = swaps + others
    pools = {kd: rng.sample(candidates[kd], len(candidates[kd])) for kd in order}
    picked: list[tuple[str, PromptSpec]] = []
    want = len(order) if k is None else k
    while len(picked) < want and any(pools.values()):
        for kd in order:
            if pools[kd] and len(picked) < want:
                picked.append((kd, pools[kd].pop()))
    picked = [picked[i % len(picked)] for i in range(want)]

    wording = find_wording(spec, like) if like is not None else None
    if wording is None:
        wording = _drawn_wording(spec, rng)
    return [HardNegative(kd, s, write(s, wording)) for kd, s in picked]


def hard_negative_captions(spec: PromptSpec, rng: random.Random, k: int = 3, *, like: str | None = None) -> list[str]:
    """The texts of :func:`hard_negatives`: ``k`` captions false for ``spec``'s scenes, nearly its words."""
    return [h.text for h in hard_negatives(spec, rng, k, like=like)]
