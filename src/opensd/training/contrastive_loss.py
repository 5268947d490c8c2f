"""The contrastive loss of CLIP training: symmetric InfoNCE, optionally with hard negatives.

Radford et al. 2021 (CLIP): for a batch of B (image, caption) pairs the B x B cosine
similarities, times the model's logit scale, are trained with the symmetric InfoNCE loss

    L = (CE(S, diag) + CE(S^T, diag)) / 2,     S[i, j] = scale * <img_i, txt_j>

(van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding").

Bag-of-words shortcuts. A batch of random captions can be told apart by the words they
contain alone, so plain CLIP learns little about which colour belongs to which shape
(Yuksekgonul et al. 2023, NegCLIP). A data source that can write captions *false* for a
scene with nearly the same words (the shapes world: :mod:`opensd.shapes.negatives`) hands
them in as ``hard_negative_ids``; they join their image's candidates in the image -> text
direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opensd.models.contrastive import ContrastiveModel


def info_nce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor | float,
    hard_negative_emb: torch.Tensor | None = None,
    hard_negative_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE on given embeddings; pair ``i`` is (image_emb[i], text_emb[i]).

    ``image_emb``, ``text_emb``: (B, D); ``hard_negative_emb``: (B, K, D) texts false
    for image ``i``, appended to image ``i``'s candidates in the image -> text
    softmax with logits ``scale * <img_i, neg_ik> + log(hard_negative_weight)``.
    Returns ``loss = (loss_i2t + loss_t2i) / 2``, the parts, ``logits`` (B, B) and
    ``hard_negative_logits`` (B, K) when negatives are given.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must both be (B, D), got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    b, d = image_emb.shape
    logits = scale * image_emb @ text_emb.T  # (B images, B texts)
    target = torch.arange(b, device=logits.device)
    out = {"logits": logits, "loss_t2i": F.cross_entropy(logits.T, target)}
    i2t = logits
    if hard_negative_emb is not None:
        if hard_negative_emb.ndim != 3 or hard_negative_emb.shape[0] != b or hard_negative_emb.shape[2] != d:
            raise ValueError(
                f"hard negative embeddings must be (B={b}, K, D={d}), "
                f"got {tuple(hard_negative_emb.shape)}"
            )
        hn = scale * torch.einsum("bd,bkd->bk", image_emb, hard_negative_emb)  # (B, K)
        out["hard_negative_logits"] = hn
        if hard_negative_weight > 0:
            i2t = torch.cat([logits, hn + math.log(hard_negative_weight)], dim=1)  # (B, B + K)
    out["loss_i2t"] = F.cross_entropy(i2t, target)
    out["loss"] = (out["loss_i2t"] + out["loss_t2i"]) / 2
    return out


def _check_batch(images: torch.Tensor, ids: torch.Tensor, hard_negative_ids: torch.Tensor | None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise ValueError(f"ids must be a (B, L) tensor, got {getattr(ids, 'shape', type(ids).__name__)}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != ids.shape[0]:
        raise ValueError(
            f"images must be (B, 3, H, W) with the same B as ids {tuple(ids.shape)}, "
            f"got {getattr(images, 'shape', type(images).__name__)}"
        )
    if ids.shape[0] < 2:
        raise ValueError("a contrastive batch needs at least 2 pairs")
    b = ids.shape[0]
    if hard_negative_ids is not None and (
        hard_negative_ids.ndim != 3 or hard_negative_ids.shape[0] != b or hard_negative_ids.shape[2] != ids.shape[1]
    ):
        raise ValueError(
            f"hard_negative_ids must be (B={b}, K, L={ids.shape[1]}), got {tuple(hard_negative_ids.shape)}"
        )


def contrastive_loss(
    model: ContrastiveModel,
    images: torch.Tensor,
    ids: torch.Tensor,
    eos_id: int,
    hard_negative_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE over a batch of (image, caption) pairs, optionally with hard negatives.

    ``images``: (B, 3, H, W) in [-1, 1]; ``ids``: (B, L) captions; ``hard_negative_ids``:
    (B, K, L) captions false for image ``i``. Returns the loss and metrics (0-d tensors):
    ``loss``, ``loss_i2t``, ``loss_t2i``, in-batch top-1 accuracies ``acc_i2t`` /
    ``acc_t2i`` (among the B captions / images), ``temperature`` and ``logit_scale``;
    with negatives also ``hard_negative_acc``, the share of images whose caption
    scores above all of its K negatives (chance 1 / (K + 1)).
    """
    _check_batch(images, ids, hard_negative_ids)
    b = ids.shape[0]
    image_emb = model.encode_image(images)
    text_emb = model.encode_text(ids, eos_id)
    neg_emb = None
    if hard_negative_ids is not None:
        k = hard_negative_ids.shape[1]
        neg_emb = model.encode_text(hard_negative_ids.reshape(b * k, -1), eos_id).view(b, k, -1)  # (B, K, D)
    scale = model.scale()
    parts = info_nce(image_emb, text_emb, scale, neg_emb, model.cfg.hard_negative_weight)

    with torch.no_grad():
        logits = parts["logits"]
        target = torch.arange(b, device=logits.device)
        metrics = {  # 0-d tensors: reading them (float()) is left to the caller, so a GPU step never waits
            "loss": parts["loss"].detach(),
            "loss_i2t": parts["loss_i2t"].detach(),
            "loss_t2i": parts["loss_t2i"].detach(),
            "acc_i2t": (logits.argmax(dim=1) == target).float().mean(),
            "acc_t2i": (logits.argmax(dim=0) == target).float().mean(),
            "temperature": 1.0 / scale.detach(),
            "logit_scale": scale.detach(),
        }
        if neg_emb is not None:
            positive = logits.diagonal()  # (B,)
            metrics["hard_negative_acc"] = (positive > parts["hard_negative_logits"].amax(dim=1)).float().mean()
    return parts["loss"], metrics
