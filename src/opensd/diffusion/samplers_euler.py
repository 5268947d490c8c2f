"""The Euler family: Euler, Euler ancestral, DDIM, DDPM (first order), Heun and DPM2 (second
order), in k-diffusion form (Karras et al. 2022; Song et al. 2021; Ho et al. 2020). The
signature and contract are :mod:`opensd.diffusion.samplers`'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from opensd.diffusion.sampler_base import (
    Callback,
    DenoiserFn,
    _ancestral_step,
    _check_nonneg,
    _denoise,
    _prepare,
    _randn,
    _report,
)

# ----------------------------------------------------------------------------- first order


def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``
    (Karras et al. 2022, alg. 2 without churn; diffusers EulerDiscreteScheduler)."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        d = (x - denoised) / s[i]
        x = x + d * (s[i + 1] - s[i])
    return x


def _sample_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None,
    callback: Callback | None,
    generator: torch.Generator | None,
    eta: float,
    s_noise: float,
) -> torch.Tensor:
    s, extra = _prepare(x, sigmas), extra_args or {}
    _check_nonneg("eta", eta)
    _check_nonneg("s_noise", s_noise)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        d = (x - denoised) / s[i]
        x = x + d * (down - s[i])
        if s[i + 1] > 0 and up > 0:
            x = x + _randn(x, generator) * (s_noise * up)
    return x


def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral: an Euler step to ``sigma_down`` plus fresh noise of std ``sigma_up``
    (diffusers EulerAncestralDiscreteScheduler at eta = 1)."""
    return _sample_ancestral(denoiser, x, sigmas, extra_args, callback, generator, eta, s_noise)


def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): in k-diffusion space its step is an Euler step
    (eta = 0) or an ancestral step with ``sigma_up = eta * sigma_t / sqrt(a_prev)`` (eta > 0).
    Run on ``DDIM_RULE`` sigmas it equals diffusers' DDIMScheduler; the result is at
    ``sigmas[-1]``, convert with ``to_vp``."""
    return _sample_ancestral(denoiser, x, sigmas, extra_args, callback, generator, eta, 1.0)


def sample_ddpm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, alg. 2 with the posterior variance
    ``beta~_t``): DDIM with eta = 1, as diffusers' DDPMScheduler (``fixed_small``)."""
    return _sample_ancestral(denoiser, x, sigmas, extra_args, callback, generator, 1.0, 1.0)


# ----------------------------------------------------------------------------- second order


def sample_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, alg. 1); Euler for the last step to sigma 0.
    2 network calls per step (1 for the last). diffusers HeunDiscreteScheduler."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _denoise(denoiser, x_2, s[i + 1], extra)) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm2(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 as in k-diffusion: the derivative at the log-midpoint sigma
    ``sqrt(sigma_i sigma_{i+1})`` moves the full step (Karras et al. 2022, sec. 3);
    Euler for the last step. diffusers KDPM2DiscreteScheduler."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        d = (x - denoised) / s[i]
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            s_mid = math.exp(0.5 * (math.log(s[i]) + math.log(s[i + 1])))
            x_2 = x + d * (s_mid - s[i])
            d_2 = (x_2 - _denoise(denoiser, x_2, s_mid, extra)) / s_mid
            x = x + d_2 * (s[i + 1] - s[i])
    return x
