"""The hires fix on tiny random weights: the second pass equal to diffusers' img2img (and
ControlNet img2img) on the upscaled first pass, A1111's target sizes and step rule, the
infotext, LoRAs and upscaler models on both passes, and its bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, tiny_clip_bundle
from PIL import Image
from test_lora_use import _write_lora
from test_upscalers import tiny_compact_state

import opensd
from opensd.checkpoints.controlnet import controlnet_config_for, save_controlnet, save_controlnet_diffusers
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.io import write_safetensors
from opensd.models.controlnet import ControlNet
from opensd.pipelines.control import ControlUnit, controlnet_for, with_control
from opensd.pipelines.hires import HiresFix, hires_fix, plan_hires, second_pass_steps, target_size
from opensd.pipelines.infotext import parse_infotext
from opensd.pipelines.lora_library import LoraLibrary
from opensd.pipelines.request import RequestError
from opensd.pipelines.upscale_models import UpscalerError
from opensd.pipelines.upscalers import UpscalerLibrary

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
SIZE = 32
TOL = 1e-3 + 0.5 / 255


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    model, tok = tiny_clip_bundle(seed=5)
    root = tmp_path_factory.mktemp("hires")
    save_diffusers(model, tok, root / "sd")
    torch.manual_seed(0)
    net = randomize(ControlNet(controlnet_config_for(model.cfg, (16, 32))), 7, scale=0.1).eval()
    save_controlnet(net, root / "cn.safetensors")
    save_controlnet_diffusers(net, root / "cn")
    (root / "ESRGAN").mkdir()
    write_safetensors(tiny_compact_state(2), root / "ESRGAN" / "compact_x2.safetensors")
    return root


@pytest.fixture(scope="module")
def ours(root):
    return opensd.load(root / "sd")


@pytest.fixture(scope="module")
def reference(root):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(root / "sd", local_files_only=True)


def _np(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def _hint(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _ddim(reference, cls_name="StableDiffusionImg2ImgPipeline", **extra):
    import diffusers as d

    pipe = getattr(d, cls_name)(**{**reference.components, **extra})
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = d.DDIMScheduler.from_config(reference.scheduler.config)
    return pipe


def _req(ours, **kw):
    return ours.request(PROMPT, NEGATIVE, steps=kw.pop("steps", 5), sampler="ddim", cfg_scale=7.5, width=SIZE, height=SIZE,
                        seed=kw.pop("seed", 42), **kw)


# ----------------------------------------------------------------------------- A1111's arithmetic


@pytest.mark.parametrize("w, h, hires, upscaled, final", [
    (512, 512, HiresFix(scale=2), (1024, 1024), (1024, 1024)),
    (512, 768, HiresFix(scale=1.5), (768, 1152), (768, 1152)),
    (504, 512, HiresFix(scale=1.3), (648, 664), (648, 664)),  # int(655.2) = 655 -> 648; int(665.6) -> 664
    (512, 768, HiresFix(resize_x=1024), (1024, 1536), (1024, 1536)),
    (512, 768, HiresFix(resize_y=1024), (680, 1024), (680, 1024)),  # 1024 * 512 // 768 = 682 -> 680
    (512, 768, HiresFix(resize_x=1024, resize_y=1024), (1024, 1536), (1024, 1024)),  # cover, then cut 256 top and bottom
    (768, 512, HiresFix(resize_x=1000, resize_y=600), (1000, 666), (1000, 600)),
])
def test_target_size_is_a1111s(w, h, hires, upscaled, final) -> None:
    size = target_size(w, h, hires)
    want_up = (upscaled[0] // 8 * 8, upscaled[1] // 8 * 8)
    assert size.upscaled == want_up and size.final == (final[0] // 8 * 8, final[1] // 8 * 8)
    left, top, right, bottom = size.box
    assert left == (want_up[0] - right) or abs(left - (want_up[0] - right)) == 8  # cut equally, the odd cell at the end
    assert top <= want_up[1] - bottom


@pytest.mark.parametrize("steps, strength, schedule", [(10, 0.7, 14), (20, 0.5, 40), (7, 0.33, 21), (4, 1.0, 4), (6, 0.9995, 6)])
def test_second_pass_runs_exactly_its_steps(steps, strength, schedule) -> None:
    total, r = second_pass_steps(steps, strength)
    assert total == schedule == int(steps / min(strength, 0.999))
    assert (int(total * r) if r < 1 else total) == steps
    assert second_pass_steps(5, 0.0) == (5, 0.0)


# ----------------------------------------------------------------------------- parity of the second pass


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest)"])
def test_latent_second_pass_equals_diffusers_img2img_on_the_upscaled_latent(ours, reference, upscaler) -> None:
    req = _req(ours)
    hires = HiresFix(scale=2, upscaler=upscaler, steps=4, denoising_strength=0.6)
    got = hires_fix(ours, req, hires)
    assert got.images[0].size == (2 * SIZE, 2 * SIZE)
    first = ours.generate(req, decode=False).latents  # (1, 4, 16, 16)
    mode = {"Latent": ("bilinear", False), "Latent (bicubic antialiased)": ("bicubic", True), "Latent (nearest)": ("nearest", False)}
    up = F.interpolate(first, size=(SIZE, SIZE), mode=mode[upscaler][0], antialias=mode[upscaler][1])
    total, strength = second_pass_steps(4, 0.6)  # 6 scheduled, the last 4 run
    ref = _ddim(reference)(PROMPT, image=up, strength=4 / 6, num_inference_steps=total, guidance_scale=7.5,
                           negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(42), output_type="np").images
    assert np.abs(_np(got.images) - ref).max() <= TOL
    assert np.abs(_np(got.images) - _np(ours.txt2img(PROMPT, NEGATIVE, steps=5, sampler="ddim", width=2 * SIZE,
                                                      height=2 * SIZE, seed=42))).max() > 0.05  # not a plain large txt2img


def test_pixel_second_pass_encodes_the_upscaled_picture(ours, reference) -> None:
    req = _req(ours)
    got = hires_fix(ours, req, HiresFix(scale=1.5, upscaler="Lanczos", steps=3, denoising_strength=0.5))
    assert got.images[0].size == (48, 48)
    small = ours.generate(req).images[0]
    big = np.asarray(small.resize((48, 48), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1
    with torch.no_grad():
        lat = reference.vae.encode(torch.from_numpy(big).permute(2, 0, 1)[None]).latent_dist.mode() * reference.vae.config.scaling_factor
    total, _ = second_pass_steps(3, 0.5)
    ref = _ddim(reference)(PROMPT, image=lat, strength=3 / total, num_inference_steps=total, guidance_scale=7.5,
                           negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(42), output_type="np").images
    assert np.abs(_np(got.images) - ref).max() <= TOL


def test_controlnet_acts_on_the_second_pass_at_the_new_size(ours, reference, root) -> None:
    from diffusers import ControlNetModel

    unit = ControlUnit(controlnet_for(ours, root / "cn.safetensors"), _hint(3, 2 * SIZE))
    req = _req(ours)
    hires = HiresFix(scale=2, steps=4, denoising_strength=0.6)
    got = hires_fix(ours, req, hires, networks=with_control(None, [unit]))
    first = ours.generate(req, decode=False, networks=with_control(None, [unit])).latents
    up = F.interpolate(first, size=(SIZE, SIZE), mode="bilinear")
    cn = ControlNetModel.from_pretrained(root / "cn", local_files_only=True).eval()
    pipe = _ddim(reference, "StableDiffusionControlNetImg2ImgPipeline", controlnet=cn)
    ref = pipe(PROMPT, image=up, control_image=_hint(3, 2 * SIZE), strength=4 / 6, num_inference_steps=6, guidance_scale=7.5,
               negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(42), output_type="np",
               controlnet_conditioning_scale=1.0).images
    assert np.abs(_np(got.images) - ref).max() <= TOL
    plain = hires_fix(ours, req, hires)
    assert np.abs(_np(got.images) - _np(plain.images)).max() > 0.02
    fields = parse_infotext(got.infotexts[0])
    assert fields["ControlNet 0"].startswith("Module: none, Model: cn [")


# ----------------------------------------------------------------------------- what the run does


def test_infotext_is_a1111s(ours) -> None:
    req = _req(ours)
    text = hires_fix(ours, req, HiresFix(scale=2, upscaler="Latent", steps=3, denoising_strength=0.7)).infotexts[0]
    params = text.splitlines()[-1]
    assert "Size: 32x32" in params and params.index("Model: ") < params.index("Denoising strength: 0.7")
    assert params.endswith("Denoising strength: 0.7, Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent")
    text = hires_fix(ours, req, HiresFix(resize_x=48, resize_y=40, prompt="a blue square", sampler="Euler",
                                         denoising_strength=1.0)).infotexts[0]
    fields = parse_infotext(text)
    assert fields["Hires resize"] == "48x40" and "Hires upscale" not in fields and "Hires upscaler" not in fields
    assert fields["Hires prompt"] == "a blue square" and fields["Hires sampler"] == "Euler" and fields["Denoising strength"] == "1"
    assert "Hires steps" not in fields and "Hires negative prompt" not in fields and fields["Steps"] == "5"


def test_strength_zero_keeps_the_upscaled_latent(ours) -> None:
    req = _req(ours)
    got = hires_fix(ours, req, HiresFix(scale=2, upscaler="Latent (nearest-exact)", denoising_strength=0.0))
    first = ours.generate(req, decode=False).latents
    want = ours.decode_latents(F.interpolate(first, size=(SIZE, SIZE), mode="nearest-exact")).float()
    want = ((want.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(got.images[0], dtype=np.float64) - want).max() <= 1


def test_a_batch_is_each_seeds_own_run(ours) -> None:
    hires = HiresFix(scale=1.5, steps=2)
    both = hires_fix(ours, _req(ours, batch_size=2, seed=7), hires)
    second = hires_fix(ours, _req(ours, seed=8), hires)
    assert both.seeds == [7, 8] and "Seed: 8" in both.infotexts[1]
    assert np.abs(_np(both.images[1:]) - _np(second.images)).max() <= 2 / 255
    assert np.abs(_np(both.images[:1]) - _np(second.images)).max() > 0.02


def test_loras_reach_both_passes(ours, tmp_path) -> None:
    _write_lora(ours.model, tmp_path / "style.safetensors", 1)
    library = LoraLibrary(tmp_path)
    req = dataclasses.replace(_req(ours), prompt=PROMPT + " <lora:style:1>")
    networks = library.networks_for(ours.model, req)
    hires = HiresFix(scale=2, steps=3, denoising_strength=0.6)
    plan = plan_hires(ours, req, hires)
    first = ours.generate(plan.first, networks=networks, decode=False).latents
    up = F.interpolate(first, size=(SIZE, SIZE), mode="bilinear")
    want = ours.generate(plan.second, init_latent=up, networks=networks).images
    without = ours.generate(plan.second, init_latent=up).images
    got = hires_fix(ours, req, hires, networks=networks)
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(want[0]))
    assert np.abs(_np(got.images) - _np(without)).max() > 0.02
    assert "Lora hashes" in got.infotexts[0]


def test_an_upscaler_model_in_the_hires_fix(ours, root) -> None:
    lib = UpscalerLibrary(root / "ESRGAN")
    req = _req(ours)
    got = hires_fix(ours, req, HiresFix(scale=2, upscaler="compact_x2", steps=2), upscalers=lib)
    lanczos = hires_fix(ours, req, HiresFix(scale=2, upscaler="Lanczos", steps=2), upscalers=lib)
    assert got.images[0].size == (64, 64) and "Hires upscaler: compact_x2" in got.infotexts[0]
    assert np.abs(_np(got.images) - _np(lanczos.images)).max() > 0.02


def test_an_interrupted_first_pass_returns_its_own_images(ours) -> None:
    got = hires_fix(ours, _req(ours), HiresFix(scale=2, steps=2), callback=lambda info: info.step < 2)
    assert got.interrupted and got.images[0].size == (SIZE, SIZE) and "Hires upscale: 2" in got.infotexts[0]


def test_the_second_pass_keeps_the_first_passs_schedule(ours) -> None:
    req = dataclasses.replace(_req(ours), sampler="dpmpp_2m_karras")
    plan = plan_hires(ours, req, HiresFix(sampler="Euler a"))
    assert plan.second.sampler == "euler_ancestral_karras"
    assert plan_hires(ours, req, HiresFix(sampler="Euler Exponential")).second.sampler == "Euler Exponential"
    assert plan_hires(ours, req, HiresFix()).second.sampler == "dpmpp_2m_karras"


@pytest.mark.parametrize("make, error, message", [
    (lambda: HiresFix(scale=0.5), RequestError, "hires scale must be a number from 1 to 8"),
    (lambda: HiresFix(denoising_strength=1.5), RequestError, "denoising strength must be a number from 0 to 1"),
    (lambda: HiresFix(steps=-1), RequestError, "hires steps must be an integer from 0"),
    (lambda: HiresFix(resize_x=5000), RequestError, "hires resize_x must be 0 .* or a size from 8 to 4096"),
    (lambda: HiresFix(upscaler="ESRGAN_4x"), UpscalerError, "unknown hires upscaler 'ESRGAN_4x'.*known: Latent"),
    (lambda: HiresFix(sampler="DPM++ 9M"), RequestError, "hires sampler: unknown sampler"),
])
def test_bad_hires_input_is_one_line(ours, make, error, message) -> None:
    with pytest.raises(error, match=message) as e:
        plan_hires(ours, _req(ours), make())
    assert "\n" not in str(e.value)


def test_a_target_over_the_largest_side_is_refused_before_any_work(ours) -> None:
    calls = []
    req = dataclasses.replace(_req(ours), width=1024, height=1024)
    with pytest.raises(RequestError, match="hires fix to 8192x8192: width must be a multiple of 8 between 8 and 4096"):
        hires_fix(ours, req, HiresFix(scale=8), callback=lambda info: calls.append(info))
    assert calls == []
