"""CLIP-style contrastive training of a text encoder against an image encoder.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP): an image tower and a text tower are projected into one
``embed_dim`` space and L2-normalised; for a batch of B (image, caption) pairs the
B x B cosine similarities, times a learned logit scale ``exp(t)`` (initialised to
1 / 0.07 and clamped at 100), are trained with the symmetric InfoNCE loss

    L = (CE(S, diag) + CE(S^T, diag)) / 2,     S[i, j] = scale * <img_i, txt_j>

(van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
Coding"). The text tower is :class:`opensd.models.clip.CLIPTextModel` pooled at the
first end-of-text token, so after training ``model.text`` drops into
``StableDiffusion.cond_stage_model.transformer`` as a frozen text encoder.

Bag-of-words shortcuts. A batch of random captions can be told apart by the words
they contain alone, so plain CLIP learns little about which colour belongs to which
shape or which object is left (Yuksekgonul et al. 2023, "When and Why Vision-Language
Models Behave like Bags-of-Words", NegCLIP). :func:`hard_negatives` writes captions
that are *false* for a scene but use nearly the same words (swapped colours,
swapped relation order, a count off by one, ...), built from a modified
:class:`~opensd.shapes.world.PromptSpec` and worded by the world's own caption
grammar; :func:`contrastive_loss` adds them as extra text candidates for their image
in the image -> text direction, and :func:`retrieval_metrics` reports accuracy
against each kind of negative.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from opensd.config import ConfigError
from opensd.models.clip import CLIPTextConfig, CLIPTextModel
from opensd.models.image_encoder import ImageEncoder, ImageEncoderConfig
from opensd.shapes.negatives import NEGATIVE_KINDS, hard_negatives
from opensd.shapes.world import PromptSpec

ENCODE_CHUNK = 256  # rows per forward pass in retrieval_metrics


@dataclass(frozen=True)
class ContrastiveConfig:
    """The two towers, the joint space and the loss.

    ``embed_dim``: width of the joint space. ``init_temperature``: the softmax
    temperature at initialisation (CLIP: 0.07, i.e. logit scale 14.3);
    ``max_logit_scale``: the clamp on ``exp(logit_scale)`` (CLIP: 100).
    ``hard_negative_weight``: each hard negative's weight ``w`` in the image -> text
    softmax denominator (its logit gets ``+ log w``): 1 adds them as plain extra
    candidates, 0 ignores them in the loss (they are still measured).
    """

    text: CLIPTextConfig = field(default_factory=CLIPTextConfig.small)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig.small)
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    hard_negative_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.text, CLIPTextConfig):
            raise ConfigError(f"ContrastiveConfig.text must be a CLIPTextConfig, got {type(self.text).__name__}")
        if not isinstance(self.image, ImageEncoderConfig):
            raise ConfigError(
                f"ContrastiveConfig.image must be an ImageEncoderConfig, got {type(self.image).__name__}"
            )
        d = self.embed_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ConfigError(f"ContrastiveConfig.embed_dim must be a positive integer, got {d!r}")
        for name in ("init_temperature", "max_logit_scale", "hard_negative_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"ContrastiveConfig.{name} must be a finite number, got {v!r}")
        if self.max_logit_scale <= 1:
            raise ConfigError(f"ContrastiveConfig.max_logit_scale must be > 1, got {self.max_logit_scale!r}")
        if not 1 / self.max_logit_scale <= self.init_temperature <= 1:
            raise ConfigError(
                f"ContrastiveConfig.init_temperature must be in [1 / max_logit_scale, 1] = "
                f"[{1 / self.max_logit_scale:g}, 1], got {self.init_temperature!r}"
            )
        if self.hard_negative_weight < 0:
            raise ConfigError(f"ContrastiveConfig.hard_negative_weight must be >= 0, got {self.hard_negative_weight!r}")

    @classmethod
    def tiny(cls, vocab_size: int = 99, max_length: int = 32) -> ContrastiveConfig:
        """About 110 k parameters (text width 64, two levels of 16/32 channels), for tests; 32 px images."""
        text = CLIPTextConfig(vocab_size=vocab_size, max_length=max_length, width=64, layers=2, heads=4, mlp_width=128)
        return cls(text=text, image=ImageEncoderConfig.tiny(), embed_dim=64)

    @classmethod
    def small(cls, vocab_size: int = 2048, max_length: int = 32) -> ContrastiveConfig:
        """About 10 M parameters: :meth:`CLIPTextConfig.small` + :meth:`ImageEncoderConfig.small`; 32-64 px."""
        base = CLIPTextConfig.small()
        text = CLIPTextConfig(
            vocab_size=vocab_size, max_length=max_length, width=base.width, layers=base.layers,
            heads=base.heads, mlp_width=base.mlp_width, activation=base.activation,
        )  # fmt: skip
        return cls(text=text, image=ImageEncoderConfig.small(), embed_dim=256)


# ---- the model -------------------------------------------------------------------------


class ContrastiveModel(nn.Module):
    """CLIP: ``text`` (a CLIPTextModel) and ``image`` towers, linear projections, a logit scale."""

    def __init__(self, cfg: ContrastiveConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ContrastiveConfig):
            raise ConfigError(f"ContrastiveModel expects a ContrastiveConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.text = CLIPTextModel(cfg.text)
        self.image = ImageEncoder(cfg.image)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.image_projection = nn.Linear(cfg.image.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation of the text tower and projections (``initialize_parameters``).

        Token embeddings N(0, 0.02), positions N(0, 0.01), attention in-projections
        N(0, width^-1/2), residual out-projections N(0, width^-1/2 (2 layers)^-1/2),
        the MLP's first layer N(0, (2 width)^-1/2), projections N(0, width^-1/2), zero
        biases. Small embeddings let the residual blocks, not the raw embedding,
        dominate the pre-LN stream from the start. The image tower keeps PyTorch's
        default (He-uniform) convolution init.
        """
        cfg = self.cfg.text
        width_std = cfg.width**-0.5
        out_std = width_std * (2 * cfg.layers) ** -0.5
        tm = self.text.text_model
        nn.init.normal_(tm.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(tm.embeddings.position_embedding.weight, std=0.01)
        for layer in tm.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(proj.weight, std=width_std)
            nn.init.normal_(attn.out_proj.weight, std=out_std)
            nn.init.normal_(mlp.fc1.weight, std=(2 * cfg.width) ** -0.5)
            nn.init.normal_(mlp.fc2.weight, std=out_std)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.text_projection.weight, std=width_std)
        nn.init.normal_(self.image_projection.weight, std=self.cfg.image.width**-0.5)

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at ``cfg.max_logit_scale`` (a 0-dim tensor)."""
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself at ``log(max_logit_scale)``, as CLIP does after each step."""
        self.logit_scale.clamp_(max=math.log(self.cfg.max_logit_scale))

    def encode_text(self, input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        """(B, L) token ids -> (B, embed_dim) unit vectors, pooled at each row's first ``eos_id``."""
        hidden = self.text(input_ids)  # (B, L, width)
        pooled = CLIPTextModel.pooled(hidden, input_ids, eos_id)  # (B, width)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, embed_dim) unit vectors."""
        return F.normalize(self.image_projection(self.image(images)), dim=-1)


# ---- the loss --------------------------------------------------------------------------


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


def contrastive_loss(
    model: ContrastiveModel,
    images: torch.Tensor,
    ids: torch.Tensor,
    eos_id: int,
    hard_negative_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE over a batch of (image, caption) pairs, optionally with hard negatives.

    ``images``: (B, 3, H, W) in [-1, 1]; ``ids``: (B, L) captions; ``hard_negative_ids``:
    (B, K, L) captions false for image ``i``. Returns the loss and metrics (0-d tensors):
    ``loss``, ``loss_i2t``, ``loss_t2i``, in-batch top-1 accuracies ``acc_i2t`` /
    ``acc_t2i`` (among the B captions / images), ``temperature`` and ``logit_scale``;
    with negatives also ``hard_negative_acc``, the share of images whose caption
    scores above all of its K negatives (chance 1 / (K + 1)).
    """
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
    image_emb = model.encode_image(images)
    text_emb = model.encode_text(ids, eos_id)
    neg_emb = None
    if hard_negative_ids is not None:
        if hard_negative_ids.ndim != 3 or hard_negative_ids.shape[0] != b or hard_negative_ids.shape[2] != ids.shape[1]:
            raise ValueError(
                f"hard_negative_ids must be (B={b}, K, L={ids.shape[1]}), got {tuple(hard_negative_ids.shape)}"
            )
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


# ---- evaluation ------------------------------------------------------------------------


def _images_tensor(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
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
def _encode_texts(model: ContrastiveModel, texts: list[str], tokenizer, device: torch.device) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), ENCODE_CHUNK):
        ids = tokenizer(texts[i : i + ENCODE_CHUNK]).to(device)
        out.append(model.encode_text(ids, tokenizer.eos_id))
    return torch.cat(out)


@torch.no_grad()
def retrieval_metrics(
    model: ContrastiveModel,
    images: torch.Tensor | Sequence[Image.Image],
    captions: Sequence[str],
    specs: Sequence[PromptSpec],
    tokenizer,
    rng_seed: int = 0,
) -> dict[str, float]:
    """Retrieval and hard-negative accuracy of ``model`` on N held-out (image, caption, spec) triples.

    - ``i2t_top1`` / ``i2t_top5``: share of images whose top-1 / top-5 of the N
      captions holds a caption of the same spec (so duplicates count as hits);
      ``t2i_top1`` / ``t2i_top5`` the same from captions to images (chance ~ 1/N, 5/N).
    - ``hard_negative_accuracy/<kind>``: share of images whose true caption scores
      above one hard negative of that kind (worded like it, see :func:`hard_negatives`;
      chance 0.5), over the ``hard_negative_count/<kind>`` images that have one;
      ``hard_negative_accuracy``: share whose caption beats all of its negatives.

    ``images``: (N, 3, H, W) in [-1, 1] or N PIL images; ``tokenizer``: a
    :class:`opensd.tokenizers.Tokenizer` whose context fits the text tower.
    """
    x = _images_tensor(images)
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


def _retrieval(
    model: ContrastiveModel, x: torch.Tensor, captions: list[str], specs: list[PromptSpec], tokenizer, rng_seed: int
) -> dict[str, float]:
    n = x.shape[0]
    device = model.logit_scale.device
    image_emb = torch.cat(
        [model.encode_image(x[i : i + ENCODE_CHUNK].to(device)) for i in range(0, n, ENCODE_CHUNK)]
    )  # (N, D)
    text_emb = _encode_texts(model, captions, tokenizer, device)  # (N, D)
    sim = image_emb @ text_emb.T  # (N images, N texts)

    index: dict[PromptSpec, int] = {}
    spec_ids = torch.tensor([index.setdefault(s, len(index)) for s in specs], device=sim.device)  # (N,)
    same = spec_ids[:, None] == spec_ids[None, :]  # (N, N): pair i and pair j state the same spec
    top = min(5, n)
    i2t = sim.topk(top, dim=1).indices  # (N, top) caption indices per image
    t2i = sim.topk(top, dim=0).indices.T  # (N, top) image indices per caption
    hits_i2t = same.gather(1, i2t)  # (N, top)
    hits_t2i = same.gather(1, t2i)
    metrics: dict[str, float] = {
        "count": float(n),
        "i2t_top1": hits_i2t[:, 0].float().mean().item(),
        "i2t_top5": hits_i2t.any(dim=1).float().mean().item(),
        "t2i_top1": hits_t2i[:, 0].float().mean().item(),
        "t2i_top5": hits_t2i.any(dim=1).float().mean().item(),
    }

    rng = random.Random(f"opensd-retrieval:{rng_seed}")
    owners, kinds, texts = [], [], []
    for i, (spec, text) in enumerate(zip(specs, captions)):
        for h in hard_negatives(spec, rng, k=None, like=text):
            owners.append(i)
            kinds.append(h.kind)
            texts.append(h.text)
    if texts:
        neg_emb = _encode_texts(model, texts, tokenizer, device)  # (M, D)
        owner = torch.tensor(owners, device=sim.device)
        wins = (image_emb[owner] * text_emb[owner]).sum(-1) > (image_emb[owner] * neg_emb).sum(-1)  # (M,)
        beaten_all = torch.ones(n, dtype=torch.bool, device=sim.device)
        beaten_all[owner[~wins]] = False
        metrics["hard_negative_accuracy"] = beaten_all.float().mean().item()
        for kd in NEGATIVE_KINDS:
            sel = torch.tensor([k == kd for k in kinds], device=sim.device)
            if bool(sel.any()):
                metrics[f"hard_negative_accuracy/{kd}"] = wins[sel].float().mean().item()
                metrics[f"hard_negative_count/{kd}"] = float(sel.sum().item())
    return metrics
