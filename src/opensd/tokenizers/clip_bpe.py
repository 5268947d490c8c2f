"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"), in plain Python.

Pipeline for one text, the same as transformers' ``CLIPTokenizer`` (the reference
Stable Diffusion pipelines use):

1. special tokens (bos, eos, pad, unk strings) are cut out of the raw text and map
   to their ids directly;
2. each remaining segment is normalized: Unicode NFC, every run of whitespace
   becomes one space, then lowercasing character by character;
3. pre-tokenization with CLIP's regex: contractions ('s 't 're 've 'm 'll 'd), runs
   of letters, single digits, runs of other non-space characters;
4. each piece is UTF-8 encoded and every byte mapped to a printable character
   (:func:`bytes_to_unicode`), the last character gets the ``</w>`` end-of-word
   suffix, and the merges are applied lowest rank first (byte-pair encoding,
   Sennrich et al. 2016).

The vocabulary is CLIP's 49408 tokens: 256 byte characters, the same with
``</w>``, 48894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Differences from OpenAI's original tokenizer, shared with transformers: no ftfy text
repair and no HTML unescaping. Ids equal transformers' for every character the
installed Python's Unicode tables know (characters newer than those may be
classified differently, as the tables of the two libraries differ).
"""

from __future__ import annotations

import gzip
import heapq
import importlib.util
import json
import unicodedata
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import regex
import torch

from opensd.tokenizers import TokenizerError, as_text_list, frame, read_json_file, read_text_file, require_text

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of its 16e6 BPE file

# CLIP's pre-tokenization pattern. Exact special tokens are cut out before it runs; its
# special-token alternatives still matter for lowercased spellings ("<|ENDOFTEXT|>"),
# which transformers' ByteLevel pre-tokenizer then splits by GPT-2's pattern (_GPT2_PIECE).
_PIECE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_GPT2_PIECE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")
_BPE_CACHE_SIZE = 100_000


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 bytes to a printable unicode character (GPT-2's table).

    Printable Latin-1 bytes map to themselves; the other 68 (control, space, ...)
    map to U+0100 onwards in byte order, so no BPE symbol is whitespace. The dict's
    order (printable bytes first, then the others) is the order of CLIP's first 256
    token ids: ``!`` is id 0.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, per-character lowercase (as transformers' CLIPTokenizer).

    Characters are lowercased one at a time (no context-dependent rules such as the
    Greek final sigma), as the ``tokenizers`` Lowercase normalizer does.
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def read_open_clip_merges(path: str | Path) -> list[tuple[str, str]]:
    """The first 48894 merges of CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (its first line is a header)."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return [_merge_pair(line, path) for line in lines[1 : NUM_MERGES + 1]]


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary in id order: bytes, bytes + ``</w>``, one token per merge, bos, eos."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def _merge_pair(line: str, where: str | Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise TokenizerError(f"{where}: a merge line must hold two symbols, got {line!r}")
    return parts[0], parts[1]


def _special_token(value: object) -> str | None:
    """A special token from special_tokens_map.json / tokenizer_config.json (str or {"content": str})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class CLIPTokenizer:
    """CLIP byte-level BPE; see the module docstring for the pipeline.

    ``pad_token`` is ``<|endoftext|>`` for SD1 (pad id 49407) and ``!`` for SD2 (pad id 0).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[Sequence[str]],  # pairs of strings, each kept as a tuple (another tokenizer's .merges too)
        *,
        pad_token: str = EOS_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        context_length: int = CONTEXT_LENGTH,
    ) -> None:
        for name, tok in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)]:
            if tok not in vocab:
                raise TokenizerError(f"{name} token {tok!r} is not in the vocabulary")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise TokenizerError(f"context_length must be an integer >= 2, got {context_length!r}")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.decoder = {i: t for t, i in self.vocab.items()}
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self._context_length = context_length
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # Special tokens are matched in the raw text, longest first.
        specials = sorted({bos_token, eos_token, pad_token, unk_token}, key=len, reverse=True)
        self._specials = regex.compile("|".join(regex.escape(s) for s in specials))
        self._cache: dict[str, list[str]] = {}

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_open_clip(cls, *, pad_token: str = EOS_TOKEN, context_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
        """CLIP's vocabulary built from the BPE file shipped inside the installed ``open_clip``.

        The package is located without importing it (importing it pulls in torchvision).
        """
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "CLIPTokenizer.from_open_clip needs the open_clip package for its BPE file: "
                "pip install open_clip_torch (or use CLIPTokenizer.from_files with a diffusers tokenizer/ folder)"
            )
        path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        if not path.exists():
            raise FileNotFoundError(f"open_clip is installed but its BPE file is missing: {path}")
        merges = read_open_clip_merges(path)
        return cls(clip_vocab(merges), merges, pad_token=pad_token, context_length=context_length)

    @classmethod
    def from_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        pad_token: str | None = None,
        context_length: int | None = None,
    ) -> CLIPTokenizer:
        """Read ``vocab.json`` and ``merges.txt`` (a diffusers ``tokenizer/`` folder's files).

        Special tokens and ``model_max_length`` come from ``special_tokens_map.json`` and
        ``tokenizer_config.json`` next to ``vocab_json`` when present; an explicit
        ``pad_token``/``context_length`` wins. Defaults: pad ``<|endoftext|>``, 77.
        """
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        vocab = read_json_file(vocab_json)
        if not all(isinstance(t, str) and type(i) is int and 0 <= i < len(vocab) for t, i in vocab.items()):
            raise TokenizerError(
                f"{vocab_json}: expected a JSON object token -> id, the ids running from 0 to {len(vocab) - 1}"
            )
        lines = read_text_file(merges_txt).split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [_merge_pair(line, merges_txt) for line in lines if line.strip()]

        specials: dict[str, str] = {}
        max_length = None
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins
            p = vocab_json.parent / name
            if p.exists():
                data = read_json_file(p)
                for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                    tok = _special_token(data.get(key))
                    if tok is not None:
                        specials[key] = tok
                if type(data.get("model_max_length")) is int and data["model_max_length"] < 10_000:
                    max_length = data["model_max_length"]
        if pad_token is not None:
            specials["pad_token"] = pad_token
        length = context_length if context_length is not None else (max_length or CONTEXT_LENGTH)
        try:
            return cls(vocab, merges, context_length=length, **specials)
        except TokenizerError as e:
            raise TokenizerError(f"{vocab_json.parent}: {e}") from None

    @classmethod
    def from_dir(cls, directory: str | Path, **kwargs: object) -> CLIPTokenizer:
        """:meth:`from_files` on ``directory/vocab.json`` and ``directory/merges.txt``."""
        d = Path(directory)
        return cls.from_files(d / "vocab.json", d / "merges.txt", **kwargs)  # type: ignore[arg-type]

    def save(self, directory: str | Path) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json
        in the layout transformers' ``CLIPTokenizer.from_pretrained`` reads."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(m) for m in self.merges)]
        (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        specials = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self._context_length, **specials}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- the Tokenizer protocol -----------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def bos_id(self) -> int:
        return self.vocab[self.bos_token]

    @property
    def eos_id(self) -> int:
        return self.vocab[self.eos_token]

    @property
    def pad_id(self) -> int:
        return self.vocab[self.pad_token]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos/padding."""
        require_text(text, "encode's text")
        ids: list[int] = []
        start = 0
        for m in self._specials.finditer(text):
            ids += self._encode_plain(text[start : m.start()])
            ids.append(self.vocab[m.group()])
            start = m.end()
        ids += self._encode_plain(text[start:])
        return ids

    def unknown_words(self, text: str) -> list[str]:
        """Always ``[]``: byte-level BPE represents any text (every byte is a token)."""
        require_text(text, "unknown_words's text")
        return []

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """(B, L) long tensor ``[bos, ids..., eos, pad...]``, ids truncated to L - 2."""
        encoded = [self.encode(t) for t in as_text_list(texts)]
        length = self._context_length if context_length is None else context_length
        return frame(encoded, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, context_length=length)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of ``ids`` (``</w>`` becomes a space); bos/eos/pad dropped unless ``skip_special=False``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.bos_id, self.eos_id, self.pad_id} if skip_special else set()
        text = "".join(self.decoder[i] for i in ids if i not in specials).replace(END_OF_WORD, " ")
        data = bytes(32 if c == " " else self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").strip()

    # ---- BPE ------------------------------------------------------------------------

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        unk = self.vocab[self.unk_token]
        for piece in _PIECE.findall(normalize(text)):
            # A lowercased special-token spelling is split again (<| endoftext |>), as
            # transformers' ByteLevel pre-tokenizer does; every other piece stays whole.
            for sub in _GPT2_PIECE.findall(piece) if piece in (BOS_TOKEN, EOS_TOKEN) else [piece]:
                word = "".join(self._byte_encoder[b] for b in sub.encode("utf-8"))
                ids += [self.vocab.get(t, unk) for t in self._bpe(word)]
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of ``word`` (its last one ending in ``</w>``) by merge rank.

        The lowest-ranked adjacent pair is merged first, leftmost first. A heap of the
        pairs and a linked list of the symbols make it O(n log n) in the word's length
        (merging pair by pair over the whole word is quadratic: a 16 KB word took 45 s).
        This merges each occurrence of a pair in the same order as "merge every
        occurrence, then look again", because a merge that uses a token always ranks
        after the merge that made it, as in every trained BPE list.
        """
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        n = len(symbols)
        nxt = list(range(1, n + 1))  # index of the next live symbol, n at the end
        prv = list(range(-1, n - 1))
        alive = [True] * n
        ranks = self.ranks
        heap = [(ranks[(symbols[i], symbols[i + 1])], i) for i in range(n - 1) if (symbols[i], symbols[i + 1]) in ranks]
        heapq.heapify(heap)

        def push(i: int) -> None:
            j = nxt[i]
            if 0 <= i and j < n:
                rank = ranks.get((symbols[i], symbols[j]))
                if rank is not None:
                    heapq.heappush(heap, (rank, i))

        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: one of the two symbols has merged since
            symbols[i] += symbols[j]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            push(prv[i])
            push(i)
        out = [symbols[i] for i in range(n) if alive[i]]
        if len(self._cache) >= _BPE_CACHE_SIZE:
            self._cache.clear()
        self._cache[word] = out
        return out
