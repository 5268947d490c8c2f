"""Generation proven equal to diffusers' StableDiffusionPipeline on identical small random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_clip_bundle
from PIL import Image

import opensd
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.pipelines import RequestError

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model, tok = tiny_clip_bundle(seed=3)
    path = tmp_path_factory.mktemp("model") / "diffusers"
    save_diffusers(model, tok, path)
    return path


@pytest.fixture(scope="module")
def ours(folders):
    return opensd.load(folders)


@pytest.fixture(scope="module")
def reference(folders):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folders, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config  # tests swap schedulers; start each from this
    return pipe


def _diffusers_scheduler(name: str, config):
    import diffusers as d

    table = {
        "ddim": (d.DDIMScheduler, {}),
        "euler": (d.EulerDiscreteScheduler, {}),
        "heun": (d.HeunDiscreteScheduler, {}),
        "dpm2": (d.KDPM2DiscreteScheduler, {}),
        "dpmpp_2m": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "DPM++ 2M Karras": (
            d.DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        "lms": (d.LMSDiscreteScheduler, {}),
        "unipc": (d.UniPCMultistepScheduler, {}),
    }
    cls, extra = table[name]
    return cls.from_config(config, **extra)


def _np(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def _latents(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


DETERMINISTIC = ["ddim", "euler", "heun", "dpm2", "dpmpp_2m", "DPM++ 2M Karras", "lms", "unipc"]


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("steps", [10])
def test_txt2img_matches_diffusers(ours, reference, sampler: str, steps: int) -> None:
    reference.scheduler = _diffusers_scheduler(sampler, reference.original_scheduler_config)
    lat = _latents(1)
    ref = reference(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        latents=lat.clone(),
        output_type="np",
    ).images
    mine = ours.txt2img(PROMPT, NEGATIVE, steps=steps, sampler=sampler, cfg_scale=7.5, width=SIZE, height=SIZE, latents=lat)
    # diffusers returns floats in [0, 1]; ours are 8-bit PNGs: compare on the [0, 1] scale
    diff = np.abs(_np(mine) - ref).max()
    assert diff <= 1e-3 + 0.5 / 255, f"{sampler}: max abs diff {diff}"


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_txt2img_20_steps_batch_of_two_matches_diffusers(ours, reference, sampler: str) -> None:
    reference.scheduler = _diffusers_scheduler(sampler, reference.original_scheduler_config)
    lat = _latents(2, batch=2)
    ref = reference(
        [PROMPT, PROMPT], negative_prompt=[NEGATIVE, NEGATIVE], num_inference_steps=20, guidance_scale=7.5,
        height=SIZE, width=SIZE, latents=lat.clone(), output_type="np",
    ).images
    mine = ours.txt2img(PROMPT, NEGATIVE, steps=20, sampler=sampler, width=SIZE, height=SIZE, batch_size=2, latents=lat)
    assert np.abs(_np(mine) - ref).max() <= 1e-3 + 0.5 / 255


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(ours, reference, sampler: str) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler(sampler, reference.original_scheduler_config)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = pipe(
        PROMPT, image=init, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
        negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(42), output_type="np",
    ).images
    mine = ours.img2img(init, PROMPT, NEGATIVE, strength=0.6, steps=10, sampler=sampler, seed=42)
    assert np.abs(_np(mine) - ref).max() <= 1e-3 + 0.5 / 255


# ----------------------------------------------------------------------------- behaviour


def test_cfg_scale_one_is_the_conditional_output_with_one_network_call_per_step(ours) -> None:
    calls = []
    unet = ours.model.unet
    handle = unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        a = ours.txt2img(PROMPT, "one negative", steps=6, sampler="euler", cfg_scale=1.0, seed=5, width=SIZE, height=SIZE)
        b = ours.txt2img(PROMPT, "another negative", steps=6, sampler="euler", cfg_scale=1.0, seed=5, width=SIZE, height=SIZE)
    finally:
        handle.remove()
    assert np.array_equal(_np(a), _np(b))
    assert calls == [1] * 12  # one un-batched call per step: no unconditional pass
    c = ours.txt2img(PROMPT, "one negative", steps=6, sampler="euler", cfg_scale=3.0, seed=5, width=SIZE, height=SIZE)
    assert not np.array_equal(_np(a), _np(c))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a", "DPM++ SDE Karras"])
def test_seeds_reproduce_and_differ(ours, sampler: str) -> None:
    kw = dict(steps=5, sampler=sampler, width=SIZE, height=SIZE)
    a = _np(ours.txt2img(PROMPT, seed=11, **kw))
    b = _np(ours.txt2img(PROMPT, seed=11, **kw))
    c = _np(ours.txt2img(PROMPT, seed=12, **kw))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_batch_images_follow_consecutive_seeds(ours) -> None:
    batch = ours.txt2img(PROMPT, steps=4, sampler="euler", seed=100, batch_size=2, width=SIZE, height=SIZE)
    second = ours.txt2img(PROMPT, steps=4, sampler="euler", seed=101, width=SIZE, height=SIZE)
    assert np.abs(_np(batch[1:]) - _np(second)).max() <= 1.0 / 255
    assert "Seed: 101" in batch[1].info["parameters"]


def test_inpainting_keeps_what_is_outside_the_mask(ours) -> None:
    size = 64
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 4] = 255  # repaint the left quarter
    out = _np(ours.inpaint(init, Image.fromarray(mask), PROMPT, steps=6, sampler="euler", seed=3))[0]
    original = np.asarray(init, np.float64) / 255
    # outside the mask: the original pixels (better than the VAE's round trip)
    assert np.abs(out[:, size // 4 :] - original[:, size // 4 :]).max() <= 1.0 / 255
    assert np.abs(out[:, : size // 4] - original[:, : size // 4]).max() > 0.1  # the masked part did change


def test_inpainting_latents_outside_the_mask_are_the_original(ours) -> None:
    """The re-noised original is imposed outside the mask at every step: the final
    latent there is the encoded original."""
    size = 32
    init = Image.fromarray(np.random.default_rng(2).integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = 255  # repaint the top half
    seen = []
    ours.inpaint(init, Image.fromarray(mask), PROMPT, steps=4, sampler="euler", seed=3,
                 callback=lambda s: seen.append(s.denoised.clone()))
    model = ours.model
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(init, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        post = model.vae.encode(x)
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        init_latent = model.vae.to_latent(post.mean + post.std * eps)
    h = init_latent.shape[2] // 2
    for d in seen:
        assert torch.allclose(d[:, :, h:], init_latent[:, :, h:], atol=1e-6)
        assert not torch.allclose(d[:, :, :h], init_latent[:, :, :h], atol=1e-2)


def test_callback_sees_every_step_and_can_stop(ours) -> None:
    seen = []
    ours.txt2img(PROMPT, steps=5, sampler="euler", seed=1, width=SIZE, height=SIZE, callback=lambda s: seen.append((s.step, s.total)))
    assert seen == [(i, 5) for i in range(1, 6)]
    stopped = []
    images = ours.txt2img(
        PROMPT, steps=8, sampler="euler", seed=1, width=SIZE, height=SIZE,
        callback=lambda s: stopped.append(s.step) or s.step < 2,
    )
    assert stopped == [1, 2] and len(images) == 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 30}, "multiple of 8"),
        ({"height": 0}, "multiple of 8"),
        ({"steps": 0}, "steps must be"),
        ({"sampler": "warp drive"}, "known: .*dpmpp_2m"),
        ({"batch_size": 0}, "batch_size"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"seed": "x"}, "seed must be"),
        ({"eta": 0.5, "sampler": "euler"}, "no option"),
    ],
)
def test_bad_txt2img_input(ours, kwargs, message) -> None:
    with pytest.raises(RequestError, match=message):
        ours.txt2img(PROMPT, **kwargs)


def test_bad_img2img_and_inpaint_input(ours, tmp_path) -> None:
    img = Image.new("RGB", (SIZE, SIZE))
    with pytest.raises(RequestError, match=r"strength must be in \[0, 1\]"):
        ours.img2img(img, PROMPT, strength=1.5)
    with pytest.raises(RequestError, match="same size"):
        ours.inpaint(img, Image.new("L", (SIZE + 8, SIZE)), PROMPT)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        ours.img2img(tmp_path / "bad.png", PROMPT)
    with pytest.raises(ValueError, match="not found"):
        ours.img2img(tmp_path / "missing.png", PROMPT)


def test_nine_channel_inpainting_unet_gets_mask_and_masked_image(tmp_path) -> None:
    """An SD inpainting U-Net (4 + 1 + 4 input channels) sees the mask and the masked image's latent."""
    import dataclasses

    from helpers import randomize, tiny_word_bundle

    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.models.stable_diffusion import StableDiffusion

    base, tok = tiny_word_bundle()
    cfg = base.cfg.replace(unet=dataclasses.replace(base.cfg.unet, in_channels=9))
    save_opensd(randomize(StableDiffusion(cfg)).eval(), tok, tmp_path / "inpaint")
    pipe = opensd.load(tmp_path / "inpaint")
    seen = []
    pipe.model.unet.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    out = _np(pipe.inpaint(init, Image.fromarray(mask), "a red circle", steps=3, sampler="euler", seed=1))[0]
    assert seen and all(s[1] == 9 for s in seen)
    original = np.asarray(init, np.float64) / 255
    assert np.abs(out[:, : SIZE // 2] - original[:, : SIZE // 2]).max() <= 1.0 / 255
    # txt2img and img2img on an inpainting model: everything masked, as A1111 conditions them
    assert pipe.txt2img("a red circle", steps=2, sampler="euler", seed=1)[0].size == (SIZE, SIZE)
    assert pipe.img2img(init, "a red circle", steps=2, strength=0.5, seed=1)[0].size == (SIZE, SIZE)
