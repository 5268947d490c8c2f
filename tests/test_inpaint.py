"""Inpainting's mask handling: masked content, mask blur, the latent mask and "only masked", in
the library, the CLI (`opensd inpaint --mask-blur --masked-content --only-masked`) and the
server (`inpainting_fill`, `inpaint_full_res`)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import tiny_word_bundle
from PIL import Image, ImageFilter
from typer.testing import CliRunner

import opensd
import opensd.pipelines.pipeline_steps as loop_steps
import opensd.pipelines.stable_diffusion as sd
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app as cli_app
from opensd.errors import OpenSDError
from opensd.pipelines.inpaint import (
    DEFAULT_MASKED_CONTENT,
    InpaintError,
    InpaintMask,
    MaskedContent,
    crop_box,
    fill_masked,
    latent_mask,
)
from opensd.serving import create_app

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
        real_sample, real_masked = loop_steps.sample, loop_steps.MaskedDenoiser

        def sample(denoiser, noise, *a, init_latent=None, **kw):
            self.calls.append({"noise": noise.clone(), "init": init_latent.clone()})
            return real_sample(denoiser, noise, *a, init_latent=init_latent, **kw)

        def masked(inner, init, noise, mask):
            self.mask = mask.clone()
            return real_masked(inner, init, noise, mask)

        monkeypatch.setattr(loop_steps, "sample", sample)
        monkeypatch.setattr(loop_steps, "MaskedDenoiser", masked)


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
    req = pipe.request(PROMPT, steps=1, sampler="euler", width=32, height=32, seed=4)
    pipe.generate(req, init_image=image, mask=mask)
    assert torch.equal(spy.calls[0]["init"], spy.calls[1]["init"])
    assert pipe.inpaint.__kwdefaults__["masked_content"] is DEFAULT_MASKED_CONTENT


# ---------------------------------------------------------------- only masked


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def test_crop_box_pads_the_masks_bounding_box() -> None:
    m = box_mask((64, 64), (20, 24, 30, 34))  # 10 x 10 at (20, 24)
    assert crop_box(m, 0, (64, 64)) == (20, 24, 30, 34)
    assert crop_box(m, 5, (64, 64)) == (15, 19, 35, 39)
    assert crop_box(Image.new("L", (64, 64), 0), 5, (64, 64)) is None


def test_crop_box_stays_inside_the_image() -> None:
    m = box_mask((64, 64), (0, 2, 6, 8))  # in the top left corner
    assert crop_box(m, 4, (64, 64)) == (0, 0, 12, 12)  # padding clamped at 0, then grown to a square
    assert crop_box(box_mask((32, 32), (0, 0, 32, 32)), 8, (32, 32)) == (0, 0, 32, 32)
    # a tall mask in a wide image: grown sideways to 2:1 but shifted to stay inside
    m = box_mask((64, 32), (58, 4, 62, 12))  # 4 x 8 at the right edge
    left, top, right, bottom = crop_box(m, 0, (64, 32))
    assert (right - left, bottom - top) == (16, 8) and right == 64 and (top, bottom) == (4, 12)


def test_crop_box_grows_to_the_generation_aspect_ratio() -> None:
    m = box_mask((64, 64), (20, 30, 40, 34))  # 20 wide, 4 high
    left, top, right, bottom = crop_box(m, 0, (64, 64))
    assert (left, right) == (20, 40) and bottom - top == 20 and top <= 30 and bottom >= 34
    left, top, right, bottom = crop_box(m, 0, (64, 32))  # 2:1: 20 x 10
    assert (left, right, bottom - top) == (20, 40, 10)
    m = box_mask((64, 64), (30, 10, 34, 50))  # 4 wide, 40 high: grown to 40 x 40
    left, top, right, bottom = crop_box(m, 0, (64, 64))
    assert (top, bottom) == (10, 50) and (right - left) == 40 and left <= 30 and right >= 34


def test_only_masked_inpaints_the_region_at_the_generation_size(pipe, monkeypatch) -> None:
    """The crop (mask plus padding) is what the sampler sees, upscaled to the request's size."""
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = (200, 30, 30)  # red left half, blue right half
    a[:, 16:] = (30, 30, 200)
    image = Image.fromarray(a)
    mask = box_mask((32, 32), (4, 4, 12, 12))
    seen = []
    real = loop_steps.to_tensor
    monkeypatch.setattr(loop_steps, "to_tensor", lambda im, w, h: seen.append((im.size, np.asarray(im.convert("RGB")), (w, h))) or real(im, w, h))
    spy = Spy(monkeypatch)
    out = pipe.inpaint(image, mask, PROMPT, steps=1, sampler="euler", seed=1, only_masked=True, only_masked_padding=2)[0]
    assert out.size == (32, 32)
    (size, pixels, wanted), = seen
    assert size == wanted == (32, 32)  # the 12 px crop, resized to the generation size
    assert (np.abs(pixels.astype(int) - (200, 30, 30)).max(axis=2) <= 2).all()  # all of it from the red half
    assert tuple(spy.calls[0]["noise"].shape[2:]) == (32 // pipe.cfg.vae.downsample_factor,) * 2
    assert spy.mask.float().mean() < 0.75  # the mask fills much of the crop, not all of it
    whole = pipe.inpaint(image, mask, PROMPT, steps=1, sampler="euler", seed=1)[0]
    assert seen[-1][1].shape == (32, 32, 3) and (seen[-1][1][:, 16:] == (30, 30, 200)).all()  # the whole picture
    assert not np.array_equal(np.asarray(out), np.asarray(whole))


@pytest.mark.parametrize("blur", [0, 2])
def test_only_masked_leaves_the_pixels_outside_the_masks_reach_exact(pipe, blur) -> None:
    image, mask = scene()
    out = pipe.inpaint(image, mask, PROMPT, steps=2, seed=5, mask_blur=blur, only_masked=True, only_masked_padding=3)[0]
    reach = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask) > 0
    got, original = np.asarray(out, np.int16), np.asarray(image, np.int16)
    assert (got[~reach] == original[~reach]).all()
    assert np.abs(got[np.asarray(mask) > 0] - original[np.asarray(mask) > 0]).max() > 0  # the mask was repainted


def test_only_masked_with_an_empty_mask_changes_nothing(pipe) -> None:
    image, _ = scene()
    out = pipe.inpaint(image, Image.new("L", (32, 32), 0), PROMPT, steps=1, seed=1, only_masked=True)[0]
    assert np.array_equal(np.asarray(out), np.asarray(image))


@pytest.mark.parametrize("padding", [-1, 257, 1.5, True])
def test_only_masked_padding_is_checked(pipe, padding) -> None:
    image, mask = scene()
    with pytest.raises(InpaintError, match="only-masked padding must be a whole number of pixels from 0 to 256"):
        pipe.inpaint(image, mask, PROMPT, steps=1, only_masked=True, only_masked_padding=padding)


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


def test_cli_only_masked_and_whole_picture(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    image, mask = scene()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    seen = []
    real = sd.StableDiffusionPipeline.inpaint
    monkeypatch.setattr(sd.StableDiffusionPipeline, "inpaint", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
    base = ["inpaint", tmp_path / "in.png", tmp_path / "mask.png", PROMPT, "-m", model_dir, "--steps", 1, "-o", tmp_path / "o.png", "-q"]
    for extra, only, padding in (([], True, 2), (["--whole-picture"], False, 2), (["--only-masked", "--only-masked-padding", 9], True, 9)):
        res = invoke(*base, *extra)
        assert res.exit_code == 0, res.output
        assert (seen[-1]["only_masked"], seen[-1]["only_masked_padding"]) == (only, padding)
    res = invoke(*base, "--only-masked-padding", 300)
    assert res.exit_code == 2 and res.output.startswith("error: only-masked padding must be a whole number of pixels from 0 to 256"), res.output
    assert len(seen) == 3  # refused before the model ran


def test_cli_defaults_are_the_library_defaults() -> None:
    import typer.main

    params = {p.name: p.default for p in typer.main.get_command(cli_app).commands["inpaint"].params}
    assert params["masked_content"] == DEFAULT_MASKED_CONTENT.value
    assert params["mask_blur"] == sd.StableDiffusionPipeline.inpaint.__kwdefaults__["mask_blur"]


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def recording_masks(model_dir: Path, monkeypatch):
    """The model's pipeline, and the list of the masks its ``generate`` receives."""
    pipe = opensd.load(model_dir)
    seen, real = [], pipe.generate

    def generate(req, **kw):
        seen.append(kw["mask"])
        return real(req, **kw)

    monkeypatch.setattr(pipe, "generate", generate)
    return pipe, seen


def test_server_inpainting_fill_and_mask_blur(model_dir: Path, monkeypatch) -> None:
    image, mask = scene()
    pipe, seen = recording_masks(model_dir, monkeypatch)
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


def test_server_inpaint_full_res_and_its_padding(model_dir: Path, monkeypatch) -> None:
    image, mask = scene()
    pipe, seen = recording_masks(model_dir, monkeypatch)
    body = {"init_images": [b64png(image)], "mask": b64png(mask), "prompt": PROMPT, "steps": 1, "seed": 3,
            "denoising_strength": 1.0, "mask_blur": 0}
    with TestClient(create_app(pipe)) as client:
        r = client.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200, r.text
        assert not seen[0].only_masked and seen[0].padding == 32  # A1111's API: the whole picture
        seen.clear()
        r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": True, "inpaint_full_res_padding": 6})
        assert r.status_code == 200, r.text
        assert seen[0].only_masked and seen[0].padding == 6
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        keep = np.asarray(mask) == 0
        assert (got[keep] == np.asarray(image)[keep]).all()
        for value in (-1, 257):
            r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": True, "inpaint_full_res_padding": value})
            assert r.status_code == 422 and "inpaint_full_res_padding must be from 0 to 256 pixels" in r.text, r.text
        r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": "sometimes"})
        assert r.status_code == 422 and "inpaint_full_res" in r.text, r.text
