"""The rich world's prompt categories: what :mod:`opensd.shapes.suites` adds to its suites for
``world=World.RICH``.

* ``three_objects``: three groups ("a red circle and a blue square and a green triangle", one
  group may be of two objects);
* ``count_pair``: two or three objects of a shape beside another group ("three purple circles
  and an orange square");
* ``sentence_form``: any spec in words the classic grammar never writes: in the benchmark the
  rich world's trained ones ("the A is above the B", "A, B and C", digits, "big"), in the
  held-out suite a held-out form ("above the B is A");
* ``synonym`` (held-out suite only): a held-out size synonym ("little").

``three_objects`` and ``count_pair`` prompts are worded as the classic grammar words its
pairs (forms ``and`` and ``relation``, canonical words, numbers in words; only "there are"
agrees with a first group of several), so they measure the composition alone, and ``sentence_form`` and ``synonym`` prompts state nothing
held out but their words, so they measure the wording alone. In the held-out suite each
category states one kind of held-out combination (:class:`~opensd.shapes.holdout.HeldOut`):
a colour-shape pair, a count beside another group, a form, a synonym.
"""

from __future__ import annotations

import random
from dataclasses import replace

from opensd.errors import OpenSDError
from opensd.shapes.captions import BACKGROUND_PHRASES, RELATION_PHRASE_DRAWS, WRAPPERS, Wording, draw_wording, write
from opensd.shapes.dataset import RICH_KINDS, draw_rich_spec, sample_spec
from opensd.shapes.holdout import HeldOut
from opensd.shapes.scorer import category_of
from opensd.shapes.world import (
    BACKGROUNDS,
    MAX_COUNT,
    SYNONYMS,
    Form,
    Holdout,
    ObjectSpec,
    PromptSpec,
    ShapesError,
    World,
)

BENCHMARK_RICH_CATEGORIES: tuple[str, ...] = ("three_objects", "count_pair", "sentence_form")
HOLDOUT_RICH_CATEGORIES: tuple[str, ...] = ("three_objects", "count_pair", "sentence_form", "synonym")
RICH_SUITE_CATEGORIES: tuple[str, ...] = ("three_objects", "count_pair", "sentence_form", "synonym")
# What each held-out category's prompts state of the holdout (and nothing else of it).
HELD_OUT_KIND: dict[str, HeldOut] = {"three_objects": HeldOut.COLOR_SHAPE, "count_pair": HeldOut.COUNT_PAIR,
                                     "sentence_form": HeldOut.FORM, "synonym": HeldOut.SYNONYM}
_KIND_OF_FORM = {Form.LIST: "triple", Form.COPULA: "relation", Form.INVERTED: "relation"}


class RichPromptError(OpenSDError):
    """A rich prompt category cannot be drawn as asked."""


def _background(rng: random.Random) -> str | None:
    return rng.choice(tuple(BACKGROUNDS)) if rng.random() < 0.2 else None


def _plain_wording(rng: random.Random, form: Form = Form.AND) -> Wording:
    """Random wrapper, relation phrase and background phrase, the canonical words, ``form``
    ("there are" agreeing with a first group of several, as the rich world's captions do)."""
    return Wording(form, rng.randrange(len(WRAPPERS)), rng.randrange(RELATION_PHRASE_DRAWS),
                   rng.randrange(len(BACKGROUND_PHRASES)), agree=True)


def _with_pair(spec: PromptSpec, index: int, color: str, shape: str) -> PromptSpec | None:
    """``spec`` with group ``index`` made of ``color`` ``shape``; None if the groups then clash."""
    objs = list(spec.objects)
    o = objs[index]
    objs[index] = ObjectSpec(shape, color, o.size, o.count)
    try:
        return PromptSpec(tuple(objs), spec.relation, spec.background)
    except ShapesError:
        return None


def _with_count(spec: PromptSpec, count: int, shape: str) -> PromptSpec | None:
    """``spec`` (a count pair) with its counted group made ``count`` objects of ``shape`` (the
    other group shrunk to fit MAX_COUNT); None if the groups then clash."""
    objs = list(spec.objects)
    i = max(range(len(objs)), key=lambda k: objs[k].count)
    o = objs[i]
    objs[i] = ObjectSpec(shape, o.color, o.size, count)
    for k, other in enumerate(objs):
        if k != i and count + other.count > MAX_COUNT:
            objs[k] = ObjectSpec(other.shape, other.color, other.size, MAX_COUNT - count)
    try:
        return PromptSpec(tuple(objs), spec.relation, spec.background)
    except ShapesError:
        return None


def _draw_once(category: str, rng: random.Random, holdout: Holdout, held_out: bool) -> tuple[PromptSpec | None, str]:
    """One try at a prompt of ``category``: (spec, text), spec None when the draw does not fit."""
    if category in ("three_objects", "count_pair"):
        spec: PromptSpec | None = draw_rich_spec("triple" if category == "three_objects" else "count_pair", rng,
                                                  _background(rng))
        if held_out and spec is not None and category == "three_objects":
            color, shape = rng.choice(holdout.color_shapes)
            spec = _with_pair(spec, rng.randrange(3), color, shape)
        elif held_out and spec is not None:
            count, shape = rng.choice(holdout.count_pairs)
            spec = _with_count(spec, count, shape)
        return spec, write(spec, _plain_wording(rng)) if spec is not None else ""
    if category == "sentence_form" and not held_out:
        spec = sample_spec(rng.choice(RICH_KINDS), rng, holdout, World.RICH)
        wording = draw_wording(spec, rng, holdout)
        return (None if wording.is_classic_for(spec) else spec), write(spec, wording)
    if category == "sentence_form":
        form = rng.choice(holdout.forms)
        spec = sample_spec(_KIND_OF_FORM[form], rng, holdout, World.RICH)
        return spec, write(spec, _plain_wording(rng, form))
    if category == "synonym":
        word = rng.choice(holdout.synonyms)
        spec = sample_spec(rng.choice(RICH_KINDS), rng, holdout, World.RICH)
        if not any(o.size == SYNONYMS[word] for o in spec.objects):
            spec = _with_size(spec, rng.randrange(len(spec.objects)), SYNONYMS[word])
        if spec is None:
            return None, ""
        plain = _plain_wording(rng)
        wording = replace(plain, small=word) if SYNONYMS[word] == "small" else replace(plain, large=word)
        return spec, write(spec, wording)
    raise RichPromptError(f"unknown rich category {category!r}; allowed: {', '.join(RICH_SUITE_CATEGORIES)}")


def _with_size(spec: PromptSpec, index: int, size: str) -> PromptSpec | None:
    objs = list(spec.objects)
    o = objs[index]
    objs[index] = ObjectSpec(o.shape, o.color, size, o.count)
    try:
        return PromptSpec(tuple(objs), spec.relation, spec.background)
    except ShapesError:
        return None


def draw_rich_prompt(category: str, rng: random.Random, holdout: Holdout, held_out: bool) -> tuple[PromptSpec, str]:
    """A prompt (spec, text) of rich ``category`` (module doc): in-distribution (nothing
    ``holdout`` keeps out, in spec or words) or, with ``held_out``, stating the category's kind
    of held-out combination (HELD_OUT_KIND) and no other."""
    allowed = HOLDOUT_RICH_CATEGORIES if held_out else BENCHMARK_RICH_CATEGORIES
    if category not in allowed:
        which = "held-out" if held_out else "benchmark"
        raise RichPromptError(f"{category!r} is not a {which} rich category; allowed: {', '.join(allowed)}")
    kind = HELD_OUT_KIND[category]
    if held_out and kind not in holdout.kinds():
        raise RichPromptError(f"the holdout keeps no {kind.value} out: there are no held-out {category} prompts")
    for _ in range(100_000):
        spec, text = _draw_once(category, rng, holdout, held_out)
        if spec is None:
            continue
        touched = holdout.touched(spec)
        if held_out and touched != ({kind} if kind in (HeldOut.COLOR_SHAPE, HeldOut.COUNT_PAIR) else set()):
            continue
        if not held_out and touched:
            continue
        assert category in ("sentence_form", "synonym") or category_of(spec) == category
        return spec, text
    raise RichPromptError(f"could not draw a {category} prompt with held_out={held_out} for {holdout}")
