"""Base-then-refiner generation (opensd.pipelines.refiner): the switch, the hand-over, the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_family_model
from PIL import Image

from opensd.checkpoints import LoadedModel
from opensd.diffusion import DiscreteSchedule
from opensd.models.stable_diffusion import ModelFamily
from opensd.pipelines.infotext import parse_infotext, parse_refiner
from opensd.pipelines.refiner import check_pair, switch_step
from opensd.pipelines.request import RequestError
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline


def _pipe(family: ModelFamily, seed: int, name: str) -> StableDiffusionPipeline:
    model, tok = tiny_family_model(family, seed)
    return StableDiffusionPipeline(LoadedModel(model, tok, name, Path("."), "opensd", f"{seed:010d}"))


@pytest.fixture(scope="module")
def base() -> StableDiffusionPipeline:
    return _pipe(ModelFamily.SDXL, 0, "xl-base")


@pytest.fixture(scope="module")
def refiner() -> StableDiffusionPipeline:
    return _pipe(ModelFamily.SDXL_REFINER, 1, "xl-refiner")


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


class _Calls:
    """Records the timesteps and batch sizes a U-Net is called with."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.unet, self.calls = pipe.model.unet, []

    def __enter__(self) -> _Calls:
        self.handle = self.unet.register_forward_pre_hook(lambda m, args: self.calls.append((float(args[1].max()), args[0].shape[0])))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    @property
    def timesteps(self) -> list[float]:
        return [t for t, _ in self.calls]


# ----------------------------------------------------------------------------- the switch


def test_switch_step_is_a1111s_and_diffusers_cutoff() -> None:
    from diffusers import EulerDiscreteScheduler

    schedule = DiscreteSchedule()  # SDXL's: scaled linear, leading, steps_offset 1
    cfg = schedule.config.to_diffusers()
    for steps in (10, 20, 30):
        sched = EulerDiscreteScheduler.from_config(cfg)
        sched.set_timesteps(steps)
        sigmas = schedule.sigmas_for(steps)
        for switch in (0.25, 0.5, 0.8, 0.9):
            cutoff = int(round(1000 - switch * 1000))  # diffusers' denoising_end
            base_steps = int((sched.timesteps >= cutoff).sum())
            assert switch_step(schedule.sigmas, sigmas, switch) == base_steps, (steps, switch)
    twenty = schedule.sigmas_for(20)  # t = 951, 901, ..., 1: the refiner from t = 151 on
    assert switch_step(schedule.sigmas, twenty, 0.8) == 16
    assert switch_step(schedule.sigmas, twenty, 1.0) == 20 and switch_step(schedule.sigmas, twenty, 0.0) == 0
    assert switch_step(schedule.sigmas, twenty, 0.798) == 15  # t = 201: (999 - 201) / 1000 = 0.798


def test_network_calls_split_at_the_switch(base, refiner) -> None:
    steps_seen = []
    with _Calls(base) as b, _Calls(refiner) as r:
        base.txt2img("a red circle", steps=20, sampler="euler", cfg_scale=1.0, seed=1, refiner=refiner,
                     refiner_switch_at=0.8, callback=lambda info: steps_seen.append((info.step, info.total)))
    assert len(b.calls) == 16 and len(r.calls) == 4
    assert b.timesteps[-1] == pytest.approx(201, abs=1e-3) and r.timesteps[0] == pytest.approx(151, abs=1e-3)
    assert steps_seen == [(i, 20) for i in range(1, 21)]  # one count across both models


def test_img2img_switch_counts_the_steps_it_runs(base, refiner) -> None:
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    with _Calls(base) as b, _Calls(refiner) as r:
        out = base.img2img(image, "a red circle", steps=10, strength=0.5, sampler="euler", cfg_scale=1.0, seed=2, refiner=refiner)
    # 10 leading steps keep t = 401, 301, 201, 101, 1; the refiner takes t <= 199
    assert len(b.calls) == 3 and len(r.calls) == 2
    assert "Denoising strength: 0.5" in out[0].info["parameters"]


def test_switch_at_one_is_the_base_alone(base, refiner) -> None:
    alone = base.generate(base.request("a red circle", "a blue square", steps=6, sampler="dpmpp_2m", seed=3))
    with _Calls(refiner) as r:
        refined = base.generate(base.request("a red circle", "a blue square", steps=6, sampler="dpmpp_2m", seed=3,
                                             refiner_switch_at=1.0), refiner=refiner)
    assert r.calls == []  # never switched: the refiner is not run (nor named in the infotext, as A1111)
    assert np.array_equal(_pixels(alone.images[0]), _pixels(refined.images[0]))
    assert alone.infotexts == refined.infotexts


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_switch_at_zero_is_the_refiner_alone(base, refiner, sampler) -> None:
    alone = refiner.txt2img("a red circle", steps=5, sampler=sampler, seed=4)[0]
    with _Calls(base) as b:
        refined = base.txt2img("a red circle", steps=5, sampler=sampler, seed=4, refiner=refiner, refiner_switch_at=0.0)[0]
    assert b.calls == []
    assert np.array_equal(_pixels(alone), _pixels(refined))  # same noise, same sampler noise, refiner's VAE decodes
    assert refined.info["parameters"].endswith("Model: xl-base, Refiner: xl-refiner [0000000001], Refiner switch at: 0.0")


def test_two_phase_euler_equals_diffusers_denoising_end_and_start(base, refiner) -> None:
    """The hand-over as diffusers' SDXL base (denoising_end) then img2img refiner (denoising_start)
    run it: the base's scheduler stops at the cutoff, a fresh one resumes on the same latent."""
    from diffusers import EulerDiscreteScheduler

    steps, switch = 10, 0.6
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    req = base.request("a red circle", steps=steps, sampler="euler", cfg_scale=1.0, seed=5, refiner_switch_at=switch)
    last = []
    base.generate(req, latents=noise, refiner=refiner, callback=lambda info: last.append(info.denoised))

    cutoff = int(round(1000 - switch * 1000))
    first = EulerDiscreteScheduler.from_config(base.schedule.config.to_diffusers())
    first.set_timesteps(steps)
    latents = noise * first.init_noise_sigma
    with torch.no_grad():
        for pipe, keep in ((base, lambda t: t >= cutoff), (refiner, lambda t: t < cutoff)):
            cond, _ = pipe.conditioner.for_request(req)
            sched = EulerDiscreteScheduler.from_config(pipe.schedule.config.to_diffusers())
            sched.set_timesteps(steps)
            timesteps = [t for t in sched.timesteps if keep(t)]
            sched.set_begin_index(list(sched.timesteps).index(timesteps[0]))
            for t in timesteps:
                eps = pipe.model.unet(sched.scale_model_input(latents, t), t.reshape(1).float(), cond["context"], cond["y"])
                latents = sched.step(eps, t, latents).prev_sample
    torch.testing.assert_close(last[-1], latents, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- inpainting


def test_inpaint_with_a_refiner_keeps_the_unmasked_pixels(base, refiner) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = base.inpaint(image, mask, "a red circle", steps=6, seed=6, refiner=refiner, refiner_switch_at=0.5)[0]
    keep = np.asarray(mask) == 0
    assert np.array_equal(_pixels(out)[keep], _pixels(image)[keep])
    assert "Refiner: xl-refiner" in out.info["parameters"]


# ----------------------------------------------------------------------------- infotext


def test_refiner_fields_parse_back(base, refiner) -> None:
    im = base.txt2img("a red circle", steps=4, seed=7, refiner=refiner, refiner_switch_at=0.25)[0]
    fields = parse_infotext(im.info["parameters"])
    assert fields["Refiner"] == "xl-refiner [0000000001]" and fields["Refiner switch at"] == "0.25"
    assert parse_refiner(fields) == ("xl-refiner", "0000000001", 0.25)
    assert parse_refiner({"Refiner": "a, b [0123456789]", "Refiner switch at": "x"}) == ("a, b", "0123456789", None)
    assert parse_refiner({"Refiner": "sd_xl_refiner_1.0"}) == ("sd_xl_refiner_1.0", None, None)
    assert parse_refiner(parse_infotext(base.txt2img("a red circle", steps=1, seed=7)[0].info["parameters"])) is None


# ----------------------------------------------------------------------------- errors


def test_latent_spaces_must_match(base, refiner) -> None:
    sd1 = _pipe(ModelFamily.SD1, 2, "sd1")
    with pytest.raises(RequestError, match=r"^a sdxl_refiner refiner cannot continue a sd1 model") as e:
        sd1.txt2img("a red circle", steps=2, refiner=refiner)
    assert "\n" not in str(e.value)
    with pytest.raises(RequestError, match="a sd1 refiner cannot continue a sdxl model"):
        base.txt2img("a red circle", steps=2, refiner=sd1)
    with pytest.raises(RequestError, match="swap them"):
        refiner.txt2img("a red circle", steps=2, refiner=base)
    check_pair(sd1.cfg, _pipe(ModelFamily.SD2, 3, "sd2").cfg)  # SD 1.x and 2.x share a latent space
    other = sd1.cfg.replace(vae=sd1.cfg.vae.__class__(**{**sd1.cfg.vae.__dict__, "scale_factor": 0.5}))
    with pytest.raises(RequestError, match="VAE latent"):
        check_pair(sd1.cfg, other)


def test_bad_refiner_requests_are_one_line_errors(base, refiner) -> None:
    with pytest.raises(RequestError, match="refiner_switch_at needs a refiner"):
        base.txt2img("a red circle", steps=2, refiner_switch_at=0.5)
    with pytest.raises(RequestError, match="refiner_switch_at must be a number from 0 to 1"):
        base.txt2img("a red circle", steps=2, refiner=refiner, refiner_switch_at=1.5)
    with pytest.raises(RequestError, match="refiner must be a loaded pipeline"):
        base.txt2img("a red circle", steps=2, refiner="models/refiner")
    embeds = {"context": torch.zeros(1, 77, base.cfg.context_dim), "pooled": torch.zeros(1, base.cfg.pooled_dim)}
    with pytest.raises(RequestError, match="cannot be used with a refiner"):
        base.txt2img("a red circle", steps=2, refiner=refiner, prompt_embeds=embeds)


def test_stopping_after_the_switch_decodes_with_the_refiner(base, refiner) -> None:
    def stop_at(n):
        return lambda info: info.step < n

    req = base.request("a red circle", steps=10, sampler="euler", seed=8, refiner_switch_at=0.5)
    late = base.generate(req, refiner=refiner, callback=stop_at(8))
    early = base.generate(req, refiner=refiner, callback=stop_at(3))
    assert late.interrupted and early.interrupted
    assert "Refiner: xl-refiner" in late.infotexts[0]  # the refiner ran steps 6..8 and decodes
    assert "Refiner" not in early.infotexts[0]  # stopped before the switch: the base's result alone
