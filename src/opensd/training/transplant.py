"""A trained U-Net's image prior under a new text encoder (the U-Net stage's ``unet_from``).

A latent diffusion U-Net reads the text only through its cross-attention layers' keys and
values (``*.attn2.to_k``, ``*.attn2.to_v``: ``context_dim`` -> inner width, Rombach et al.
2022, Sec. 3.3); every other weight reads the latents, the timestep or the image's own
queries. :func:`unet_body` takes an SD 1.x or 2.x opensd model's VAE, noise schedule and
U-Net architecture, and every U-Net weight but those keys and values, which
:func:`load_body` leaves at their fresh initialisation, sized for the new encoder's width.
Two runs that start from the same body and differ only in their text encoder then compare
the encoders at the same cost, without training the image side again.

``init_from`` (the stage's other start) keeps the model's own text encoder and every weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.diffusion.schedules import NoiseScheduleConfig
from opensd.models.unet import UNetConfig
from opensd.models.vae import AutoencoderKL

if TYPE_CHECKING:
    from opensd.models.stable_diffusion import StableDiffusion
    from opensd.tokenizers import Tokenizer

TEXT_READERS = (".attn2.to_k.", ".attn2.to_v.")  # the only U-Net weights that multiply the text context


def reads_text(key: str) -> bool:
    """True for a U-Net state-dict key of a cross-attention key or value projection."""
    return any(part in f".{key}" for part in TEXT_READERS)


def opensd_model(path: str, key: str) -> tuple[StableDiffusion, Tokenizer]:
    """(StableDiffusion in float32, tokenizer) of the opensd model folder at ``path``, of any
    family; ``key`` (the config key that named it) heads the error otherwise."""
    from opensd.checkpoints import CheckpointError, detect_format, load_model

    p = Path(path)
    try:
        if detect_format(p) != "opensd":
            raise ConfigError(f"{key} must be an opensd model folder (as `opensd train unet` exports), got {p}")
        loaded = load_model(p)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    return loaded.model.float(), loaded.tokenizer


@dataclass(frozen=True)
class UNetBody:
    """What ``unet_from`` takes from a model: its VAE (the latent space the U-Net learned), the
    U-Net's architecture and schedule, its image size, and its U-Net weights without the
    cross-attention keys and values."""

    vae: AutoencoderKL
    unet: UNetConfig
    schedule: NoiseScheduleConfig
    image_size: int
    state: dict[str, torch.Tensor]


def unet_body(path: str) -> UNetBody:
    """The body of the opensd model at ``path`` (SD 1.x or 2.x: a U-Net that reads the text
    by cross-attention alone; SDXL's also reads pooled text through ``y`` and is refused)."""
    sd, _ = opensd_model(path, "unet_from")
    if sd.cfg.pooled_dim is not None:
        raise ConfigError(f"unet_from: {path} is an {sd.cfg.family.value} model, whose U-Net also reads the pooled "
                          "text (y); unet_from takes SD 1.x and 2.x models (init_from fine-tunes any family)")
    state = {k: v for k, v in sd.unet.state_dict().items() if not reads_text(k)}
    return UNetBody(sd.vae, sd.cfg.unet, sd.cfg.schedule, sd.cfg.image_size, state)


def load_body(unet: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a body into a U-Net of the same architecture (any ``context_dim``); returns the
    keys left fresh, which are exactly its cross-attention keys and values."""
    result = unet.load_state_dict(state, strict=False)
    fresh = sorted(result.missing_keys)
    if result.unexpected_keys or not all(reads_text(k) for k in fresh):
        raise ConfigError(f"unet_from's U-Net does not fit this stage's: unexpected {result.unexpected_keys[:3]}, "
                          f"missing {[k for k in fresh if not reads_text(k)][:3]}")
    return fresh
