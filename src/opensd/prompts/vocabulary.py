"""Which words of a prompt the model cannot read, said out loud instead of dropped.

A small model's word tokenizer knows a few dozen words (the default model: the shapes,
colours, counts and places of its captions); every other word becomes ``<unk>`` and the
image ignores it. :func:`prompt_warnings` turns those words into one readable line per
prompt, which the pipeline returns in ``GenerationResult.warnings``, the CLI prints as
``warning: ...`` and the A1111 server returns in ``info["warnings"]``.

>>> prompt_warnings(tokenizer, "a dog on the beach")
["the model does not know the words 'dog', 'beach' of the prompt and ignores them; it knows: a, of, ..."]
"""

from __future__ import annotations

from collections.abc import Iterable

from opensd.prompts.embedding_names import EmbeddingNames
from opensd.prompts.extra_networks import strip_tags
from opensd.prompts.syntax import parse_prompt_attention
from opensd.tokenizers import unknown_words

LIST_AT_MOST = 80  # a vocabulary this small is listed in the warning; a larger one is only counted
SHOW_AT_MOST = 10  # unknown words quoted in one warning


def prompt_unknown_words(tokenizer, prompt: str, embeddings: Iterable[str] = ()) -> list[str]:
    """The words of ``prompt`` (A1111 syntax removed) that ``tokenizer`` cannot represent, each once.

    Names of the ``embeddings`` in use are not words to read: the embedding replaces them."""
    names = EmbeddingNames(embeddings)
    fragments = [f.text for f in parse_prompt_attention(strip_tags(prompt)) if not f.is_break]
    text = " ".join(piece for t in fragments for piece, is_name in names.split(t) if not is_name)
    return unknown_words(tokenizer, text)


def _known_words_hint(tokenizer) -> str:
    known = getattr(tokenizer, "known_words", None)
    if not callable(known):
        return "use words of the model's training captions"
    words = [w for w in known() if any(c.isalnum() for c in w)]  # punctuation reads badly in a list
    if len(words) <= LIST_AT_MOST:
        return "it knows: " + ", ".join(words)
    return f"its vocabulary holds {len(words)} words (see the tokenizer/ folder of the model)"


def prompt_warnings(tokenizer, prompt: str, negative_prompt: str = "", embeddings: Iterable[str] = ()) -> list[str]:
    """One line per prompt that holds unknown words, naming them and the words the model knows
    (the names of the ``embeddings`` in use are not unknown words)."""
    out = []
    embeddings = tuple(embeddings)
    for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if not text:
            continue
        lost = prompt_unknown_words(tokenizer, text, embeddings)
        if not lost:
            continue
        shown = ", ".join(repr(w) for w in lost[:SHOW_AT_MOST])
        more = f" and {len(lost) - SHOW_AT_MOST} more" if len(lost) > SHOW_AT_MOST else ""
        noun = "word" if len(lost) == 1 else "words"
        them = "it" if len(lost) == 1 else "them"
        out.append(
            f"the model does not know the {noun} {shown}{more} of the {what} and ignores {them}; "
            f"{_known_words_hint(tokenizer)}"
        )
    return out


__all__ = ["prompt_unknown_words", "prompt_warnings"]
