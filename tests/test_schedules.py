"""Noise schedules vs diffusers: betas, sigma<->t, Karras/exponential sigmas, timestep
grids of each scheduler family, img2img truncation, config round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from opensd.config import ConfigError, from_dict, to_dict
from opensd.diffusion import (
    DDIM_RULE,
    DPM_RULE,
    EULER_RULE,
    BetaSchedule,
    DiscreteSchedule,
    NoiseScheduleConfig,
    Prediction,
    ScheduleError,
    SigmaSpacing,
    TimestepGrid,
    TimestepSpacing,
    exponential_sigmas,
    karras_sigmas,
    strength_start,
)

# SD 1.5's scheduler_config.json, as published (PNDM)
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SPACINGS = [TimestepSpacing.LEADING, TimestepSpacing.TRAILING, TimestepSpacing.LINSPACE]
STEPS = [1, 7, 10, 20, 25, 50]


def _cfg(spacing: TimestepSpacing = TimestepSpacing.LEADING, **kw) -> NoiseScheduleConfig:
    offset = 1 if spacing is TimestepSpacing.LEADING else 0
    return NoiseScheduleConfig(timestep_spacing=spacing, steps_offset=offset, **kw)


# ----------------------------------------------------------------------------- betas


@pytest.mark.parametrize(
    "schedule, start, end",
    [
        (BetaSchedule.SCALED_LINEAR, 0.00085, 0.012),
        (BetaSchedule.LINEAR, 0.0001, 0.02),
        (BetaSchedule.COSINE, 0.0001, 0.02),
    ],
)
def test_betas_and_alphas_cumprod_equal_diffusers(schedule, start, end):
    cfg = NoiseScheduleConfig(beta_start=start, beta_end=end, beta_schedule=schedule)
    ours = DiscreteSchedule(cfg)
    ref = DDPMScheduler.from_config(cfg.to_diffusers())
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    expected_sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    assert torch.equal(ours.sigmas, expected_sigmas)


def test_sd15_sigma_range():
    s = DiscreteSchedule()
    assert s.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert s.sigma_max == pytest.approx(14.6146, abs=1e-4)


# ----------------------------------------------------------------------------- sigma <-> t


def test_sigma_to_t_equals_diffusers():
    s = DiscreteSchedule()
    ref = EulerDiscreteScheduler.from_config(s.config.to_diffusers())
    log_sigmas = np.log(s.sigmas.numpy())
    g = torch.Generator().manual_seed(0)
    sigmas = torch.cat(
        [
            torch.exp(torch.empty(200).uniform_(-5, 3.2, generator=g)),  # in and beyond [sigma_min, sigma_max]
            s.sigmas[[0, 1, 500, 998, 999]],
        ]
    )
    expected = np.array([ref._sigma_to_t(np.array(v), log_sigmas) for v in sigmas.numpy()])
    ours = s.sigma_to_t(sigmas)
    assert ours.dtype == torch.float32 and ours.shape == sigmas.shape
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-4)
    # training sigmas map to their own timestep; quantize rounds
    assert torch.equal(s.sigma_to_t(s.sigmas[[3, 17, 999]]), torch.tensor([3.0, 17.0, 999.0]))
    two = torch.tensor([1.0, 2.0])
    assert torch.equal(s.sigma_to_t(two, quantize=True), s.sigma_to_t(two).round())


def test_t_to_sigma_inverts_sigma_to_t():
    s = DiscreteSchedule()
    t = torch.linspace(0, 999, 97)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    torch.testing.assert_close(s.t_to_sigma(torch.tensor([0.0, 999.0])), s.sigmas[[0, 999]])
    with pytest.raises(ScheduleError):
        s.t_to_sigma(torch.tensor([1000.0]))


# ----------------------------------------------------------------------------- karras / exponential


@pytest.mark.parametrize("n", [5, 10, 30])
def test_karras_and_exponential_formulas_equal_diffusers(n):
    ref = EulerDiscreteScheduler.from_config(NoiseScheduleConfig().to_diffusers())
    in_sigmas = torch.tensor([14.6146, 3.0, 0.0292], dtype=torch.float64)
    expected = ref._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=n)
    np.testing.assert_allclose(karras_sigmas(0.0292, 14.6146, n), expected, rtol=1e-12)
    expected = ref._convert_to_exponential(in_sigmas=in_sigmas, num_inference_steps=n)
    np.testing.assert_allclose(exponential_sigmas(0.0292, 14.6146, n), expected, rtol=1e-12)


# ----------------------------------------------------------------------------- timestep grids


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_timestep_grids_equal_diffusers(spacing, steps):
    cfg = _cfg(spacing)
    s = DiscreteSchedule(cfg)
    for grid, cls in [
        (TimestepGrid.EULER, EulerDiscreteScheduler),
        (TimestepGrid.DDIM, DDIMScheduler),
        (TimestepGrid.DPM, DPMSolverMultistepScheduler),
        (TimestepGrid.DPM, UniPCMultistepScheduler),
    ]:
        ref = cls.from_config(cfg.to_diffusers())
        ref.set_timesteps(steps)
        expected = ref.timesteps.double().numpy()
        np.testing.assert_array_equal(s.timesteps_for(steps, grid), expected, err_msg=cls.__name__)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [7, 10, 20])
# SGM Uniform has no diffusers flag (A1111's; tests/test_sdxl_pipeline.py checks it)
@pytest.mark.parametrize("sigma_spacing", [sp for sp in SigmaSpacing if sp is not SigmaSpacing.SGM_UNIFORM])
def test_euler_family_sigmas_equal_diffusers(spacing, steps, sigma_spacing):
    cfg = _cfg(spacing)
    flags = {
        SigmaSpacing.DEFAULT: {},
        SigmaSpacing.KARRAS: {"use_karras_sigmas": True},
        SigmaSpacing.EXPONENTIAL: {"use_exponential_sigmas": True},
    }[sigma_spacing]
    ref = EulerDiscreteScheduler.from_config({**cfg.to_diffusers(), **flags})
    ref.set_timesteps(steps)
    ours = DiscreteSchedule(cfg).sigmas_for(steps, sigma_spacing, rule=EULER_RULE)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.sigmas, rtol=1e-6, atol=0)
    # Heun visits the same sigmas (each inner one twice)
    heun = HeunDiscreteScheduler.from_config({**cfg.to_diffusers(), **flags})
    heun.set_timesteps(steps)
    torch.testing.assert_close(ours, torch.unique_consecutive(heun.sigmas), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [7, 10, 20])
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_family_sigmas_equal_diffusers(spacing, steps, karras):
    cfg = _cfg(spacing)
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        ref = cls.from_config({**cfg.to_diffusers(), "use_karras_sigmas": karras})
        ref.set_timesteps(steps)
        spacing = SigmaSpacing.KARRAS if karras else SigmaSpacing.DEFAULT
        ours = DiscreteSchedule(cfg).sigmas_for(steps, spacing, rule=DPM_RULE)
        torch.testing.assert_close(ours, ref.sigmas, rtol=1e-6, atol=0)
    assert DPM_RULE.quantize_t(SigmaSpacing.KARRAS) and not EULER_RULE.quantize_t(SigmaSpacing.KARRAS)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_sigmas_equal_diffusers_alphas(set_alpha_to_one, steps):
    cfg = NoiseScheduleConfig(set_alpha_to_one=set_alpha_to_one)
    ref = DDIMScheduler.from_config(cfg.to_diffusers())
    ref.set_timesteps(steps)
    alphas = torch.cat([ref.alphas_cumprod[ref.timesteps], ref.final_alpha_cumprod.reshape(1)])
    expected = ((1 - alphas) / alphas) ** 0.5
    ours = DiscreteSchedule(cfg).sigmas_for(steps, rule=DDIM_RULE)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert (ours[-1] == 0) == set_alpha_to_one


def test_bad_step_counts_raise():
    s = DiscreteSchedule()
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(ScheduleError, match="steps"):
            s.sigmas_for(bad)
    with pytest.raises(ScheduleError, match="SigmaSpacing"):
        s.sigmas_for(10, "karras")


# ----------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("steps", [10, 20, 25, 50])
@pytest.mark.parametrize("strength", [0.3, 0.6, 0.75, 1.0])
def test_strength_truncation_is_diffusers_get_timesteps(steps, strength):
    # StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    assert strength_start(steps, strength) == t_start
    s = DiscreteSchedule()
    full = s.sigmas_for(steps, rule=EULER_RULE)
    part = s.sigmas_for(steps, rule=EULER_RULE, strength=strength)
    assert len(part) == init_timestep + 1
    assert torch.equal(part, full[t_start:])


def test_strength_errors():
    s = DiscreteSchedule()
    with pytest.raises(ScheduleError, match="no step"):
        s.sigmas_for(10, strength=0.05)
    with pytest.raises(ScheduleError, match="strength"):
        s.sigmas_for(10, strength=1.5)


# ----------------------------------------------------------------------------- config


def test_from_diffusers_reads_sd15_json():
    cfg = NoiseScheduleConfig.from_diffusers(SD15_SCHEDULER_JSON)
    assert cfg == NoiseScheduleConfig()
    sd2 = {**SD15_SCHEDULER_JSON, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    v = NoiseScheduleConfig.from_diffusers(sd2)
    assert v.prediction is Prediction.V and v.timestep_spacing is TimestepSpacing.TRAILING


def test_to_diffusers_round_trip():
    cfg = NoiseScheduleConfig(prediction=Prediction.V, timestep_spacing=TimestepSpacing.TRAILING, steps_offset=0)
    assert NoiseScheduleConfig.from_diffusers(cfg.to_diffusers()) == cfg
    ref = DDIMScheduler.from_config(cfg.to_diffusers())
    assert ref.config.prediction_type == "v_prediction" and ref.config.timestep_spacing == "trailing"
    assert not ref.config.clip_sample


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("beta_schedule", "sigmoid", "beta_schedule='sigmoid' is not supported; choose one of 'scaled_linear'"),
        ("prediction_type", "sample", "prediction_type='sample' is not supported"),
        ("timestep_spacing", "middle", "timestep_spacing"),
        ("trained_betas", [0.1, 0.2], "trained_betas"),
        ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr"),
        ("clip_sample", True, "clip_sample"),
        ("num_train_timesteps", "1000", "num_train_timesteps must be an integer"),
        ("beta_start", 0.5, "beta_start <= beta_end"),
    ],
)
def test_from_diffusers_rejects_unsupported_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        NoiseScheduleConfig.from_diffusers({**SD15_SCHEDULER_JSON, key: value})


def test_config_dict_round_trip_and_aliases():
    cfg = NoiseScheduleConfig(beta_schedule=BetaSchedule.COSINE, prediction=Prediction.V)
    d = to_dict(cfg)
    assert d["beta_schedule"] == "squaredcos_cap_v2" and d["prediction"] == "v_prediction"
    assert from_dict(NoiseScheduleConfig, d) == cfg
    assert from_dict(NoiseScheduleConfig, {"beta_schedule": "cosine", "prediction": "v"}) == cfg
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        NoiseScheduleConfig(num_train_timesteps=1)
    with pytest.raises(ConfigError, match="beta_schedule must be a BetaSchedule"):
        NoiseScheduleConfig(beta_schedule="linear")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- step counts near T


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_step_count_gives_distinct_timesteps_in_range(spacing):
    # diffusers' formulas break near steps = T: leading reaches timestep T (999 steps on the
    # DPM grid, 1000 on the others) or repeats steps_offset (1000 on the DPM grid), trailing
    # gets 999 timesteps for 998 steps down to -1, the DPM grid's linspace rounds two together
    s = DiscreteSchedule(_cfg(spacing))
    for steps in [*range(1, 30), *range(985, 1001)]:
        for grid in TimestepGrid:  # the LCM grid holds at most original_steps steps, so T of T
            ts = s.timesteps_for(steps, grid, original_steps=1000 if steps > 50 else 50)
            assert len(ts) == steps, (grid, steps)
            assert (np.diff(ts) < 0).all() and ts.min() >= 0 and ts.max() <= 999, (grid, steps)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sigma_spacing", list(SigmaSpacing))
@pytest.mark.parametrize("rule", [EULER_RULE, DDIM_RULE, DPM_RULE], ids=["euler", "ddim", "dpm"])
def test_sigmas_never_repeat_a_level(spacing, sigma_spacing, rule):
    s = DiscreteSchedule(_cfg(spacing))
    for steps in (2, 998, 999, 1000):
        for strength in (1.0, 0.5):
            sig = s.sigmas_for(steps, sigma_spacing, rule=rule, strength=strength)
            assert len(sig) == int(steps * strength) + 1
            # DDIM's last level is alphas_cumprod[0]'s, which its grid may reach already (a no-op step)
            body = sig[:-1] if rule is DDIM_RULE else sig
            assert (body[1:] < body[:-1]).all(), (steps, strength)


def test_leading_grid_at_t_steps_spreads_over_the_training_range():
    s = DiscreteSchedule()  # leading, steps_offset 1: diffusers asks for timestep 1000 and, on the DPM grid, 1000 times for timestep 1
    for grid in TimestepGrid:
        np.testing.assert_array_equal(s.timesteps_for(1000, grid, original_steps=1000), np.arange(999, -1, -1.0))
