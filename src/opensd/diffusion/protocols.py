"""The composition types of generation, in one place: the model function, the denoiser, the
sampler and its callback.

A generation composes, innermost first (:mod:`opensd.diffusion`): the network as a
:class:`ModelFn` -> :class:`~opensd.diffusion.guidance.ClassifierFreeGuidance` (again a
:class:`ModelFn`) -> :class:`~opensd.diffusion.denoisers.Denoiser`, a :class:`DenoiserFn`
(Karras et al. 2022's ``D(x, sigma) -> x0``) -> a :class:`SamplerFn` run on a sigma list.
Each protocol fixes the leading positional arguments; the conditioning travels as keyword
arguments whose names are the conditioning dict's (``context``, ``y``, ``control``; ``cond``
and ``uncond`` around guidance), so the protocols leave them open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

SamplerCallback = Callable[[dict[str, Any]], Any]
"""``callback({"i", "x", "sigma", "denoised"})`` once per step; returning ``False`` or
:class:`~opensd.diffusion.interruption.Interrupted` stops the run (:mod:`opensd.diffusion.interruption`)."""


class ModelFn(Protocol):
    """A network in its own output space: ``model_fn(x_in, t, **cond) -> eps or v``.

    ``x_in`` (B, C, h, w) is the VP latent, ``t`` the (B,) float32 training timesteps;
    the output has ``x_in``'s shape."""

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, /, *args: Any, **cond: Any) -> torch.Tensor: ...


class DenoiserFn(Protocol):
    """``D(x, sigma, **extra_args) -> x0`` on the k-diffusion latent ``x = x0 + sigma eps``;
    ``sigma`` is passed as a (B,) float32 tensor."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, /, *args: Any, **extra_args: Any) -> torch.Tensor: ...


class SamplerFn(Protocol):
    """A stateless sampler: ``sample(denoiser, x, sigmas, *, extra_args, callback, generator,
    **options) -> x`` at ``sigmas[-1]`` (the contract is :mod:`opensd.diffusion.samplers`'s)."""

    def __call__(
        self,
        denoiser: DenoiserFn,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        /,
        *,
        extra_args: dict[str, Any] | None = ...,
        callback: SamplerCallback | None = ...,
        generator: torch.Generator | None = ...,
    ) -> torch.Tensor: ...
