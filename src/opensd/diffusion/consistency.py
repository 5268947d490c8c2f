"""Few-step samplers for consistency-distilled models: LCM and TCD.

Both have the samplers' one signature (:mod:`opensd.diffusion.samplers`) and one more
keyword, ``schedule``: the model's :class:`~opensd.diffusion.schedules.DiscreteSchedule`,
which the registry passes (:func:`opensd.diffusion.registry.sample`), because both
formulas are written on the training timesteps, not on sigmas alone. Their timestep
grid (``LCM_RULE`` / ``TCD_RULE``: ``steps`` of the ``original_inference_steps`` = 50
timesteps the model was distilled on) is the registry's too; here the sigmas are taken
as given, so both also run on Karras or exponential sigmas.

* **LCM**, multistep consistency sampling (Luo et al. 2023, "Latent Consistency
  Models", alg. 1; Song et al. 2023, "Consistency Models", alg. 1): at each level the
  consistency function ``f(x, t) = c_skip(t) x_vp + c_out(t) x0(x, t)`` (the boundary
  condition of Song et al. sec. 3 with LCM's ``c_skip = s_d^2 / ((10 t)^2 + s_d^2)``,
  ``c_out = 10 t / sqrt((10 t)^2 + s_d^2)``, ``s_d = 0.5``) is the sample, then fresh
  noise takes it to the next level: ``x = f + sigma_next z``; the last step returns
  ``f``. diffusers' LCMScheduler.
* **TCD**, strategic stochastic sampling (Zheng et al. 2024, "Trajectory Consistency
  Distillation", sec. 4.3, eq. 15): from ``t`` the model's x0 and eps jump back along
  the trajectory to ``s = floor((1 - gamma) t_next)``, ``x_s = x0 + sigma_s eps``, and
  forward noise brings ``x_s`` up to ``t_next``: ``x = x_s + sqrt(sigma_next^2 -
  sigma_s^2) z``. ``gamma = 0`` is DDIM (deterministic); ``gamma = 1`` jumps to x0 and
  re-noises, as LCM. diffusers' TCDScheduler (its ``eta``). TCD's grid ends at timestep
  0 (``sigma_min``, not 0): the registry's ``to_vp`` gives the VP latent there.

Both draw their noise as every sampler does (``_randn``: float32 on the generator's
device), one draw per step except the last, in the order diffusers draws it, so a
shared generator gives diffusers' images.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from opensd.diffusion.sampler_base import Callback, DenoiserFn, SamplerError, _denoise, _prepare, _randn, _report
from opensd.diffusion.schedules import DiscreteSchedule

SIGMA_DATA = 0.5  # the data std of LCM's boundary condition (Song et al. 2023)


def _check_schedule(schedule: Any, name: str) -> DiscreteSchedule:
    if not isinstance(schedule, DiscreteSchedule):
        raise SamplerError(
            f"the {name} sampler needs the model's noise schedule (schedule=DiscreteSchedule), got {type(schedule).__name__}"
        )
    return schedule


def _timestep(schedule: DiscreteSchedule, sigma: float) -> float:
    """The training timestep of ``sigma``: an integer when sigma is a training level (up to
    float rounding, as on the LCM/TCD grids), else the continuous one."""
    t = float(schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float32)))
    return float(round(t)) if abs(t - round(t)) < 1e-3 else t


def boundary_scalings(t: Any, timestep_scaling: float = 10.0) -> tuple[Any, Any]:
    """``(c_skip, c_out)`` of LCM's consistency function at timestep ``t`` (a float, or a
    tensor of them: what ``opensd train lcm`` distils with) (diffusers'
    ``get_scalings_for_boundary_condition_discrete``): ``f = x`` at t = 0, ``f`` = the
    model's x0 once ``timestep_scaling * t >> 0.5``."""
    scaled = t * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def sample_lcm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    schedule: DiscreteSchedule | None = None,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, alg. 1; diffusers LCMScheduler).

    Per step: ``f = c_skip x / sqrt(1 + sigma^2) + c_out D(x, sigma)`` (the VP latent is
    ``x / sqrt(1 + sigma^2)``), then ``x = f + sigma_next z`` (``f`` when ``sigma_next`` is 0).
    The callback's ``denoised`` is ``f``. ``timestep_scaling``: the boundary condition's
    scale (diffusers' default 10; larger is closer to ``f = x0``)."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    schedule = _check_schedule(schedule, "LCM")
    if isinstance(timestep_scaling, bool) or not isinstance(timestep_scaling, (int, float)) or not timestep_scaling > 0:
        raise SamplerError(f"timestep_scaling must be a number > 0, got {timestep_scaling!r}")
    if not math.isfinite(timestep_scaling):
        raise SamplerError(f"timestep_scaling must be finite, got {timestep_scaling!r}")
    for i in range(len(s) - 1):
        x0 = _denoise(denoiser, x, s[i], extra)
        c_skip, c_out = boundary_scalings(_timestep(schedule, s[i]), timestep_scaling)
        denoised = x0 * c_out + x * (c_skip / math.sqrt(1.0 + s[i] ** 2))
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == s[i]:
            continue  # a zero-length step
        x = denoised if s[i + 1] == 0 else denoised + _randn(x, generator) * s[i + 1]
    return x


def _tcd_sigma_s(schedule: DiscreteSchedule, sigma_next: float, gamma: float) -> float:
    """Sigma at TCD's ``s = floor((1 - gamma) t_next)`` (diffusers' float32 arithmetic on the
    integer timestep), never above ``sigma_next``."""
    t_next = _timestep(schedule, sigma_next)
    t = torch.tensor(int(t_next)) if t_next.is_integer() else torch.tensor(t_next, dtype=torch.float32)
    ts = int(torch.floor((1 - gamma) * t).clamp(0, schedule.num_train_timesteps - 1))
    return min(float(schedule.sigmas[ts]), sigma_next)


def sample_tcd(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    schedule: DiscreteSchedule | None = None,
    gamma: float = 0.3,
) -> torch.Tensor:
    """Trajectory consistency sampling, TCD's strategic stochastic sampling (Zheng et al.
    2024, sec. 4.3; diffusers TCDScheduler with ``eta = gamma``).

    Per step, with ``x0 = D(x, sigma)`` and ``eps = (x - x0) / sigma``: ``x_s = x0 + sigma_s eps``
    at ``s = floor((1 - gamma) t(sigma_next))``, then ``x = x_s + sqrt(sigma_next^2 -
    sigma_s^2) z`` (no noise when ``gamma`` is 0 or ``sigma_s = sigma_next``, as at the
    last step of TCD's grid). ``gamma`` in [0, 1]: the stochasticity (default 0.3, the
    paper's and diffusers')."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    schedule = _check_schedule(schedule, "TCD")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise SamplerError(f"gamma must be a number in [0, 1], got {gamma!r}")
    for i in range(len(s) - 1):
        x0 = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], x0)
        if s[i + 1] == s[i]:
            continue  # a zero-length step
        sigma_s = s[i + 1] if gamma == 0 else _tcd_sigma_s(schedule, s[i + 1], gamma)
        eps = (x - x0) / s[i]
        x = x0 + eps * sigma_s
        if sigma_s < s[i + 1]:
            x = x + _randn(x, generator) * math.sqrt(s[i + 1] ** 2 - sigma_s**2)
    return x
