"""Retrieval accuracy of a two-tower (image, text) model such as CLIP.

Generic over the data: given N images and N captions with a group id each (pairs of one
group state the same thing, so duplicates count as hits), :func:`retrieval_accuracy`
gives the top-1 / top-5 share from images to captions and back; given extra captions
each false for one image, :func:`negative_accuracy` gives how often the true caption
wins. The shapes world's report (its specs as groups, its hard negatives) is
:func:`opensd.shapes.retrieval.retrieval_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

ENCODE_CHUNK = 256  # rows per forward pass


def images_tensor(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """``images`` as a (N, 3, H, W) tensor in [-1, 1] (PIL images converted at the first one's size)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a (N, 3, H, W) tensor in [-1, 1], got {tuple(images.shape)}")
        return images
    from opensd.pipelines.images import to_tensor

    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise ValueError("images must be a (N, 3, H, W) tensor or a non-empty list of PIL images")
    w, h = images[0].size
    return torch.cat([to_tensor(im, w, h) for im in images])


@torch.no_grad()
def encode_texts(model, texts: list[str], tokenizer, device: torch.device) -> torch.Tensor:
    """(N, D) text embeddings of ``texts``, ``ENCODE_CHUNK`` at a time."""
    out = []
    for i in range(0, len(texts), ENCODE_CHUNK):
        ids = tokenizer(texts[i : i + ENCODE_CHUNK]).to(device)
        out.append(model.encode_text(ids, tokenizer.eos_id))
    return torch.cat(out)


@torch.no_grad()
def encode_images(model, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, D) image embeddings of ``x`` (N, 3, H, W), ``ENCODE_CHUNK`` at a time."""
    return torch.cat([model.encode_image(x[i : i + ENCODE_CHUNK].to(device)) for i in range(0, x.shape[0], ENCODE_CHUNK)])


def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """``i2t_top1`` / ``i2t_top5``: share of images whose top-1 / top-5 of the N captions holds
    one of the same group; ``t2i_top1`` / ``t2i_top5`` the same from captions to images
    (chance ~ 1/N, 5/N); ``count``: N. ``image_emb``, ``text_emb``: (N, D); ``groups``: (N,) ints."""
    n = image_emb.shape[0]
    sim = image_emb @ text_emb.T  # (N images, N texts)
    same = groups[:, None] == groups[None, :]  # (N, N): pair i and pair j state the same thing
    top = min(5, n)
    hits_i2t = same.gather(1, sim.topk(top, dim=1).indices)  # (N, top) over caption indices per image
    hits_t2i = same.gather(1, sim.topk(top, dim=0).indices.T)  # (N, top) over image indices per caption
    return {
        "count": float(n),
        "i2t_top1": hits_i2t[:, 0].float().mean().item(),
        "i2t_top5": hits_i2t.any(dim=1).float().mean().item(),
        "t2i_top1": hits_t2i[:, 0].float().mean().item(),
        "t2i_top5": hits_t2i.any(dim=1).float().mean().item(),
    }


def negative_accuracy(
    image_emb: torch.Tensor, text_emb: torch.Tensor, neg_emb: torch.Tensor, owners: torch.Tensor,
    kinds: Sequence[str], kind_order: Sequence[str],
) -> dict[str, float]:
    """Negative captions ``neg_emb`` (M, D), each false for image ``owners[m]`` and of kind
    ``kinds[m]``: ``hard_negative_accuracy`` (the share of the N images whose true caption beats
    all of its negatives) and, per kind of ``kind_order`` present, ``hard_negative_accuracy/<kind>``
    (the share of wins, chance 0.5) and ``hard_negative_count/<kind>``."""
    n = image_emb.shape[0]
    wins = (image_emb[owners] * text_emb[owners]).sum(-1) > (image_emb[owners] * neg_emb).sum(-1)  # (M,)
    beaten_all = torch.ones(n, dtype=torch.bool, device=image_emb.device)
    beaten_all[owners[~wins]] = False
    metrics = {"hard_negative_accuracy": beaten_all.float().mean().item()}
    for kd in kind_order:
        sel = torch.tensor([k == kd for k in kinds], device=image_emb.device)
        if bool(sel.any()):
            metrics[f"hard_negative_accuracy/{kd}"] = wins[sel].float().mean().item()
            metrics[f"hard_negative_count/{kd}"] = float(sel.sum().item())
    return metrics
