"""Classifier-free guidance (Ho & Salimans 2022) in the network's output space.

The guided network is again a ``model_fn(x_in, t, *, cond, uncond) -> output`` so it
composes with the rest: network -> :class:`ClassifierFreeGuidance` ->
:class:`~opensd.diffusion.denoisers.Denoiser` (eps/v -> x0) -> sampler. Conditioning
travels as two keyword dicts, e.g. ``extra_args={"cond": {"context": c}, "uncond":
{"context": u}}``; each is splatted into the network call.

Per step (as diffusers' StableDiffusionPipeline): one network forward on the batch
``[uncond; cond]``, then ``out = u + scale * (c - u)``, then optionally guidance
rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
flawed", eq. 15-16, applied to the raw output as diffusers' ``rescale_noise_cfg``):
``out = phi * out * std(c) / std(out) + (1 - phi) * out`` with per-sample stds.
At ``scale == 1`` the unconditional pass is skipped and the conditional output is
returned untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from opensd.diffusion.protocols import ModelFn
from opensd.errors import OpenSDError


class GuidanceError(OpenSDError):
    """Bad guidance settings or conditioning (missing uncond, mismatched keys)."""


def rescale_guided(guided: torch.Tensor, cond_out: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale: match the per-sample std of ``guided`` to ``cond_out``, mixed by ``phi``."""
    dims = list(range(1, guided.ndim))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    return phi * (guided * (std_cond / std_guided)) + (1.0 - phi) * guided


def _concat_cond(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, Any]:
    """Batch two conditioning dicts: tensors are concatenated [uncond; cond] along dim 0;
    other values must be equal."""
    if set(uncond) != set(cond):
        raise GuidanceError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out: dict[str, Any] = {}
    for k, c in cond.items():
        u = uncond[k]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            out[k] = torch.cat([u, c.to(u.dtype)], dim=0)
        elif isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
            raise GuidanceError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors or both not")
        elif u != c:
            raise GuidanceError(f"non-tensor conditioning {k!r} differs between cond and uncond")
        else:
            out[k] = c
    return out


class ClassifierFreeGuidance:
    """Wraps ``model_fn(x_in, t, **cond)``; call as ``cfg(x_in, t, cond=..., uncond=...)``.

    ``scale``: guidance scale w (1 = no guidance). ``rescale``: phi in [0, 1] of
    guidance rescale (0 = off). Stateless; safe to share between threads.
    """

    def __init__(self, model_fn: ModelFn, scale: float = 7.5, rescale: float = 0.0) -> None:
        if not callable(model_fn):
            raise GuidanceError(f"model_fn must be callable, got {type(model_fn).__name__}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale:
            raise GuidanceError(f"guidance scale must be a number, got {scale!r}")
        if not 0.0 <= rescale <= 1.0:
            raise GuidanceError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.model_fn = model_fn
        self.scale = float(scale)
        self.rescale = float(rescale)

    def __call__(
        self,
        x_in: torch.Tensor,
        t: torch.Tensor,
        *,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        cond = dict(cond or {})
        if self.scale == 1.0:
            return self.model_fn(x_in, t, **cond)
        if uncond is None:
            raise GuidanceError("guidance scale != 1 needs an `uncond` conditioning dict")
        both = _concat_cond(uncond, cond)
        t2 = torch.cat([t, t]) if t.ndim else t
        out = self.model_fn(torch.cat([x_in, x_in]), t2, **both)  # (2B, ...)
        u, c = out.chunk(2)
        guided = u + self.scale * (c - u)
        if self.rescale > 0.0:
            guided = rescale_guided(guided, c, self.rescale)
        return guided

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(scale={self.scale}, rescale={self.rescale})"
