"""A smaller WordPiece vocabulary for a BERT-conditioned model, with the same outputs on
every text the kept tokens spell.

A pretrained BERT's word-embedding table is most of its size (all-MiniLM-L6-v2: 30,522
tokens x 384, half its parameters). BERT's ``vocab.txt`` lists the special tokens and the
characters first and then the word pieces roughly from frequent to rare (the WordPiece
training's order: "the" is id 1997, "triangle" 9547, "crimson" 11467). Pruning keeps

* every id below ``first`` (the special tokens, the characters, the commonest pieces),
* every single character and ``##`` + character wherever it is listed, and
* every token of the texts given to keep (a model's training captions: the order is only
  roughly by frequency, and the shapes world's "triangles" is id 27189),

renumbered in their old order, and the matching rows of the embedding table.

What stays exact: WordPiece takes the longest vocabulary piece at each point of a word, so
a text whose tokens all survive is split exactly as before (any longer piece that matched
would have been chosen the first time), gets the same rows, and the encoder gives the same
output bit for bit. A word whose pieces were dropped is spelled from shorter pieces (down to
its characters): it still reaches the encoder, never silently as ``[UNK]``, but without the
meaning its own embedding carried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from opensd.checkpoints.io import CheckpointError, load_strict
from opensd.models.stable_diffusion import StableDiffusion
from opensd.tokenizers.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

EMBEDDING = "cond_stage_model.bert.embeddings.word_embeddings.weight"


def kept_ids(vocab: dict[str, int], first: int, also: Iterable[int] = ()) -> list[int]:
    """The old ids a vocabulary pruned to ``first`` keeps, ascending: those below ``first``,
    the characters, the special tokens and ``also``."""
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise CheckpointError(f"the vocabulary size to keep must be a positive integer, got {first!r}")
    keep = {i for t, i in vocab.items()
            if i < first or len(t) == 1 or (t.startswith("##") and len(t) == 3) or t in SPECIAL_TOKENS}
    return sorted(keep | set(also))


def prune_vocabulary(model: StableDiffusion, tokenizer: WordPieceTokenizer, first: int,
                     keep_texts: Iterable[str] = ()) -> tuple[StableDiffusion, WordPieceTokenizer]:
    """A copy of a BERT-conditioned ``model`` and its ``tokenizer`` with the vocabulary cut to
    the ids below ``first``, every character and every token of ``keep_texts`` (:func:`kept_ids`).
    The other weights are shared with ``model``, not copied."""
    if not model.cfg.has_bert or not isinstance(tokenizer, WordPieceTokenizer):
        raise CheckpointError("only a model whose text encoder is a BERT (with a WordPiece tokenizer) has a "
                              "vocabulary to prune; this one's encoder is "
                              f"{type(model.text_encoder).__name__} with {type(tokenizer).__name__}")
    if first >= tokenizer.vocab_size:
        raise CheckpointError(f"the vocabulary has {tokenizer.vocab_size} tokens; keeping the first {first} "
                              f"prunes nothing (give a number below {tokenizer.vocab_size})")
    ids = kept_ids(tokenizer.vocab, first, (i for text in keep_texts for i in tokenizer.encode(text)))
    by_id = {i: t for t, i in tokenizer.vocab.items()}
    vocab = {by_id[old]: new for new, old in enumerate(ids)}
    cfg = dataclasses.replace(model.cfg, text=dataclasses.replace(model.cfg.text, vocab_size=len(ids)))
    state = dict(model.state_dict())
    state[EMBEDDING] = state[EMBEDDING][torch.tensor(ids)].clone()  # (kept, width)
    with torch.device("meta"):
        pruned = StableDiffusion(cfg)
    load_strict(pruned, state, "the pruned model")
    return pruned.eval(), WordPieceTokenizer(vocab, tokenizer.context_length)
