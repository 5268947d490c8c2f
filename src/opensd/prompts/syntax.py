"""The prompt syntax of AUTOMATIC1111's web UI, and weighted, chunked prompt encoding.

Attention syntax (A1111's ``parse_prompt_attention``, reimplemented from its public
description)::

    (word)          weight x 1.1            ((word))   x 1.21      (((word)))  x 1.331
    [word]          weight / 1.1            [[word]]   / 1.21
    (word:1.3)      weight x 1.3            (a (b:1.5) c:0.5)  b: 0.75, a and c: 0.5
    \\( \\) \\[ \\]     literal brackets        \\\\  a literal backslash
    BREAK           ends the current chunk of 75 tokens (upper case, a word of its own)

Weights multiply through nesting. Input that does not balance never fails, it falls
back as A1111 does: a ``(`` or ``[`` left open applies its factor to the rest of the
prompt, a ``)`` or ``]`` that closes nothing is literal text, so is ``:1.2)`` with no
open ``(``; a lone backslash is dropped. Two differences from A1111, both where A1111
breaks: ``BREAK`` inside brackets still breaks (A1111 turns it into the word
"BREAK"), and a weight that is no number (``(a:1.2.3)``) stays as text and the
``)`` closes with x 1.1 (A1111 raises).

Two bounds A1111 does not have: at most :data:`MAX_NESTING` (32) brackets open at once,
and every weight, explicit or multiplied through nesting, within +-:data:`MAX_WEIGHT`
(10); past either, :class:`PromptSyntaxError` names the limit. The parser runs in time
and memory linear in the prompt (A1111's, and this module's before, were quadratic in
the nesting). Within the bounds it gives A1111's fragments and floats, bit for bit.

Encoding (A1111's ``FrozenCLIPEmbedderWithCustomWords`` with emphasis "Original"):

1. every fragment of the parse is tokenized on its own (per whitespace-separated
   word, which gives the same ids for CLIP's BPE and the word tokenizer); each token
   carries its fragment's weight and the index of the word it belongs to;
2. tokens are cut into chunks of ``context - 2`` (75 for CLIP's 77): a chunk ends
   when full, at ``BREAK``, or, when full and a comma lies at most
   ``comma_backtrack`` (A1111: 20) tokens back, right after that comma (the rest
   moves to the next chunk); every chunk is framed ``[bos, tokens, eos, pad...]``;
3. each chunk goes through the text encoder on its own, the hidden states are
   multiplied by the token weights, then rescaled so that the chunk's mean equals the
   unweighted mean; chunks are concatenated along the token axis, so a 150-token
   prompt gives 2 x 77 = 154 context vectors;
4. prompts of one batch (and cond / uncond for guidance) get the same number of
   chunks by appending the encoding of the empty prompt, one chunk per missing chunk.

A prompt whose weights are all 1 (``(word:1.0)`` included: equal weights merge)
encodes exactly as the plain prompt, without the rescale.

Extra-network tags (``<lora:name:0.8>``, any ``<kind:...>``) are removed before parsing,
as A1111 removes them (:mod:`opensd.prompts.extra_networks`); the infotext keeps them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from opensd.prompts.attention import (  # noqa: F401  (the parser, re-exported: this module's public names)
    BREAK,
    MAX_NESTING,
    MAX_WEIGHT,
    ROUND_FACTOR,
    SQUARE_FACTOR,
    Fragment,
    PromptSyntaxError,
    as_pairs,
    parse_prompt_attention,
)
from opensd.prompts.budget import DEFAULT_BUDGET, PromptBudget, tokenize_within_budget
from opensd.prompts.embedding_names import EmbeddingNames
from opensd.prompts.extra_networks import strip_tags

COMMA_BACKTRACK = 20  # A1111's "Prompt word wrap length limit"
# The id under an embedding's vectors (A1111's 0): low, so that OpenCLIP's pooling at the
# highest id of a row still finds end-of-text, and before eos, so re-padding keeps it.
PLACEHOLDER_ID = 0


# ----------------------------------------------------------------------------- tokenizing into chunks

@dataclass
class Chunk:
    """One framed chunk: ``ids``, ``weights`` and ``word_index`` have the context's length.

    ``word_index`` is -1 at bos, eos and padding. ``embeddings``: the textual inversions
    the chunk holds, each at the offset of its first placeholder (bos is offset 0).
    """

    ids: list[int]
    weights: list[float]
    word_index: list[int]
    embeddings: list[tuple[int, str]] = field(default_factory=list)  # (offset, name): where each embedding's vectors go


@dataclass
class TokenizedPrompt:
    """A prompt cut into chunks, with the words its tokens belong to."""

    chunks: list[Chunk]
    words: list[str]  # the prompt's words (whitespace-separated, syntax removed)
    token_count: int  # tokens the prompt holds (without framing)
    context: int  # length of every chunk
    fragments: list[Fragment] = field(default_factory=list)

    @property
    def ids(self) -> torch.Tensor:
        """(n_chunks, context) long."""
        return torch.tensor([c.ids for c in self.chunks], dtype=torch.long)

    @property
    def weights(self) -> torch.Tensor:
        """(n_chunks, context) float32."""
        return torch.tensor([c.weights for c in self.chunks], dtype=torch.float32)

    @property
    def word_index(self) -> torch.Tensor:
        """(n_chunks * context,) long: the word of each context position, -1 for framing."""
        return torch.tensor([i for c in self.chunks for i in c.word_index], dtype=torch.long)


def _comma_id(tokenizer) -> int | None:
    ids = tokenizer.encode(",")
    unk = getattr(tokenizer, "unk_id", None)
    return ids[0] if len(ids) == 1 and ids[0] != unk else None


def context_length(tokenizer, text_encoder=None) -> int:
    """Chunk length: the tokenizer's context, at most the text encoder's positions."""
    ctx = int(tokenizer.context_length)
    if text_encoder is not None:
        ctx = min(ctx, int(text_encoder.cfg.max_length))
    if ctx < 3:
        raise PromptSyntaxError(f"the context length must be >= 3 (bos, a token, eos), got {ctx}")
    return ctx


def empty_chunk(tokenizer, context: int) -> Chunk:
    """``[bos, eos, pad...]`` with weight 1: the empty prompt's one chunk."""
    pad = context - 2
    return Chunk(
        [tokenizer.bos_id, tokenizer.eos_id] + [tokenizer.pad_id] * pad, [1.0] * context, [-1] * context
    )


def tokenize_prompt(
    tokenizer,
    text: str,
    context: int | None = None,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    max_tokens: int | None = None,
    embeddings: Mapping[str, int] | None = None,
) -> TokenizedPrompt:
    """Parse ``text`` and cut its weighted tokens into framed chunks of ``context`` ids.

    ``context`` defaults to the tokenizer's (77 for CLIP: 75 tokens per chunk).
    ``comma_backtrack`` 0 turns the comma rule off. With ``max_tokens``, tokenizing
    stops as soon as the prompt holds more: the result then has ``token_count ==
    max_tokens + 1`` and is only good for saying that it is too long (see
    :func:`opensd.prompts.budget.check_prompt`). Time and memory are linear in ``len(text)``.

    ``embeddings`` (name -> vector count n): where the text names one
    (:mod:`opensd.prompts.embedding_names`), n placeholder tokens (:data:`PLACEHOLDER_ID`,
    weighted as the name's fragment) stand for its vectors, counted as n tokens, and the
    chunk records where (:attr:`Chunk.embeddings`). As A1111, an embedding is never split:
    when it does not fit in what is left of a chunk, the chunk ends and it starts the next.
    """
    context = int(tokenizer.context_length) if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context < 3:
        raise PromptSyntaxError(f"context must be an integer >= 3 (bos, a token, eos), got {context!r}")
    if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) or comma_backtrack < 0:
        raise PromptSyntaxError(f"comma_backtrack must be an integer >= 0, got {comma_backtrack!r}")
    size = context - 2
    fragments = parse_prompt_attention(strip_tags(text))  # <lora:name:w> and every other <kind:...> tag is not text
    chunker = _Chunker(tokenizer, size, comma_backtrack)
    names = EmbeddingNames(embeddings) if embeddings else None
    count = 0

    words: list[list[str]] = []  # each word's pieces, joined at the end (``+=`` on a long word is quadratic)
    joined = False  # the previous piece was a word with no whitespace after it
    for frag in fragments:
        if max_tokens is not None and count > max_tokens:
            break
        if frag.is_break:
            chunker.close()
            joined = False
            continue
        for segment, is_name in names.split(frag.text) if names else [(frag.text, False)]:
            for piece in [segment] if is_name else re.split(r"(\s+)", segment):
                if not piece:
                    continue
                if piece.isspace():
                    joined = False
                    continue
                if max_tokens is not None and count > max_tokens:
                    break
                if joined:
                    words[-1].append(piece)
                else:
                    words.append([piece])
                joined = True
                if is_name:
                    assert embeddings is not None
                    chunker.add_embedding(piece, embeddings[piece], float(frag.weight), len(words) - 1)
                    count += embeddings[piece]
                    continue
                for token in tokenizer.encode(piece):
                    chunker.add_token(token, float(frag.weight), len(words) - 1)
                    count += 1
    if chunker.ids or not chunker.chunks:
        chunker.close()
    if max_tokens is not None and count > max_tokens:
        count = max_tokens + 1
    return TokenizedPrompt(chunker.chunks, ["".join(w) for w in words], count, context, fragments)


class _Chunker:
    """Step 2 of the module doc: weighted tokens (and embeddings' placeholders) into framed chunks."""

    def __init__(self, tokenizer, size: int, comma_backtrack: int):
        self.tokenizer, self.size, self.comma_backtrack = tokenizer, size, comma_backtrack
        self.comma = _comma_id(tokenizer)
        self.chunks: list[Chunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.words_of: list[int] = []
        self.fixes: list[tuple[int, str]] = []  # (index in ids, embedding name)
        self.last_comma = -1

    def close(self) -> None:
        n = self.size - len(self.ids)
        tok = self.tokenizer
        self.chunks.append(
            Chunk(
                [tok.bos_id, *self.ids, tok.eos_id] + [tok.pad_id] * n,
                [1.0, *self.weights, 1.0] + [1.0] * n,
                [-1, *self.words_of, -1] + [-1] * n,
                [(i + 1, name) for i, name in self.fixes],  # + 1: after bos
            )
        )
        self.ids, self.weights, self.words_of, self.fixes, self.last_comma = [], [], [], [], -1

    def _make_room(self, is_comma: bool) -> None:
        """Before a token: note a comma; or, in a full chunk with a comma at most
        ``comma_backtrack`` back, move what follows the comma to the next chunk; close a full chunk."""
        if is_comma:
            self.last_comma = len(self.ids)
        elif (self.comma_backtrack and len(self.ids) == self.size and self.last_comma != -1
              and self.size - self.last_comma <= self.comma_backtrack):
            cut = self.last_comma + 1  # the comma stays, what follows it moves on
            moved = self.ids[cut:], self.weights[cut:], self.words_of[cut:]
            moved_fixes = [(i - cut, name) for i, name in self.fixes if i >= cut]
            self.ids, self.weights, self.words_of = self.ids[:cut], self.weights[:cut], self.words_of[:cut]
            self.fixes = [f for f in self.fixes if f[0] < cut]
            self.close()
            self.ids, self.weights, self.words_of = list(moved[0]), list(moved[1]), list(moved[2])
            self.fixes = moved_fixes
        if len(self.ids) == self.size:
            self.close()

    def add_token(self, token: int, weight: float, word: int) -> None:
        self._make_room(token == self.comma)
        self.ids.append(token)
        self.weights.append(weight)
        self.words_of.append(word)

    def add_embedding(self, name: str, n: int, weight: float, word: int) -> None:
        """n placeholders for embedding ``name``, all in one chunk (A1111's rule)."""
        if not 1 <= n <= self.size:
            raise PromptSyntaxError(f"embedding {name!r} has {n} vectors; a prompt chunk holds 1 to {self.size}")
        self._make_room(False)
        if len(self.ids) + n > self.size:
            self.close()
        self.fixes.append((len(self.ids), name))
        self.ids += [PLACEHOLDER_ID] * n
        self.weights += [weight] * n
        self.words_of += [word] * n


# ----------------------------------------------------------------------------- encoding

def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis "Original": ``z * w``, rescaled to keep the mean of each chunk.

    ``z``: (N, L, D) hidden states of N chunks, ``weights``: (N, L). Chunks whose
    weights are all 1 are returned untouched (bit for bit).
    """
    if z.ndim != 3 or weights.shape != z.shape[:2]:
        raise PromptSyntaxError(
            f"apply_emphasis expects z (N, L, D) and weights (N, L), got {tuple(z.shape)} and {tuple(weights.shape)}"
        )
    w = weights.to(z.device, torch.float32)
    rows = torch.nonzero((w != 1).any(dim=1)).flatten().tolist()
    if not rows:
        return z
    out = z.clone()
    for i in rows:
        zi = z[i].float()  # (L, D)
        weighted = zi * w[i, :, None]
        new_mean = weighted.mean()
        scale = zi.mean() / new_mean if new_mean != 0 else torch.ones((), device=z.device)
        out[i] = (weighted * scale).to(z.dtype)
    return out


@torch.no_grad()
def encode_tokenized(text_encoder, prompts: Sequence[TokenizedPrompt], tokenizer, *, skip_layers: int = 0) -> torch.Tensor:
    """(B, n * context, D): every chunk encoded on its own, weighted, concatenated.

    Prompts with fewer chunks than the longest get empty-prompt chunks appended.
    """
    ids, weights, n = chunk_rows(prompts, tokenizer, device=next(text_encoder.parameters()).device)
    z = text_encoder(ids, skip_layers=skip_layers)  # (B*n, ctx, D)
    z = apply_emphasis(z, weights)
    return z.reshape(len(prompts), n * z.shape[1], z.shape[-1])  # (B, n*ctx, D)


def chunk_rows(
    prompts: Sequence[TokenizedPrompt], tokenizer, *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(ids (B*n, ctx) long on device, weights (B*n, ctx) float32, n)``: every prompt's
    chunks, those with fewer than the longest's n padded with empty-prompt chunks."""
    if not prompts:
        raise PromptSyntaxError("encode needs at least one prompt")
    ctx = prompts[0].context
    if any(p.context != ctx for p in prompts):
        raise PromptSyntaxError("all prompts of one batch must be tokenized with the same context")
    n = max(len(p.chunks) for p in prompts)
    empty = empty_chunk(tokenizer, ctx)
    rows = [c for p in prompts for c in p.chunks + [empty] * (n - len(p.chunks))]
    ids = torch.tensor([c.ids for c in rows], dtype=torch.long, device=device)  # (B*n, ctx)
    weights = torch.tensor([c.weights for c in rows], dtype=torch.float32)  # (B*n, ctx)
    return ids, weights, n


def encode_prompts(
    text_encoder,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    skip_layers: int = 0,
    comma_backtrack: int = COMMA_BACKTRACK,
    budget: PromptBudget | None = DEFAULT_BUDGET,
) -> torch.Tensor:
    """(B, n * context, D) context for ``prompts`` written in A1111 syntax (see the module doc).

    Every prompt is first checked against ``budget`` (bytes, valid Unicode, tokens:
    :func:`~opensd.prompts.budget.check_prompt`, which raises ``PromptBudgetError``);
    ``budget=None`` encodes prompts of any length.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise PromptSyntaxError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    ctx = context_length(tokenizer, text_encoder)
    if budget is None:
        tokenized = [tokenize_prompt(tokenizer, p, ctx, comma_backtrack=comma_backtrack) for p in prompts]
    else:
        tokenized = [tokenize_within_budget(p, tokenizer, budget, ctx, comma_backtrack=comma_backtrack) for p in prompts]
    return encode_tokenized(text_encoder, tokenized, tokenizer, skip_layers=skip_layers)


def pad_context(context: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """``context`` (B, L, D) extended to ``length`` tokens with repeats of ``empty`` (1, ctx, D).

    A difference that is not a whole number of chunks takes the first tokens of the
    last repeat.
    """
    b, n, _ = context.shape
    if length < n:
        raise PromptSyntaxError(f"cannot pad a context of {n} tokens to {length}")
    if length == n:
        return context
    reps = math.ceil((length - n) / empty.shape[1])
    fill = empty.to(context).repeat(1, reps, 1)[:, : length - n]  # (1, length-n, D)
    return torch.cat([context, fill.expand(b, -1, -1)], dim=1)


def match_lengths(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cond`` and ``uncond`` padded with empty-prompt chunks to the same token count (A1111)."""
    n = max(cond.shape[1], uncond.shape[1])
    return pad_context(cond, n, empty), pad_context(uncond, n, empty)


__all__ = [
    "BREAK",
    "COMMA_BACKTRACK",
    "MAX_NESTING",
    "MAX_WEIGHT",
    "PLACEHOLDER_ID",
    "Chunk",
    "Fragment",
    "PromptSyntaxError",
    "TokenizedPrompt",
    "apply_emphasis",
    "as_pairs",
    "chunk_rows",
    "context_length",
    "empty_chunk",
    "encode_prompts",
    "encode_tokenized",
    "match_lengths",
    "pad_context",
    "parse_prompt_attention",
    "tokenize_prompt",
]
