"""A1111's extra-network tags: ``<lora:name:0.8>`` in a prompt, found and removed.

The syntax (A1111's ``extra_networks.parse_prompt``): a tag is ``<`` kind ``:`` arguments
``>``, where kind is a word (letters, digits, ``_``) and the arguments are any text
without ``>``, split on ``:``. An argument ``key=value`` (one ``=``) is *named*, any other
is *positional*. Every tag, whatever its kind, is removed from the text that is encoded;
the text around it stays as it was (no space is added or taken).

LoRA tags (kind ``lora``, or ``lyco``, A1111's alias for the same networks) read as
A1111 reads them::

    <lora:name>              te 1,   unet 1
    <lora:name:0.8>          te 0.8, unet 0.8
    <lora:name:0.8:0.5>      te 0.8, unet 0.5       (positional: name, te, unet)
    <lora:name:te=0.8>       te 0.8, unet 0.8       (unet defaults to te)
    <lora:name:1:unet=0.3>   te 1,   unet 0.3       (named wins over positional)

A1111's fourth positional or ``dyn=`` (a DyLoRA's rank) is refused, and so is any other
named argument: opensd does not apply them, and a tag that would be half-honoured is an
error, not a silent difference. Weights are numbers within +-:data:`MAX_LORA_WEIGHT`.
The same LoRA named twice is applied twice (A1111: each tag is one loaded network, their
deltas add). Which tags a request may use is the LoRA library's to say
(:mod:`opensd.pipelines.lora_library`); this module is pure text.

Finding tags is linear in the prompt's length (A1111's regular expression backtracks
quadratically on ``<a:<a:<a:...`` with no ``>``; the matches are the same), and so is
removing them (at most :data:`MAX_TAG_NESTING` passes, see :func:`strip_tags`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from opensd.prompts.attention import PromptSyntaxError

LORA_KINDS = ("lora", "lyco")
MAX_LORA_WEIGHT = 10.0
MAX_TAG_NESTING = 32  # tags that form once inner ones are removed, as brackets' MAX_NESTING
_KIND = re.compile(r"\w+:")  # at a "<": the kind and its colon (A1111: <(\w+):([^>]+)>)


class ExtraNetworkError(PromptSyntaxError):
    """An extra-network tag that opensd cannot honour: its kind, a weight, an argument."""


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:arg:arg...>`` of a prompt: ``text`` as written, at ``start`` (an index of the prompt)."""

    kind: str
    items: tuple[str, ...]
    text: str
    start: int

    @property
    def positional(self) -> tuple[str, ...]:
        return tuple(i for i in self.items if len(i.split("=")) != 2)

    @property
    def named(self) -> dict[str, str]:
        """``key=value`` items (A1111: exactly one ``=``; a later key overrides an earlier one)."""
        out = {}
        for item in self.items:
            parts = item.split("=")
            if len(parts) == 2:
                out[parts[0].strip()] = parts[1]
        return out


@dataclass(frozen=True)
class LoraTag:
    """A ``<lora:...>`` tag read: the name it mentions and its text-encoder and U-Net multipliers."""

    name: str
    te: float
    unet: float
    text: str


def find_tags(prompt: str) -> list[NetworkTag]:
    """Every extra-network tag of ``prompt``, in order (A1111's matches, found in linear time)."""
    if not isinstance(prompt, str):
        raise PromptSyntaxError(f"a prompt must be text, got {type(prompt).__name__}")
    tags: list[NetworkTag] = []
    i, end = prompt.find("<"), -1
    while i != -1:
        if end <= i:  # the first ">" after i (every "<" before it shares it)
            end = prompt.find(">", i + 1)
        if end == -1:
            break  # no ">" after this "<": no tag can close
        m = _KIND.match(prompt, i + 1, end)
        if m is not None and m.end() < end:  # a kind, a colon, and at least one character of arguments
            kind = prompt[i + 1 : m.end() - 1]
            tags.append(NetworkTag(kind, tuple(prompt[m.end() : end].split(":")), prompt[i : end + 1], i))
            i = prompt.find("<", end + 1)
        else:
            i = prompt.find("<", i + 1)
    return tags


def _strip_once(prompt: str, tags: list[NetworkTag]) -> str:
    parts, at = [], 0
    for t in tags:
        parts.append(prompt[at : t.start])
        at = t.start + len(t.text)
    parts.append(prompt[at:])
    return "".join(parts)


def strip_tags(prompt: str) -> str:
    """``prompt`` without its extra-network tags: the text that is encoded.

    Idempotent: a tag that only forms once an inner one is gone (``<x<lora:a>:y>``
    leaves ``<x:y>``) is removed too, where A1111's one pass would encode it as text.
    Tags formed that way more than :data:`MAX_TAG_NESTING` deep are a
    :class:`PromptSyntaxError` (each level is one more pass over the prompt).
    """
    tags = find_tags(prompt)
    for _ in range(MAX_TAG_NESTING):
        if not tags:
            return prompt
        prompt = _strip_once(prompt, tags)
        tags = find_tags(prompt)
    if tags:
        raise PromptSyntaxError(f"extra-network tags are nested more than {MAX_TAG_NESTING} deep (like <a<b<lora:x>:1>:1>)")
    return prompt


def parse_multiplier(text: str, where: str, what: str = "") -> float:
    """A LoRA multiplier: a number within +-:data:`MAX_LORA_WEIGHT`; ``where`` starts the error."""
    what = f"the {what} multiplier" if what else "a LoRA multiplier"
    try:
        w = float(text)
    except ValueError:
        raise ExtraNetworkError(f"{where}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(w) or abs(w) > MAX_LORA_WEIGHT:
        raise ExtraNetworkError(f"{where}: {what} must be from {-MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}, got {text.strip()}")
    return w


def lora_tag(tag: NetworkTag) -> LoraTag:
    """A ``lora``/``lyco`` tag's name and multipliers, by A1111's rules (module doc)."""
    pos, named = tag.positional, tag.named
    if not pos or not pos[0].strip():
        raise ExtraNetworkError(f"{tag.text}: names no LoRA; write <{tag.kind}:name:weight>")
    if len(pos) > 3 or "dyn" in named:
        raise ExtraNetworkError(f"{tag.text}: a DyLoRA dimension (A1111's 4th value or dyn=) is not supported; "
                                "give name, te and unet multipliers only")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise ExtraNetworkError(f"{tag.text}: unknown argument {unknown[0]!r}; allowed: te=, unet=")
    te = parse_multiplier(pos[1], tag.text, "text encoder") if len(pos) > 1 else 1.0
    te = parse_multiplier(named["te"], tag.text, "text encoder") if "te" in named else te
    unet = parse_multiplier(pos[2], tag.text, "U-Net") if len(pos) > 2 else te
    unet = parse_multiplier(named["unet"], tag.text, "U-Net") if "unet" in named else unet
    return LoraTag(pos[0].strip(), te, unet, tag.text)


def lora_tags(prompt: str) -> list[LoraTag]:
    """The ``<lora:...>`` / ``<lyco:...>`` tags of ``prompt``, read.

    Raises :class:`ExtraNetworkError` for a tag of another kind (``hypernet``, or any
    other: opensd applies only LoRA networks, and a tag it would drop unapplied is
    refused), and for a LoRA tag it cannot read (:func:`lora_tag`).
    """
    out = []
    for tag in find_tags(prompt):
        if tag.kind not in LORA_KINDS:
            what = "hypernetworks are" if tag.kind == "hypernet" else f"extra networks of kind {tag.kind!r} are"
            raise ExtraNetworkError(f"{tag.text}: {what} not supported; opensd applies <lora:name:weight> and <lyco:...> tags")
        out.append(lora_tag(tag))
    return out


__all__ = [
    "LORA_KINDS",
    "MAX_LORA_WEIGHT",
    "MAX_TAG_NESTING",
    "ExtraNetworkError",
    "LoraTag",
    "NetworkTag",
    "find_tags",
    "lora_tags",
    "lora_tag",
    "parse_multiplier",
    "strip_tags",
]
