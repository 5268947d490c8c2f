"""Inpainting's mask handling: masked content, mask blur and the latent mask, in the library,
the CLI (`opensd inpaint --mask-blur --masked-content`) and the server (`inpainting_fill`)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import opensd
import opensd.pipelines.stable_diffusion as sd
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app as cli_app
from opensd.errors import OpenSDError
from opensd.pipelines.inpaint import (
    DEFAULT_MASKED_CONTENT,
    InpaintError,
    InpaintMask,
    MaskedContent,
    fill_masked,
    latent_mask,
)
from opensd.serving import create_app

from helpers import tiny_word_bundle

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model, tok = tiny_word_bundle()
    return save_opensd(model, tok, tmp_path_factory.mktemp("m") / "tiny-shapes")


@pytest.fixture(scope="module")
def pipe(model_dir: Path):
    return opensd.load(model_dir)


def scene() -> tuple[Image.Image, Image.Image]:
    """A white 32 px image with a green square at (8..16, 8..16), and a mask over (6..18, 6..18)."""
    a = np.full((32, 32, 3), 255, np.uint8)
    a[8:16, 8:16] = (30, 190, 50)
    m = np.zeros((32, 32), np.uint8)
    m[6:18, 6:18] = 255
    return Image.fromarray(a), Image.fromarray(m)


class Spy:
    """Records what the pipeline hands the sampler (noise, init latent) and the masked denoiser (latent mask)."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real_sample, real_masked = sd.sample, sd._MaskedDenoiser

        def sample(denoiser, noise, *a, init_latent=None, **kw):
            self.calls.append({"noise": noise.clone(), "init": init_latent.clone()})
            return real_sample(denoiser, noise, *a, init_latent=init_latent, **kw)

        def masked(inner, init, noise, mask):
            self.mask = mask.clone()
            return real_masked(inner, init, noise, mask)

        monkeypatch.setattr(sd, "sample", sample)
        monkeypatch.setattr(sd, "_MaskedDenoiser", masked)


# ---------------------------------------------------------------- the pieces


def test_masked_content_names_and_a1111_numbers() -> None:
    assert [MaskedContent.parse(i) for i in range(4)] == list(MaskedContent)
    assert [m.value for m in MaskedContent] == ["fill", "original", "latent-noise", "latent-nothing"]
    for spelling in ("latent-noise", "latent noise", "LATENT_NOISE", MaskedContent.LATENT_NOISE):
        assert MaskedContent.parse(spelling) is MaskedContent.LATENT_NOISE
    for bad in (4, -1, True, "blur", None, 1.0):
        with pytest.raises(InpaintError, match="masked content must be one of 0 or 'fill', 1 or 'original'"):
            MaskedContent.parse(bad)
    assert issubclass(InpaintError, OpenSDError)
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(InpaintError, match="mask blur must be a whole number of pixels from 0 to 64"):
            InpaintMask(Image.new("L", (8, 8)), bad)


def test_fill_paints_the_masked_pixels_with_the_colours_around_them() -> None:
    image, mask = scene()
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    m = torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]
    out = fill_masked(pixels, m)
    assert torch.equal(out[..., m[0, 0] < 0.5], pixels[..., m[0, 0] < 0.5])  # outside: untouched
    assert (out[..., m[0, 0] >= 0.5] > 0.99).all()  # inside: the white around it, the green square gone
    # two colours around the hole: each side takes its neighbour's colour, blended in the middle
    two = torch.cat([torch.full((1, 3, 16, 8), -1.0), torch.full((1, 3, 16, 8), 1.0)], dim=3)
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 4:12, 2:14] = 1
    f = fill_masked(two, hole)[0, 0, 8]
    assert f[2] < -0.5 and f[13] > 0.5 and -0.5 < f[7:9].mean() < 0.5
    assert torch.equal(fill_masked(two, torch.ones(1, 1, 16, 16)), torch.zeros_like(two))  # nothing known: gray


def test_latent_mask_covers_every_masked_pixel() -> None:
    m = torch.zeros(1, 1, 32, 32)
    m[..., 5:21, 5:21] = 1  # 16 px, not on the 4 px latent grid
    lm = latent_mask(m, (8, 8))
    covered = torch.nn.functional.interpolate(lm, scale_factor=4, mode="nearest")
    assert (covered[m > 0.5] == 1).all()  # no masked pixel left out of the repainted cells
    assert lm.sum() == 25 and set(lm.unique().tolist()) == {0.0, 1.0}
    assert latent_mask(torch.zeros(1, 1, 32, 32), (8, 8)).sum() == 0


# ---------------------------------------------------------------- in the pipeline


def test_the_pipeline_repaints_every_latent_cell_the_mask_touches(pipe, monkeypatch) -> None:
    """Before: a nearest-neighbour subsample of the mask, shifted up to 3 px: cells the mask
    covers were kept, so the new object came out cut where the paste restored the original."""
    spy = Spy(monkeypatch)
    image = Image.new("RGB", (32, 32), "white")
    m = np.zeros((32, 32), np.uint8)
    m[5:21, 5:21] = 255
    pipe.inpaint(image, Image.fromarray(m), PROMPT, steps=1, sampler="euler", seed=1)
    f = 32 // spy.mask.shape[-1]  # the tiny VAE downsamples by 2
    cells = torch.nn.functional.interpolate(spy.mask[:1].float(), scale_factor=f, mode="nearest")[0, 0]
    assert (cells[torch.from_numpy(m > 127)] == 1).all()


@pytest.mark.parametrize("content", list(MaskedContent))
def test_masked_content_sets_the_masked_part_of_the_start(pipe, monkeypatch, content) -> None:
    image, mask = scene()
    spy = Spy(monkeypatch)
    pipe.inpaint(image, mask, PROMPT, steps=1, sampler="euler", seed=4, masked_content=MaskedContent.ORIGINAL)
    pipe.inpaint(image, mask, PROMPT, steps=1, sampler="euler", seed=4, masked_content=content)
    original, now = spy.calls[0]["init"], spy.calls[1]["init"]
    inside = spy.mask.bool().expand_as(now)
    assert torch.equal(now[~inside], original[~inside])  # outside the mask: the original's latent
    if content is MaskedContent.ORIGINAL:
        assert torch.equal(now, original)
    elif content is MaskedContent.LATENT_NOTHING:
        assert (now[inside] == 0).all()
    elif content is MaskedContent.LATENT_NOISE:
        assert torch.equal(now[inside], spy.calls[1]["noise"].to(now)[inside])  # the seed's noise
    else:  # fill: the latent of the image with the green square painted over in white
        white = pipe.model.vae.to_latent(pipe.encode_pixels(torch.ones(1, 3, 32, 32)).mean)
        assert (now[inside] - white.expand_as(now)[inside]).abs().mean() < (original[inside] - white.expand_as(now)[inside]).abs().mean()


def test_mask_blur_softens_the_seam_and_zero_keeps_it_exact(pipe) -> None:
    image, mask = scene()
    original = np.asarray(image, np.int16)
    keep = np.asarray(mask) == 0
    sharp = np.asarray(pipe.inpaint(image, mask, PROMPT, steps=2, seed=2, mask_blur=0)[0], np.int16)
    soft = np.asarray(pipe.inpaint(image, mask, PROMPT, steps=2, seed=2, mask_blur=2)[0], np.int16)
    assert (sharp[keep] == original[keep]).all()
    ring = np.zeros((32, 32), bool)
    ring[4:20, 4:20] = True
    ring &= keep  # the 2 px just outside the mask
    assert np.abs(soft[ring] - original[ring]).max() > 0  # the blur reaches over the mask's edge
    assert (soft[26:] == original[26:]).all()  # far from it: exact


def test_a_bare_mask_image_gets_the_default_masked_content(pipe, monkeypatch) -> None:
    image, mask = scene()
    spy = Spy(monkeypatch)
    pipe.inpaint(image, mask, PROMPT, steps=1, sampler="euler", seed=4)
    req = pipe._request(PROMPT, "", 1, "euler", 7.5, 32, 32, 4, 1, 1.0, {})
    pipe.generate(req, init_image=image, mask=mask)
    assert torch.equal(spy.calls[0]["init"], spy.calls[1]["init"])
    assert pipe.inpaint.__kwdefaults__["masked_content"] is DEFAULT_MASKED_CONTENT


# ---------------------------------------------------------------- CLI and server


def invoke(*args) -> object:
    return CliRunner().invoke(cli_app, [str(a) for a in args])


def test_cli_inpaint_takes_mask_blur_and_masked_content(model_dir: Path, tmp_path: Path) -> None:
    image, mask = scene()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    res = invoke("inpaint", tmp_path / "in.png", tmp_path / "mask.png", PROMPT, "-m", model_dir, "--steps", 2, "--seed", 1,
                 "--mask-blur", 1, "--masked-content", "latent-nothing", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    kept = np.asarray(mask) == 0
    kept[2:22, 2:22] = False  # what the blur of 1 px may reach
    assert (np.asarray(Image.open(out))[kept] == np.asarray(image)[kept]).all()
    for flag, value, message in (("--masked-content", "blur", "masked content must be one of 0 or 'fill'"),
                                 ("--mask-blur", 65, "mask blur must be a whole number of pixels from 0 to 64")):
        res = invoke("inpaint", tmp_path / "in.png", tmp_path / "mask.png", PROMPT, "-m", model_dir, flag, value, "-o", out)
        assert res.exit_code == 2 and res.output.startswith("error: ") and message in res.output, res.output
        assert "Traceback" not in res.output


def test_cli_defaults_are_the_library_defaults() -> None:
    import typer.main

    params = {p.name: p.default for p in typer.main.get_command(cli_app).commands["inpaint"].params}
    assert params["masked_content"] == DEFAULT_MASKED_CONTENT.value
    assert params["mask_blur"] == sd.StableDiffusionPipeline.inpaint.__kwdefaults__["mask_blur"]


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_server_inpainting_fill_and_mask_blur(model_dir: Path, monkeypatch) -> None:
    image, mask = scene()
    pipe = opensd.load(model_dir)
    seen = []
    real = pipe.generate

    def generate(req, **kw):
        seen.append(kw["mask"])
        return real(req, **kw)

    monkeypatch.setattr(pipe, "generate", generate)
    body = {"init_images": [b64png(image)], "mask": b64png(mask), "prompt": PROMPT, "steps": 2, "seed": 3,
            "denoising_strength": 1.0}
    with TestClient(create_app(pipe)) as client:
        for fill, content in enumerate(MaskedContent):
            r = client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": fill, "mask_blur": fill})
            assert r.status_code == 200, r.text
            assert seen[-1].content is content and seen[-1].blur == fill
        r = client.post("/sdapi/v1/img2img", json=body)  # A1111's defaults: fill, blur 4
        assert seen[-1].content is MaskedContent.FILL and seen[-1].blur == 4
        r = client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 4})
        assert r.status_code == 422 and "inpainting_fill must be one of 0 fill, 1 original, 2 latent-noise, 3 latent-nothing" in r.text
        r = client.post("/sdapi/v1/img2img", json={**body, "mask_blur": 65})
        assert r.status_code == 422 and "mask_blur must be from 0 to 64" in r.text
