"""BERT's WordPiece tokenizer (Wu et al. 2016, "Google's Neural Machine Translation
System"; Devlin et al. 2019, "BERT"), uncased, on the ``tokenizers`` library.

Pipeline for one text, the same as transformers' ``BertTokenizerFast`` with
``do_lower_case=True`` (what all-MiniLM-L6-v2 uses):

1. the special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` written in the text map to
   their ids directly;
2. BERT's normalizer: control characters dropped, whitespace made spaces, a space put
   around every CJK character, lowercasing and accents stripped (NFD, marks removed);
3. BERT's pre-tokenizer: split on whitespace, every punctuation character its own word;
4. WordPiece: each word greedily as the longest vocabulary pieces from its start, pieces
   after the first prefixed ``##``; a word with a part no piece covers (or longer than
   100 characters) becomes one ``[UNK]``.

A batch is framed ``[CLS] ids... [SEP] [PAD]...`` to the context length, the ids
truncated so that ``[SEP]`` is kept (as ``padding="max_length", truncation=True``).
:meth:`WordPieceTokenizer.batch` also returns the attention mask the encoder needs;
:meth:`WordPieceTokenizer.unknown_words` names the words that became ``[UNK]``, so that
callers can say which words a prompt loses instead of dropping them silently.

Files: ``vocab.txt`` (one token per line, id = line number) plus, written by
:meth:`~WordPieceTokenizer.save`, ``opensd_tokenizer.json`` holding the context length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from opensd.tokenizers import TokenizerError, as_text_list, frame, read_json_file, read_text_file, require_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_FILE = "vocab.txt"
META_FILE = "opensd_tokenizer.json"
CONTEXT_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
MAX_WORD_CHARS = 100  # BERT's limit: a longer word is one [UNK]


class TokenBatch(NamedTuple):
    """A framed batch: ``input_ids`` (B, L) long and ``attention_mask`` (B, L) long, 1 at
    ``[CLS]``, the text's ids and ``[SEP]``, 0 at padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def read_vocab(path: Path) -> dict[str, int]:
    """``vocab.txt`` as token -> id (its line number); a :class:`TokenizerError` naming the file
    for an empty line, a repeated token or a missing special token."""
    lines = read_text_file(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.rstrip("\r")
        if not token.strip():
            raise TokenizerError(f"{path}: line {i + 1} is empty; expected one token per line")
        if token in vocab:
            raise TokenizerError(f"{path}: token {token!r:.40} appears twice (lines {vocab[token] + 1} and {i + 1})")
        vocab[token] = i
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{path}: the vocabulary lacks the special token(s) {', '.join(missing)}")
    return vocab


def _backend(vocab: dict[str, int]) -> _Backend:
    backend = _Backend(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )  # strip_accents=None: strip them because of lowercasing, as BERT does
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return backend


class WordPieceTokenizer:
    """Uncased WordPiece; build from a vocabulary (:meth:`from_vocab_file`) or :meth:`load`."""

    def __init__(self, vocab: dict[str, int], context_length: int = CONTEXT_LENGTH) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise TokenizerError(f"context_length must be an integer >= 2 (room for [CLS] and [SEP]), got {context_length!r}")
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise TokenizerError(f"WordPiece vocabulary lacks the special token(s) {', '.join(missing)}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise TokenizerError(f"WordPiece vocabulary ids must run from 0 to {len(vocab) - 1}, each once")
        self.vocab = dict(vocab)
        self._backend = _backend(self.vocab)
        self._context_length = context_length

    @classmethod
    def from_vocab_file(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> WordPieceTokenizer:
        """From a BERT ``vocab.txt``."""
        return cls(read_vocab(Path(path)), context_length)

    @classmethod
    def load(cls, directory: str | Path) -> WordPieceTokenizer:
        """Read ``vocab.txt`` + ``opensd_tokenizer.json`` written by :meth:`save`."""
        d = Path(directory)
        meta = read_json_file(d / META_FILE)
        if meta.get("kind") != "wordpiece":
            raise TokenizerError(f"{d / META_FILE}: kind is {meta.get('kind')!r:.60}, expected 'wordpiece'")
        length = meta.get("context_length")
        if type(length) is not int or length < 2:
            raise TokenizerError(f"{d / META_FILE}: context_length must be an integer >= 2, got {length!r:.60}")
        return cls.from_vocab_file(d / VOCAB_FILE, length)

    def save(self, directory: str | Path) -> None:
        """Write ``vocab.txt`` and ``opensd_tokenizer.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tokens = sorted(self.vocab, key=self.vocab.__getitem__)
        (d / VOCAB_FILE).write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        meta = {"kind": "wordpiece", "context_length": self._context_length}
        (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    # ---- the Tokenizer protocol -----------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def bos_id(self) -> int:
        """``[CLS]``, which starts every framed row."""
        return self.vocab[CLS]

    @property
    def eos_id(self) -> int:
        """``[SEP]``, which ends the text of every framed row."""
        return self.vocab[SEP]

    @property
    def pad_id(self) -> int:
        return self.vocab[PAD]

    @property
    def unk_id(self) -> int:
        return self.vocab[UNK]

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of ``text`` (unknown words -> ``[UNK]``), without ``[CLS]``/``[SEP]``/padding."""
        require_text(text, "encode's text")
        return self._backend.encode(text, add_special_tokens=False).ids

    def batch(self, texts: str | Sequence[str], context_length: int | None = None) -> TokenBatch:
        """``[CLS] ids... [SEP] [PAD]...`` (B, L) and its attention mask; ids truncated to L - 2."""
        texts = as_text_list(texts)
        encoded = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        length = self._context_length if context_length is None else context_length
        ids = frame(encoded, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, context_length=length)
        real = torch.tensor([min(len(e), length - 2) + 2 for e in encoded], dtype=torch.long)  # (B,)
        mask = (torch.arange(length)[None, :] < real[:, None]).long()  # (B, L)
        return TokenBatch(ids, mask)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """(B, L) long tensor ``[CLS] ids... [SEP] [PAD]...`` (:meth:`batch` without the mask)."""
        return self.batch(texts, context_length).input_ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids`` (pieces joined into words), special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"decode: id {bad[0]} is outside the vocabulary of {self.vocab_size} tokens")
        return self._backend.decode(list(ids), skip_special_tokens=True)

    # ---- what the vocabulary holds ----------------------------------------------------

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` that became ``[UNK]``, in order of appearance, each once (ignoring case).

        A word is what BERT's pre-tokenizer splits off (punctuation stands alone); adjacent
        unknown words are reported as one ("☃☃"). A ``[UNK]`` written in the text is not a
        lost word and is not reported.
        """
        require_text(text, "unknown_words's text")
        enc = self._backend.encode(text, add_special_tokens=False)
        spans: list[list[int]] = []
        for token_id, (a, b) in zip(enc.ids, enc.offsets, strict=True):
            if token_id != self.unk_id or text[a:b] == UNK:
                continue
            if spans and spans[-1][1] == a:
                spans[-1][1] = b
            else:
                spans.append([a, b])
        found: dict[str, str] = {}
        for a, b in spans:
            found.setdefault(text[a:b].lower(), text[a:b])
        return list(found.values())
