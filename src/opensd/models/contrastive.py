"""CLIP: an image tower and a text tower in one embedding space (Radford et al. 2021).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision": the towers' outputs are projected into one ``embed_dim`` space and
L2-normalised, and a learned logit scale ``exp(t)`` (initialised to 1 / 0.07 and clamped
at 100) turns their cosine similarities into logits. The text tower is
:class:`opensd.models.clip.CLIPTextModel` pooled at the first end-of-text token, so after
training ``model.text`` drops into ``StableDiffusion.cond_stage_model.transformer`` as a
frozen text encoder; the image tower is :class:`opensd.models.image_encoder.ImageEncoder`.
The loss is :mod:`opensd.training.contrastive_loss`'s, retrieval accuracy
:mod:`opensd.eval.retrieval`'s (the shapes world's report: :mod:`opensd.shapes.retrieval`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from opensd.config import ConfigError
from opensd.models.clip import CLIPEncoderLayer, CLIPTextConfig, CLIPTextModel
from opensd.models.image_encoder import ImageEncoder, ImageEncoderConfig


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
            assert isinstance(layer, CLIPEncoderLayer)
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
