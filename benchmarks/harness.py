"""The benchmark harness: settings, one row of results, interleaved timing, the machine.

``bench.py`` (the runner and the SD 1.5 cases) and ``families.py`` (SD 2.1 and SDXL)
share these. Every timed case gives one set of weights to both implementations, then
:func:`interleave` warms both up, lets the case check that they agree, and times them
in turn A, B, A, B, ...
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# CPU features that decide which number formats have a fast path (reported beside every number).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


# ----------------------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class Settings:
    """What every case runs with; both sides always get the same."""

    device: torch.device
    dtype: torch.dtype
    dtype_name: str
    compile: bool
    compile_mode: str
    quick: bool
    repeats: int | None  # None: each case's default
    threads: int
    memory_size: int
    memory_steps: int
    unet_size: int | None = None  # image side of the family U-Net cases (None: each case's default)
    # --dtype auto: opensd runs in ``dtype`` (its default precision decided here), the reference
    # side in ``ref_dtype`` (diffusers' default, fp32); None: both sides in ``dtype``
    ref_dtype: torch.dtype | None = None
    auto_reason: str | None = None
    kernels: str = "auto"  # opensd's kernel choice in the SD 1.5 module cases (opensd.kernels; its default there)

    @property
    def split(self) -> bool:
        """Whether the two sides run in different dtypes (--dtype auto)."""
        return self.ref_dtype is not None and self.ref_dtype != self.dtype

    def reference(self) -> Settings:
        """The settings of the reference side: these, in ``ref_dtype`` under --dtype auto."""
        if self.ref_dtype is None:
            return self
        return dataclasses.replace(self, dtype=self.ref_dtype, dtype_name=dtype_name(self.ref_dtype), ref_dtype=None)

    def label(self, what: str) -> str:
        """A row's description, saying which dtype each side ran in when they differ."""
        if self.ref_dtype is None:
            return what
        return f"{what}, opensd default ({dtype_name(self.dtype)}) vs diffusers default ({dtype_name(self.ref_dtype)})"

    def reps(self, heavy: bool) -> int:
        """Timed repeats: few for the SD 1.5 cases on a CPU (a guided step takes seconds)."""
        if self.repeats is not None:
            return self.repeats
        cuda = self.device.type == "cuda"
        if heavy:
            return (10 if self.quick else 20) if cuda else (2 if self.quick else 3)
        return (5 if self.quick else 10) if cuda else (3 if self.quick else 10)

    def warmup(self) -> int:
        return 3 if self.device.type == "cuda" else 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


@dataclass
class Row:
    """One line of the table: one workload, both implementations."""

    case: str
    what: str
    unit: str  # throughput unit, e.g. "img/s"
    per_call: float  # work items per timed call (images, steps, samples)
    opensd_s: list[float] = field(default_factory=list)
    diffusers_s: list[float] = field(default_factory=list)
    first_call_s: dict[str, float] = field(default_factory=dict)  # warm-up / compile
    max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, side: str) -> float:
        return statistics.median(getattr(self, f"{side}_s"))

    def to_json(self) -> dict[str, Any]:
        a, b = self.median("opensd"), self.median("diffusers")
        return {
            "case": self.case,
            "what": self.what,
            "opensd_median_s": a,
            "diffusers_median_s": b,
            "ratio_time_opensd_over_diffusers": a / b,
            "throughput_unit": self.unit,
            "opensd_throughput": self.per_call / a,
            "diffusers_throughput": self.per_call / b,
            "opensd_spread_max_over_min": max(self.opensd_s) / min(self.opensd_s),
            "diffusers_spread_max_over_min": max(self.diffusers_s) / min(self.diffusers_s),
            "opensd_times_s": self.opensd_s,
            "diffusers_times_s": self.diffusers_s,
            "first_call_s": self.first_call_s,
            "max_abs_diff": self.max_abs_diff,
            **self.extra,
        }


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], s: Settings) -> tuple[float, Any]:
    s.sync()
    if s.compile and s.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: CUDA graphs may reuse its buffers
    t0 = time.perf_counter()
    out = fn()
    s.sync()
    return time.perf_counter() - t0, out


def kept(out: Any) -> Any:
    """A copy of a call's output that later calls cannot overwrite (CUDA graphs reuse their output buffers)."""
    return out.clone() if isinstance(out, torch.Tensor) else out


def interleave(
    row: Row, ours: Callable[[], Any], ref: Callable[[], Any], s: Settings, heavy: bool,
    check: Callable[[Any, Any], None] | None = None,
) -> tuple[Any, Any]:
    """Warm up both, then time ours, ref, ours, ref, ... Returns the first outputs of each.

    ``check(first_ours, first_ref)`` runs after the warm-up and before any timed call:
    it may raise to stop a case whose two sides do not compute the same thing."""
    first_ours = first_ref = None
    for i in range(s.warmup()):
        ta, out_a = timed(ours, s)
        if i == 0 and s.compile:  # printed at once: a run cut off by a timeout still shows it
            print(f"# {row.case}: opensd first call (compile) {ta:.1f} s", flush=True)
        tb, out_b = timed(ref, s)
        if i == 0:
            if s.compile:
                print(f"# {row.case}: diffusers first call (compile) {tb:.1f} s", flush=True)
            row.first_call_s = {"opensd": ta, "diffusers": tb}
            first_ours, first_ref = kept(out_a), kept(out_b)
    if check is not None:
        check(first_ours, first_ref)
    for _ in range(s.reps(heavy)):
        row.opensd_s.append(timed(ours, s)[0])
        row.diffusers_s.append(timed(ref, s)[0])
    return first_ours, first_ref


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def maybe_compile(module: torch.nn.Module, s: Settings) -> torch.nn.Module:
    return torch.compile(module, mode=s.compile_mode) if s.compile else module


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` /proc/cpuinfo lists (empty where there is no /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return {f: f in have for f in CPU_FLAGS}
    except OSError:
        pass
    return {}


def versions() -> dict[str, str | None]:
    """Library versions without importing them (diffusers/transformers may be absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("diffusers", "transformers"):
        if name in sys.modules:  # imported by a case (perhaps from PYTHONPATH, without package metadata)
            out[name] = getattr(sys.modules[name], "__version__", None)
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine(s: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        **versions(),
    }
    if s.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(s.device)
        info["cuda"] = torch.version.cuda
    return info


def matmul_peak(s: Settings, dtype: torch.dtype) -> float:
    """Best GFLOP/s of large square matmuls (2 n^3 FLOPs each) in ``dtype`` on the device."""
    cuda = s.device.type == "cuda"
    n = 8192 if cuda else (2048 if s.quick else 4096)
    per_timing = 10 if cuda else 1
    g = torch.Generator(s.device).manual_seed(0)
    a = torch.randn(n, n, device=s.device, generator=g).to(dtype)
    b = torch.randn(n, n, device=s.device, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5 if cuda or s.quick else 3):
        t, _ = timed(lambda: [torch.mm(a, b) for _ in range(per_timing)], s)
        best = min(best, t / per_timing)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------- weights, shared


def silence_reference_logs() -> None:
    """diffusers/transformers print deprecation notes and progress bars; the table is enough."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # e.g. diffusers' torch_dtype -> dtype rename
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
        try:
            __import__(f"{name}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def build(cls: Callable[[], torch.nn.Module], s: Settings, native: bool = False) -> torch.nn.Module:
    """A module initialized directly on the device (fast on a GPU), cast to the dtype.

    ``native``: initialize in the dtype itself (PyTorch's default init, drawn in that
    dtype), so that a large model never exists in fp32 too (SDXL: 10 GB)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    if native:
        torch.set_default_dtype(s.dtype)
    try:
        with torch.device(s.device):
            module = cls()
    finally:
        torch.set_default_dtype(default)
    return module.to(s.dtype).eval().requires_grad_(False)


def efficiency(flops: float, row: Row, s: Settings) -> dict[str, Any]:
    """FLOPs of one call against the device's matmul peak in each side's dtype."""
    peak = matmul_peak(s, s.dtype)
    ref_peak = matmul_peak(s, s.ref_dtype) if s.split else peak
    a, b = flops / row.median("opensd") / 1e9, flops / row.median("diffusers") / 1e9
    out = {
        "unet_flops_per_call": flops,
        "matmul_peak_gflops": peak,
        "matmul_peak_dtype": dtype_name(s.dtype),
        "opensd_achieved_gflops": a,
        "diffusers_achieved_gflops": b,
        "opensd_pct_of_peak": 100 * a / peak,
        "diffusers_pct_of_peak": 100 * b / ref_peak,
    }
    if s.split:
        out["diffusers_matmul_peak_gflops"] = ref_peak
        out["diffusers_matmul_peak_dtype"] = dtype_name(s.ref_dtype)
    if s.dtype != torch.float32:
        out["matmul_peak_fp32_gflops"] = ref_peak if s.split and s.ref_dtype == torch.float32 else matmul_peak(s, torch.float32)
    return out


def recast(module: torch.nn.Module, make: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """``module``'s weights in ``dtype`` in a new module (``make()`` built on meta), itself when
    already so: under --dtype auto opensd's side gets its own copy in its precision."""
    if next(module.parameters()).dtype == dtype:
        return module
    with torch.device("meta"):
        other = make()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    other.load_state_dict(state, strict=True, assign=True)
    return other.eval().requires_grad_(False)

