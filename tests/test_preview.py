"""The linear latent-to-RGB preview ("Approx cheap"): the fit's math on an exactly linear
fake VAE, shapes and ranges on a real tiny AutoencoderKL, and the server's live previews."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from helpers import SlowPipeline, decode_png, one_thread_direct_loopback, randomize, tiny_word_bundle
from torch import nn

from opensd.checkpoints import LoadedModel
from opensd.models.vae import AutoencoderKL, VAEConfig
from opensd.pipelines.images import to_pil
from opensd.pipelines.preview import LinearPreview, PreviewError, fit_linear_preview, linear_preview_for, synthetic_images
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import create_app
from opensd.serving.background import serve_in_thread
from opensd.serving.queue import Job


class LinearVAE(nn.Module):
    """encode(x).mode() = conv1x1(avgpool_f(x)): the latent is an exact affine function of
    each cell's mean colour, so the best preview is that function's inverse."""

    def __init__(self, c: int = 4, f: int = 4, seed: int = 0):
        super().__init__()
        self.cfg = SimpleNamespace(downsample_factor=f)
        torch.manual_seed(seed)
        self.proj = nn.Conv2d(3, c, 1)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        z = self.proj(F.avg_pool2d(x, self.cfg.downsample_factor))
        return SimpleNamespace(mode=lambda: z)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_synthetic_images_are_seeded_and_in_range() -> None:
    a, b = synthetic_images(32, 3, seed=4), synthetic_images(32, 3, seed=4)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, synthetic_images(32, 3, seed=5))


@pytest.mark.parametrize("c", [3, 4])
def test_fit_inverts_an_exactly_linear_encoder(c: int) -> None:
    vae = LinearVAE(c=c, f=4)
    preview = fit_linear_preview(vae, size=32, n=8)
    assert preview.weight.shape == (c, 3) and preview.bias.shape == (3,) and preview.downsample_factor == 4
    # Constant latents of colours the fit never saw come back as exactly those colours.
    colours = torch.tensor([[0.8, -0.2, 0.1], [-0.9, 0.9, -0.5], [0.0, 0.0, 0.0], [0.3, 0.6, -1.0]])
    images = colours[:, :, None, None].expand(-1, -1, 8, 12)  # (4, 3, 8, 12): f x f cells of one colour
    with torch.no_grad():
        z = vae.encode(images).mode()  # (4, c, 2, 3)
    rgb = preview(z)
    assert rgb.shape == (4, 3, 2, 3)
    torch.testing.assert_close(rgb, colours[:, :, None, None].expand_as(rgb), rtol=0, atol=1e-5)
    if c == 3:  # an invertible encoder: the fit is its exact inverse
        w, b = vae.proj.weight.detach()[:, :, 0, 0], vae.proj.bias.detach()  # z = w @ rgb + b
        inv = torch.linalg.inv(w.double())
        torch.testing.assert_close(preview.weight.double(), inv.T, rtol=0, atol=1e-5)
        torch.testing.assert_close(preview.bias.double(), -(inv @ b.double()), rtol=0, atol=1e-5)


def test_output_is_clamped_and_to_pil_upscales() -> None:
    preview = LinearPreview(torch.eye(3) * 10, torch.zeros(3), downsample_factor=4)
    z = torch.tensor([1.0, -1.0, 0.01]).reshape(1, 3, 1, 1).expand(2, 3, 3, 5)
    rgb = preview(z)
    assert rgb.min() == -1 and rgb.max() == 1 and torch.allclose(rgb[:, 2], torch.tensor(0.1))
    images = preview.to_pil(z)
    assert len(images) == 2 and images[0].size == (20, 12)
    assert _pixels(images[0])[0, 0].tolist() == [255, 0, 140]  # (x + 1) * 127.5, rounded
    assert preview.to_pil(z, upscale=1)[0].size == (5, 3)


def test_real_tiny_vae_shapes_ranges_and_determinism() -> None:
    torch.manual_seed(0)
    vae = randomize(AutoencoderKL(VAEConfig.tiny()), 0).eval()
    a, b = fit_linear_preview(vae, size=32, n=4), fit_linear_preview(vae, size=32, n=4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.weight.dtype == torch.float32 and a.downsample_factor == 2
    z = torch.randn(2, 4, 16, 8) * 5
    rgb = a(z)
    assert rgb.shape == (2, 3, 16, 8) and rgb.min() >= -1 and rgb.max() <= 1
    assert [im.size for im in a.to_pil(z)] == [(16, 32), (16, 32)]
    assert linear_preview_for(vae) is linear_preview_for(vae)  # fitted once per VAE


@pytest.mark.parametrize("kw, message", [
    ({"size": 30}, "size must be a positive multiple of the downsample factor 4"),
    ({"size": 0}, "size must be a positive multiple"),
    ({"n": 0}, "n must be >= 1"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_bad_fit_arguments(kw: dict, message: str) -> None:
    with pytest.raises(PreviewError, match=message):
        fit_linear_preview(LinearVAE(), **kw)


def test_bad_preview_inputs() -> None:
    preview = LinearPreview(torch.zeros(4, 3), torch.zeros(3), 8)
    with pytest.raises(PreviewError, match=r"z must be a \(B, 4, h, w\) latent"):
        preview(torch.zeros(1, 3, 2, 2))
    with pytest.raises(PreviewError, match="upscale must be a positive integer"):
        preview.to_pil(torch.zeros(1, 4, 2, 2), upscale=0)
    with pytest.raises(PreviewError, match=r"weight must be \(C, 3\)"):
        LinearPreview(torch.zeros(4, 4), torch.zeros(3))
    assert issubclass(PreviewError, ValueError)


# ---------------------------------------------------------------- server


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    model, tok = tiny_word_bundle(seed=4)
    return StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("."), "opensd", "0" * 10))


def test_job_preview_modes(pipe: StableDiffusionPipeline) -> None:
    job = Job("txt2img", pipeline=pipe)
    assert job.preview_png("Approx cheap") is None  # nothing sampled yet
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    job.denoised, job.step = latent, 3
    vae = pipe.model.vae
    cheap = _pixels(decode_png(job.preview_png("Approx cheap")))
    assert cheap.shape == (32, 32, 3)
    assert np.array_equal(cheap, _pixels(linear_preview_for(vae).to_pil(vae.from_latent(latent))[0]))
    assert np.array_equal(cheap[0::2, 0::2], cheap[1::2, 1::2])  # one colour per 2x2 latent cell
    full = _pixels(decode_png(job.preview_png("Full")))  # same step, other mode: not the cached one
    with torch.no_grad():
        assert np.array_equal(full, _pixels(to_pil(vae.decode(vae.from_latent(latent)))[0]))
    assert not np.array_equal(cheap, full)
    assert pipe.tiny_vae is None  # no tiny autoencoder: the TAESD preview is the VAE's
    assert np.array_equal(_pixels(decode_png(job.preview_png("TAESD"))), full)
    with pytest.raises(ValueError, match="preview mode must be one of Full, Approx cheap, TAESD"):
        job.preview_png("Approx NN")


def test_show_progress_type_option(pipe: StableDiffusionPipeline) -> None:
    with TestClient(create_app(pipe)) as client:
        assert client.get("/sdapi/v1/options").json()["show_progress_type"] == "TAESD"
        r = client.post("/sdapi/v1/options", json={"show_progress_type": "Approx NN"})
        assert r.status_code == 422 and "show_progress_type must be one of 'Full', 'Approx cheap', 'TAESD'" in r.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"show_progress_type": "Approx cheap"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["show_progress_type"] == "Approx cheap"


def test_progress_serves_the_cheap_preview(pipe: StableDiffusionPipeline) -> None:
    slow = SlowPipeline(pipe.loaded, pause=0.05)
    with one_thread_direct_loopback(), serve_in_thread(create_app(slow)) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/sdapi/v1/options", json={"show_progress_type": "Approx cheap"}).status_code == 200
        worker = threading.Thread(target=lambda: http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 60, "seed": 1}))
        worker.start()
        try:
            deadline, image = time.monotonic() + 30, None
            while image is None:
                assert time.monotonic() < deadline, "no preview came"
                time.sleep(0.05)
                if slow.steps_done >= 2:
                    image = http.get("/sdapi/v1/progress").json()["current_image"]
            preview = _pixels(decode_png(image))
            assert preview.shape == (32, 32, 3)
            assert np.array_equal(preview[0::2, 0::2], preview[1::2, 1::2])  # nearest-upscaled 16x16 map
        finally:
            http.post("/sdapi/v1/interrupt")
            worker.join(60)
