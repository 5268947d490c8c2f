"""Stable Diffusion as one module whose state dict *is* the original checkpoint format.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models";
Podell et al. 2023 (SDXL). The networks sit at the attribute paths of an original
single file of their family (:class:`ModelFamily`):

- ``model.diffusion_model.*``                        the U-Net denoiser (:mod:`opensd.models.unet`)
- ``first_stage_model.*``                            the KL autoencoder (:mod:`opensd.models.vae`)
- the text encoder(s):
  SD 1.x  ``cond_stage_model.transformer.text_model.*``   CLIP ViT-L (:mod:`opensd.models.clip`),
          or ``cond_stage_model.bert.*``                  a BERT / MiniLM (:mod:`opensd.models.bert`;
                                                          opensd's own models: no original has one)
  SD 2.x  ``cond_stage_model.model.*``                    OpenCLIP ViT-H (:mod:`opensd.models.open_clip`)
  SDXL    ``conditioner.embedders.0.transformer.*``       CLIP ViT-L, and
          ``conditioner.embedders.1.model.*``             OpenCLIP ViT-bigG
  refiner ``conditioner.embedders.0.model.*``             OpenCLIP ViT-bigG

so an original file loads with a strict ``load_state_dict`` once the few non-network
entries it carries (the training schedule's buffers, EMA bookkeeping) are set aside.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.diffusion.schedules import NoiseScheduleConfig, Prediction
from opensd.models.bert import BertTextConfig, BertTextModel
from opensd.models.clip import CLIPTextConfig, CLIPTextModel
from opensd.models.open_clip import OpenCLIPTextModel
from opensd.models.unet import UNetConfig, UNetModel
from opensd.models.vae import AutoencoderKL, VAEConfig

TextEncoder = CLIPTextModel | OpenCLIPTextModel | BertTextModel
TextConfig = CLIPTextConfig | BertTextConfig


class ModelFamily(enum.Enum):
    """Which Stable Diffusion: decides the text encoders and what conditions the U-Net.

    ``sd1``: CLIP ViT-L, context only. ``sd2``: OpenCLIP ViT-H (penultimate layer),
    context only. ``sdxl``: CLIP ViT-L and OpenCLIP ViT-bigG concatenated as context,
    plus ``y`` = pooled bigG text and 6 size numbers. ``sdxl_refiner``: bigG alone, ``y``
    = pooled text, original size, crop and aesthetic score (5 numbers).
    """

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"

    @property
    def size_numbers(self) -> int:
        """How many scalars the Fourier size embedding of ``y`` holds (0: no ``y``)."""
        return {ModelFamily.SDXL: 6, ModelFamily.SDXL_REFINER: 5}.get(self, 0)


@dataclass(frozen=True)
class SDConfig:
    """The whole model: its networks plus the noise schedule they were trained with.

    ``text`` is the (first) text encoder; ``text_2`` SDXL base's second (OpenCLIP
    bigG). ``size_embed_dim``: width of the Fourier embedding of each size number in
    SDXL's ``y`` (256 in SDXL; smaller in tiny test models).

    ``text`` may be a :class:`~opensd.models.bert.BertTextConfig` (without pooler) in the
    sd1 family: a model conditioned on a BERT such as MiniLM (context width 384); in a
    config dict it carries ``"kind": "bert"``.
    """

    unet: UNetConfig = field(default_factory=UNetConfig.sd15)
    vae: VAEConfig = field(default_factory=VAEConfig.sd15)
    text: TextConfig = field(default_factory=CLIPTextConfig.sd15)
    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    # Native image size in pixels (width = height); generation defaults to it.
    image_size: int = 512
    family: ModelFamily = ModelFamily.SD1
    text_2: CLIPTextConfig | None = None
    size_embed_dim: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.family, ModelFamily):
            allowed = ", ".join(repr(f.value) for f in ModelFamily)
            raise ConfigError(f"SDConfig.family must be a ModelFamily ({allowed}), got {self.family!r}")
        if isinstance(self.text, BertTextConfig):
            if self.family is not ModelFamily.SD1:
                raise ConfigError(f"a BERT text encoder conditions the sd1 family only, not {self.family.value}")
            if self.text.pooler:
                raise ConfigError("an SD model's BERT text encoder has no pooler: set its pooler = false")
        elif not isinstance(self.text, CLIPTextConfig):
            raise ConfigError(f"SDConfig.text must be a CLIPTextConfig or BertTextConfig, got {type(self.text).__name__}")
        if (self.text_2 is not None) != (self.family is ModelFamily.SDXL):
            raise ConfigError("SDConfig.text_2 (a second text encoder) is for the sdxl family only, and it needs one")
        if self.unet.context_dim != self.context_dim:
            raise ConfigError(
                f"the U-Net's context_dim ({self.unet.context_dim}) must equal the text "
                f"encoders' width ({self.context_dim})"
            )
        if self.unet.adm_in_channels != self.adm_channels:
            raise ConfigError(
                f"a {self.family.value} U-Net's adm_in_channels must be {self.adm_channels} "
                f"(pooled text + {self.family.size_numbers} size numbers x {self.size_embed_dim}), "
                f"got {self.unet.adm_in_channels}"
            )
        if self.unet.in_channels not in (self.vae.embed_dim, self.inpainting_in_channels):
            raise ConfigError(
                f"the U-Net takes {self.unet.in_channels} channels; the VAE's latent has "
                f"{self.vae.embed_dim} (an inpainting U-Net takes {self.inpainting_in_channels})"
            )
        f = self.vae.downsample_factor
        if self.image_size % f or self.image_size < f:
            raise ConfigError(f"image_size {self.image_size} must be a positive multiple of {f}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor

    @property
    def inpainting_in_channels(self) -> int:
        """The input channels of an inpainting U-Net for this VAE: the latent, the mask and the
        masked image's latent (``2 C + 1``: 9 for SD's 4-channel latent; Rombach et al. 2022)."""
        return 2 * self.vae.embed_dim + 1

    @property
    def is_inpainting(self) -> bool:
        """Whether the U-Net is an inpainting one (it takes :attr:`inpainting_in_channels`)."""
        return self.unet.in_channels == self.inpainting_in_channels

    @property
    def text_configs(self) -> tuple[TextConfig, ...]:
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    @property
    def has_bert(self) -> bool:
        """Whether the text encoder is a BERT (:class:`BertConditioner`)."""
        return isinstance(self.text, BertTextConfig)

    @property
    def clip_text(self) -> CLIPTextConfig:
        """``text`` as a CLIP config; a ConfigError for a model with a BERT text encoder."""
        if not isinstance(self.text, CLIPTextConfig):
            raise ConfigError("this model's text encoder is a BERT, not CLIP")
        return self.text

    @property
    def context_dim(self) -> int:
        """Width of the U-Net's context: the text encoders' widths, concatenated."""
        return sum(t.width for t in self.text_configs)

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding in ``y`` (None: the family has no ``y``)."""
        if not self.family.size_numbers:
            return None
        last = self.text_configs[-1]
        pooled = last.projection_dim if isinstance(last, CLIPTextConfig) else None
        if pooled is None:
            raise ConfigError(f"a {self.family.value} model's OpenCLIP text encoder needs a projection_dim")
        return pooled

    @property
    def adm_channels(self) -> int | None:
        """What ``y`` holds: the pooled text plus the Fourier-embedded size numbers."""
        pooled = self.pooled_dim
        return None if pooled is None else pooled + self.family.size_numbers * self.size_embed_dim

    @classmethod
    def sd15(cls) -> SDConfig:
        return cls()

    @classmethod
    def sd21(cls) -> SDConfig:
        """SD 2.x 768-v (v2-inference-v.yaml): v-prediction, 768 px."""
        return cls(
            unet=UNetConfig.sd21(), text=CLIPTextConfig.open_clip_vit_h(), family=ModelFamily.SD2, image_size=768,
            schedule=NoiseScheduleConfig(prediction=Prediction.V),
        )

    @classmethod
    def sd21_base(cls) -> SDConfig:
        """SD 2.x 512-base (v2-inference.yaml): eps-prediction, 512 px."""
        return dataclasses.replace(cls.sd21(), image_size=512, schedule=NoiseScheduleConfig())

    @classmethod
    def sdxl(cls) -> SDConfig:
        """SDXL base 1.0 (sd_xl_base.yaml): 1024 px, VAE scale 0.13025."""
        return cls(
            unet=UNetConfig.sdxl_base(), vae=dataclasses.replace(VAEConfig.sd15(), scale_factor=0.13025),
            text=CLIPTextConfig.sd15(), text_2=CLIPTextConfig.open_clip_vit_bigg(), family=ModelFamily.SDXL,
            image_size=1024,
        )

    @classmethod
    def sdxl_refiner(cls) -> SDConfig:
        """SDXL refiner 1.0 (sd_xl_refiner.yaml): 1024 px, VAE scale 0.13025."""
        return cls(
            unet=UNetConfig.sdxl_refiner(), vae=dataclasses.replace(VAEConfig.sd15(), scale_factor=0.13025),
            text=CLIPTextConfig.open_clip_vit_bigg(), family=ModelFamily.SDXL_REFINER, image_size=1024,
        )

    @classmethod
    def tiny(cls, family: ModelFamily = ModelFamily.SD1) -> SDConfig:
        """A few-hundred-kB model of ``family`` for tests (tiny SDXL: two tiny encoders)."""
        base = CLIPTextConfig.tiny()
        unet = dataclasses.replace(UNetConfig.tiny(), context_dim=base.width)
        if family is ModelFamily.SD1:
            return cls(unet=unet, vae=VAEConfig.tiny(), text=base, image_size=32)
        open_clip = dataclasses.replace(base, activation=CLIPTextConfig.open_clip_vit_h().activation, projection_dim=24)
        unet = dataclasses.replace(unet, head_channels=8, use_linear_in_transformer=True)
        if family is ModelFamily.SD2:
            return cls(unet=unet, vae=VAEConfig.tiny(), text=open_clip, family=family, image_size=32)
        size_dim = 8
        if family is ModelFamily.SDXL:
            text_2 = dataclasses.replace(open_clip, width=48, mlp_width=96)
            unet = dataclasses.replace(
                unet, context_dim=base.width + text_2.width, transformer_depth=(1, 2), adm_in_channels=24 + 6 * size_dim
            )
            return cls(unet=unet, vae=VAEConfig.tiny(), text=base, text_2=text_2, family=family, image_size=32,
                       size_embed_dim=size_dim)
        unet = dataclasses.replace(unet, adm_in_channels=24 + 5 * size_dim)
        return cls(unet=unet, vae=VAEConfig.tiny(), text=open_clip, family=family, image_size=32, size_embed_dim=size_dim)

    @classmethod
    def tiny_bert(cls) -> SDConfig:
        """A tiny sd1 model whose text encoder is a tiny BERT (:meth:`BertTextConfig.tiny`, no pooler)."""
        text = dataclasses.replace(BertTextConfig.tiny(), pooler=False)
        unet = dataclasses.replace(UNetConfig.tiny(), context_dim=text.width)
        return cls(unet=unet, vae=VAEConfig.tiny(), text=text, image_size=32)

    def replace(self, **changes: Any) -> SDConfig:
        return dataclasses.replace(self, **changes)


class DiffusionWrapper(nn.Module):
    """Holds the U-Net at ``model.diffusion_model`` as LDM does."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class TextConditioner(nn.Module):
    """Holds a CLIP text transformer at ``transformer`` as LDM's FrozenCLIPEmbedder."""

    def __init__(self, transformer: CLIPTextModel):
        super().__init__()
        self.transformer = transformer

    @property
    def encoder(self) -> CLIPTextModel:
        return self.transformer


class OpenCLIPConditioner(nn.Module):
    """Holds an OpenCLIP text tower at ``model`` as LDM's FrozenOpenCLIPEmbedder."""

    def __init__(self, model: OpenCLIPTextModel):
        super().__init__()
        self.model = model

    @property
    def encoder(self) -> OpenCLIPTextModel:
        return self.model


class BertConditioner(nn.Module):
    """Holds a BERT encoder at ``bert`` (opensd's layout: ``cond_stage_model.bert.*`` are
    transformers' ``BertModel`` names, so a BERT checkpoint's keys are the model's after
    the prefix)."""

    def __init__(self, bert: BertTextModel):
        super().__init__()
        self.bert = bert

    @property
    def encoder(self) -> BertTextModel:
        return self.bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, width): the encoder's last hidden states, zero at the padding (mask 0)."""
        hidden: torch.Tensor = self.bert(input_ids, attention_mask)
        return hidden * (attention_mask != 0).to(hidden.dtype)[..., None]


class GeneralConditioner(nn.Module):
    """SGM's conditioner: the text embedders at ``embedders.N``."""

    def __init__(self, embedders: list[TextConditioner | OpenCLIPConditioner]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class StableDiffusion(nn.Module):
    """The networks of Stable Diffusion under their original checkpoint names."""

    def __init__(self, cfg: SDConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        family = cfg.family
        if isinstance(cfg.text, BertTextConfig):  # SDConfig allows it in sd1 only
            self.cond_stage_model: nn.Module = BertConditioner(BertTextModel(cfg.text))
        elif family is ModelFamily.SD1:
            self.cond_stage_model = TextConditioner(CLIPTextModel(cfg.text))
        elif family is ModelFamily.SD2:
            self.cond_stage_model = OpenCLIPConditioner(OpenCLIPTextModel(cfg.text))
        elif family is ModelFamily.SDXL:
            assert cfg.text_2 is not None
            self.conditioner = GeneralConditioner(
                [TextConditioner(CLIPTextModel(cfg.text)), OpenCLIPConditioner(OpenCLIPTextModel(cfg.text_2))]
            )
        else:
            self.conditioner = GeneralConditioner([OpenCLIPConditioner(OpenCLIPTextModel(cfg.text))])

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoders(self) -> list[TextEncoder]:
        """The text encoders in the order their outputs are concatenated."""
        if self.cfg.family in (ModelFamily.SD1, ModelFamily.SD2):
            return [cast(TextEncoder, self.cond_stage_model.encoder)]
        return [cast(TextEncoder, e.encoder) for e in self.conditioner.embedders]

    @property
    def text_encoder(self) -> TextEncoder:
        """The (first) text encoder."""
        return self.text_encoders[0]

    @property
    def text_prefixes(self) -> list[str]:
        """Where each text encoder's keys start in the state dict."""
        names = {id(m): n for n, m in self.named_modules()}
        return [names[id(e)] + "." for e in self.text_encoders]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per network and in total (SDXL: ``text_encoder_2`` too)."""
        counts = {
            "unet": sum(p.numel() for p in self.unet.parameters()),
            "vae": sum(p.numel() for p in self.vae.parameters()),
        }
        for i, te in enumerate(self.text_encoders):
            counts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = sum(p.numel() for p in te.parameters())
        counts["total"] = sum(counts.values())
        return counts

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
