"""Whether a model's upsamplers run as sub-pixel convolutions, chosen by measurement.

The U-Net's and the VAE's ``Upsample`` doubles H and W by nearest-neighbour copying and then
applies a 3x3 convolution (LDM). After the copy, each 2x2 group of output pixels sees only 2x2
distinct input pixels, so the convolution can run on the small input instead: for each of the
four output phases ``(a, b)`` a 2x2 kernel whose taps are sums of the 3x3 kernel's rows and
columns (phase 0 of a row: ``(w0, w1 + w2)`` at offsets ``(-1, 0)``; phase 1: ``(w0 + w1, w2)`` at
``(0, +1)``), the four phases as one convolution with 4x the output channels, and the phases
interleaved into the doubled map (the same idea as Shi et al. 2016's sub-pixel convolution).
It computes the same sums with 16 instead of 36 multiply-adds per input pixel and channel pair,
and without materializing the upsampled input. In float32 it differs from the plain form by
about 4e-7 of the output's magnitude (the sums of taps are rounded once); in bfloat16 by the
type's own rounding.

Measured on one core of the AMD EPYC with avx512_bf16 at SD 1.5's upsamplers of a 512² image
(``benchmarks/upsample_cpu.py``, both forms through ``F.conv2d``): 0.42-0.55x the time at the VAE's
in bfloat16 (0.45-0.52x since the phase convolution adds the bias and pads), 0.57-0.66x in float32,
and slower (1.4-1.6x) at the U-Net's smallest, 8x8 map. Where it is faster
depends on the CPU and the convolution route, so it is never assumed: :func:`measure` times
both forms on one of the model's own layers per channel pair and :func:`choose` keeps it, pair by
pair, only at <= :data:`MARGIN` of the plain form's time and within :data:`AGREEMENT`. :mod:`opensd.kernels` makes that choice with
the model's other kernel choices.

Routing (like the other kernels'): ``Upsample.forward`` calls :func:`upsample_conv`, which runs
the sub-pixel form for the layers of a routed model (a process-wide weak set; the phase kernels
in a weak map beside them, made again when the weight changes) when it can (an exact 2x size,
a 3x3 stride-1 convolution with zero padding 1, no adapter deltas on the layer, no gradient
needed, not inside ``torch.compile``), and the plain form otherwise.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opensd.kernel_routes import Routes

MARGIN = 0.9
AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# Each distinct upsampler is timed at an input of TIMED_WORK / channels² pixels (at least 8x8):
# 16x16 at 512 channels.
TIMED_WORK = 512 * 512 * 16 * 16

_SUBPIXEL: Routes[bool] = Routes()  # the upsamplers' convolutions on the sub-pixel form
_phases: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], torch.Tensor]] = weakref.WeakKeyDictionary()


def phase_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): the 2x2 kernels of the phases 00, 01, 10, 11, summed in float32."""
    w = w.float()
    taps = {0: (w[:, :, 0], w[:, :, 1] + w[:, :, 2]), 1: (w[:, :, 0] + w[:, :, 1], w[:, :, 2])}  # rows, each (Co, Ci, 3)
    kernels = []
    for a in (0, 1):
        for b in (0, 1):
            rows = [(r[..., 0], r[..., 1] + r[..., 2]) if b == 0 else (r[..., 0] + r[..., 1], r[..., 2]) for r in taps[a]]
            kernels.append(torch.stack([torch.stack(cols, -1) for cols in rows], -2))  # (Co, Ci, 2, 2)
    return torch.cat(kernels, 0)


def _key(w: torch.Tensor) -> tuple[int, ...]:
    try:
        version = w._version
    except RuntimeError:  # an inference tensor
        version = -1
    return (id(w), w.data_ptr(), version, hash(w.dtype))


def _phase_kernels(conv: nn.Conv2d) -> torch.Tensor:
    """``conv``'s phase kernels, made again when its weight changes."""
    w = conv.weight
    hit = _phases.get(conv)
    if hit is None or hit[0] != _key(w):
        hit = (_key(w), phase_weight(w.detach()).to(w.dtype))
        _phases[conv] = hit
    return hit[1]


def subpixel_upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(nearest_upsample_2x(x))`` for a 3x3, padding-1 ``conv``, computed on ``x`` itself.

    The phase convolution runs through ``F.conv2d``: on oneDNN's packed route its output came in
    a layout whose interleaving took longer than the convolution saved (docs/benchmarks.md)."""
    b, _, h, w = x.shape
    co = conv.out_channels
    bias = None if conv.bias is None else conv.bias.repeat(4)  # each phase's bias, added by the convolution
    y = F.conv2d(x, _phase_kernels(conv), bias, padding=1)  # (B, 4 C_out, H+1, W+1): 2x2 kernels, zero border
    if y.is_contiguous() or not y.is_contiguous(memory_format=torch.channels_last):
        planar = y.view(b, 2, 2, co, h + 1, w + 1)  # (B, a, b, C_out, H+1, W+1)
        out = x.new_empty(b, co, h, 2, w, 2)
        for pa in (0, 1):
            for pb in (0, 1):
                out[:, :, :, pa, :, pb] = planar[:, pa, pb, :, pa : pa + h, pb : pb + w]  # phase (a, b) starts at (a, b)
        result = out.view(b, co, 2 * h, 2 * w)
    else:  # the convolution answered in channels-last (oneDNN's choice for bf16): copy whole pixels, keep the layout
        pixels = y.permute(0, 2, 3, 1).reshape(b, h + 1, w + 1, 2, 2, co)  # (B, H+1, W+1, a, b, C_out)
        out = x.new_empty(b, h, 2, w, 2, co)
        for pa in (0, 1):
            for pb in (0, 1):
                out[:, :, pa, :, pb] = pixels[:, pa : pa + h, pb : pb + w, pa, pb]
        result = out.view(b, 2 * h, 2 * w, co).permute(0, 3, 1, 2)  # (B, C_out, 2H, 2W), channels-last strides
    return result


def _fits(conv: nn.Conv2d, x: torch.Tensor, size: tuple[int, int]) -> bool:
    from opensd.models.adapters import has_deltas  # here: adapters imports the kernel modules

    if x.dim() != 4 or size != (2 * x.shape[-2], 2 * x.shape[-1]) or x.dtype != conv.weight.dtype:
        return False
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1):
        return False
    if conv.groups != 1 or conv.padding_mode != "zeros" or has_deltas(conv):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``conv(F.interpolate(x, size, mode="nearest"))`` (``size`` default: 2x) on the route the model's selection chose."""
    target = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else (int(size[0]), int(size[1]))
    if _SUBPIXEL.get(conv) and _fits(conv, x, target):
        return subpixel_upsample_conv(conv, x)
    out: torch.Tensor = conv(F.interpolate(x, size=target, mode="nearest"))
    return out


def upsamplers(module: nn.Module) -> list[nn.Conv2d]:
    """The convolutions of ``module``'s upsamplers (modules named ``Upsample`` with a ``conv``)."""
    found = (getattr(m, "conv", None) for m in module.modules() if type(m).__name__ == "Upsample")
    return [c for c in found if isinstance(c, nn.Conv2d)]


Pair = tuple[int, int]  # an upsampler's (in, out) channels


def route(module: nn.Module, pairs: Collection[Pair] | bool) -> int:
    """Put ``module``'s upsamplers with these channel pairs (True: all, False: none) on the
    sub-pixel form and the others on the plain one; returns how many are on the sub-pixel form."""
    convs = upsamplers(module)
    on = [c for c in convs if pairs is True or (pairs is not False and (c.in_channels, c.out_channels) in pairs)]
    off = [c for c in convs if c not in on]
    _SUBPIXEL.set(off, None)
    with _SUBPIXEL.lock:
        for c in off:
            _phases.pop(c, None)
    return _SUBPIXEL.set(on, True)


def routed(conv: nn.Module) -> bool:
    return conv in _SUBPIXEL


@dataclass(frozen=True)
class PairTiming:
    """Both forms timed on one upsampler of a channel pair (seconds, fastest of the repeats)."""

    pair: Pair
    layers: int  # how many of the model's upsamplers have this pair
    plain_s: float
    subpixel_s: float
    max_rel_diff: float  # max |subpixel - plain| / max |plain|

    @property
    def ratio(self) -> float:
        return self.subpixel_s / self.plain_s if self.plain_s > 0 else float("inf")


@dataclass(frozen=True)
class UpsampleTiming:
    """The model's distinct upsamplers, each timed both ways."""

    pairs: tuple[PairTiming, ...]
    dtype: torch.dtype


Timer = Callable[[str, nn.Conv2d], float]


def measure(module: nn.Module, *, repeats: int = 3, timer: Timer | None = None) -> UpsampleTiming:
    """Time the plain and the sub-pixel form on one layer of each distinct channel pair of
    ``module``'s upsamplers (plain: the layer's own route), interleaved; ``timer(form, conv)``
    replaces the clock (tests)."""
    seen: dict[Pair, tuple[nn.Conv2d, int]] = {}
    for c in upsamplers(module):
        key = (c.in_channels, c.out_channels)
        seen[key] = (seen[key][0], seen[key][1] + 1) if key in seen else (c, 1)
    g = torch.Generator().manual_seed(0)
    out, dtype = [], torch.float32
    with torch.inference_mode():
        for key, (conv, count) in seen.items():
            w = conv.weight
            dtype = w.dtype
            side = max(8, int((TIMED_WORK / (conv.in_channels * conv.out_channels)) ** 0.5))
            x = torch.randn(1, conv.in_channels, side, side, generator=g).to(w.device, w.dtype)
            forms = {"plain": lambda c=conv, x=x: c(F.interpolate(x, scale_factor=2.0, mode="nearest")),
                     "subpixel": lambda c=conv, x=x: subpixel_upsample_conv(c, x)}
            ref, got = forms["plain"]().float(), forms["subpixel"]().float()  # also the warm-up
            diff = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            best = dict.fromkeys(forms, float("inf"))
            for _ in range(repeats):
                for name, fn in forms.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], timer(name, conv) if timer else time.perf_counter() - start)
            out.append(PairTiming(key, count, best["plain"], best["subpixel"], diff))
    return UpsampleTiming(tuple(out), dtype)


def choose(timing: UpsampleTiming) -> tuple[frozenset[Pair], str]:
    """The channel pairs to run sub-pixel (those at <= :data:`MARGIN` of the plain form's time that
    agree to :data:`AGREEMENT`), and why."""
    if not timing.pairs:
        return frozenset(), "no upsamplers"
    bound = AGREEMENT.get(timing.dtype, 1e-4)
    chosen = frozenset(p.pair for p in timing.pairs if p.ratio <= MARGIN and p.max_rel_diff <= bound)
    each = ", ".join(f"{p.pair[0]}->{p.pair[1]} ch {p.ratio:.2f}x" + (" (differs)" if p.max_rel_diff > bound else "")
                     for p in timing.pairs)
    return chosen, f"measured: sub-pixel / plain time per upsampler shape: {each}"
