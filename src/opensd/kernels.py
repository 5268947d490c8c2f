"""Which kernel computes opensd's float32 linear layers on a CPU: torch's default or oneDNN, chosen by measurement.

torch sends a float32 ``F.linear`` on the CPU to MKL's sgemm, and MKL picks its code path
by the CPU's vendor: on this project's AMD EPYC (AVX-512) the same GEMM through oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the op torch's Inductor emits for CPU linears) ran
1.8x faster, while on an Intel Xeon with AVX-512 and AMX MKL is the faster one: oneDNN took
1.11-1.17x its time over the SD 1.5 U-Net's linear layers and about 2x over the default model's,
whose small GEMMs pay oneDNN's larger per-call overhead (docs/benchmarks.md). So the
choice is never hard-coded: :func:`select_kernels` with :attr:`Kernels.AUTO` times both
paths at the model's GEMM shapes, once per process and thread count (cached), and keeps
oneDNN only when it takes at most :data:`ONEDNN_MARGIN` of the default's time and agrees
with it to :data:`AGREEMENT` (relative). Both compute float32 products with float32
accumulation and differ only in summation order (about 1e-6 of the output's magnitude).

Routing: :class:`opensd.models.adapters.Linear` computes its base output with
:func:`linear`, which sends the layers a selection put on oneDNN (a process-wide weak set
of modules: nothing is stored on them) there when oneDNN can run the call (CPU, float32,
no gradient needed, not inside ``torch.compile``), and everything else to ``F.linear``.
LoRA deltas are added to that base output as before. A selection is made once per model
(and thread count) and holds for every request; it is not a per-request setting.

The same selection decides the model's convolutions (float32 and bfloat16): torch's
``F.conv2d``, or oneDNN with packed weights in channels-last layout, measured on the model's
own U-Net (:mod:`opensd.conv_kernels`); and its attention: torch's SDPA, or blocked GEMMs,
measured at the model's attention shapes (:mod:`opensd.attention_kernels`); and its
upsamplers: a 3x3 convolution of a nearest-upsampled map, or the same as a sub-pixel
convolution of the map itself (:mod:`opensd.upsample_kernels`).
"""

from __future__ import annotations

import enum
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opensd import attention_kernels, conv_kernels, upsample_kernels
from opensd.errors import OpenSDError
from opensd.precision import slow_on_cpu

# oneDNN is chosen when it takes at most this fraction of the default path's time: a tie
# keeps torch's default, whose results are the reference.
ONEDNN_MARGIN = 0.9
# ... and when its outputs agree with the default's to this (max |diff| / max |default|).
AGREEMENT = 1e-4
# What is timed: a layer's GEMM at the model's rows, cut to TIMED_ROWS rows (still enough
# for both kernels to be compute-bound, which is where they differ) and then to about
# FLOP_CAP FLOPs by timing fewer output columns (never below MIN_COLUMNS), each weighted
# by the work it stands for, so that measuring an SD 1.5-sized U-Net stays well under a second.
TIMED_ROWS = 256
FLOP_CAP = 1e8
MIN_COLUMNS = 128
# Models below this many U-Net parameters keep torch's default kernels unless asked
# (see default_kernels).
AUTO_MIN_PARAMS = 100_000_000


class KernelError(OpenSDError):
    """A kernel choice that is unknown or cannot run here."""


class Kernels(enum.Enum):
    """``auto``: measure and take the faster; ``default``: torch's own path; ``onednn``: oneDNN."""

    AUTO = "auto"
    DEFAULT = "default"
    ONEDNN = "onednn"

    @classmethod
    def parse(cls, value: Kernels | str) -> Kernels:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise KernelError(f"unknown kernels {value!r}; allowed: {', '.join(k.value for k in cls)}") from None


@dataclass(frozen=True)
class GemmShape:
    """One timed GEMM ``(rows, in_features) @ (in_features, out_features)``; ``weight``: how many such
    calls it stands for (the layers of that shape times the work cut from each, see :func:`linear_shapes`)."""

    rows: int
    in_features: int
    out_features: int
    bias: bool
    weight: float = 1.0

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.in_features * self.out_features


@dataclass(frozen=True)
class GemmTiming:
    """Both paths timed at ``shapes``: seconds for the work they stand for (weighted), fastest of the repeats."""

    shapes: tuple[GemmShape, ...]
    threads: int
    default_s: float
    onednn_s: float
    max_rel_diff: float  # max |oneDNN - default| / max |default| over the shapes

    @property
    def ratio(self) -> float:
        """oneDNN's time / the default's (below 1: oneDNN is faster)."""
        return self.onednn_s / self.default_s if self.default_s > 0 else float("inf")


@dataclass(frozen=True)
class KernelSelection:
    """What a model's linear layers and convolutions run on, and why."""

    requested: Kernels
    backend: Kernels  # DEFAULT or ONEDNN: the linear layers
    reason: str
    timing: GemmTiming | None = None
    packed_convs: bool = False  # the convolutions on oneDNN with packed weights (opensd.conv_kernels)
    conv_reason: str = "as asked"
    conv_timing: conv_kernels.ConvTiming | None = None
    blocked_attention: bool = False  # attention as blocked GEMMs (opensd.attention_kernels), not SDPA
    attention_reason: str = "as asked"
    attention_timing: attention_kernels.AttentionTiming | None = None
    subpixel_upsampling: frozenset[tuple[int, int]] = frozenset()  # the upsamplers' channel pairs run sub-pixel
    upsample_reason: str = "as asked"
    upsample_timing: upsample_kernels.UpsampleTiming | None = None
    attention_softmax: attention_kernels.Softmax = attention_kernels.Softmax.ATEN  # the blocked kernel's softmax

    def describe(self) -> str:
        convs = "packed" if self.packed_convs else "default"
        onednn = self.attention_softmax is attention_kernels.Softmax.ONEDNN
        attention = ("blocked, oneDNN softmax" if onednn else "blocked") if self.blocked_attention else "sdpa"
        upsampling = f"sub-pixel at {len(self.subpixel_upsampling)} shapes" if self.subpixel_upsampling else "plain"
        return (f"kernels: {self.backend.value} ({self.reason}); convolutions: {convs} ({self.conv_reason}); "
                f"attention: {attention} ({self.attention_reason}); upsampling: {upsampling} ({self.upsample_reason})")


# ----------------------------------------------------------------------------- routing

_ONEDNN_LAYERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_routing = False  # any layer ever routed: the fast path skips the set lookup while False
_lock = threading.Lock()
_timings: dict[tuple, GemmTiming] = {}


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN (no autograd: inference only)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fits_onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False  # the oneDNN op has no backward
    return True


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s base output ``x W^T + b`` on the kernel its model's selection chose."""
    w, b = layer.weight, layer.bias
    if _routing and not torch.compiler.is_compiling() and layer in _ONEDNN_LAYERS and _fits_onednn(x, w, b):
        return onednn_linear(x, w, b)
    return F.linear(x, w, b)


def routed_to_onednn(layer: nn.Module) -> bool:
    return layer in _ONEDNN_LAYERS


def route(module: nn.Module, backend: Kernels) -> int:
    """Put every ``nn.Linear`` of ``module`` on ``backend`` (DEFAULT or ONEDNN); returns how many."""
    global _routing
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    with _lock:
        for m in layers:
            if backend is Kernels.ONEDNN:
                _ONEDNN_LAYERS.add(m)
            else:
                _ONEDNN_LAYERS.discard(m)
        _routing = _routing or (backend is Kernels.ONEDNN and bool(layers))
    return len(layers)


# ----------------------------------------------------------------------------- measurement


def linear_shapes(module: nn.Module, rows: int) -> tuple[GemmShape, ...]:
    """The distinct ``nn.Linear`` shapes of ``module`` (in, out, bias) at ``rows`` rows, as timed.

    Each is cut to :data:`TIMED_ROWS` rows and then to about :data:`FLOP_CAP` FLOPs by
    timing fewer output columns (at least :data:`MIN_COLUMNS`); its weight is the number of
    layers of that shape times the work cut. Largest work first.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise KernelError(f"rows must be an integer >= 1, got {rows!r}")
    counts = Counter(
        (m.in_features, m.out_features, m.bias is not None) for m in module.modules() if isinstance(m, nn.Linear)
    )
    shapes = []
    for (k, n, bias), count in counts.items():
        r = min(rows, TIMED_ROWS)
        cols = n if 2 * r * k * n <= FLOP_CAP else min(n, max(MIN_COLUMNS, int(FLOP_CAP // (2 * r * k)) // 16 * 16))
        shapes.append(GemmShape(r, k, cols, bias, count * (rows * n) / (r * cols)))
    return tuple(sorted(shapes, key=lambda s: (-s.flops * s.weight, s.in_features, s.out_features)))


Timer = Callable[[Kernels, GemmShape], float]


def _time_calls(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(shapes: Iterable[GemmShape], *, repeats: int = 3, timer: Timer | None = None) -> GemmTiming:
    """Time both paths at ``shapes`` (interleaved, fastest of ``repeats`` per shape) and compare their outputs.

    ``timer(backend, shape) -> seconds per call`` replaces the clock (tests inject one);
    the outputs are still computed and compared.
    """
    shapes = tuple(shapes)
    g = torch.Generator().manual_seed(0)
    total = {Kernels.DEFAULT: 0.0, Kernels.ONEDNN: 0.0}
    worst = 0.0
    with torch.inference_mode():
        for s in shapes:
            x = torch.randn(s.rows, s.in_features, generator=g)
            w = torch.randn(s.out_features, s.in_features, generator=g) * s.in_features**-0.5
            b = torch.randn(s.out_features, generator=g) if s.bias else None
            calls = {Kernels.DEFAULT: lambda x=x, w=w, b=b: F.linear(x, w, b), Kernels.ONEDNN: lambda x=x, w=w, b=b: onednn_linear(x, w, b)}
            ref, got = calls[Kernels.DEFAULT](), calls[Kernels.ONEDNN]()  # also the warm-up
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
            inner = max(1, int(2e7 // s.flops))  # about 0.2 ms of work per sample at 100 GFLOP/s
            best = {k: float("inf") for k in calls}
            for _ in range(repeats):
                for k, fn in calls.items():
                    best[k] = min(best[k], timer(k, s) if timer is not None else _time_calls(fn, inner))
            for k in calls:
                total[k] += best[k] * s.weight
    return GemmTiming(shapes, torch.get_num_threads(), total[Kernels.DEFAULT], total[Kernels.ONEDNN], worst)


def choose(timing: GemmTiming) -> tuple[Kernels, str]:
    """``(backend, reason)``: oneDNN when it is faster by :data:`ONEDNN_MARGIN` and agrees to :data:`AGREEMENT`."""
    if not timing.shapes:
        return Kernels.DEFAULT, "no linear layers to route"
    where = f"{len(timing.shapes)} shapes, {timing.threads} thread{'s' if timing.threads != 1 else ''}"
    measured = f"measured: oneDNN takes {timing.ratio:.2f}x the default's time at {where}"
    if timing.max_rel_diff > AGREEMENT:
        return Kernels.DEFAULT, f"{measured}, but differs by {timing.max_rel_diff:.1e} (> {AGREEMENT:g})"
    if timing.ratio <= ONEDNN_MARGIN:
        return Kernels.ONEDNN, measured
    return Kernels.DEFAULT, measured


def measure_cached(shapes: tuple[GemmShape, ...], *, timer: Timer | None = None) -> GemmTiming:
    """:func:`measure`, once per process for a set of shapes and a thread count (an injected timer is never cached)."""
    if timer is not None:
        return measure(shapes, timer=timer)
    key = (shapes, torch.get_num_threads())
    with _lock:
        hit = _timings.get(key)
    if hit is None:
        hit = measure(shapes)
        with _lock:
            hit = _timings.setdefault(key, hit)
    return hit


# ----------------------------------------------------------------------------- selection


def default_kernels(unet_params: int) -> Kernels:
    """``auto`` for U-Nets of at least :data:`AUTO_MIN_PARAMS` parameters, ``default`` below.

    A small model's GEMMs (the bundled model's: 2 to 128 rows, 64 to 1024 wide) take tens of
    microseconds, where call overhead and not the kernel decides, and keeping torch's own
    path keeps its images bit-identical on every CPU (``tests/test_golden.py``). Ask for
    ``auto`` to measure anyway.
    """
    return Kernels.AUTO if unet_params >= AUTO_MIN_PARAMS else Kernels.DEFAULT


def available_memory() -> int | None:
    """The memory available now (bytes; None where unknown): what ``auto`` weighs packed copies against."""
    return conv_kernels.available_memory()


def _not_measured(model: nn.Module) -> str | None:
    """Why ``auto`` measures none of opensd's own kernels for ``model`` (None: it measures): a
    model in a type this CPU computes slowly (float16; bfloat16 without native support) keeps
    torch's. Timing it would take minutes at SD 1.5's shapes, and the kernels were never tuned for it."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return None
    slow = slow_on_cpu(p.dtype)
    return None if slow is None else f"no choice: torch's kernels, since {slow.split(';')[0]}"


def _select_convs(
    model: nn.Module, kernels: Kernels, measure_on: nn.Module, probe: conv_kernels.Probe | None,
    clock: Callable[[bool], float] | None,
) -> tuple[bool, str, conv_kernels.ConvTiming | None]:
    """``(packed, reason, timing)`` for the convolutions: ``onednn`` packs, ``default`` does not,
    ``auto`` times ``probe`` (a forward of ``measure_on``) on both routes where there is a choice."""
    p = next(model.parameters(), None)
    packable = conv_kernels.packed_available() if p is None else (
        p.device.type == "cpu" and conv_kernels.packed_available(p.dtype))
    if kernels is Kernels.DEFAULT:
        return False, "as asked", None
    if kernels is Kernels.AUTO and (slow := _not_measured(model)):
        return False, slow, None
    if not packable:
        return False, ("no choice: packed convolutions need oneDNN on a CPU and float32, or bfloat16 where "
                       "oneDNN runs it on this CPU"), None
    if kernels is Kernels.ONEDNN:
        return True, "as asked", None
    if probe is None:
        return False, "not measured: no probe of the model was given", None
    short = conv_kernels.memory_refusal(model, available_memory())
    if short is not None:
        return False, short, None
    try:
        timing = conv_kernels.measure_model(measure_on, probe, clock=clock)
    except (RuntimeError, OpenSDError) as e:  # a probe this model cannot run: keep torch's route, say why
        return False, f"not measured: the probe failed ({type(e).__name__}: {e})", None
    packed, reason = conv_kernels.choose(timing)
    return packed, reason, timing


_Attention = tuple[bool, attention_kernels.Softmax, str, attention_kernels.AttentionTiming | None]


def _select_attention(model: nn.Module, kernels: Kernels) -> _Attention:
    """``(blocked, softmax, reason, timing)`` for the attention: ``auto`` times the kernels at the
    model's attention shapes on a CPU; ``default`` and ``onednn`` (which routes GEMMs and convolutions) keep SDPA."""
    aten = attention_kernels.Softmax.ATEN
    if kernels is not Kernels.AUTO:
        return False, aten, "as asked", None
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return False, aten, "no choice: the blocked kernel is for a CPU", None
    if slow := _not_measured(model):
        return False, aten, slow, None
    shapes = attention_kernels.attention_shapes(model)
    if not shapes:
        return False, aten, "no attention to route", None
    timing = attention_kernels.measure_cached(shapes, p.dtype)
    blocked, softmax, reason = attention_kernels.choose(timing)
    return blocked, softmax, reason, timing


def _select_upsampling(
    model: nn.Module, kernels: Kernels,
) -> tuple[frozenset[tuple[int, int]], str, upsample_kernels.UpsampleTiming | None]:
    """``(pairs, reason, timing)`` for the upsamplers: ``auto`` times both forms on the model's own
    upsampler layers (after its convolutions are routed); ``default`` and ``onednn`` keep the plain form."""
    if kernels is not Kernels.AUTO:
        return frozenset(), "as asked", None
    if not upsample_kernels.upsamplers(model):
        return frozenset(), "no upsamplers", None
    if slow := _not_measured(model):
        return frozenset(), slow, None
    timing = upsample_kernels.measure(model)  # calls both forms directly: the route does not matter
    subpixel, reason = upsample_kernels.choose(timing)
    return subpixel, reason, timing


def select_kernels(
    model: nn.Module, kernels: Kernels | str, *, measure_on: nn.Module | None = None, rows: int = 128,
    timer: Timer | None = None, probe: conv_kernels.Probe | None = None, conv_clock: Callable[[bool], float] | None = None,
) -> KernelSelection:
    """Choose the kernel of every ``nn.Linear`` and ``nn.Conv2d`` in ``model`` and route them to it.

    Linear layers: ``auto`` measures at ``measure_on``'s linear shapes (default: ``model``'s) with
    ``rows`` rows each (:func:`linear_shapes`); only a float32 model on the CPU has a choice.
    ``onednn`` there forces oneDNN; elsewhere it is an error. Convolutions: ``auto`` times
    ``probe.run()`` (a forward of ``measure_on`` on fixed inputs) with and without packed weights
    (:mod:`opensd.conv_kernels`), after the linear layers are routed; ``onednn`` packs them.
    Attention: ``auto`` times SDPA and blocked GEMMs at ``model``'s attention shapes on a CPU
    (:mod:`opensd.attention_kernels`); ``default`` and ``onednn`` keep SDPA. Upsamplers: ``auto``
    times the plain and the sub-pixel form on the model's own layers (:mod:`opensd.upsample_kernels`).
    ``timer`` and ``conv_clock`` replace the clocks (tests).
    """
    kernels = Kernels.parse(kernels)
    p = next(model.parameters(), None)
    cpu_fp32 = p is None or (p.device.type == "cpu" and p.dtype == torch.float32)
    if kernels is Kernels.ONEDNN and not (cpu_fp32 and onednn_available()):
        where = ("this torch has no oneDNN" if not onednn_available() or p is None
                 else f"the model is {p.dtype} on {p.device}")
        raise KernelError(f"kernels 'onednn' runs float32 models on the CPU only, and {where}; use 'auto' or 'default'")
    if kernels is Kernels.AUTO and not (cpu_fp32 and onednn_available()):
        backend, reason, timing = Kernels.DEFAULT, "no choice: oneDNN's route is for float32 on a CPU", None
    elif kernels is Kernels.AUTO:
        timing = measure_cached(linear_shapes(measure_on or model, rows), timer=timer)
        backend, reason = choose(timing)
    else:
        backend, reason, timing = kernels, "as asked", None
    route(model, backend)
    packed, conv_reason, conv_timing = _select_convs(model, kernels, measure_on or model, probe, conv_clock)
    conv_kernels.route(model, packed)
    conv_kernels.release(model)  # what the measurement packed, when the choice is torch's route
    blocked, softmax, attention_reason, attention_timing = _select_attention(model, kernels)
    attention_kernels.route(model, blocked, softmax)
    subpixel, upsample_reason, upsample_timing = _select_upsampling(model, kernels)
    upsample_kernels.route(model, subpixel)
    return KernelSelection(kernels, backend, reason, timing, packed, conv_reason, conv_timing,
                           blocked, attention_reason, attention_timing, subpixel, upsample_reason, upsample_timing,
                           softmax)


class ModelKernels:
    """A model's kernel choice, made on first use at each torch thread count (a pipeline holds one).

    ``kernels`` None: :func:`default_kernels` for the size of ``measure_on`` (the U-Net).
    ``rows``: the rows of its linear layers' GEMMs to measure at. ``onednn`` is checked at once.
    """

    def __init__(
        self, model: nn.Module, kernels: Kernels | str | None, *, measure_on: nn.Module, rows: int,
        probe: conv_kernels.Probe | None = None,
    ) -> None:
        self.model, self.measure_on, self.rows, self.probe = model, measure_on, rows, probe
        self.kernels = default_kernels(sum(p.numel() for p in measure_on.parameters())) if kernels is None else Kernels.parse(kernels)
        self._selections: dict[int, KernelSelection] = {}  # torch's thread count -> selection
        self._threads: int | None = None
        self._measuring = threading.Lock()  # one measurement at a time: it switches the model's routes
        if self.kernels is Kernels.ONEDNN:
            self.selection()  # refuses a model oneDNN cannot run, at load time

    def selection(self) -> KernelSelection:
        """The selection at torch's current thread count; the first call per count measures
        (``auto``) and routes the model's layers, later ones route again only when the count changed."""
        threads = torch.get_num_threads()
        selection = self._selections.get(threads)
        if selection is None:
            with self._measuring:  # a concurrent first request waits for this one's choice
                selection = self._selections.get(threads)
                if selection is None:
                    selection = select_kernels(self.model, self.kernels, measure_on=self.measure_on, rows=self.rows,
                                               probe=self.probe)
                    self._selections[threads] = selection
                    self._threads = threads
        if threads != self._threads:
            route(self.model, selection.backend)
            conv_kernels.route(self.model, selection.packed_convs)
            attention_kernels.route(self.model, selection.blocked_attention, selection.attention_softmax)
            upsample_kernels.route(self.model, selection.subpixel_upsampling)
        self._threads = threads
        return selection
