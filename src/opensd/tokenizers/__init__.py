"""Tokenizers: text -> fixed-length id tensors for the text encoder.

Every tokenizer in opensd follows the small :class:`Tokenizer` protocol. A batch
is framed the way CLIP frames it (and transformers' ``CLIPTokenizer`` with
``padding="max_length", truncation=True``)::

    [bos, id_1, ..., id_k, eos, pad, ..., pad]      (length = context_length)

with the ids truncated to ``context_length - 2`` so that ``eos`` is always kept.

Three implementations:

- :class:`~opensd.tokenizers.clip_bpe.CLIPTokenizer`: CLIP's byte-level BPE
  (49408 tokens), for Stable Diffusion checkpoints.
- :class:`~opensd.tokenizers.word.WordTokenizer`: a small word-level tokenizer
  trained on a caption corpus, for opensd's own small models.
- :class:`~opensd.tokenizers.wordpiece.WordPieceTokenizer`: BERT's uncased WordPiece
  (``[CLS]``/``[SEP]`` are its bos/eos), for the pretrained MiniLM text encoder; its
  ``batch`` also returns the attention mask BERT needs.

:func:`load_tokenizer` reads either from a folder written by ``save``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload, runtime_checkable

import torch

from opensd.errors import OpenSDError

T = TypeVar("T")

class TokenizerError(OpenSDError):
    """Bad tokenizer input: wrong text type, bad context length, unreadable folder."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the text encoder and the pipelines need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def context_length(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos/eos/padding."""
        ...

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """(B, L) long tensor of framed ids, L = ``context_length`` or the tokenizer's own."""
        ...

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer files into ``directory`` (created if needed)."""
        ...


def require_text(text: object, what: str = "tokenizer input") -> str:
    """``text`` if it is a str of valid Unicode; else :class:`TokenizerError` (a lone surrogate: with its position)."""
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"{what} is not valid Unicode text: character {e.start} is a lone surrogate (U+{ord(text[e.start]):04X})"
        ) from None
    return text


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """``texts`` as a list of valid Unicode strings (a single string becomes a batch of one)."""
    if isinstance(texts, str):
        return [require_text(texts)]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TokenizerError(
            f"tokenizer input must be a str or a list of str, got {type(texts).__name__}"
            + ("" if not isinstance(texts, Sequence) else " containing non-str items")
        )
    return [require_text(t, f"tokenizer input {i}") for i, t in enumerate(texts)]


def frame(
    token_ids: Sequence[Sequence[int]], *, bos_id: int, eos_id: int, pad_id: int, context_length: int
) -> torch.Tensor:
    """Frame each id list as ``[bos, ids[:L-2]..., eos, pad...]``; returns (B, L) long."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise TokenizerError(f"context_length must be an integer >= 2 (room for bos and eos), got {context_length!r}")
    out = torch.full((len(token_ids), context_length), pad_id, dtype=torch.long)
    for i, ids in enumerate(token_ids):
        row = [bos_id, *ids[: context_length - 2], eos_id]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def unknown_words(tokenizer: Tokenizer, text: str) -> list[str]:
    """The words of plain ``text`` (no prompt syntax) that ``tokenizer`` cannot represent, each once.

    A tokenizer with an ``unknown_words`` method answers itself (:class:`WordTokenizer`:
    the words that map to ``<unk>``; :class:`CLIPTokenizer`: none, its byte-level BPE
    represents any text). Any other tokenizer with an ``unk_id`` is asked word by word
    (whitespace-separated); one without has no unknown words.
    """
    require_text(text, "unknown_words' text")
    own = getattr(tokenizer, "unknown_words", None)
    if callable(own):
        return list(own(text))
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None:
        return []
    return list(dict.fromkeys(w for w in text.split() if unk in tokenizer.encode(w)))


def read_text_file(path: Path) -> str:
    """The UTF-8 text of a tokenizer file; a :class:`TokenizerError` naming it if unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not a readable text file: {' '.join(str(e).split())[:200]}") from None


@overload
def read_json_file(path: Path) -> dict[str, Any]: ...
@overload
def read_json_file(path: Path, kind: type[T]) -> T: ...
def read_json_file(path: Path, kind: type = dict) -> Any:
    """The JSON value of a tokenizer file, which must be a ``kind``; else a :class:`TokenizerError` naming it."""
    text = read_text_file(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, kind):
        raise TokenizerError(f"{path} must hold a JSON {kind.__name__}, not {type(data).__name__}")
    return data


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save`, or a diffusers ``tokenizer/`` folder.

    Recognises ``opensd_tokenizer.json`` + ``tokenizer.json``: a :class:`WordTokenizer`;
    ``opensd_tokenizer.json`` (kind ``wordpiece``) + ``vocab.txt``: a :class:`WordPieceTokenizer`;
    ``vocab.json`` + ``merges.txt``: a :class:`CLIPTokenizer`. A diffusers model folder
    (holding ``tokenizer/``) is also accepted. A missing, unreadable or inconsistent file
    is a one-line :class:`TokenizerError` naming it.
    """
    d = Path(directory)
    if not d.is_dir():
        raise TokenizerError(f"tokenizer folder not found: {d}")
    if not any((d / f).exists() for f in ("opensd_tokenizer.json", "vocab.json")) and (d / "tokenizer").is_dir():
        d = d / "tokenizer"
    meta_path = d / "opensd_tokenizer.json"
    if meta_path.exists():
        kind = read_json_file(meta_path).get("kind")
        if kind == "word":
            return WordTokenizer.load(d)
        if kind == "wordpiece":
            return WordPieceTokenizer.load(d)
        raise TokenizerError(f"{meta_path}: unknown tokenizer kind {kind!r:.60}; allowed: 'word', 'wordpiece'")
    if (d / "vocab.json").exists() and (d / "merges.txt").exists():
        return CLIPTokenizer.from_dir(d)
    raise TokenizerError(
        f"{d} holds no known tokenizer: expected opensd_tokenizer.json + tokenizer.json (word), "
        "opensd_tokenizer.json + vocab.txt (WordPiece) or vocab.json + merges.txt (CLIP BPE)"
    )


# Imported last: both modules use the helpers above.
from opensd.tokenizers.clip_bpe import CLIPTokenizer  # noqa: E402
from opensd.tokenizers.word import WordTokenizer  # noqa: E402
from opensd.tokenizers.wordpiece import WordPieceTokenizer  # noqa: E402

__all__ = [
    "CLIPTokenizer",
    "Tokenizer",
    "TokenizerError",
    "WordPieceTokenizer",
    "WordTokenizer",
    "as_text_list",
    "frame",
    "load_tokenizer",
    "read_json_file",
    "read_text_file",
    "require_text",
    "unknown_words",
]
