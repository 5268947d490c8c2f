"""Stable Diffusion as one module whose state dict *is* the original checkpoint format.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models".
The three networks sit at the attribute paths of an original SD 1.x single file:

- ``model.diffusion_model.*``                      the U-Net denoiser (:mod:`opensd.models.unet`)
- ``first_stage_model.*``                          the KL autoencoder (:mod:`opensd.models.vae`)
- ``cond_stage_model.transformer.text_model.*``    the CLIP text transformer (:mod:`opensd.models.clip`)

so an original file loads with a strict ``load_state_dict`` once the few non-network
entries it carries (the training schedule's buffers, EMA bookkeeping) are set aside.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.diffusion.schedules import NoiseScheduleConfig
from opensd.models.clip import CLIPTextConfig, CLIPTextModel
from opensd.models.unet import UNetConfig, UNetModel
from opensd.models.vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class SDConfig:
    """The whole model: three networks plus the noise schedule they were trained with."""

    unet: UNetConfig = field(default_factory=UNetConfig.sd15)
    vae: VAEConfig = field(default_factory=VAEConfig.sd15)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig.sd15)
    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    # Native image size in pixels (width = height); generation defaults to it.
    image_size: int = 512

    def __post_init__(self) -> None:
        if self.unet.context_dim != self.text.width:
            raise ConfigError(
                f"the U-Net's context_dim ({self.unet.context_dim}) must equal the text "
                f"encoder's width ({self.text.width})"
            )
        if self.unet.in_channels not in (self.vae.embed_dim, 2 * self.vae.embed_dim + 1):
            raise ConfigError(
                f"the U-Net takes {self.unet.in_channels} channels; the VAE's latent has "
                f"{self.vae.embed_dim} (an inpainting U-Net takes {2 * self.vae.embed_dim + 1})"
            )
        f = self.vae.downsample_factor
        if self.image_size % f or self.image_size < f:
            raise ConfigError(f"image_size {self.image_size} must be a positive multiple of {f}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor

    @classmethod
    def sd15(cls) -> "SDConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "SDConfig":
        """A few-hundred-kB model for tests."""
        text = CLIPTextConfig.tiny()
        unet = dataclasses.replace(UNetConfig.tiny(), context_dim=text.width)
        return cls(unet=unet, vae=VAEConfig.tiny(), text=text, image_size=32)

    def replace(self, **changes) -> "SDConfig":
        return dataclasses.replace(self, **changes)


class DiffusionWrapper(nn.Module):
    """Holds the U-Net at ``model.diffusion_model`` as LDM does."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class TextConditioner(nn.Module):
    """Holds the text transformer at ``cond_stage_model.transformer`` as LDM's FrozenCLIPEmbedder."""

    def __init__(self, transformer: CLIPTextModel):
        super().__init__()
        self.transformer = transformer


class StableDiffusion(nn.Module):
    """The three networks of Stable Diffusion under their original checkpoint names."""

    def __init__(self, cfg: SDConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = TextConditioner(CLIPTextModel(cfg.text))

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.cond_stage_model.transformer

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per network and in total."""
        counts = {
            "unet": sum(p.numel() for p in self.unet.parameters()),
            "vae": sum(p.numel() for p in self.vae.parameters()),
            "text_encoder": sum(p.numel() for p in self.text_encoder.parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
