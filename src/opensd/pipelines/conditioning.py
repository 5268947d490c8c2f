"""The conditioning path: a request's prompts and sizes become dicts of named tensors.

Every family conditions its U-Net through ``UNetModel(x, t, context, y=None)``; what
goes in is one dict per guidance branch, built here and nowhere else:

- ``context`` (B, L, D): the text encoders' hidden states per token, concatenated on
  D. SD 1.x: CLIP ViT-L's last layer (``clip_skip`` 2: its penultimate) through the
  final LayerNorm. SD 2.x: OpenCLIP ViT-H's penultimate layer through ``ln_final``.
  SDXL: CLIP ViT-L's and OpenCLIP bigG's penultimate layers as they are (768 + 1280 =
  2048); the refiner: bigG's alone (1280). Long prompts are chunks of 77 tokens
  encoded one by one and concatenated on L (:mod:`opensd.prompts.syntax`).
- ``y`` (B, adm), SDXL only (Podell et al. 2023, Sec. 2.2): the pooled, projected bigG
  embedding of the prompt's first chunk, then the Fourier (sinusoidal) embedding of each
  size number: original size (h, w), crop top-left (top, left) and target size (h, w)
  for the base; original size, crop and aesthetic score for the refiner.

Guidance batches every key (:class:`~opensd.diffusion.ClassifierFreeGuidance`). As
A1111 and diffusers do for SDXL, an empty negative prompt (once its ``<lora:...>`` tags
are removed) is all zeros (context and pooled), and the refiner's negative branch gets the negative aesthetic score.

OpenCLIP pads with id 0 (``!``) where CLIP pads with end-of-text: a chunk built with the
first tokenizer is re-padded for every OpenCLIP encoder (everything after the first
end-of-text becomes 0), which A1111 does by tokenizing once per embedder; so an SD 2.x
model conditions the same whichever of the two paddings its tokenizer has.

Textual inversions (:mod:`opensd.checkpoints.embeddings`): a request's ``embeddings``
(name -> :class:`~opensd.checkpoints.embeddings.TextualInversion`) are found in its
prompts by name (:mod:`opensd.prompts.embedding_names`); each stands for n placeholder
tokens (:func:`~opensd.prompts.syntax.tokenize_prompt`), and every text encoder gets the
embedding's vectors for it in place of the placeholders' token embeddings (A1111's
``EmbeddingsWithFixes``), so emphasis, chunking, re-padding and pooling apply as to words.
Without embeddings in a prompt, its encoding is exactly what it was without them.

A model whose text encoder is a BERT (MiniLM; ``SDConfig.text`` a
:class:`~opensd.models.bert.BertTextConfig`, sd1 family only) frames chunks with its
WordPiece tokenizer as ``[CLS] tokens [SEP] [PAD]...``; the attention mask is built from
the ids (:func:`bert_attention_mask`: 1 through each row's last ``[SEP]``, 0 after), so
no token attends to the padding, and the context is the last layer's hidden states with
the padded positions zeroed (:class:`~opensd.models.stable_diffusion.BertConditioner`):
a prompt's context depends on its tokens only. Emphasis and chunking apply as for SD
1.x's CLIP. ``clip_skip`` (other than 1) and textual inversions do not apply to a BERT and
are refused with a :class:`~opensd.pipelines.request.RequestError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opensd.checkpoints.embeddings import TextualInversion, check_fits
from opensd.diffusion.interruption import StopCheck, check_stop
from opensd.models.bert import BertTextModel
from opensd.models.layers import timestep_embedding
from opensd.models.open_clip import OpenCLIPTextModel
from opensd.models.stable_diffusion import BertConditioner, ModelFamily, StableDiffusion, TextEncoder
from opensd.pipelines.request import GenerationRequest, RequestError
from opensd.prompts.budget import DEFAULT_BUDGET, PromptBudget, tokenize_within_budget
from opensd.prompts.extra_networks import strip_tags
from opensd.prompts.syntax import (
    TokenizedPrompt,
    apply_emphasis,
    chunk_rows,
    context_length,
    encode_tokenized,
    match_lengths,
    tokenize_prompt,
)

OPEN_CLIP_PAD_ID = 0  # OpenCLIP's tokenizer pads with 0 ("!")
Conditioning = dict[str, torch.Tensor]
Embeddings = Mapping[str, TextualInversion]  # a request's textual inversions by name


@dataclass(frozen=True)
class TextEmbedding:
    """Encoded prompts: ``context`` (B, L, D) and, for families with ``y``, ``pooled`` (B, P)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def expand(self, batch: int) -> TextEmbedding:
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return TextEmbedding(self.context.expand(batch, -1, -1), pooled)


def token_embedding(encoder: TextEncoder) -> nn.Embedding:
    """A text encoder's token-embedding table (CLIP's, OpenCLIP's and BERT's module names)."""
    if isinstance(encoder, OpenCLIPTextModel):
        return encoder.token_embedding
    if isinstance(encoder, BertTextModel):
        return encoder.embeddings.word_embeddings
    return encoder.text_model.embeddings.token_embedding


def bert_attention_mask(ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(N, L) long: 1 from the start through each row of ``ids`` (N, L)'s last ``sep_id``
    (``[SEP]``, which ends a framed row's text), 0 at the padding after it; a row without
    ``[SEP]`` is all 1 (nothing to mask)."""
    length = ids.shape[1]
    pos = torch.arange(length, device=ids.device)
    last = torch.where(ids == sep_id, pos, -1).max(dim=1).values  # (N,)
    last = torch.where(last < 0, length - 1, last)
    return (pos[None, :] <= last[:, None]).long()


def bert_context(model: StableDiffusion, ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(N, L, D): the BERT text encoder's context for framed ``ids`` (N, L), padding zeroed."""
    conditioner = model.cond_stage_model
    if not isinstance(conditioner, BertConditioner):
        raise TypeError("bert_context needs a model whose text encoder is a BERT")
    out: torch.Tensor = conditioner(ids, bert_attention_mask(ids, sep_id))
    return out


def check_bert_clip_skip(clip_skip: int) -> None:
    """A :class:`RequestError` unless ``clip_skip`` is 1: a BERT text encoder has no "clip skip"."""
    if clip_skip != 1:
        raise RequestError(
            f"clip_skip {clip_skip} does not apply: this model's text encoder is a BERT, not CLIP (use clip_skip 1)"
        )


def embedding_fixes(prompts: list[TokenizedPrompt], n: int) -> list[tuple[int, int, str]]:
    """``(row, offset, name)`` of every embedding in :func:`chunk_rows`' rows (prompt i's chunk j is row i * n + j)."""
    return [(i * n + j, off, name) for i, p in enumerate(prompts) for j, c in enumerate(p.chunks) for off, name in c.embeddings]


def repad(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """``ids`` (N, L) with every position after each row's first ``eos_id`` set to ``pad_id``."""
    is_eos = (ids == eos_id).int()
    after = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first eos
    return ids.masked_fill(after, pad_id)


class Conditioner:
    """Turns prompts and a request's sizes into the U-Net's conditioning dicts.

    Stateless between calls (safe to share). ``tokenizer`` frames the chunks (the first
    text encoder's); ``budget`` caps every prompt before it is encoded (None: no cap).
    """

    def __init__(self, model: StableDiffusion, tokenizer: Any, budget: PromptBudget | None = DEFAULT_BUDGET):
        self.model, self.tokenizer, self.budget = model, tokenizer, budget
        self.family = model.cfg.family

    # ------------------------------------------------------------------ text

    @property
    def context_length(self) -> int:
        return context_length(self.tokenizer, self.model.text_encoder)

    def tokenize(self, prompt: str, embeddings: Embeddings | None = None) -> TokenizedPrompt:
        """``prompt`` cut into chunks, within the budget; ``embeddings`` where it names them."""
        counts = {name: ti.count for name, ti in embeddings.items()} if embeddings else None
        if self.budget is None:
            return tokenize_prompt(self.tokenizer, prompt, self.context_length, embeddings=counts)
        return tokenize_within_budget(prompt, self.tokenizer, self.budget, self.context_length, embeddings=counts)

    def clip_skip_applies(self) -> bool:
        """Only SD 1.x's CLIP has A1111's "clip skip"; SD 2.x and SDXL use their fixed layers
        (as A1111); a BERT text encoder has none (:meth:`check_clip_skip` refuses it)."""
        return self.family is ModelFamily.SD1 and not self.model.cfg.has_bert

    def check_clip_skip(self, clip_skip: int) -> None:
        """A :class:`RequestError` for a ``clip_skip`` that cannot apply (other than 1 with a BERT)."""
        if self.model.cfg.has_bert:
            check_bert_clip_skip(clip_skip)

    def encode_tokenized(
        self, prompts: list[TokenizedPrompt], clip_skip: int = 1, embeddings: Embeddings | None = None
    ) -> TextEmbedding:
        """Every chunk encoded on its own, weighted (A1111's emphasis, per encoder), concatenated;
        the chunks' embeddings (:attr:`Chunk.embeddings`) taken from ``embeddings`` by name."""
        encoders = self.model.text_encoders
        device = next(encoders[0].parameters()).device
        ids, weights, n = chunk_rows(prompts, self.tokenizer, device=device)  # (B*n, ctx)
        fixes = embedding_fixes(prompts, n)
        if self.model.cfg.has_bert:
            check_bert_clip_skip(clip_skip)
            if fixes:
                raise RequestError("textual-inversion embeddings need a CLIP text encoder; this model's is a BERT")
            z = apply_emphasis(bert_context(self.model, ids, self.tokenizer.eos_id), weights)  # (B*n, ctx, D)
            return TextEmbedding(z.reshape(len(prompts), n * z.shape[1], z.shape[-1]))
        if self.family is ModelFamily.SD1:
            if not fixes:
                return TextEmbedding(encode_tokenized(encoders[0], prompts, self.tokenizer, skip_layers=clip_skip - 1))
            hidden = encoders[0](ids, skip_layers=clip_skip - 1, token_embeds=self._token_embeds(0, ids, fixes, embeddings))
            z = apply_emphasis(hidden, weights)
            return TextEmbedding(z.reshape(len(prompts), n * z.shape[1], z.shape[-1]))
        if self.family is ModelFamily.SD2:  # OpenCLIP was trained on zero padding, whatever the tokenizer pads with
            ids = repad(ids, self.tokenizer.eos_id, OPEN_CLIP_PAD_ID)
            hidden = encoders[0](ids, skip_layers=1, token_embeds=self._token_embeds(0, ids, fixes, embeddings))
            z = apply_emphasis(hidden, weights)
            return TextEmbedding(z.reshape(len(prompts), n * z.shape[1], z.shape[-1]))
        parts, pooled = [], None
        for k, enc in enumerate(encoders):
            if isinstance(enc, OpenCLIPTextModel):
                padded = repad(ids, self.tokenizer.eos_id, OPEN_CLIP_PAD_ID)
                hidden, pooled = enc.hidden_and_pooled(padded, 1, self._token_embeds(k, padded, fixes, embeddings))
            else:
                hidden = enc(ids, skip_layers=1, final_norm=False, token_embeds=self._token_embeds(k, ids, fixes, embeddings))
            parts.append(apply_emphasis(hidden, weights))  # (B*n, ctx, D_i)
        z = torch.cat(parts, dim=-1)
        assert pooled is not None
        b = len(prompts)
        first = pooled.reshape(b, n, -1)[:, 0]  # (B, P): the first chunk's, as A1111
        return TextEmbedding(z.reshape(b, n * z.shape[1], z.shape[-1]), first)

    def _token_embeds(
        self, k: int, ids: torch.Tensor, fixes: list[tuple[int, int, str]], embeddings: Embeddings | None
    ) -> torch.Tensor | None:
        """(N, ctx, D_k): text encoder ``k``'s token embeddings of ``ids`` (N, ctx) with each
        fix's placeholders replaced by its embedding's vectors; None without fixes."""
        if not fixes:
            return None
        assert embeddings is not None
        x: torch.Tensor = token_embedding(self.model.text_encoders[k])(ids)  # (N, ctx, D_k)
        for row, offset, name in fixes:
            vectors = embeddings[name].vectors[k]  # (n, D_k)
            x[row, offset: offset + vectors.shape[0]] = vectors.to(x.dtype)
        return x

    def encode(
        self, prompts: list[str], clip_skip: int = 1, *, should_stop: StopCheck | None = None,
        embeddings: Embeddings | None = None,
    ) -> TextEmbedding:
        """Encode ``prompts`` (A1111 syntax, any length). With ``should_stop`` a single prompt
        is encoded chunk by chunk and ``should_stop()`` polled before each (the result is
        the same: every chunk is encoded on its own either way). ``embeddings``: textual
        inversions by name, put where the prompts name them (differentiable in their vectors
        outside inference mode); each must fit the model."""
        for ti in (embeddings or {}).values():
            check_fits(ti, self.model)
        if should_stop is None or len(prompts) != 1:
            check_stop(should_stop, "encoding the prompt")
            return self.encode_tokenized([self.tokenize(p, embeddings) for p in prompts], clip_skip, embeddings)
        tokenized = self.tokenize(prompts[0], embeddings)
        parts = []
        for chunk in tokenized.chunks:
            check_stop(should_stop, "encoding the prompt")
            one = TokenizedPrompt([chunk], tokenized.words, tokenized.token_count, tokenized.context)
            parts.append(self.encode_tokenized([one], clip_skip, embeddings))
        pooled = parts[0].pooled
        return TextEmbedding(torch.cat([p.context for p in parts], dim=1), pooled)

    # ------------------------------------------------------------------ size conditioning

    def size_vector(self, req: GenerationRequest, *, negative: bool = False) -> torch.Tensor:
        """(1, numbers * size_embed_dim): the Fourier-embedded size numbers of ``y``."""
        original = req.original_size or (req.height, req.width)
        numbers: list[float]
        if self.family is ModelFamily.SDXL:
            numbers = [*original, *req.crop_top_left, req.height, req.width]
        elif self.family is ModelFamily.SDXL_REFINER:
            score = req.negative_aesthetic_score if negative else req.aesthetic_score
            numbers = [*original, *req.crop_top_left, score]
        else:
            raise RequestError(f"a {self.family.value} model takes no size conditioning")
        dim = self.model.cfg.size_embed_dim
        emb = timestep_embedding(torch.tensor(numbers, dtype=torch.float32), dim)  # (numbers, dim)
        return emb.reshape(1, -1)

    # ------------------------------------------------------------------ request -> dicts

    def to_dict(self, text: TextEmbedding, req: GenerationRequest, *, negative: bool = False) -> Conditioning:
        """One guidance branch's conditioning: ``context``, and ``y`` where the family has it."""
        if self.model.cfg.adm_channels is None:
            return {"context": text.context}
        if text.pooled is None:
            raise RequestError(f"a {self.family.value} model needs the pooled text embedding too")
        size = self.size_vector(req, negative=negative).to(text.pooled)
        y = torch.cat([text.pooled, size.expand(text.pooled.shape[0], -1)], dim=1)  # (B, adm)
        return {"context": text.context, "y": y}

    def for_request(
        self,
        req: GenerationRequest,
        *,
        prompt_embeds: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        negative_embeds: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        should_stop: StopCheck | None = None,
        embeddings: Mapping[str, Any] | None = None,
    ) -> tuple[Conditioning, Conditioning | None]:
        """``(cond, uncond)`` for ``req``, each batched to ``req.batch_size``; uncond is None
        at ``cfg_scale`` 1 (no unconditional pass). ``embeddings``: the request's textual
        inversions by name (:mod:`opensd.pipelines.networks`), in the prompt and the negative prompt."""
        batch = req.batch_size
        embeddings = embeddings or None
        cond = self._text(prompt_embeds, "prompt_embeds", req.prompt, req, should_stop, embeddings).expand(batch)
        if req.cfg_scale == 1.0:
            return self.to_dict(cond, req), None
        if negative_embeds is None and strip_tags(req.negative_prompt) == "" and self.family in (
            ModelFamily.SDXL, ModelFamily.SDXL_REFINER
        ):
            pooled = None if cond.pooled is None else torch.zeros_like(cond.pooled)
            uncond = TextEmbedding(torch.zeros_like(cond.context), pooled)
        else:
            uncond = self._text(
                negative_embeds, "negative_embeds", req.negative_prompt, req, should_stop, embeddings
            ).expand(batch)
        if uncond.context.shape[1] != cond.context.shape[1]:  # A1111: pad the shorter with empty-prompt chunks
            empty = self.encode([""], req.clip_skip).context
            c, u = match_lengths(cond.context, uncond.context, empty)
            cond, uncond = TextEmbedding(c, cond.pooled), TextEmbedding(u, uncond.pooled)
        return self.to_dict(cond, req), self.to_dict(uncond, req, negative=True)

    def _text(
        self, embeds: Any, name: str, prompt: str, req: GenerationRequest, should_stop: StopCheck | None,
        embeddings: Embeddings | None = None,
    ) -> TextEmbedding:
        """``embeds`` checked (a context tensor, or a dict with ``context`` and ``pooled``), else ``prompt`` encoded."""
        if embeds is None:
            return self.encode([prompt], req.clip_skip, should_stop=should_stop, embeddings=embeddings)
        cfg, batch = self.model.cfg, req.batch_size
        context, pooled = (embeds.get("context"), embeds.get("pooled")) if isinstance(embeds, Mapping) else (embeds, None)
        width = cfg.context_dim
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] not in (1, batch) \
                or context.shape[1] < 1 or context.shape[2] != width:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise RequestError(f"{name} must be a (1 or {batch}, L, {width}) tensor, got {got}")
        p_dim = cfg.pooled_dim
        param = next(self.model.unet.parameters())
        if p_dim is None:
            pooled = None
        elif not isinstance(pooled, torch.Tensor) or pooled.shape not in ((1, p_dim), (batch, p_dim)):
            got = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise RequestError(
                f"{name} for a {self.family.value} model must be a dict with 'context' and 'pooled' "
                f"(1 or {batch}, {p_dim}), got pooled {got}"
            )
        else:
            pooled = pooled.to(param.device, param.dtype)
        return TextEmbedding(context.to(param.device, param.dtype), pooled)
