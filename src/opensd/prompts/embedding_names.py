"""Where a prompt names a textual-inversion embedding.

A1111 matches an embedding's name as a sequence of CLIP tokens, so, CLIP's tokenizer
lowercasing everything, names match whatever their case, and ``my style`` matches across
the space. opensd matches on the text instead, the same for every tokenizer (its word
tokenizer knows no embedding names): a name matches

* ignoring case (``EasyNegative`` finds ``easynegative.pt``; where two names differ only
  in case, the one written exactly wins),
* as whole words: not preceded or followed by a letter, digit or ``_`` (``myemb,`` and
  ``(myemb:1.2)`` match, ``myembs`` and ``x_myemb`` do not; A1111's token match would
  also find a name at the end of a longer word),
* with any run of whitespace where the name has a space,
* longest name first (``style-2`` before ``style``), as A1111.

Matching runs on each fragment of the attention syntax (:func:`parse_prompt_attention`),
so ``(myemb:1.2)`` weights the embedding and a name cannot span brackets, as in A1111.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from opensd.prompts.attention import parse_prompt_attention


class EmbeddingNames:
    """The names of some embeddings, found in text (see the module doc)."""

    def __init__(self, names: Iterable[str]):
        self.names = sorted({n for n in names if n.strip()}, key=lambda n: (-len(n), n))
        self._folded: dict[str, str] = {}
        for n in self.names:
            self._folded.setdefault(_key(n), n)
        exact = set(self.names)
        self._exact = exact
        if self.names:
            alternatives = "|".join(r"\s+".join(re.escape(w) for w in n.split()) for n in self.names)
            self._pattern: re.Pattern[str] | None = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        else:
            self._pattern = None

    def __bool__(self) -> bool:
        return bool(self.names)

    def resolve(self, written: str) -> str:
        """The name ``written`` (as the prompt spells it) refers to."""
        return written if written in self._exact else self._folded[_key(written)]

    def split(self, text: str) -> list[tuple[str, bool]]:
        """``text`` as ``(piece, is_name)`` in order: plain text, and names resolved (:meth:`resolve`)."""
        if self._pattern is None:
            return [(text, False)] if text else []
        out: list[tuple[str, bool]] = []
        at = 0
        for m in self._pattern.finditer(text):
            if m.start() > at:
                out.append((text[at: m.start()], False))
            out.append((self.resolve(m.group(0)), True))
            at = m.end()
        if at < len(text):
            out.append((text[at:], False))
        return out

    def find(self, prompt: str) -> list[str]:
        """The names ``prompt`` (A1111 syntax) mentions, each once, in order of appearance."""
        if self._pattern is None:
            return []
        found: dict[str, None] = {}
        for frag in parse_prompt_attention(prompt):
            if not frag.is_break:
                found.update((piece, None) for piece, is_name in self.split(frag.text) if is_name)
        return list(found)


def _key(name: str) -> str:
    return " ".join(name.casefold().split())
