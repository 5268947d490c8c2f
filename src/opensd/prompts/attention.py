"""A1111's attention syntax: ``(word)``, ``[word]``, ``(word:1.3)``, escapes, ``BREAK``, as weighted fragments.

See :mod:`opensd.prompts.syntax` for the syntax and the encoding built on it. This
module is the parser alone: linear in the prompt's length, bounded in nesting
(:data:`MAX_NESTING`) and in weight (:data:`MAX_WEIGHT`), and otherwise giving
A1111's fragments and floats bit for bit.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

from opensd.errors import OpenSDError

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1


class PromptSyntaxError(OpenSDError):
    """A prompt that cannot be parsed: not text, brackets nested too deep, a weight out of range."""


# ----------------------------------------------------------------------------- parsing

MAX_NESTING = 32
"""Brackets (round and square together) open at once. Real prompts nest a few levels
(``((((masterpiece))))``); the cap bounds the parser's work to O(len(text) * MAX_NESTING)."""

MAX_WEIGHT = 10.0
"""A fragment's weight, explicit or multiplied through nesting, lies in [-MAX_WEIGHT, MAX_WEIGHT].

A1111 bounds nothing, and documents weights around 0.5-1.5; past ~2 the image already
falls apart. Negative weights are kept, as A1111 allows them (they push away from the
word). The cap is far above anything useful yet keeps the weighted hidden states finite:
``(red:1e30)`` overflowed the encoder's output to inf and gave an all-black image with no
error; at 10 the products stay well inside float16's range (65504). 1.1 ** 24 (24
nested round brackets) is about 9.85, so deep emphasis alone also stays inside."""


class Fragment(NamedTuple):
    """A run of prompt text with one weight; ``is_break`` marks a BREAK (text "BREAK", weight -1)."""

    text: str
    weight: float
    is_break: bool = False


BREAK = Fragment("BREAK", -1.0, True)

_SYNTAX = re.compile(
    r"""
      \\[\\()\[\]]                  # escaped character: literal
    | \\                            # a lone backslash: dropped (as A1111)
    | \(                            # open round
    | \[                            # open square
    | :\s*([+-]?[.\d]+)\s*\)         # ":weight)" closes a round bracket with an explicit weight
    | \)                            # close round
    | \]                            # close square
    | [^\\()\[\]:]+                 # plain text
    | :                             # a colon that is no weight: literal
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")  # split on the word, then strip: linear (a "\s*BREAK" pattern is not)


def _check_weight(factor: float, text: str, position: int) -> None:
    """Raise for the number of ``(a:text)`` when it is not finite or outside +-MAX_WEIGHT."""
    if not math.isfinite(factor) or abs(factor) > MAX_WEIGHT:
        raise PromptSyntaxError(
            f"the weight {text[:20]}{'...' if len(text) > 20 else ''} at character {position} is out of range; "
            f"allowed: a number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}"
        )


class _Parse:
    """The parser's state: text items, and each bracket's span and factor in the order they closed.

    A bracket multiplies every item from where it opened to where it closed (to the end
    when it never closes). Instead of multiplying those items at every close (quadratic
    in the nesting), the spans are recorded and :meth:`weights` applies them per run of
    items that share the same open brackets, in the order A1111 applies them, so the
    floats are the ones A1111's parser gives. State is kept in flat lists of str, int and
    float (no tuple per item: the garbage collector's cost grows with tracked objects).
    """

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.is_break = bytearray()  # one flag per item
        self.span_start: list[int] = []  # per bracket, in closing order: first item, end item, factor
        self.span_end: list[int] = []
        self.span_factor: list[float] = []
        self.round: list[int] = []  # item index where each open "(" started
        self.square: list[int] = []

    def add(self, text: str, is_break: bool = False) -> None:
        self.texts.append(text)
        self.is_break.append(is_break)

    def open(self, stack: list[int], position: int) -> None:
        if len(self.round) + len(self.square) >= MAX_NESTING:
            raise PromptSyntaxError(
                f"brackets nest more than {MAX_NESTING} deep at character {position}; at most {MAX_NESTING} "
                "may be open at once (write \\( or \\[ for a literal bracket)"
            )
        stack.append(len(self.texts))

    def close(self, start: int, factor: float) -> None:
        self.span_start.append(start)
        self.span_end.append(len(self.texts))
        self.span_factor.append(factor)

    def text(self, text: str) -> None:
        if "BREAK" not in text:
            self.add(text)
            return
        for i, part in enumerate(_BREAK_WORD.split(text)):
            if i > 0:
                self.texts[-1] = self.texts[-1].rstrip()
                self.add("BREAK", True)
                part = part.lstrip()
            self.add(part)

    def weights(self) -> list[float]:
        """The weight of every item: 1.0 times the factors of the brackets around it, in closing order."""
        for start in self.round:  # unclosed brackets apply to the rest of the prompt
            self.close(start, ROUND_FACTOR)
        for start in self.square:
            self.close(start, SQUARE_FACTOR)
        self.round, self.square = [], []
        starts: dict[int, list[int]] = {}
        ends: dict[int, list[int]] = {}
        for order, (a, b) in enumerate(zip(self.span_start, self.span_end, strict=False)):
            if a < b:
                starts.setdefault(a, []).append(order)
                ends.setdefault(b, []).append(order)
        active: list[int] = []  # orders of the spans around the current item, sorted
        out: list[float] = []
        weight = 1.0
        for i in range(len(self.texts)):
            if i in starts or i in ends:
                for order in ends.get(i, ()):
                    active.remove(order)  # at most MAX_NESTING long
                for order in starts.get(i, ()):
                    bisect.insort(active, order)
                weight = 1.0
                for order in active:
                    weight *= self.span_factor[order]
            out.append(weight)
        return out


def parse_prompt_attention(text: str) -> list[Fragment]:
    """``text`` as fragments with weights, equal neighbours merged (A1111's parser).

    >>> [tuple(f[:2]) for f in parse_prompt_attention("an (important) word")]
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    The empty prompt gives ``[Fragment("", 1.0)]``. Unbalanced input never fails (see
    the module doc); :class:`PromptSyntaxError` only for a non-str, brackets nested over
    :data:`MAX_NESTING` deep, or a weight outside +-:data:`MAX_WEIGHT` (explicit or
    multiplied through nesting). Time and memory are linear in ``len(text)``.
    """
    if not isinstance(text, str):
        raise PromptSyntaxError(f"a prompt must be text, got {type(text).__name__}")
    p = _Parse()
    for m in _SYNTAX.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok[0] == "\\":
            p.add(tok[1:])
        elif tok == "(":
            p.open(p.round, m.start())
        elif tok == "[":
            p.open(p.square, m.start())
        elif weight is not None and p.round:
            try:
                factor = float(weight)
            except ValueError:  # "(a:1.2.3)": the weight is text, the ")" still closes
                p.add(tok[:-1].rstrip())
                factor = ROUND_FACTOR
            else:
                _check_weight(factor, weight, m.start(1))
            p.close(p.round.pop(), factor)
        elif tok == ")" and p.round:
            p.close(p.round.pop(), ROUND_FACTOR)
        elif tok == "]" and p.square:
            p.close(p.square.pop(), SQUARE_FACTOR)
        else:  # plain text, or a bracket / weight with nothing to close: literal
            p.text(tok)
    return _merge(p.texts, p.is_break, p.weights())


def _merge(texts: list[str], is_break: bytearray, weights: list[float]) -> list[Fragment]:
    """Fragments with equal-weight neighbours joined (in linear time); weights checked against the range."""
    out: list[Fragment] = []
    start = -1  # first item of the fragment being built, -1: none (at the start, after a BREAK)
    for i, w in enumerate(weights):
        if is_break[i]:
            if start >= 0:
                out.append(Fragment("".join(texts[start:i]), weights[start]))
            out.append(BREAK)
            start = -1
        elif start < 0:
            start = i
        elif w != weights[start]:
            out.append(Fragment("".join(texts[start:i]), weights[start]))
            start = i
    if start >= 0:
        out.append(Fragment("".join(texts[start:]), weights[start]))
    for f in out:
        if not f.is_break and not abs(f.weight) <= MAX_WEIGHT:
            raise PromptSyntaxError(
                f"{f.text[:30]!r} gets the weight {f.weight:.4g} through nesting; "
                f"allowed: from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g} (fewer brackets, or a smaller (word:weight))"
            )
    return out or [Fragment("", 1.0)]


def as_pairs(fragments: Sequence[Fragment]) -> list[list]:
    """A1111's output format: ``[[text, weight], ...]`` with ``["BREAK", -1]`` for breaks."""
    return [[f.text, f.weight] for f in fragments]


__all__ = [
    "BREAK",
    "MAX_NESTING",
    "MAX_WEIGHT",
    "ROUND_FACTOR",
    "SQUARE_FACTOR",
    "Fragment",
    "PromptSyntaxError",
    "as_pairs",
    "parse_prompt_attention",
]
