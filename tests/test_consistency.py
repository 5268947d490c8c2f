"""The consistency samplers, LCM and TCD (opensd.diffusion.consistency).

Parity: against diffusers' LCMScheduler and TCDScheduler, their timestep grids, a run
on test_samplers' smooth fake network (final latents to 1e-4, the same generator for
the noise), and whole txt2img / img2img runs on tiny random weights (pixels to 1e-3).
Statistics: with the exact consistency function of Gaussian data LCM's sampler lands on
the data; TCD's output variance is its step's linear-Gaussian recursion.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler
from helpers import tiny_clip_bundle, tiny_loaded
from test_samplers import MU, STD, consistency_function, make_model, run_diffusers

import opensd
from opensd.diffusion import Denoiser, DiscreteSchedule, NoiseScheduleConfig, Prediction, SamplerError, SigmaSpacing
from opensd.diffusion.consistency import _tcd_sigma_s, sample_lcm, sample_tcd
from opensd.diffusion.registry import resolve_sampler, sample
from opensd.diffusion.schedules import LCM_RULE, TCD_RULE, ScheduleError, TimestepGrid
from opensd.pipelines import RequestError
from opensd.pipelines.request import SEED_RANGE
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = 1e-4
REFERENCE = {"lcm": LCMScheduler, "tcd": TCDScheduler}


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize("original", [50, 25, 10])
@pytest.mark.parametrize("cls", [LCMScheduler, TCDScheduler])
def test_grid_equals_diffusers(cls, original):
    cfg = NoiseScheduleConfig()
    schedule = DiscreteSchedule(cfg)
    for steps in range(1, original + 1):
        ref = cls.from_config({**cfg.to_diffusers(), "original_inference_steps": original})
        ref.set_timesteps(steps)
        ts = ref.timesteps.double().numpy()
        np.testing.assert_array_equal(schedule.timesteps_for(steps, TimestepGrid.LCM, original_steps=original), ts)
        rule = LCM_RULE if cls is LCMScheduler else TCD_RULE
        sigmas = schedule.sigmas_for(steps, rule=rule.__class__(rule.grid, rule.final_sigma, rule.sigma_range, original_steps=original))
        np.testing.assert_allclose(sigmas[:-1].numpy(), schedule.sigmas[ts.astype(int)].numpy(), rtol=1e-6)
        # LCM ends at sigma 0; TCD at timestep 0 (alphas_cumprod[0], whatever set_alpha_to_one)
        assert sigmas[-1].item() == (0.0 if cls is LCMScheduler else pytest.approx(schedule.sigma_min))


def test_four_steps_of_fifty_and_more_steps_than_the_grid():
    schedule = DiscreteSchedule()
    assert schedule.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    with pytest.raises(ScheduleError, match="at most 50 steps"):
        schedule.sigmas_for(51, rule=LCM_RULE)
    assert len(schedule.sigmas_for(51, SigmaSpacing.KARRAS, rule=LCM_RULE)) == 52  # any count with Karras
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ScheduleError, match="original_inference_steps"):
            schedule.timesteps_for(4, TimestepGrid.LCM, original_steps=bad)


# ----------------------------------------------------------------------------- parity on a fake network


def check_parity(name, steps, *, prediction=Prediction.EPS, options=None, original=None, strength=1.0):
    cfg = NoiseScheduleConfig(prediction=prediction)
    schedule = DiscreteSchedule(cfg)
    model = make_model(schedule, v=prediction is Prediction.V)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    init = 0.8 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    options = dict(options or {})
    step_kw = {"eta": options["gamma"]} if "gamma" in options else None
    flags = {"original_inference_steps": original} if original else {}
    img2img = {"init": init, "strength": strength, "noise": noise} if strength < 1 else {"init": noise}
    ref, _ = run_diffusers(
        REFERENCE[name], cfg, steps, model, generator=torch.Generator().manual_seed(5), step_kw=step_kw, **img2img, **flags
    )
    grid = {"original_inference_steps": original} if original else {}
    ours = sample(
        Denoiser(model, schedule), noise, schedule, name, steps, generator=torch.Generator().manual_seed(5),
        strength=strength, init_latent=init if strength < 1 else None, **options, **grid,
    )
    assert 0.3 < ref.std().item() < 5
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"{name} {steps} steps {options}: max abs diff {err:.2e}"


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_parity_with_diffusers(name, steps):
    check_parity(name, steps)


@pytest.mark.parametrize("name, steps", [("lcm", 4), ("tcd", 4), ("lcm", 6)])
def test_parity_v_prediction(name, steps):
    check_parity(name, steps, prediction=Prediction.V)


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 1.0])
def test_tcd_gamma_parity(gamma):
    check_parity("tcd", 6, options={"gamma": gamma})


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_original_inference_steps_parity(name):
    check_parity(name, 5, original=25)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_img2img_parity(name):
    # StableDiffusionImg2ImgPipeline's rule: the last int(steps * strength) of the grid
    check_parity(name, 8, strength=0.6)


def test_tcd_at_gamma_zero_is_ddim_on_the_same_sigmas():
    schedule = DiscreteSchedule()
    den = Denoiser(make_model(schedule), schedule)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = schedule.sigmas_for(6, rule=TCD_RULE)
    a = sample_tcd(den.with_quantize_t(True), x, sigmas, schedule=schedule, gamma=0.0)
    b = resolve_sampler("ddim")[0].fn(den.with_quantize_t(True), x, sigmas)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_with_the_exact_consistency_function_lands_on_the_data(steps):
    schedule = DiscreteSchedule()
    sigmas = schedule.sigmas_for(steps, rule=LCM_RULE)
    g = torch.Generator().manual_seed(0)
    x = MU + math.sqrt(STD**2 + sigmas[0].item() ** 2) * torch.randn(8192, 4, generator=g)
    out = sample_lcm(consistency_function, x, sigmas, schedule=schedule, generator=g)
    n = x.numel()
    assert abs(out.mean().item() - MU) < 5 * STD / math.sqrt(n)
    assert abs(out.std().item() - STD) < 5 * STD / math.sqrt(2 * n)


def _posterior_mean(x, sigma):
    s2 = (sigma**2).view(-1, *([1] * (x.ndim - 1)))
    return (STD**2 * x + s2 * MU) / (STD**2 + s2)


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_tcd_variance_follows_its_step(gamma):
    # x_next = x0 + sigma_s eps + sqrt(sigma_next^2 - sigma_s^2) z with the posterior mean x0 is
    # linear-Gaussian: Var' = a^2 Var + sigma_next^2 - sigma_s^2, a = (STD^2 + sigma_s sigma) / (STD^2 + sigma^2)
    schedule = DiscreteSchedule()
    sigmas = schedule.sigmas_for(8, rule=TCD_RULE)
    g = torch.Generator().manual_seed(0)
    x = MU + math.sqrt(STD**2 + sigmas[0].item() ** 2) * torch.randn(8192, 4, generator=g)
    out = sample_tcd(_posterior_mean, x, sigmas, schedule=schedule, generator=g, gamma=gamma)
    s, var = sigmas.tolist(), x.var().item()
    for i in range(len(s) - 1):
        s_s = _tcd_sigma_s(schedule, s[i + 1], gamma)
        var = ((STD**2 + s_s * s[i]) / (STD**2 + s[i] ** 2)) ** 2 * var + s[i + 1] ** 2 - s_s**2
    assert abs(out.std().item() - math.sqrt(var)) < 5 * STD / math.sqrt(2 * x.numel())
    assert abs(out.mean().item() - MU) < 5 * STD / math.sqrt(x.numel())


# ----------------------------------------------------------------------------- registry and errors


@pytest.mark.parametrize("name, sampler_id", [("LCM", "lcm"), ("lcm", "lcm"), ("k_lcm", "lcm"), ("TCD", "tcd"), ("tcd", "tcd")])
def test_names_resolve(name, sampler_id):
    assert resolve_sampler(name)[0].id == sampler_id
    assert resolve_sampler(name + " Karras")[1] is SigmaSpacing.KARRAS


def test_options_and_bad_values():
    assert resolve_sampler("lcm")[0].options() == {"timestep_scaling": 10.0, "original_inference_steps": 50}
    assert resolve_sampler("tcd")[0].options() == {"gamma": 0.3, "original_inference_steps": 50}
    schedule = DiscreteSchedule()
    den = Denoiser(make_model(schedule), schedule)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ScheduleError, match="at most 50 steps"):
        sample(den, x, schedule, "lcm", 60)
    sample(den, x, schedule, "lcm", 60, original_inference_steps=100)
    with pytest.raises(ScheduleError, match="original_inference_steps"):
        sample(den, x, schedule, "tcd", 4, original_inference_steps="50")
    for bad in (-0.1, 1.5, "0.3", None):
        with pytest.raises(SamplerError, match="gamma"):
            sample(den, x, schedule, "tcd", 4, gamma=bad)
    with pytest.raises(SamplerError, match="timestep_scaling"):
        sample(den, x, schedule, "lcm", 4, timestep_scaling=0)
    with pytest.raises(SamplerError, match="no option"):
        sample(den, x, schedule, "lcm", 4, eta=0.3)
    with pytest.raises(SamplerError, match="noise schedule"):
        sample_lcm(den, x, schedule.sigmas_for(4, rule=LCM_RULE))


def test_seeded_and_karras():
    schedule = DiscreteSchedule()
    den = Denoiser(make_model(schedule), schedule)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("lcm", "tcd", "LCM Karras", "TCD Exponential"):
        a, b, c = (sample(den, noise, schedule, name, 4, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
        assert torch.equal(a, b) and (a - c).abs().max() > 1e-2, name
    # TCD at gamma 0 draws nothing
    a, b = (sample(den, noise, schedule, "tcd", 4, gamma=0.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- whole pipelines


PROMPT = "a red circle above a blue square"
SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from opensd.checkpoints.diffusers_folder import save_diffusers

    model, tok = tiny_clip_bundle(seed=3)
    path = tmp_path_factory.mktemp("model") / "diffusers"
    save_diffusers(model, tok, path)
    return path


@pytest.fixture(scope="module")
def reference(folders):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folders, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def _sampler_generator(seed):
    """The generator opensd's pipeline draws its samplers' noise from (seed + 0x5EED)."""
    return torch.Generator().manual_seed((seed + 0x5EED) % SEED_RANGE)


def _scheduler(name, config, seed):
    """diffusers' scheduler whose steps draw from opensd's samplers' stream (seed + 0x5EED),
    while the pipeline's own draws (posterior sample, start noise) take the call's generator.
    ``step`` keeps its signature: the pipeline passes ``eta`` only to a step that names it."""
    base = REFERENCE[name]
    stream = torch.Generator().manual_seed((seed + 0x5EED) % SEED_RANGE)

    def step(self, *args, generator=None, **kw):
        return base.step(self, *args, generator=stream, **kw)

    step.__signature__ = inspect.signature(base.step)
    return type(f"StepNoise{base.__name__}", (base,), {"step": step}).from_config(config)


@pytest.mark.parametrize(
    "name, cfg_scale, steps, gamma", [("lcm", 1.0, 4, None), ("lcm", 1.5, 4, None), ("tcd", 1.0, 4, 0.3), ("tcd", 2.0, 2, 0.0)]
)
def test_txt2img_matches_diffusers(folders, reference, name, cfg_scale, steps, gamma):
    lat = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1))
    extra = {} if gamma is None else {"eta": gamma}
    original = reference.scheduler
    reference.scheduler = _scheduler(name, original.config, 7)
    try:
        ref = reference(
            [PROMPT, PROMPT], num_inference_steps=steps, guidance_scale=cfg_scale, height=SIZE, width=SIZE,
            latents=lat.clone(), output_type="np", **extra,
        ).images
    finally:
        reference.scheduler = original
    opts = {} if gamma is None else {"gamma": gamma}
    mine = opensd.load(folders).txt2img(
        PROMPT, steps=steps, sampler=name, cfg_scale=cfg_scale, width=SIZE, height=SIZE, batch_size=2, seed=7,
        latents=lat, **opts,
    )
    diff = np.abs(_np(mine) - ref).max()
    assert diff <= 1e-3 + 0.5 / 255, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_img2img_matches_diffusers(folders, reference, name):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionImg2ImgPipeline(**reference.components)
    pipe.scheduler = _scheduler(name, reference.scheduler.config, 42)
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    eta = {"eta": 0.3} if name == "tcd" else {}  # diffusers' pipelines pass eta = 0 unless told: TCD's gamma
    ref = pipe(
        PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(42), output_type="np", **eta,
    ).images
    ours = opensd.load(folders).img2img(init, PROMPT, strength=0.6, steps=5, sampler=name, cfg_scale=1.0, seed=42)
    diff = np.abs(_np(ours) - ref).max()
    assert diff <= 1e-3 + 0.5 / 255, f"{name} img2img: max abs diff {diff}"


def test_request_validation_names_the_grid():
    pipe = StableDiffusionPipeline(tiny_loaded())
    with pytest.raises(RequestError, match="original_inference_steps=50"):
        pipe.txt2img("a red circle", steps=51, sampler="lcm", width=SIZE, height=SIZE)
    with pytest.raises(RequestError, match="no option"):
        pipe.txt2img("a red circle", steps=4, sampler="tcd", eta=0.3, width=SIZE, height=SIZE)
    with pytest.raises(RequestError, match="original_inference_steps must be"):
        pipe.txt2img("a red circle", steps=4, sampler="lcm", original_inference_steps=0, width=SIZE, height=SIZE)
    assert len(pipe.txt2img("a red circle", steps=51, sampler="lcm", original_inference_steps=100, width=SIZE, height=SIZE, seed=1)) == 1


# ----------------------------------------------------------------------------- the CLI and the server


def test_cli_and_server_take_lcm_and_tcd(tmp_path):
    from fastapi.testclient import TestClient
    from helpers import one_thread_direct_loopback, tiny_word_bundle
    from typer.testing import CliRunner

    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.cli.main import app
    from opensd.pipelines.infotext import parse_infotext, read_png_parameters
    from opensd.serving import create_app

    folder = save_opensd(*tiny_word_bundle(), tmp_path / "tiny")
    for name, label in (("lcm", "LCM"), ("TCD", "TCD")):
        res = CliRunner().invoke(app, ["generate", "a red circle", "-m", str(folder), "--steps", "4", "--sampler", name,
                                       "--cfg-scale", "1", "--seed", "3", "-o", str(tmp_path / f"{name}.png"), "-q"])
        assert res.exit_code == 0, res.output
        assert parse_infotext(read_png_parameters(tmp_path / f"{name}.png"))["Sampler"] == label
    res = CliRunner().invoke(app, ["generate", "a red circle", "-m", str(folder), "--steps", "60", "--sampler", "lcm", "-q",
                                   "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "original_inference_steps=50" in res.output
    with one_thread_direct_loopback(), TestClient(create_app(opensd.load(folder))) as client:
        by_name = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
        assert by_name["LCM"]["aliases"] == ["lcm", "k_lcm"] and by_name["TCD"]["options"]["gamma"] == "0.3"
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "sampler_name": "LCM", "steps": 4, "cfg_scale": 1})
        assert r.status_code == 200, r.text
        assert "Sampler: LCM" in r.json()["info"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "sampler_name": "TCD", "scheduler": "Karras", "steps": 4})
        assert r.status_code == 200, r.text
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "sampler_name": "LCM", "steps": 60})
        assert r.status_code == 422 and "original_inference_steps=50" in r.text
