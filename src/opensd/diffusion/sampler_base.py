"""What every sampler shares: the checks of its inputs, its noise, its network call and its
callback (the contract is :mod:`opensd.diffusion.samplers`'s docstring).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from opensd.diffusion.interruption import Interrupted, asks_to_stop
from opensd.diffusion.protocols import DenoiserFn
from opensd.diffusion.protocols import SamplerCallback as Callback
from opensd.errors import OpenSDError

__all__ = ["Callback", "DenoiserFn", "Interrupted", "SamplerError"]


class SamplerError(OpenSDError):
    """Bad input to a sampler (sigma list, latent, option value)."""


# ----------------------------------------------------------------------------- helpers


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> list[float]:
    """Check the latent and sigma list; return the sigmas as Python floats."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] < 1:
        raise SamplerError("x must be a tensor with a batch dimension (B, ...)")
    if not torch.is_floating_point(x):
        raise SamplerError(f"x must be a floating point tensor, got {x.dtype}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 1:
        raise SamplerError("sigmas must be a 1-D tensor with at least one entry")
    s = sigmas.detach().float().cpu().tolist()
    if not all(math.isfinite(v) for v in s):
        raise SamplerError("sigmas must be finite")
    if any(b > a for a, b in zip(s, s[1:], strict=False)):
        raise SamplerError("sigmas must be non-increasing")
    if any(v <= 0 for v in s[:-1]) or s[-1] < 0:
        raise SamplerError("sigmas must be > 0, except the last which may be 0")
    return s


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn in float32 on the generator's device."""
    device = generator.device if generator is not None else "cpu"
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x)


def _denoise(denoiser: DenoiserFn, x: torch.Tensor, sigma: float, extra: dict[str, Any]) -> torch.Tensor:
    s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    return denoiser(x, s, **extra)


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> None:
    if callback is None:
        return
    try:
        r = callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    except Interrupted as e:
        e.step, e.x = i, x
        raise
    if asks_to_stop(r):
        raise Interrupted(step=i, x=x)


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` splitting a step into a deterministic move to
    ``sigma_down`` and fresh noise of std ``sigma_up`` (``down^2 + up^2 = to^2``); eta = 1
    is the DDPM posterior, eta = 0 is deterministic (DDIM, Song et al. 2021 eq. 16)."""
    if sigma_to == 0.0 or eta == 0.0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _check_nonneg(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise SamplerError(f"{name} must be a number >= 0, got {v!r}")
