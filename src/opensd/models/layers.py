"""Small building blocks shared by the U-Net, the autoencoder and the text encoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from opensd.config import ConfigError


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same keys) calling the ATen op directly: the same
    kernel, without ``F.group_norm``'s Python checks, which cost a small model's steps
    more than its normalizations do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with affine weights, as used throughout LDM (``Normalize``).

    Fewer than ~4 channels per group behaves like instance norm and erases absolute
    colour in small models, so configs should keep ``channels // groups >= 4``.
    """
    if channels % groups != 0:
        raise ConfigError(f"GroupNorm: {channels} channels do not divide into {groups} groups")
    return GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


def silu_fresh(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor the caller made and owns (a norm's output): in place when no gradient
    is needed, which saves an activation-sized allocation per call (fresh pages are costly on
    a CPU: docs/benchmarks.md). Never pass a tensor someone else still reads."""
    return F.silu(x, inplace=not (x.requires_grad and torch.is_grad_enabled()))


def _in_place_fits(fresh: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``fresh op= other`` gives ``fresh op other``: no gradient needed, one dtype, and
    ``other`` broadcasts into ``fresh``'s shape without growing it."""
    if (torch.is_grad_enabled() and (fresh.requires_grad or other.requires_grad)) or fresh.dtype != other.dtype:
        return False
    return fresh.shape == other.shape or (other.dim() == fresh.dim() and all(
        o in (1, f) for o, f in zip(other.shape, fresh.shape, strict=True)))


def add_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other`` (the same numbers: addition commutes), written into ``fresh`` when no
    gradient is needed and the sum has ``fresh``'s dtype and shape: a residual branch's output,
    which the caller made and owns, saves the sum's allocation (fresh pages, docs/benchmarks.md)."""
    return fresh.add_(other) if _in_place_fits(fresh, other) else fresh + other


def mul_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh * other``, in place into ``fresh`` on the terms of :func:`add_fresh` (a gate's fresh activation)."""
    return fresh.mul_(other) if _in_place_fits(fresh, other) else fresh * other


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding (Vaswani et al. 2017; DDPM, Ho et al. 2020).

    ``timesteps``: (B,) float or int. Returns (B, dim) as ``[cos(t f), sin(t f)]`` with
    frequencies ``f_i = max_period ** (-i / (dim // 2))``, the order LDM and
    diffusers' ``flip_sin_to_cos=True`` use.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
