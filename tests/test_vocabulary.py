"""One vocabulary (issue #18, part 4): the inpainting test on the model's configuration, the
composition protocols, and how a run stops."""

from __future__ import annotations

import dataclasses

import pytest

from opensd.config import ConfigError
from opensd.models.stable_diffusion import ModelFamily, SDConfig


@pytest.mark.parametrize("family", list(ModelFamily))
def test_is_inpainting_is_the_unet_taking_latent_mask_and_masked_image(family: ModelFamily) -> None:
    cfg = SDConfig.tiny(family)
    c = cfg.vae.embed_dim
    assert cfg.inpainting_in_channels == 2 * c + 1
    assert not cfg.is_inpainting
    inpainting = cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=2 * c + 1))
    assert inpainting.is_inpainting
    with pytest.raises(ConfigError, match=f"an inpainting U-Net takes {2 * c + 1}"):
        cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=c + 1))


def test_sd_inpainting_is_nine_channels() -> None:
    cfg = SDConfig.sd15()
    assert cfg.inpainting_in_channels == 9
    assert cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=9)).is_inpainting
