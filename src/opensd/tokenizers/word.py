"""A small word-level tokenizer for opensd's own text encoders.

CLIP's 49408-token vocabulary costs a small model a 49408 x width embedding table
it never uses. A caption corpus of a few thousand images needs a vocabulary of one
or two thousand words; this tokenizer learns it with the ``tokenizers`` library's
WordLevel model:

- normalization: Unicode NFC, lowercase;
- pre-tokenization: split on whitespace, every punctuation character and every
  digit is its own token ("(masterpiece:1.2)" -> ( masterpiece : 1 . 2 ));
- vocabulary: the special tokens ``<bos>`` ``<eos>`` ``<pad>`` ``<unk>`` (ids 0..3),
  then the most frequent words; anything else maps to ``<unk>``;
- numbers written in digits: a number standing on its own ("3 green triangles", not
  "1.5" or "3d") becomes its word when the vocabulary knows the word ("three"), from
  0 to 20 (:data:`NUMBER_WORDS`); otherwise its digits stay (and map to ``<unk>``
  unless the vocabulary has them).

:meth:`WordTokenizer.unknown_words` names the words that map to ``<unk>``, so that
callers can say which words a prompt loses instead of dropping them silently.

Saved as ``tokenizer.json`` (the ``tokenizers`` format) plus ``opensd_tokenizer.json``
holding the context length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as _Backend
from tokenizers import models, normalizers, pre_tokenizers, trainers

from opensd.tokenizers import TokenizerError, as_text_list, frame, read_json_file, require_text

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)
META_FILE = "opensd_tokenizer.json"
BACKEND_FILE = "tokenizer.json"
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
# A run of ASCII digits standing on its own: not inside a word ("3d", "x2") or a decimal ("1.5", "2,5").
_NUMBER = re.compile(r"(?<![\w.,])[0-9]+(?![\w]|[.,][0-9])")
PROBE_TEXT = "A red circle, 2 squares: (zqxjv)!"  # known and unknown words, digits, punctuation


def _empty_backend() -> _Backend:
    """An untrained WordLevel tokenizer with opensd's normalizer and pre-tokenizer."""
    backend = _Backend(models.WordLevel(unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return backend


class WordTokenizer:
    """Word-level tokenizer; build with :meth:`train` or :meth:`load`."""

    def __init__(self, backend: _Backend, context_length: int) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise TokenizerError(f"context_length must be an integer >= 2, got {context_length!r}")
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"word tokenizer vocabulary lacks the special token(s) {', '.join(missing)}")
        self._backend = backend
        self._context_length = context_length

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int = 2048,
        context_length: int = 32,
        min_frequency: int = 1,
    ) -> WordTokenizer:
        """Learn the ``vocab_size - 4`` most frequent words (seen >= ``min_frequency`` times).

        The vocabulary may come out smaller when the corpus has fewer distinct words.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
            raise TokenizerError(f"vocab_size must be an integer > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise TokenizerError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
        if isinstance(captions, str):
            raise TokenizerError("captions must be an iterable of str, not a single str")

        def checked(items: Iterable[str]) -> Iterator[str]:
            for i, text in enumerate(items):
                if not isinstance(text, str):
                    raise TokenizerError(f"captions[{i}] is {type(text).__name__}, expected str")
                yield text

        backend = _empty_backend()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        backend.train_from_iterator(checked(captions), trainer=trainer)
        return cls(backend, context_length)

    @classmethod
    def load(cls, directory: str | Path) -> WordTokenizer:
        """Read ``tokenizer.json`` + ``opensd_tokenizer.json`` written by :meth:`save`.

        A missing, unreadable or inconsistent file is a :class:`TokenizerError` naming it.
        """
        d = Path(directory)
        for name in (BACKEND_FILE, META_FILE):
            if not (d / name).is_file():
                raise TokenizerError(f"word tokenizer file not found: {d / name}")
        meta = read_json_file(d / META_FILE)
        if meta.get("kind") != "word":
            raise TokenizerError(f"{d / META_FILE}: kind is {meta.get('kind')!r:.60}, expected 'word'")
        read_json_file(d / BACKEND_FILE)  # a clear error for a file that is no JSON object at all
        try:
            backend = _Backend.from_file(str(d / BACKEND_FILE))
        except Exception as e:  # the tokenizers library's parser: whatever it raises, the file is at fault
            raise TokenizerError(f"{d / BACKEND_FILE} is not a valid tokenizer file: {' '.join(str(e).split())[:200]}") from None
        length: Any = meta.get("context_length")  # the file's value, checked by __init__
        try:
            tok = cls(backend, length)
        except TokenizerError as e:
            raise TokenizerError(f"{d}: {e}") from None
        ids = backend.get_vocab().values()
        if ids and (min(ids) < 0 or max(ids) >= backend.get_vocab_size()):
            raise TokenizerError(f"{d / BACKEND_FILE}: token ids must run from 0 to the vocabulary size - 1")
        try:  # a file can parse and still fail on the first text (an unknown-word token not in the vocabulary)
            backend.encode(PROBE_TEXT, add_special_tokens=False)
        except Exception as e:  # the tokenizers library's own errors
            raise TokenizerError(f"{d / BACKEND_FILE} cannot tokenize text: {' '.join(str(e).split())[:200]}") from None
        return tok

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``opensd_tokenizer.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(d / BACKEND_FILE))
        meta = {"kind": "word", "context_length": self._context_length}
        (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    # ---- the Tokenizer protocol -----------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    @property
    def context_length(self) -> int:
        return self._context_length

    def _special_id(self, token: str) -> int:
        i = self._backend.token_to_id(token)
        assert i is not None  # __init__ checks the special tokens are in the vocabulary
        return i

    @property
    def bos_id(self) -> int:
        return self._special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self._special_id(EOS)

    @property
    def pad_id(self) -> int:
        return self._special_id(PAD)

    @property
    def unk_id(self) -> int:
        return self._special_id(UNK)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (numbers in digits as words, unknown words -> ``<unk>``), without bos/eos/padding."""
        require_text(text, "encode's text")
        return self._backend.encode(self.spell_numbers(text), add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """(B, L) long tensor ``[bos, ids..., eos, pad...]``, ids truncated to L - 2."""
        texts = [self.spell_numbers(t) for t in as_text_list(texts)]
        encoded = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        length = self._context_length if context_length is None else context_length
        return frame(encoded, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, context_length=length)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The words of ``ids`` joined by spaces, bos/eos/pad dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = {self.bos_id, self.eos_id, self.pad_id}
        words = [self._backend.id_to_token(i) for i in ids if i not in skip]
        if any(w is None for w in words):  # an id outside the vocabulary: the TypeError str.join raised on it
            raise TypeError(f"decode: ids outside the vocabulary of {self.vocab_size} words")
        return " ".join(w for w in words if w is not None)

    # ---- what the vocabulary holds ----------------------------------------------------

    def spell_numbers(self, text: str) -> str:
        """``text`` with every number standing on its own (0-20) written as its word, where the vocabulary has it."""
        require_text(text, "spell_numbers's text")

        def word(m: re.Match) -> str:
            digits = m.group(0)
            if len(digits) > 2 or int(digits) >= len(NUMBER_WORDS) or str(int(digits)) != digits:
                return digits
            name = NUMBER_WORDS[int(digits)]
            return name if self._backend.token_to_id(name) is not None else digits

        return _NUMBER.sub(word, text)

    def known_words(self) -> list[str]:
        """The vocabulary's words in id order, the special tokens left out."""
        vocab = self._backend.get_vocab()
        return [w for w in sorted(vocab, key=vocab.__getitem__) if w not in SPECIAL_TOKENS]

    def unknown_words(self, text: str) -> list[str]:
        """The pieces of ``text`` that map to ``<unk>``, in order of appearance, each once (ignoring case).

        Adjacent unknown pieces are reported as one ("1.5", "x2"); a known piece next to
        an unknown one is left out ("dog," gives "dog" when "," is known).
        """
        require_text(text, "unknown_words's text")
        spelled = self.spell_numbers(text)
        enc = self._backend.encode(spelled, add_special_tokens=False)
        spans: list[list[int]] = []
        for token_id, (a, b) in zip(enc.ids, enc.offsets, strict=False):
            if token_id != self.unk_id:
                continue
            if spans and spans[-1][1] == a:
                spans[-1][1] = b
            else:
                spans.append([a, b])
        found: dict[str, str] = {}
        for a, b in spans:
            found.setdefault(spelled[a:b].lower(), spelled[a:b])
        return list(found.values())
