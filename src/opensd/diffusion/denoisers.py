"""A noise-predicting network seen as a k-diffusion denoiser ``D(x, sigma) -> x0``.

Karras et al. 2022 ("Elucidating the design space", Table 1) write any
discrete-time VP model as ``D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma))`` on
the variance-exploding latent ``x = x0 + sigma eps``:

* ``c_in = 1 / sqrt(sigma^2 + 1)`` turns ``x`` back into the VP latent the network
  was trained on, and ``t(sigma)`` is the (continuous) training timestep of sigma;
* eps-prediction (Ho et al. 2020): ``c_skip = 1``, ``c_out = -sigma``;
* v-prediction (Salimans & Ho 2022): ``c_skip = 1 / (sigma^2 + 1)``,
  ``c_out = -sigma / sqrt(sigma^2 + 1)``.

The wrapped ``model_fn(x_in, t, **cond) -> output`` may be a raw U-Net call or a
classifier-free-guided one (:mod:`opensd.diffusion.guidance`); it gets ``t`` as a
(B,) float32 tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from opensd.diffusion.protocols import ModelFn
from opensd.diffusion.schedules import DiscreteSchedule, Prediction
from opensd.errors import OpenSDError


class DenoiserError(OpenSDError):
    """Bad input to a denoiser (sigma shape does not fit the batch)."""


def _batch_sigma(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """sigma as a (B,) float32 tensor on x's device; a scalar is broadcast."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise DenoiserError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcasting over x, in x's dtype."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Denoiser:
    """``D(x, sigma, **cond) -> x0`` for a network ``model_fn`` trained on ``schedule``.

    ``quantize_t``: call the network at the nearest integer timestep (what diffusers'
    DPMSolverMultistep/UniPC do with Karras sigmas); the parameterization still uses
    the exact sigma. Stateless; safe to share between threads.
    """

    def __init__(self, model_fn: ModelFn, schedule: DiscreteSchedule, *, quantize_t: bool = False) -> None:
        if not callable(model_fn):
            raise DenoiserError(f"model_fn must be callable, got {type(model_fn).__name__}")
        if not isinstance(schedule, DiscreteSchedule):
            raise DenoiserError(f"schedule must be a DiscreteSchedule, got {type(schedule).__name__}")
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction = schedule.config.prediction
        self.quantize_t = quantize_t

    def with_quantize_t(self, quantize_t: bool) -> Denoiser:
        """A copy that does (or does not) round the network's timesteps."""
        if quantize_t == self.quantize_t:
            return self
        return Denoiser(self.model_fn, self.schedule, quantize_t=quantize_t)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in)`` for sigma (any shape, float32)."""
        c_in = 1.0 / (sigma**2 + 1.0).sqrt()
        if self.prediction is Prediction.EPS:
            return torch.ones_like(sigma), -sigma, c_in
        return 1.0 / (sigma**2 + 1.0), -sigma * c_in, c_in

    def raw(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        """The network's own output (eps or v) at ``x = x0 + sigma eps``; x is (B, ...)."""
        s = _batch_sigma(x, sigma)
        t = self.schedule.sigma_to_t(s, quantize=self.quantize_t)  # (B,)
        c_in = 1.0 / (s**2 + 1.0).sqrt()
        return self.model_fn(x * _expand(c_in, x), t, **cond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        """The denoised estimate ``x0`` (same shape and dtype as x)."""
        s = _batch_sigma(x, sigma)
        out = self.raw(x, s, **cond)
        if out.shape != x.shape:
            raise DenoiserError(f"model output shape {tuple(out.shape)} does not match input {tuple(x.shape)}")
        c_skip, c_out, _ = self.scalings(s)
        return x * _expand(c_skip, x) + out.to(x.dtype) * _expand(c_out, x)

    def __repr__(self) -> str:
        return f"Denoiser(prediction={self.prediction.value}, quantize_t={self.quantize_t})"
