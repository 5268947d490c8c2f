"""The one image <-> tensor module (opensd.pipelines.images): its conversions against diffusers'
image processor, the exact 8-bit round trip, and the old training names that point at it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from opensd.pipelines import images as I


def random_image(w: int = 13, h: int = 7, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_to_pil_matches_diffusers_postprocess() -> None:
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 9, 11, generator=g) * 0.7  # some values beyond [-1, 1]
    k = torch.arange(256, dtype=torch.float64)
    x[0, 0, :, :] = ((k[:99] + 0.5) / 127.5 - 1).float().reshape(9, 11)  # the halfway points between levels
    ours = [np.asarray(im) for im in I.to_pil(x)]
    theirs = [np.asarray(im) for im in VaeImageProcessor().postprocess(x, output_type="pil")]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_to_tensor_matches_diffusers_preprocess() -> None:
    from diffusers.image_processor import VaeImageProcessor

    im = random_image(16, 8)
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(im)
    torch.testing.assert_close(I.to_tensor(im), theirs, rtol=0, atol=1e-6)


def test_the_8_bit_round_trip_is_exact() -> None:
    levels = torch.arange(256, dtype=torch.uint8)
    x = I.from_uint8(levels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(I.to_uint8(x), levels)
    im = random_image()
    assert np.array_equal(np.asarray(I.to_pil(I.to_tensor(im))[0]), np.asarray(im))
    assert torch.equal(I.to_uint8(torch.tensor([-3.0, 3.0, -1.0, 1.0])), torch.tensor([0, 255, 0, 255], dtype=torch.uint8))


def test_to_tensor_sizes_and_the_other_shapes() -> None:
    im = random_image(13, 7)
    assert I.to_tensor(im).shape == (1, 3, 7, 13)
    assert I.to_tensor(im, 16, 8).shape == (1, 3, 8, 16)
    assert I.to_tensor(im, width=16).shape == (1, 3, 7, 16)
    assert torch.equal(I.pil_to_tensor(im), I.to_tensor(im)[0])
    hint = I.to_unit_tensor(im)
    assert hint.shape == (1, 3, 7, 13) and 0 <= hint.min() and hint.max() <= 1
    torch.testing.assert_close(hint * 2 - 1, I.to_tensor(im), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["pil_to_tensor", "tensor_to_pil"])
def test_training_names_are_the_image_module_functions(name: str) -> None:
    import opensd.training.data as data

    assert getattr(data, name) is getattr(I, name)
    assert I.tensor_to_pil is I.to_pil
