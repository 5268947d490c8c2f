"""Samplers, denoisers, guidance and the registry.

Parity: each deterministic sampler against the diffusers scheduler it imitates, run
as a pipeline runs it (``scale_model_input``, model, ``step``), from the same initial
latent, with a fixed smooth fake network; final latents (std ~1) agree to 1e-4.
Statistics: on data ~ N(mu, s^2) with the exact denoiser every sampler lands on
N(mu, s^2).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import types

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    UniPCMultistepScheduler,
)

from opensd.diffusion import (
    ClassifierFreeGuidance,
    Denoiser,
    DenoiserError,
    DiscreteSchedule,
    GuidanceError,
    Interrupted,
    NoiseScheduleConfig,
    Prediction,
    SamplerError,
    ScheduleError,
    SigmaSpacing,
    UnknownSamplerError,
    list_samplers,
    resolve_sampler,
    sample,
    to_vp,
)
from opensd.diffusion import samplers as S
from opensd.diffusion.schedules import initial_noise_scale

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = 1e-4


def _diffusers_lms():
    """diffusers' LMSDiscreteScheduler. Without scipy diffusers exports a stub, so load
    the real module and give it a Gauss-Legendre ``quad``: the LMS integrand is a cubic,
    which 8-point Gauss-Legendre integrates exactly (as scipy's quad does)."""
    try:
        import scipy  # noqa: F401
        from diffusers import LMSDiscreteScheduler

        return LMSDiscreteScheduler
    except ImportError:
        pass
    spec = importlib.util.find_spec("diffusers.schedulers.scheduling_lms_discrete")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def quad(f, a, b, **_):
        xs, ws = np.polynomial.legendre.leggauss(8)
        mid, half = (a + b) / 2, (b - a) / 2
        return float(sum(w * f(mid + half * x) for x, w in zip(xs, ws, strict=True)) * half), 0.0

    mod.integrate = types.SimpleNamespace(quad=quad)
    return mod.LMSDiscreteScheduler


LMSDiscreteScheduler = _diffusers_lms()


# ----------------------------------------------------------------------------- fake network


def make_model(schedule: DiscreteSchedule, v: bool = False):
    """A smooth deterministic "network" ``f(x_in, t)``: close to the ideal eps of unit
    Gaussian data plus nonlinear terms that depend on t, slowly and quickly (so a
    timestep off by a fraction, e.g. unrounded, changes the result well beyond TOL)."""
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2
    ac = schedule.alphas_cumprod
    T = len(ac)

    def f(x_in: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_in.shape[0])
        low = t.floor().long().clamp(0, T - 2)
        w = t - low
        a = (ac[low] * (1 - w) + ac[low + 1] * w).view(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", W, x_in)
        tt = t.view(-1, 1, 1, 1)
        # slow and fast (period ~30 timesteps, like a U-Net's timestep embedding) t-dependence
        nonlinear = 0.3 * torch.tanh(mixed * (0.5 + tt / 1000)) + 0.1 * torch.sin(tt / 5) * torch.tanh(x_in)
        if v:
            return nonlinear - 0.2 * (1 - a).sqrt() * x_in
        return (1 - a).sqrt() * x_in + nonlinear

    return f


def run_diffusers(
    cls, cfg: NoiseScheduleConfig, steps, model, init, *, strength=1.0, noise=None, generator=None, step_kw=None,
    **flags,
):
    """The denoising loop of StableDiffusion(Img2Img)Pipeline with scheduler ``cls``."""
    sched = cls.from_config({**cfg.to_diffusers(), **flags})
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength < 1.0:  # StableDiffusionImg2ImgPipeline.get_timesteps + add_noise
        t_start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(init, noise, timesteps[:1])
    else:
        x = init * sched.init_noise_sigma
    kw = dict(step_kw or {})
    if generator is not None:
        kw["generator"] = generator
    for t in timesteps:
        out = model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **kw).prev_sample
    return x, sched


# which diffusers scheduler each sampler imitates; "vp": its latents are VP (init_noise_sigma 1)
REFERENCE = {
    "ddim": (DDIMScheduler, True),
    "euler": (EulerDiscreteScheduler, False),
    "heun": (HeunDiscreteScheduler, False),
    "dpm2": (KDPM2DiscreteScheduler, False),
    "dpmpp_2m": (DPMSolverMultistepScheduler, True),
    "lms": (LMSDiscreteScheduler, False),
    "unipc": (UniPCMultistepScheduler, True),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, False),
    "ddpm": (DDPMScheduler, True),
}


def check_parity(name, steps, *, prediction=Prediction.EPS, karras=False, generator_seed=None, options=None):
    cfg = NoiseScheduleConfig(prediction=prediction)
    schedule = DiscreteSchedule(cfg)
    model = make_model(schedule, v=prediction is Prediction.V)
    cls, vp = REFERENCE[name]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    gen = (lambda: torch.Generator().manual_seed(generator_seed)) if generator_seed is not None else (lambda: None)
    flags = {"use_karras_sigmas": True} if karras else {}
    ref, sched = run_diffusers(cls, cfg, steps, model, noise, generator=gen(), step_kw=options, **flags)
    spec, spacing = resolve_sampler(name, karras=karras or None)
    sigma0 = schedule.sigmas_for(steps, spacing, rule=spec.rule)[0].item()
    # the same start latent: diffusers' VP latent n is n * sqrt(1 + sigma0^2) in k-diffusion space
    x_start = noise * math.sqrt(1 + sigma0**2) if vp else noise * sched.init_noise_sigma
    den = Denoiser(model, schedule)
    ours = sample(den, x_start / initial_noise_scale(sigma0), schedule, name, steps, karras=karras, generator=gen(), **(options or {}))
    assert 0.8 < ref.std().item() < 1.5
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"{name} {steps} steps: max abs diff {err:.2e}"


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpm2", "dpmpp_2m", "lms", "unipc"])
def test_parity_with_diffusers(name, steps):
    check_parity(name, steps)


@pytest.mark.parametrize(
    "name, steps", [("euler", 10), ("euler", 20), ("dpmpp_2m", 10), ("dpmpp_2m", 20), ("ddim", 10), ("heun", 10), ("unipc", 10)]
)
def test_parity_v_prediction(name, steps):
    check_parity(name, steps, prediction=Prediction.V)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun", "lms", "unipc"])
def test_parity_karras(name, steps):
    check_parity(name, steps, karras=True)


def test_parity_karras_v_prediction():
    check_parity("dpmpp_2m", 15, prediction=Prediction.V, karras=True)


@pytest.mark.parametrize(
    "name, options", [("euler_ancestral", None), ("ddpm", None), ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.5})]
)
def test_stochastic_parity_with_shared_generator(name, options):
    # same generator -> same noise draws in the same order, so the runs match exactly
    check_parity(name, 10, generator_seed=5, options=options)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m", "heun"])
def test_img2img_parity(name, steps):
    cfg = NoiseScheduleConfig()
    schedule = DiscreteSchedule(cfg)
    model = make_model(schedule)
    init = 0.8 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref, _ = run_diffusers(REFERENCE[name][0], cfg, steps, model, init, strength=0.6, noise=noise)
    ours = sample(Denoiser(model, schedule), noise, schedule, name, steps, strength=0.6, init_latent=init)
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"{name} img2img: max abs diff {err:.2e}"


def test_ddim_ends_above_zero_and_to_vp():
    schedule = DiscreteSchedule()
    spec, spacing = resolve_sampler("DDIM")
    sigmas = schedule.sigmas_for(10, spacing, rule=spec.rule)
    assert sigmas[-1].item() == pytest.approx(schedule.sigma_min)
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(to_vp(x, sigmas[-1]), x * schedule.alphas_cumprod[0].sqrt())


# ----------------------------------------------------------------------------- statistics


MU, STD = 0.5, 0.6
N_SAMPLES = 4096 * 4


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for x0 ~ N(MU, STD^2) per element and x = x0 + sigma eps."""
    s2 = (sigma**2).view(-1, *([1] * (x.ndim - 1)))
    return (STD**2 * x + s2 * MU) / (STD**2 + s2)


def _fn(spec, schedule=None):
    """``spec.fn``, given the noise schedule when it needs one (the consistency samplers)."""
    if not spec.needs_schedule:
        return spec.fn
    return functools.partial(spec.fn, schedule=schedule if schedule is not None else DiscreteSchedule())


def consistency_function(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact consistency function of the same data: the probability-flow ODE's end point
    ``MU + (x - MU) STD / sqrt(STD^2 + sigma^2)``, what an LCM's network gives (Song et al. 2023);
    LCM's sampler reaches the data with it, not with the posterior mean (which it would shrink)."""
    s2 = (sigma**2).view(-1, *([1] * (x.ndim - 1)))
    return MU + (x - MU) * STD / (STD**2 + s2).sqrt()


# Discretization error of the std at 30 Karras steps (O(1/steps) for first-order
# samplers; DDPM-style ancestral steps also drop Var[x0 | x_t] each step). TCD runs at
# gamma = 0 here, where it is DDIM (tests/test_consistency.py checks gamma > 0).
DISCRETIZATION = {"ddpm": 0.12, "euler_ancestral": 0.12, "ddim": 0.06, "euler": 0.06, "tcd": 0.06}
DENOISER = {"lcm": consistency_function}
OPTIONS = {"tcd": {"gamma": 0.0}}


@pytest.mark.parametrize("spec", list_samplers(), ids=lambda s: s.id)
def test_samplers_reach_gaussian_data_distribution(spec):
    schedule = DiscreteSchedule()
    sigmas = schedule.sigmas_for(30, SigmaSpacing.KARRAS, rule=spec.rule)
    g = torch.Generator().manual_seed(0)
    # start from the exact marginal N(MU, STD^2 + sigma0^2)
    x = MU + math.sqrt(STD**2 + sigmas[0].item() ** 2) * torch.randn(4096, 4, generator=g)
    out = _fn(spec, schedule)(DENOISER.get(spec.id, gaussian_denoiser), x, sigmas, generator=g, **OPTIONS.get(spec.id, {}))
    target_std = math.sqrt(STD**2 + sigmas[-1].item() ** 2)  # DDIM stops at sigma_min
    se_mean = STD / math.sqrt(N_SAMPLES)  # standard error of the sample mean
    se_std = STD / math.sqrt(2 * N_SAMPLES)  # standard error of the sample std (normal data)
    assert abs(out.mean().item() - MU) < 5 * se_mean
    tol = 5 * se_std + DISCRETIZATION.get(spec.id, 0.02) * target_std
    assert abs(out.std().item() - target_std) < tol, f"{spec.id}: std {out.std().item():.4f} vs {target_std:.4f}"


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_first_order_error_shrinks_with_steps(name):
    spec, _ = resolve_sampler(name)
    schedule = DiscreteSchedule()
    errs = []
    for steps in (30, 120):
        sigmas = schedule.sigmas_for(steps, SigmaSpacing.KARRAS, rule=spec.rule)
        z = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))
        x = MU + math.sqrt(STD**2 + sigmas[0].item() ** 2) * z
        out = spec.fn(gaussian_denoiser, x, sigmas)
        # the exact flow scales x - MU by sqrt(STD^2 + sigma_end^2) / sqrt(STD^2 + sigma_start^2)
        s0, s1 = sigmas[0].item(), sigmas[-1].item()
        exact = x.std().item() * math.sqrt(STD**2 + s1**2) / math.sqrt(STD**2 + s0**2)
        errs.append(abs(out.std().item() / exact - 1))
    assert errs[1] < errs[0] / 3  # first order: 4x the steps, ~1/4 the error


@pytest.mark.parametrize("spec", [s for s in list_samplers() if s.stochastic], ids=lambda s: s.id)
def test_stochastic_samplers_are_seeded(spec):
    schedule = DiscreteSchedule()
    model = make_model(schedule)
    den = Denoiser(model, schedule)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return sample(den, noise, schedule, spec.id, 6, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("spec", [s for s in list_samplers() if not s.stochastic], ids=lambda s: s.id)
def test_deterministic_samplers_ignore_generator(spec):
    schedule = DiscreteSchedule()
    den = Denoiser(make_model(schedule), schedule)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample(den, noise, schedule, spec.id, 5, generator=torch.Generator().manual_seed(1))
    b = sample(den, noise, schedule, spec.id, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- callback / errors


def test_callback_sees_every_step_and_can_interrupt():
    schedule = DiscreteSchedule()
    den = Denoiser(make_model(schedule), schedule)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    sample(den, noise, schedule, "heun", 5, callback=lambda info: seen.append(info))
    assert [d["i"] for d in seen] == list(range(5))
    assert all(set(d) == {"i", "x", "sigma", "denoised"} and d["denoised"].shape == noise.shape for d in seen)
    assert seen[0]["sigma"] > seen[-1]["sigma"] > 0

    def stop_raise(info):
        if info["i"] == 2:
            raise Interrupted("user cancelled")

    with pytest.raises(Interrupted) as e:
        sample(den, noise, schedule, "dpmpp_2m", 5, callback=stop_raise)
    assert e.value.step == 2 and e.value.x.shape == noise.shape
    with pytest.raises(Interrupted) as e:
        sample(den, noise, schedule, "unipc", 5, callback=lambda info: Interrupted if info["i"] == 3 else None)
    assert e.value.step == 3


def test_bad_inputs_raise_value_errors():
    schedule = DiscreteSchedule()
    den = Denoiser(make_model(schedule), schedule)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(SamplerError, match="non-increasing"):
        S.sample_euler(den, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(SamplerError, match="> 0"):
        S.sample_euler(den, x, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(SamplerError, match="1-D"):
        S.sample_euler(den, x, torch.ones(2, 2))
    with pytest.raises(SamplerError, match="no option"):
        sample(den, x, schedule, "euler", 5, eta=0.3)
    with pytest.raises(SamplerError, match="eta"):
        sample(den, x, schedule, "ddim", 5, eta=-1.0)
    with pytest.raises(SamplerError, match="init_latent"):
        sample(den, x, schedule, "euler", 5, strength=0.5)
    with pytest.raises(DenoiserError, match="sigma"):
        den(torch.randn(2, 4, 4, 4), torch.ones(3))
    assert issubclass(UnknownSamplerError, ValueError)


# ----------------------------------------------------------------------------- denoiser


def test_denoiser_parameterizations():
    torch.manual_seed(0)
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.5, 3.0])
    out = torch.randn(2, 4, 3, 3)
    calls = []

    def fn(x_in, t):
        calls.append((x_in, t))
        return out

    for prediction in Prediction:
        schedule = DiscreteSchedule(NoiseScheduleConfig(prediction=prediction))
        den = Denoiser(fn, schedule)
        x0 = den(x, sigma)
        s = sigma.view(-1, 1, 1, 1)
        torch.testing.assert_close(calls[-1][0], x / (s**2 + 1).sqrt())
        torch.testing.assert_close(calls[-1][1], schedule.sigma_to_t(sigma))
        if prediction is Prediction.EPS:
            torch.testing.assert_close(x0, x - s * out)
        else:  # x0 = sqrt(a) x_vp - sqrt(1-a) v with x_vp = x / sqrt(1 + sigma^2)
            a = 1 / (1 + s**2)
            torch.testing.assert_close(x0, a.sqrt() * (x * a.sqrt()) - (1 - a).sqrt() * out)
        assert torch.equal(den.raw(x, sigma), out)
    # quantized timesteps are integers
    den = Denoiser(fn, DiscreteSchedule(), quantize_t=True)
    den(x, sigma)
    assert torch.equal(calls[-1][1], calls[-1][1].round())


# ----------------------------------------------------------------------------- guidance


def _counting(fn):
    calls = []

    def wrapped(x_in, t, **kw):
        calls.append(x_in.shape[0])
        return fn(x_in, t, **kw)

    return wrapped, calls


def _net(x_in, t, context):
    return torch.tanh(x_in * context.view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1) / 1000


def test_cfg_scale_one_is_the_conditional_output_in_one_forward():
    net, calls = _counting(_net)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([500.0, 500.0])
    cond, uncond = {"context": torch.tensor([0.5, 2.0])}, {"context": torch.tensor([0.0, 0.0])}
    out = ClassifierFreeGuidance(net, scale=1.0)(x, t, cond=cond, uncond=uncond)
    assert torch.equal(out, _net(x, t, **cond))
    assert calls == [2]


def test_cfg_batches_uncond_and_cond_and_rescales_like_diffusers():
    # the function StableDiffusionPipeline uses (a copy of it; this module imports faster)
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    net, calls = _counting(_net)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([300.0, 300.0])
    cond, uncond = {"context": torch.tensor([0.5, 2.0])}, {"context": torch.tensor([0.1, 0.1])}
    c, u = _net(x, t, **cond), _net(x, t, **uncond)
    guided = ClassifierFreeGuidance(net, scale=7.5)(x, t, cond=cond, uncond=uncond)
    assert calls == [4]  # one forward of the [uncond; cond] batch
    torch.testing.assert_close(guided, u + 7.5 * (c - u))
    for phi in (0.0, 0.7, 1.0):
        ours = ClassifierFreeGuidance(_net, scale=7.5, rescale=phi)(x, t, cond=cond, uncond=uncond)
        torch.testing.assert_close(ours, rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=phi))


def test_cfg_composes_with_denoiser_and_sampler():
    schedule = DiscreteSchedule()
    den = Denoiser(ClassifierFreeGuidance(_net, scale=5.0), schedule)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    extra = {"cond": {"context": torch.tensor([0.5, 2.0])}, "uncond": {"context": torch.tensor([0.0, 0.0])}}
    out = sample(den, noise, schedule, "DPM++ 2M Karras", 6, extra_args=extra)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(GuidanceError, match="uncond"):
        den(noise, torch.tensor(1.0), cond=extra["cond"])
    with pytest.raises(GuidanceError, match="same keys"):
        den(noise, torch.tensor(1.0), cond=extra["cond"], uncond={"other": torch.zeros(2)})
    with pytest.raises(GuidanceError, match="rescale"):
        ClassifierFreeGuidance(_net, rescale=2.0)


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "name, sampler_id, spacing",
    [
        ("DPM++ 2M", "dpmpp_2m", SigmaSpacing.DEFAULT),
        ("DPM++ 2M Karras", "dpmpp_2m", SigmaSpacing.KARRAS),
        ("dpm++ 2m  karras", "dpmpp_2m", SigmaSpacing.KARRAS),
        ("Euler a", "euler_ancestral", SigmaSpacing.DEFAULT),
        ("euler_a", "euler_ancestral", SigmaSpacing.DEFAULT),
        ("Euler", "euler", SigmaSpacing.DEFAULT),
        ("Heun", "heun", SigmaSpacing.DEFAULT),
        ("DPM2", "dpm2", SigmaSpacing.DEFAULT),
        ("DPM2 Karras", "dpm2", SigmaSpacing.KARRAS),
        ("DPM++ 2S a", "dpmpp_2s_ancestral", SigmaSpacing.DEFAULT),
        ("DPM++ 2S a Karras", "dpmpp_2s_ancestral", SigmaSpacing.KARRAS),
        ("DPM++ SDE Karras", "dpmpp_sde", SigmaSpacing.KARRAS),
        ("LMS", "lms", SigmaSpacing.DEFAULT),
        ("LMS Karras", "lms", SigmaSpacing.KARRAS),
        ("DDIM", "ddim", SigmaSpacing.DEFAULT),
        ("UniPC", "unipc", SigmaSpacing.DEFAULT),
        ("DDPM", "ddpm", SigmaSpacing.DEFAULT),
        ("Euler Exponential", "euler", SigmaSpacing.EXPONENTIAL),
        ("dpmpp_2m_karras", "dpmpp_2m", SigmaSpacing.KARRAS),
        ("k_dpmpp_2m", "dpmpp_2m", SigmaSpacing.DEFAULT),
    ],
)
def test_names_resolve(name, sampler_id, spacing):
    spec, sp = resolve_sampler(name)
    assert (spec.id, sp) == (sampler_id, spacing)


def test_resolve_karras_flag_and_unknown_names():
    assert resolve_sampler("Euler", karras=True)[1] is SigmaSpacing.KARRAS
    assert resolve_sampler("Euler", karras=False)[1] is SigmaSpacing.DEFAULT
    with pytest.raises(UnknownSamplerError, match="karras=False"):
        resolve_sampler("DPM++ 2M Karras", karras=False)
    with pytest.raises(UnknownSamplerError) as e:
        resolve_sampler("Euler b")
    assert isinstance(e.value, ValueError)
    for known in ("dpmpp_2m", "DPM++ 2M", "Euler a", "unipc", "DDIM"):
        assert known in str(e.value)


def test_registry_lists_every_sampler_once():
    ids = [s.id for s in list_samplers()]
    expected = {"ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpm2", "dpmpp_2m"}
    expected |= {"dpmpp_2s_ancestral", "dpmpp_sde", "lms", "unipc", "lcm", "tcd"}
    assert set(ids) == expected and len(ids) == len(expected)
    stochastic = {s.id for s in list_samplers() if s.stochastic}
    assert stochastic == {"ddpm", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "lcm", "tcd"}
    assert resolve_sampler("ddim")[0].options() == {"eta": 0.0}


@pytest.mark.parametrize("spec", list_samplers(), ids=lambda s: s.id)
def test_every_sampler_runs_with_karras_sigmas(spec):
    schedule = DiscreteSchedule()
    den = Denoiser(make_model(schedule), schedule)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(den, noise, schedule, spec.id, 8, karras=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert 0.3 < out.std().item() < 3.0


# ----------------------------------------------------------------------------- step counts near T, repeated levels


def _halve(x, sigma, **_):
    """A trivial denoiser (no network): x0 = x / 2."""
    return x * 0.5


@pytest.mark.parametrize("spec", list_samplers(), ids=lambda s: s.id)
def test_every_sampler_runs_999_and_1000_steps(spec):
    # diffusers' grids repeat a noise level there (a ZeroDivisionError in 2M/UniPC/LMS, NaN in SDE)
    schedule = DiscreteSchedule()
    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    lcm_grid = spec.rule.original_steps is not None  # its grid holds original_inference_steps (50) steps
    for steps in (999, 1000):
        for suffix in ("", " Karras", " Exponential"):
            if lcm_grid and not suffix:
                with pytest.raises(ScheduleError, match="original_inference_steps=50"):
                    sample(_halve, noise, schedule, spec.a1111_name, steps)
                out = sample(_halve, noise, schedule, spec.a1111_name, steps, original_inference_steps=1000,
                             generator=torch.Generator().manual_seed(0))
            else:
                out = sample(_halve, noise, schedule, spec.a1111_name + suffix, steps, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out).all(), (steps, suffix)
        grid = {"original_inference_steps": 1000} if lcm_grid else {}
        out = sample(_halve, noise, schedule, spec.id, steps, strength=0.5, init_latent=torch.zeros_like(noise),
                     generator=torch.Generator().manual_seed(0), **grid)
        assert torch.isfinite(out).all(), (steps, "strength 0.5")


@pytest.mark.parametrize("spec", list_samplers(), ids=lambda s: s.id)
def test_a_repeated_level_is_a_step_of_length_zero(spec):
    distinct = [14.6, 5.0, 2.0, 1.0, 0.5, 0.1, 0.0]
    repeated = [14.6, 14.6, 5.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.1, 0.1, 0.0]
    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a, b = (
        _fn(spec)(_halve, noise, torch.tensor(s), generator=torch.Generator().manual_seed(0)) for s in (distinct, repeated)
    )
    assert torch.isfinite(b).all()
    if spec.id != "unipc":  # UniPC evaluates its corrected x again at the repeated level, a different x0
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
