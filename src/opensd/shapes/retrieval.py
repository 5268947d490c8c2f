"""Retrieval and hard-negative accuracy of a contrastive model on the shapes world.

The world's specs are the groups of :func:`opensd.eval.retrieval.retrieval_accuracy`
(two captions of one spec state the same scene), and its hard negatives
(:func:`opensd.shapes.negatives.hard_negatives`: swapped colours, swapped relation
order, a count off by one, ...) the false captions of
:func:`opensd.eval.retrieval.negative_accuracy`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image

from opensd.eval.retrieval import encode_images, encode_texts, images_tensor, negative_accuracy, retrieval_accuracy
from opensd.shapes.negatives import NEGATIVE_KINDS, hard_negatives
from opensd.shapes.world import PromptSpec


@torch.no_grad()
def retrieval_metrics(
    model,
    images: torch.Tensor | Sequence[Image.Image],
    captions: Sequence[str],
    specs: Sequence[PromptSpec],
    tokenizer,
    rng_seed: int = 0,
) -> dict[str, float]:
    """Retrieval and hard-negative accuracy of ``model`` (a
    :class:`~opensd.models.contrastive.ContrastiveModel`) on N held-out (image, caption, spec) triples.

    - ``i2t_top1`` / ``i2t_top5`` / ``t2i_top1`` / ``t2i_top5``: as
      :func:`~opensd.eval.retrieval.retrieval_accuracy`, a caption of the same spec a hit;
    - ``hard_negative_accuracy/<kind>``: share of images whose true caption scores
      above one hard negative of that kind (worded like it; chance 0.5), over the
      ``hard_negative_count/<kind>`` images that have one; ``hard_negative_accuracy``:
      share whose caption beats all of its negatives.

    ``images``: (N, 3, H, W) in [-1, 1] or N PIL images; ``tokenizer``: a
    :class:`opensd.tokenizers.Tokenizer` whose context fits the text tower.
    """
    x = images_tensor(images)
    n = x.shape[0]
    if not (len(captions) == len(specs) == n) or n < 1:
        raise ValueError(
            f"need as many captions and specs as images, got {n} images, {len(captions)} captions, {len(specs)} specs"
        )
    if tokenizer.context_length > model.cfg.text.max_length:
        raise ValueError(
            f"tokenizer context_length {tokenizer.context_length} exceeds the text tower's max_length "
            f"{model.cfg.text.max_length}"
        )
    was_training = model.training
    model.eval()
    try:
        return _retrieval(model, x, list(captions), list(specs), tokenizer, rng_seed)
    finally:
        model.train(was_training)


def _retrieval(model, x: torch.Tensor, captions: list[str], specs: list[PromptSpec], tokenizer, rng_seed: int) -> dict[str, float]:
    device = model.logit_scale.device
    image_emb = encode_images(model, x, device)  # (N, D)
    text_emb = encode_texts(model, captions, tokenizer, device)  # (N, D)
    index: dict[PromptSpec, int] = {}
    groups = torch.tensor([index.setdefault(s, len(index)) for s in specs], device=image_emb.device)  # (N,)
    metrics = retrieval_accuracy(image_emb, text_emb, groups)

    rng = random.Random(f"opensd-retrieval:{rng_seed}")
    owners, kinds, texts = [], [], []
    for i, (spec, text) in enumerate(zip(specs, captions, strict=False)):
        for h in hard_negatives(spec, rng, k=None, like=text):
            owners.append(i)
            kinds.append(h.kind)
            texts.append(h.text)
    if texts:
        neg_emb = encode_texts(model, texts, tokenizer, device)  # (M, D)
        owner = torch.tensor(owners, device=image_emb.device)
        metrics.update(negative_accuracy(image_emb, text_emb, neg_emb, owner, kinds, NEGATIVE_KINDS))
    return metrics
