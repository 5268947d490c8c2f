"""Which number format a model runs in, from the words a user types: ``auto``, ``fp32``, ``bf16``, ``fp16``.

>>> resolve_precision("fp32", "cpu")
torch.float32
>>> resolve_precision("auto", "cpu", ProbeShape.for_model(cfg))   # bf16 only where native and measured faster
torch.bfloat16

``fp32``, ``bf16`` and ``fp16`` are taken as asked (also as ``float32``, ``bfloat16``,
``float16``). ``auto`` decides per device (:func:`decide_precision`):

- **CPU**: bfloat16 only when the CPU computes it natively (the ``avx512_bf16`` or
  ``amx_bf16`` flag on x86, ``bf16`` on Arm) **and** a short probe shows it faster at
  the model's own shapes; else float32. Without native support bfloat16 is emulated,
  hundreds of times slower than float32, so no probe is run. float16 is never chosen on
  a CPU (most CPUs have no fast float16 path); asked for explicitly, it warns.
- **CUDA**: the GPU's half type (bfloat16 from compute capability 8.0, float16 on 7.x,
  which has tensor cores but no bfloat16), when the probe shows it faster; before 7.0
  (no tensor cores) float32.
- **MPS**: float32. Not measured here (no Apple machine): float16 is not chosen blindly;
  ``fp16`` works when asked (the VAE then decodes in float32).

The probe (:func:`probe_half`) times one ResBlock and one SpatialTransformer of the
model's first attention level (its channels, heads, norm groups and context width; the
latent side capped by :data:`PROBE_SIDE` and :data:`PROBE_CHANNEL_SIDE`, batch 2 for guidance) in float32 and in the
half type, interleaved, the best of at least :data:`PROBE_REPEATS` rounds (more while they
are cheap, :data:`PROBE_SECONDS`), under ``torch.inference_mode``.
On a CPU it runs on one thread. It takes tens of milliseconds for a small model, a few
hundred for SD 1.5's shapes, and is cached per process (shape, device, dtype). The half type
must be at least ``1 / PROBE_MARGIN`` times faster, so a near tie (small models, whose
operations are too small to gain) stays in float32.

A value that is no precision is a one-line :class:`PrecisionError` listing the allowed ones.
"""

from __future__ import annotations

import enum
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from opensd.errors import OpenSDError

PRECISION_CHOICES = "auto, fp32, bf16 or fp16"


class PrecisionError(OpenSDError):
    """The precision asked for is not one opensd knows."""


class PrecisionWarning(UserWarning):
    """A precision that works but is slow on this device (float16 on a CPU, emulated bfloat16)."""


class Precision(enum.StrEnum):
    """What a user may ask for: ``auto`` decides per device and model (the module docstring)."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}
_NAMES = {
    "auto": Precision.AUTO, "fp32": Precision.FP32, "float32": Precision.FP32, "float": Precision.FP32,
    "bf16": Precision.BF16, "bfloat16": Precision.BF16, "fp16": Precision.FP16, "float16": Precision.FP16,
    "half": Precision.FP16,
}


def parse_precision(spec: Precision | str | torch.dtype | None) -> Precision:
    """``spec`` as a :class:`Precision`; None is ``auto``; a torch dtype or its name (``float16``) is taken as is."""
    if spec is None:
        return Precision.AUTO
    if isinstance(spec, Precision):
        return spec
    if isinstance(spec, torch.dtype):
        for p, dt in DTYPES.items():
            if dt == spec:
                return p
        raise PrecisionError(f"precision {str(spec).replace('torch.', '')} is not supported; use {PRECISION_CHOICES}")
    if isinstance(spec, str):
        key = spec.strip().lower().removeprefix("torch.")
        if key in _NAMES:
            return _NAMES[key]
    raise PrecisionError(f"unknown precision {spec!r}; use {PRECISION_CHOICES}")


def precision_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for a dtype (its torch name otherwise)."""
    return next((p.value for p, dt in DTYPES.items() if dt == dtype), str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------- the CPU's features

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm FEAT_BF16


@dataclass(frozen=True)
class CPUFeatures:
    """The CPU's feature flags as the OS lists them (``source``: where they were read)."""

    flags: frozenset[str]
    source: str

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU has bfloat16 arithmetic instructions (else torch emulates them, slowly)."""
        return any(f in self.flags for f in NATIVE_BF16_FLAGS)

    def bf16_flags(self) -> str:
        found = [f for f in NATIVE_BF16_FLAGS if f in self.flags]
        return ", ".join(found) if found else "none of " + ", ".join(NATIVE_BF16_FLAGS[:2])


def parse_cpuinfo(text: str) -> frozenset[str]:
    """The flags of ``/proc/cpuinfo``'s first ``flags`` (x86) or ``Features`` (Arm) line."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _torch_features() -> CPUFeatures:
    """Where there is no /proc/cpuinfo: torch's own view (its vector capability, and its
    private AVX-512 BF16 / AMX checks where this torch has them)."""
    flags = {torch.backends.cpu.get_cpu_capability().lower()}
    for flag, check in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, check, None)
        try:
            if fn is not None and fn():
                flags.add(flag)
        except RuntimeError:  # a torch built without the check
            pass
    return CPUFeatures(frozenset(flags), "torch.backends.cpu.get_cpu_capability()")


_FEATURES: list[CPUFeatures] = []


def cpu_features() -> CPUFeatures:
    """This machine's CPU features, read once per process: ``/proc/cpuinfo`` where it exists, else torch's."""
    if not _FEATURES:
        try:
            flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
            _FEATURES.append(CPUFeatures(flags, "/proc/cpuinfo") if flags else _torch_features())
        except OSError:
            _FEATURES.append(_torch_features())
    return _FEATURES[0]


# ----------------------------------------------------------------------------- the probe

PROBE_SIDE = 16  # the probe's latent side at most (SD 1.5's 64 would take seconds in float32) ...
PROBE_CHANNEL_SIDE = 16 * 256  # ... and at most this over its channels (320: 12, SDXL's 640: 8), at least 8
PROBE_CONTEXT = 77  # the cross-attention context at most: one prompt chunk of CLIP's length
PROBE_REPEATS = 2  # timed rounds at least (one round: one call in each dtype) ...
PROBE_SECONDS = 0.15  # ... and more, up to PROBE_MAX_ROUNDS, until this much time has passed
PROBE_MAX_ROUNDS = 40
PROBE_MARGIN = 0.8  # the half type must take at most this share of float32's time


@dataclass(frozen=True)
class ProbeShape:
    """The work the probe times: a ResBlock and a SpatialTransformer of ``channels`` at
    ``side`` x ``side`` (batch 2: a guided step), cross-attending to ``context_len`` tokens."""

    channels: int
    side: int
    heads: int
    norm_groups: int
    context_dim: int
    context_len: int
    linear: bool = False

    @classmethod
    def for_unet(cls, unet, latent_size: int, context_len: int = 77) -> ProbeShape:
        """The first attention level of a :class:`~opensd.models.unet.UNetConfig` at ``latent_size``."""
        level = min(unet.attention_levels) if unet.attention_levels else len(unet.channel_mult) - 1
        channels = unet.level_channels[level]
        side = max(1, -(-latent_size // 2**level))  # downsampling rounds up
        side = min(side, PROBE_SIDE, max(8, PROBE_CHANNEL_SIDE // channels))
        return cls(channels, side, unet.heads_at(level), unet.norm_groups, unet.context_dim, context_len,
                   unet.use_linear_in_transformer)

    @classmethod
    def for_model(cls, cfg) -> ProbeShape:
        """The probe of a :class:`~opensd.models.stable_diffusion.SDConfig`'s U-Net at its native size.
        The context is one prompt chunk: at most CLIP's 77 tokens, whatever the text encoder's
        positions (BERT has 512, but a BERT model's prompts are chunked to its tokenizer's context)."""
        return cls.for_unet(cfg.unet, cfg.latent_size, min(int(cfg.text.max_length), PROBE_CONTEXT))


SD15_PROBE = ProbeShape(320, PROBE_CHANNEL_SIDE // 320, 8, 32, 768, PROBE_CONTEXT)  # the default shape: SD 1.x's first level


@dataclass(frozen=True)
class ProbeResult:
    """Best seconds per call of the probe in float32 and in ``half``."""

    fp32_s: float
    half_s: float
    half: torch.dtype

    @property
    def ratio(self) -> float:
        """The half type's time as a share of float32's (below 1: faster)."""
        return self.half_s / self.fp32_s


def _probe_blocks(shape: ProbeShape, device: torch.device) -> torch.nn.ModuleList:
    """The probe's ResBlock and SpatialTransformer on ``device``, float32, filled from a
    private generator (torch's global random state is left as it was)."""
    from opensd.models.transformer import SpatialTransformer
    from opensd.models.unet import ResBlock

    c = shape.channels
    with torch.device("meta"):
        blocks = torch.nn.ModuleList([
            ResBlock(c, c, 4 * c, shape.norm_groups),
            SpatialTransformer(c, shape.heads, c // shape.heads, shape.context_dim, 1, shape.norm_groups, shape.linear),
        ])
    blocks = blocks.to_empty(device="cpu")
    # Values as small as a trained model's; drawn once and tiled (drawing 20 M values takes a second).
    pattern = torch.randn(4099, generator=torch.Generator().manual_seed(0)) * 0.05
    with torch.no_grad():
        for p in blocks.parameters():
            p.copy_(pattern.repeat(p.numel() // pattern.numel() + 1)[: p.numel()].view(p.shape))
    return blocks.to(device).eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_probe(shape: ProbeShape, device: torch.device, half: torch.dtype) -> ProbeResult:
    """Time the probe (the module docstring): float32 and ``half`` interleaved after a warm-up."""
    blocks = _probe_blocks(shape, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, shape.channels, shape.side, shape.side, generator=g).to(device)  # (B, C, s, s)
    emb = torch.randn(2, 4 * shape.channels, generator=g).to(device)
    ctx = torch.randn(2, shape.context_len, shape.context_dim, generator=g).to(device)  # (B, L, D)
    runs: dict[torch.dtype, tuple[torch.nn.ModuleList, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for dt in (torch.float32, half):
        net = blocks if dt == torch.float32 else _copy_to(blocks, dt)
        runs[dt] = (net, x.to(dt), emb.to(dt), ctx.to(dt))
    best = {dt: float("inf") for dt in runs}
    # On a CPU (one thread, see probe_half) the thread's CPU time: what the arithmetic costs,
    # not how long other processes held the core. On a GPU the wall time, synchronized.
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    start, rounds = time.perf_counter(), 0
    with torch.inference_mode():
        # Round 0 warms up (oneDNN picks its kernels). Then at least PROBE_REPEATS rounds, more
        # while they are cheap: the best of many is what a call costs when nothing preempts it.
        while rounds <= PROBE_REPEATS or (rounds < PROBE_MAX_ROUNDS and time.perf_counter() - start < PROBE_SECONDS):
            for dt, (net, xi, ei, ci) in runs.items():
                _sync(device)
                t0 = clock()
                net[1](net[0](xi, ei), ci)
                _sync(device)
                if rounds:
                    best[dt] = min(best[dt], clock() - t0)
            rounds += 1
    return ProbeResult(best[torch.float32], best[half], half)


def _copy_to(blocks: torch.nn.ModuleList, dtype: torch.dtype) -> torch.nn.ModuleList:
    import copy

    return copy.deepcopy(blocks).to(dtype)


_PROBES: dict[tuple, ProbeResult] = {}
_PROBE_LOCK = threading.Lock()

ProbeFn = Callable[[ProbeShape, torch.device, torch.dtype], ProbeResult]


def probe_half(shape: ProbeShape, device: torch.device, half: torch.dtype) -> ProbeResult:
    """:func:`time_probe`, cached per process by shape, device and dtype.

    On a CPU it runs on one thread (torch's count is restored after): the ratio of one
    core's speeds, which more threads share; on a busy machine threads waiting for each
    other at every operation's barrier would be timed instead of the arithmetic."""
    key = (shape, str(device), half)
    with _PROBE_LOCK:  # one probe at a time: two at once would time each other
        if key not in _PROBES:
            threads = torch.get_num_threads()
            if device.type == "cpu" and threads != 1:
                torch.set_num_threads(1)
            try:
                _PROBES[key] = time_probe(shape, device, half)
            finally:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
        return _PROBES[key]


# ----------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class PrecisionDecision:
    """The dtype a model runs in, what was asked, and why (one line, for logs and docs)."""

    dtype: torch.dtype
    asked: Precision | None  # None: nothing was asked (a model used in the dtype it came in)
    reason: str

    @property
    def name(self) -> str:
        return precision_name(self.dtype)


def _cuda_half(device: torch.device) -> tuple[torch.dtype | None, str]:
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8 and torch.cuda.is_bf16_supported():
        return torch.bfloat16, f"compute capability {major}.{minor} has bf16 tensor cores"
    if major >= 7:
        return torch.float16, f"compute capability {major}.{minor} has fp16 tensor cores but no bf16"
    return None, f"compute capability {major}.{minor} has no tensor cores"


def _auto(device: torch.device, shape: ProbeShape, features: CPUFeatures, probe: ProbeFn) -> tuple[torch.dtype, str]:
    if device.type == "cpu":
        if not features.native_bf16:
            return torch.float32, f"auto: fp32, this CPU has no native bf16 ({features.bf16_flags()} in {features.source})"
        half, why = torch.bfloat16, f"native bf16 ({features.bf16_flags()})"
    elif device.type == "cuda":
        found, why = _cuda_half(device)
        if found is None:
            return torch.float32, f"auto: fp32, {why}"
        half = found
    else:
        return torch.float32, f"auto: fp32 on {device.type} (half precision is not chosen without a measurement there)"
    r = probe(shape, device, half)
    verdict = "faster" if r.ratio <= PROBE_MARGIN else f"not faster by {1 / PROBE_MARGIN:.2f}x"
    chosen = half if r.ratio <= PROBE_MARGIN else torch.float32
    return chosen, (f"auto: {precision_name(chosen)}, {why}; the probe at {shape.channels} channels, "
                    f"{shape.side}x{shape.side}: {precision_name(half)} takes {r.ratio:.2f}x fp32's time ({verdict})")


def slow_on_cpu(dtype: torch.dtype) -> str | None:
    """Why ``dtype`` is slow on this machine's CPU (float16; bfloat16 without native support), or None."""
    return _warning(dtype, torch.device("cpu"), cpu_features())


def _warning(dtype: torch.dtype, device: torch.device, features: CPUFeatures) -> str | None:
    if device.type != "cpu":
        return None
    if dtype == torch.float16:
        return "fp16 on a CPU is slow (few CPUs compute float16 natively; torch converts every operation); use fp32 or auto"
    if dtype == torch.bfloat16 and not features.native_bf16:
        return ("bf16 on this CPU is emulated (it has no avx512_bf16 or amx_bf16), often hundreds of times slower "
                "than fp32; use fp32 or auto")
    return None


def decide_precision(
    spec: Precision | str | torch.dtype | None,
    device: torch.device | str,
    shape: ProbeShape | None = None,
    *,
    features: CPUFeatures | None = None,
    probe: ProbeFn | None = None,
) -> PrecisionDecision:
    """The dtype ``spec`` means on ``device`` for a model of ``shape`` (None: SD 1.x's), and why.

    ``features`` and ``probe`` replace this machine's CPU flags and :func:`probe_half`
    (for tests). An explicit precision that is slow here (fp16 on a CPU, bf16 without
    native support) is used, with a :class:`PrecisionWarning`.
    """
    asked = parse_precision(spec)
    device = torch.device(device)
    features = features if features is not None else (cpu_features() if device.type == "cpu" else CPUFeatures(frozenset(), "n/a"))
    if asked is Precision.AUTO:
        dtype, reason = _auto(device, shape or SD15_PROBE, features, probe or probe_half)
        return PrecisionDecision(dtype, asked, reason)
    dtype = DTYPES[asked]
    slow = _warning(dtype, device, features)
    if slow is not None:
        warnings.warn(slow, PrecisionWarning, stacklevel=2)
    return PrecisionDecision(dtype, asked, f"{asked.value}, as asked")


PrecisionSpec = Precision | str | torch.dtype | None


class PrecisionForModel:
    """``spec`` decided for ``device`` (None: the CPU) at a model's shapes, as a function of its
    configuration: what :func:`opensd.checkpoints.load_model`'s ``dtype`` takes, so that the
    weights are read straight into the dtype. Keeps the :class:`PrecisionDecision` made."""

    def __init__(self, spec: PrecisionSpec, device: torch.device | str | None = None):
        self.spec, self.device = spec, torch.device(device) if device is not None else torch.device("cpu")
        self.decision: PrecisionDecision | None = None

    def __call__(self, cfg) -> torch.dtype:
        self.decision = decide_precision(self.spec, self.device, ProbeShape.for_model(cfg))
        return self.decision.dtype


def model_precision(spec: PrecisionSpec, device: torch.device | str | None, model) -> PrecisionDecision:
    """``spec`` for a loaded :class:`~opensd.models.stable_diffusion.StableDiffusion` going to
    ``device`` (None: where it is); None: the model's dtype as it is."""
    if spec is None:
        return PrecisionDecision(model.dtype, None, f"{precision_name(model.dtype)}, the model's as loaded")
    return decide_precision(spec, device if device is not None else model.device, ProbeShape.for_model(model.cfg))


def resolve_precision(
    spec: Precision | str | torch.dtype | None, device: torch.device | str, shape: ProbeShape | None = None, **kw
) -> torch.dtype:
    """The :class:`torch.dtype` of :func:`decide_precision`."""
    return decide_precision(spec, device, shape, **kw).dtype


__all__ = [
    "CPUFeatures", "PRECISION_CHOICES", "Precision", "PrecisionDecision", "PrecisionError", "PrecisionForModel",
    "PrecisionSpec", "PrecisionWarning", "ProbeResult", "ProbeShape", "cpu_features", "decide_precision",
    "model_precision", "parse_cpuinfo", "parse_precision", "precision_name", "probe_half", "resolve_precision",
    "time_probe",
]
