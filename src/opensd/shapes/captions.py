"""The shapes world's caption grammar: a :class:`~opensd.shapes.world.PromptSpec` in varied English.

``[wrapper] body [background]``: every word is true of a scene that realizes the spec. A
:class:`Wording` holds every choice of a caption's words but the spec's (its sentence form,
wrapper, relation phrase, background phrase, size words, digits or number words, "one" or
"a"), and :func:`write` puts a spec into words with it, so one wording words two specs alike
(:mod:`opensd.shapes.negatives` words a false caption like a true one that way, and
:func:`find_wording` recovers a caption's wording from its text).

* :func:`caption`: the classic world's captions (sentence forms ``and`` and ``relation``,
  the canonical size words, numbers in words), its choices drawn with ``rng.choice`` only;
* :func:`draw_wording`: the rich world's, any sentence form, "big" or "little" for a size,
  digits ("3 green triangles"), avoiding what a holdout keeps out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from opensd.shapes.world import (
    CLASSIC_FORMS,
    NUMBERS,
    PLURALS,
    RELATION_FORMS,
    SIZE_WORDS,
    Form,
    Holdout,
    ObjectSpec,
    PromptSpec,
    ShapesError,
)

RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
WRAPPERS = ("{}", "{}", "a picture of {}", "a photo of {}", "an image showing {}", "an image of {}", "there {be} {}")
BACKGROUND_PHRASES = (" on a {} background", " on {} background", " against a {} background", ", {} background")
RELATION_PHRASE_DRAWS = 6  # lcm of the relations' phrase counts (2, 3): a draw mod 6 is uniform for each


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Wording:
    """Every choice of a caption's words but the spec's.

    ``form``: the sentence form (:class:`~opensd.shapes.world.Form`; one that does not fit a
    spec gives way, see :meth:`form_for`); ``wrapper``: index into WRAPPERS (the ``copula`` and
    ``inverted`` forms take none); ``relation_phrase``: index into the relation's phrases,
    modulo their number; ``background_phrase``: index into BACKGROUND_PHRASES; ``small`` /
    ``large``: the word for each size (SIZE_WORDS); ``digits``: counts of two or more as
    digits; ``say_one``: "one" for a single object instead of "a"; ``agree``: "there is/are"
    follows the first group's number ("there are three circles and a square"; the classic
    grammar says "are" only for a single group of several).
    """

    form: Form = Form.AND
    wrapper: int = 0
    relation_phrase: int = 0
    background_phrase: int = 0
    small: str = "small"
    large: str = "large"
    digits: bool = False
    say_one: bool = False
    agree: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "form", Form(self.form))
        except ValueError:
            raise ShapesError(f"unknown sentence form {self.form!r}; allowed: {', '.join(Form)}") from None
        for name, low, high in (("wrapper", 0, len(WRAPPERS)), ("relation_phrase", 0, None),
                                ("background_phrase", 0, len(BACKGROUND_PHRASES))):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v >= high):
                span = f"{low}..{high - 1}" if high is not None else f">= {low}"
                raise ShapesError(f"Wording.{name} must be an integer {span}, got {v!r}")
        for size in ("small", "large"):
            if getattr(self, size) not in SIZE_WORDS[size]:
                raise ShapesError(f"the word for {size} must be one of {', '.join(SIZE_WORDS[size])}, "
                                  f"got {getattr(self, size)!r}")

    def form_for(self, spec: PromptSpec) -> Form:
        """The form a caption of ``spec`` takes: ``form`` where it fits, else the classic one
        (``relation`` for a relation, ``and`` otherwise; ``list`` needs three groups)."""
        if spec.relation is not None:
            return self.form if self.form in RELATION_FORMS else Form.RELATION
        return Form.LIST if self.form is Form.LIST and len(spec.objects) == 3 else Form.AND

    def size_word(self, size: str) -> str:
        return self.small if size == "small" else self.large

    def used_words(self, spec: PromptSpec) -> set[str]:
        """The size words a caption of ``spec`` in this wording writes."""
        return {self.size_word(o.size) for o in spec.objects if o.size}

    def is_classic_for(self, spec: PromptSpec) -> bool:
        """Whether a caption of ``spec`` in this wording is one the classic grammar writes too."""
        if self.form_for(spec) not in CLASSIC_FORMS:
            return False
        if any(self.size_word(o.size) != o.size for o in spec.objects if o.size):
            return False  # a synonym
        if self.digits and any(o.count > 1 for o in spec.objects):
            return False
        agreeing = self.agree and WRAPPERS[self.wrapper].startswith("there") and len(spec.objects) > 1
        return not (agreeing and spec.objects[0].count > 1)

    def held_out_by(self, holdout: Holdout, spec: PromptSpec) -> bool:
        """Whether a caption of ``spec`` in this wording uses a form or word ``holdout`` keeps out."""
        return holdout.blocks_form(self.form_for(spec)) or any(holdout.blocks_word(w) for w in self.used_words(spec))


def noun_phrase(o: ObjectSpec, say_one: bool = False, wording: Wording | None = None, definite: bool = False) -> str:
    """The words naming group ``o`` in a caption: "a small red circle", "one circle", "two blue
    squares"; with a ``wording`` its size word and digits ("3 big blue squares"); ``definite``:
    "the red circle" (a single object)."""
    wd = wording or Wording(say_one=say_one)
    words = [word for word in (wd.size_word(o.size) if o.size else None, o.color) if word]
    if o.count == 1:
        head = " ".join([*words, o.shape])
        det = "the" if definite else "one" if wd.say_one else _article(head)
        return f"{det} {head}"
    return " ".join([str(o.count) if wd.digits else NUMBERS[o.count], *words, PLURALS[o.shape]])


def write(spec: PromptSpec, wording: Wording) -> str:
    """``spec`` in words: its noun phrases in ``wording``'s sentence form, wrapper and background phrase."""
    form = wording.form_for(spec)
    nps = [noun_phrase(o, wording=wording) for o in spec.objects]
    wrapper = WRAPPERS[wording.wrapper]
    if spec.relation is not None:
        phrases = RELATION_PHRASES[spec.relation]
        phrase = phrases[wording.relation_phrase % len(phrases)]
        a, b = spec.objects
        if form is Form.COPULA:
            body, wrapper = f"{noun_phrase(a, wording=wording, definite=True)} is {phrase} " \
                            f"{noun_phrase(b, wording=wording, definite=True)}", "{}"
        elif form is Form.INVERTED:
            body, wrapper = f"{phrase} {noun_phrase(b, wording=wording, definite=True)} is {nps[0]}", "{}"
        else:
            body = f"{nps[0]} {phrase} {nps[1]}"
    elif form is Form.LIST:
        body = ", ".join(nps[:-1]) + " and " + nps[-1]
    else:
        body = " and ".join(nps)
    first = spec.objects[0].count > 1
    plural = first if wording.agree else len(spec.objects) == 1 and first
    text = wrapper.replace("{be}", "are" if plural else "is").format(body)
    if spec.background is not None:
        text += BACKGROUND_PHRASES[wording.background_phrase].format(spec.background)
    return text


def caption(spec: PromptSpec, rng: random.Random, say_one: bool = False) -> str:
    """``spec`` in the classic grammar, its wording drawn with ``rng.choice`` (relation phrase,
    wrapper, background phrase, in that order). Every word is true of a scene realizing it.

    Grammar: ``[wrapper] NP [(and | relation) NP] [background]`` where a noun phrase
    is ``(a|an|one|two|three|four) [size] [colour] shape[s]``, wrappers are "a
    picture of", "a photo of", "an image showing", "an image of", "there is/are",
    and backgrounds read "on a black background", ", gray background", ...
    """
    rel = rng.choice(range(len(RELATION_PHRASES[spec.relation]))) if spec.relation is not None else 0
    wrapper = rng.choice(range(len(WRAPPERS)))
    background = rng.choice(range(len(BACKGROUND_PHRASES))) if spec.background is not None else 0
    form = Form.RELATION if spec.relation is not None else Form.AND
    return write(spec, Wording(form, wrapper, rel, background, say_one=say_one))


_FORM_WEIGHTS: dict[Form, float] = {Form.AND: 1.0, Form.LIST: 1.0, Form.RELATION: 0.5, Form.COPULA: 0.3,
                                    Form.INVERTED: 0.2}
DIGITS_SHARE = 0.3  # of rich captions write their counts in digits
SYNONYM_SHARE = 0.35  # ... and a size by its synonym


def draw_wording(spec: PromptSpec, rng: random.Random, holdout: Holdout | None = None,
                 say_one: float = 0.25) -> Wording:
    """A rich-world wording of ``spec`` drawn with ``rng``, with no form or word ``holdout`` keeps out.

    The form: for a relation "A above B" (0.5), "the A is above the B" (0.3) or "above the B
    is A" (0.2), for three groups "A and B and C" or "A, B and C" (even odds), else "A and B";
    a size's synonym 35% of the time, digits 30%, "one" for "a" with odds ``say_one``. The
    draws do not depend on ``spec``'s structure beyond the forms that fit it.
    """
    forms = [f for f in Form if Wording(f).form_for(spec) is f and not (holdout and holdout.blocks_form(f))]
    form = rng.choices(forms, [_FORM_WEIGHTS[f] for f in forms])[0]
    words = {}
    for size, options in SIZE_WORDS.items():
        allowed = [w for w in options[1:] if not (holdout and holdout.blocks_word(w))]
        words[size] = rng.choice(allowed) if allowed and rng.random() < SYNONYM_SHARE else options[0]
    wrapper = rng.randrange(len(WRAPPERS))
    relation_phrase = rng.randrange(RELATION_PHRASE_DRAWS)
    background_phrase = rng.randrange(len(BACKGROUND_PHRASES))
    digits = rng.random() < DIGITS_SHARE
    one = rng.random() < say_one
    return Wording(form, wrapper, relation_phrase, background_phrase, words["small"], words["large"], digits, one,
                   agree=True)


def find_wording(spec: PromptSpec, text: str) -> Wording | None:
    """The wording with which :func:`write` puts ``spec`` into ``text`` (the first one in
    order: the classic forms, then without agreement, and each index as small as it can be),
    or None if none does.

    The size words, digits and "one" are read off the text's words; the form, wrapper,
    relation phrase and background phrase are tried, only those whose words begin or end it.
    """
    words = set(text.replace(",", " ").split())
    sizes = {s: next((w for w in options if w in words), options[0]) for s, options in SIZE_WORDS.items()}
    base = Wording(small=sizes["small"], large=sizes["large"], digits=any(w.isdigit() for w in words),
                   say_one="one" in words)
    forms = RELATION_FORMS if spec.relation is not None else (Form.AND, Form.LIST) if len(spec.objects) == 3 \
        else (Form.AND,)
    n_rel = len(RELATION_PHRASES[spec.relation]) if spec.relation is not None else 1
    backgrounds = [0]
    if spec.background is not None:
        backgrounds = [i for i, p in enumerate(BACKGROUND_PHRASES) if text.endswith(p.format(spec.background))]
    wrappers = [i for i, w in enumerate(WRAPPERS) if WRAPPERS.index(w) == i and _may_begin(w, text)]
    for form in forms:
        for wrapper in wrappers if form in (Form.AND, Form.LIST, Form.RELATION) else [0]:
            for agree in (False, True) if WRAPPERS[wrapper].startswith("there") else (False,):
                for rel in range(n_rel):
                    for bg in backgrounds:
                        wording = replace(base, form=form, wrapper=wrapper, relation_phrase=rel,
                                          background_phrase=bg, agree=agree)
                        if write(spec, wording) == text:
                            return wording
    return None


def _may_begin(wrapper: str, text: str) -> bool:
    head = wrapper.split("{}")[0]
    return any(text.startswith(head.replace("{be}", be)) for be in ("is", "are"))
