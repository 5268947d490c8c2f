"""The DPM-Solver++ family (Lu et al. 2022): 2M multistep, 2S ancestral and SDE, in
``lambda = -log sigma``. The signature and contract are :mod:`opensd.diffusion.samplers`'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from opensd.diffusion.sampler_base import (
    Callback,
    DenoiserFn,
    SamplerError,
    _ancestral_step,
    _check_nonneg,
    _denoise,
    _prepare,
    _randn,
    _report,
)


def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in ``lambda = -log sigma``: first-order
    start and finish, then a second-order multistep correction from the previous x0.
    diffusers DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint)."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    old: torch.Tensor | None = None  # x0 of the last step of non-zero length
    h_last: float | None = None  # its step size (None before the first step between non-zero sigmas)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == s[i]:
            continue  # a zero-length step
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            if old is None or h_last is None:
                dd = denoised
            else:
                r = h_last / h
                dd = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * dd
            h_last = h
        old = denoised
    return x


def sample_dpmpp_2s_ancestral(
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
    """DPM-Solver++(2S) single-step to ``sigma_down`` (midpoint in lambda), plus ancestral
    noise ``sigma_up`` (k-diffusion ``sample_dpmpp_2s_ancestral``). 2 calls per step."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    _check_nonneg("eta", eta)
    _check_nonneg("s_noise", s_noise)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = denoised
        else:
            h = math.log(s[i] / down)
            s_mid = math.sqrt(s[i] * down)  # lambda midpoint
            x_2 = (s_mid / s[i]) * x - math.expm1(-h / 2) * denoised
            denoised_2 = _denoise(denoiser, x_2, s_mid, extra)
            x = (down / s[i]) * x - math.expm1(-h) * denoised_2
        if s[i + 1] > 0 and up > 0:
            x = x + _randn(x, generator) * (s_noise * up)
    return x


def sample_dpmpp_sde(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): a stochastic step to the
    lambda-point ``t + r h``, a network call there, then a stochastic full step with the
    mixed x0. The two noises of a step are increments of one Brownian motion in sigma
    (as k-diffusion's Brownian tree: the second contains the first), drawn exactly per
    step from two normals; values differ from torchsde's tree for the same seed."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    _check_nonneg("eta", eta)
    _check_nonneg("s_noise", s_noise)
    if not 0.0 < r <= 1.0:
        raise SamplerError(f"r must be in (0, 1], got {r}")
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        if s[i + 1] == s[i]:
            continue  # a zero-length step: no drift, a zero Brownian increment
        h = math.log(s[i] / s[i + 1])
        s_mid = s[i] * math.exp(-r * h)
        # Brownian increments over [s_mid, s_i] and [s_next, s_i], normalized
        z1, z2 = _randn(x, generator), _randn(x, generator)
        n1 = z1
        n2 = (math.sqrt(s[i] - s_mid) * z1 + math.sqrt(s_mid - s[i + 1]) * z2) / math.sqrt(s[i] - s[i + 1])
        down, up = _ancestral_step(s[i], s_mid, eta)
        x_2 = denoised + (down / s[i]) * (x - denoised) + n1 * (s_noise * up)
        denoised_2 = _denoise(denoiser, x_2, s_mid, extra)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = denoised_d + (down / s[i]) * (x - denoised_d) + n2 * (s_noise * up)
    return x
