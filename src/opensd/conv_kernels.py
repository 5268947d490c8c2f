"""Whether a model's convolutions run on prepacked oneDNN weights, chosen by measurement.

torch's eager ``F.conv2d`` on a CPU hands oneDNN an NCHW input and a plain weight, and oneDNN
then reorders the input, the weight and the output between layouts on every call: in
oneDNN's log of one guided SD 1.5 U-Net call (256², bf16, 1 thread, AMD EPYC with
avx512_bf16) 293 reorders took 17% of the call, and the convolutions ran oneDNN's older
direct kernel (``jit_bf16``). The route here packs each layer's weight once per input shape
(``mkldnn_reorder_conv2d_weight``, what Inductor's weight freezing does: the packed layout
depends on the input's size) and calls ``torch.ops.mkldnn._convolution_pointwise`` in the
input's own memory layout: oneDNN's brgemm convolutions, no weight reorder. That U-Net call
took 0.78x the time of torch's route in bf16 (``benchmarks/conv_pack_checks.py``,
docs/benchmarks.md).

Both routes compute the same products and differ in summation order: about 4e-6 of the
output's magnitude in float32; in bfloat16, the type's own rounding (about 1%). Whether the
route is faster depends on the CPU and the model, so it is never assumed:
:func:`measure_model` times a model's own forward both ways (interleaved, fastest of the
repeats) and :func:`choose` keeps the packed route only when it takes at most
:data:`PACK_MARGIN` of the default's time and agrees to :data:`AGREEMENT` for the dtype.
:mod:`opensd.kernels` makes that choice for a model together with its GEMM choice.

Routing (like the GEMMs'): :class:`opensd.models.adapters.Conv2d` computes its base output
with :func:`conv2d`, which sends the layers of a routed model (a process-wide weak set:
nothing is stored on the modules) to the packed route when it can run the call (CPU, float32
or bfloat16, the layer's own weight, no gradient needed, not inside ``torch.compile``), and
everything else to ``F.conv2d``. The packed copies live in a weak map beside the layers, one
per layer, made on first use and made again when the weight or the input's shape changes
(the packed layout depends on both); they take as much memory as the convolution weights.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from opensd.kernel_routes import Routes

# The packed route is chosen when it takes at most this fraction of the default's time.
PACK_MARGIN = 0.9
# ... and when the two routes' outputs agree to this (max |diff| / max |default|), per dtype.
AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# ``auto`` packs only when the packed copies take at most this share of the memory available
# (SD 1.5's convolution weights: 1.3 GB in bfloat16, 2.7 GB in float32).
MEMORY_SHARE = 0.25

_PACKED: Routes[bool] = Routes()  # the layers on the packed route; its lock also guards _packs
_packs: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], torch.Tensor]] = weakref.WeakKeyDictionary()


def packed_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN's packed convolution ops and runs them in ``dtype``
    here: float32 wherever it has them, bfloat16 where oneDNN supports it on this CPU (AVX-512
    BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only CPU packing a bfloat16 weight raises)."""
    ops = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
           and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    if not ops or dtype not in PACKED_DTYPES:
        return False
    bf16_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return dtype == torch.float32 or (bf16_check is not None and bool(bf16_check()))


def _weight_key(w: torch.Tensor) -> tuple[int, ...]:
    """What identifies the weight's values: its storage, dtype and in-place version (inference
    tensors have no version counter: they cannot be changed in place outside inference mode)."""
    try:
        version = w._version
    except RuntimeError:
        version = -1
    return (id(w), w.data_ptr(), version, hash(w.dtype))


def _packable(layer: nn.Conv2d) -> bool:
    return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _fits(layer: nn.Conv2d, x: torch.Tensor) -> bool:
    w = layer.weight
    if x.dim() != 4 or x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype:
        return False
    if x.dtype not in PACKED_DTYPES or not _packable(layer):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))  # the op has no backward


def _packed_weight(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's weight packed for ``x``'s shape: oneDNN picks the packed layout by the input's size,
    and a weight packed for a 16x16 input made SD 1.5's U-Net at 32x32 take 1.6x its eager time (the
    weights reordered again on every call), so a new input shape packs again (one copy per layer)."""
    key = (*_weight_key(layer.weight), *x.shape)
    hit = _packs.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    with _PACKED.lock, torch.no_grad():
        # the input's size picks oneDNN's weight layout; torch's stub omits that argument
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]
            layer.weight.detach().to_mkldnn(), list(layer.padding), list(layer.stride), list(layer.dilation),
            layer.groups, list(x.shape))
        _packs[layer] = (key, packed)
    return packed


def packed_conv2d(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through oneDNN with the layer's packed weight, in ``x``'s memory layout."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, _packed_weight(layer, x), layer.bias, list(layer.padding), list(layer.stride), list(layer.dilation),
        layer.groups, "none", [], "")


def conv2d(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``layer``'s output for ``x`` with ``weight`` (default: its own) on the route its model's selection chose."""
    if weight is None or weight is layer.weight:
        if _PACKED.get(layer) and _fits(layer, x):
            return packed_conv2d(layer, x)
        weight = layer.weight
    out: torch.Tensor = layer._conv_forward(x, weight, layer.bias)
    return out


def packed_bytes(module: nn.Module) -> int:
    """The bytes the packed copies of ``module``'s convolution weights take (as many as the weights)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, nn.Conv2d))


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """The memory the kernel says is available for new allocations (``MemAvailable``), in bytes; None where unknown."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_refusal(module: nn.Module, available: int | None) -> str | None:
    """Why ``module``'s convolutions should not be packed for lack of memory, or None."""
    need = packed_bytes(module)
    if available is None or need <= MEMORY_SHARE * available:
        return None
    return (f"not packed: the packed copies would take {need / 1e9:.2f} GB, more than {MEMORY_SHARE:.0%} "
            f"of the {available / 1e9:.2f} GB available")


def routed_packed(layer: nn.Module) -> bool:
    return layer in _PACKED


def route(module: nn.Module, packed: bool) -> int:
    """Put every ``nn.Conv2d`` of ``module`` on the packed route (``packed``) or torch's; returns how many.
    Leaving the packed route keeps the packed copies made so far (:func:`release` frees them)."""
    return _PACKED.set([m for m in module.modules() if isinstance(m, nn.Conv2d)], True if packed else None)


def release(module: nn.Module) -> int:
    """Free the packed copies of ``module``'s convolutions that are not on the packed route; returns how many."""
    with _PACKED.lock:
        freed = [m for m in module.modules() if m in _packs and m not in _PACKED]
        for m in freed:
            del _packs[m]
    return len(freed)


def packed_copies(module: nn.Module) -> int:
    """How many of ``module``'s convolutions hold a packed copy of their weight."""
    return sum(1 for m in module.modules() if m in _packs)


# ----------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class ConvTiming:
    """A model's forward timed on both routes: fastest seconds per call, and how far the outputs differ."""

    default_s: float
    packed_s: float
    max_rel_diff: float
    dtype: torch.dtype
    threads: int
    where: str  # what was timed, e.g. "the U-Net at a 16x16 latent, batch 2"

    @property
    def ratio(self) -> float:
        """The packed route's time / the default's (below 1: packed is faster)."""
        return self.packed_s / self.default_s if self.default_s > 0 else float("inf")


@dataclass(frozen=True)
class Probe:
    """A forward of a model on fixed inputs (``run()``), and what it is, for the reason (``where``)."""

    run: Callable[[], torch.Tensor]
    where: str


def measure_model(module: nn.Module, probe: Probe, *, repeats: int = 2,
                  clock: Callable[[bool], float] | None = None) -> ConvTiming:
    """Time ``probe.run()`` (a forward of ``module`` on fixed inputs) with ``module``'s convolutions on each
    route: one warm-up per route (the packing happens there), then ``repeats`` interleaved rounds.
    Leaves the convolutions on torch's route, their packed copies kept. ``clock(packed) -> seconds`` replaces the timing (tests)."""
    outs: dict[bool, torch.Tensor] = {}
    best = {False: float("inf"), True: float("inf")}
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    try:
        with torch.inference_mode():
            for packed in (False, True):
                route(module, packed)
                outs[packed] = probe.run().float()
            for _ in range(repeats):
                for packed in (False, True):
                    route(module, packed)
                    start = time.perf_counter()
                    probe.run()
                    s = time.perf_counter() - start
                    best[packed] = min(best[packed], clock(packed) if clock is not None else s)
    finally:
        route(module, False)
    diff = float((outs[True] - outs[False]).abs().max() / outs[False].abs().max().clamp_min(1e-30))
    return ConvTiming(best[False], best[True], diff, dtype, torch.get_num_threads(), probe.where)


def choose(timing: ConvTiming) -> tuple[bool, str]:
    """``(packed, reason)``: packed when faster by :data:`PACK_MARGIN` and agreeing to :data:`AGREEMENT`."""
    measured = f"measured: packed convolutions take {timing.ratio:.2f}x the default's time ({timing.where})"
    limit = AGREEMENT.get(timing.dtype, 0.0)
    if timing.max_rel_diff > limit:
        return False, f"{measured}, but differ by {timing.max_rel_diff:.1e} (> {limit:g})"
    return timing.ratio <= PACK_MARGIN, measured
