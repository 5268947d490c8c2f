"""The shapes world's caption grammar: a :class:`~opensd.shapes.world.PromptSpec` in varied English.

``[wrapper] NP [(and | relation) NP] [background]``: every word is true of a scene that
realizes the spec. The wording is drawn with ``rng.choice`` only (relation phrase,
wrapper, background phrase), which :mod:`opensd.shapes.negatives` relies on to word a
false caption like a true one.
"""

from __future__ import annotations

import random

from opensd.shapes.world import NUMBERS, PLURALS, ObjectSpec, PromptSpec

RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_WRAPPERS = ("{}", "{}", "a picture of {}", "a photo of {}", "an image showing {}", "an image of {}", "there {be} {}")
_BACKGROUND_PHRASES = (" on a {} background", " on {} background", " against a {} background", ", {} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(o: ObjectSpec, say_one: bool = False) -> str:
    """The words naming group ``o`` in a caption: "a small red circle", "one circle", "two blue squares"."""
    words = [w for w in (o.size, o.color) if w]
    if o.count == 1:
        head = " ".join([*words, o.shape])
        return f"one {head}" if say_one else f"{_article(head)} {head}"
    return " ".join([NUMBERS[o.count], *words, PLURALS[o.shape]])


def caption(spec: PromptSpec, rng: random.Random, say_one: bool = False) -> str:
    """``spec`` in varied English, drawn with ``rng``. Every word is true of a scene realizing it.

    Grammar: ``[wrapper] NP [(and | relation) NP] [background]`` where a noun phrase
    is ``(a|an|one|two|three|four) [size] [colour] shape[s]``, wrappers are "a
    picture of", "a photo of", "an image showing", "an image of", "there is/are",
    and backgrounds read "on a black background", ", gray background", ...
    """
    nps = [noun_phrase(o, say_one) for o in spec.objects]
    if spec.relation is not None:
        body = f"{nps[0]} {rng.choice(RELATION_PHRASES[spec.relation])} {nps[1]}"
    else:
        body = " and ".join(nps)
    wrapper = rng.choice(_WRAPPERS)
    plural = len(spec.objects) == 1 and spec.objects[0].count > 1
    text = wrapper.replace("{be}", "are" if plural else "is").format(body)
    if spec.background is not None:
        text += rng.choice(_BACKGROUND_PHRASES).format(spec.background)
    return text
