"""Whether a model's attention runs on torch's SDPA or on blocked GEMMs, chosen by measurement.

torch's CPU ``F.scaled_dot_product_attention`` is a flash kernel: it keeps the scores of a
block of queries in float32 and does its softmax arithmetic at float32 speed. At SD 1.5's
head dim of 40 it is no faster in bfloat16 than in float32 (0.54 s for one 4096-token
self-attention of a guided 512² step, 1 thread, AMD EPYC with avx512_bf16), while the two
GEMMs of attention (``QK^T`` and ``PV``) run 3-4x faster in bfloat16 than in float32.

:func:`blocked_attention` computes the same softmax attention (Vaswani et al. 2017,
"Attention Is All You Need", Eq. 1) as those two batched GEMMs over blocks of query rows,
each block's scores in one buffer of at most :data:`BLOCK_BYTES` made once per call, and the
softmax taken in that buffer in place (ATen's ``_softmax.out`` with the scores as its output:
its row kernel reads each score before it writes it), so that no score matrix is ever
allocated per block. Fresh memory is what made the plain ``softmax(QK^T)V`` slow on a CPU:
the pages of a new 32 MB score matrix are faulted in one by one on every call. In bfloat16
the scores are rounded to bfloat16 before the softmax, which SDPA's are not: alone it
differs from float32 by about twice SDPA's own bfloat16 error, but inside the SD 1.5 U-Net,
whose q, k and v are themselves bfloat16 products, the U-Net's output differed from float32
by the same 1.2e-2 (RMS, relative) either way (``benchmarks/attention_route.py``, docs/benchmarks.md).

Where it is faster depends on the CPU, the dtype and the shapes (in float32 SDPA was the
faster here), so it is never assumed: :func:`measure` times both at a model's own attention
shapes and :func:`choose` keeps the blocked kernel only when it takes at most
:data:`BLOCKED_MARGIN` of SDPA's time and agrees with float32 SDPA to :data:`AGREEMENT` for
the dtype. :mod:`opensd.kernels` makes that choice with the model's GEMM and convolution choices.

Routing (like theirs): the U-Net's :class:`~opensd.models.transformer.CrossAttention` and the
VAE's :class:`~opensd.models.vae.AttnBlock` call :func:`attend`, which sends the modules of a
routed model (a process-wide weak set: nothing is stored on them) to the blocked kernel when it
can run the call (CPU, no mask, no gradient needed, not inside ``torch.compile``), and
everything else to :func:`opensd.models.attention.multihead_attention` (SDPA).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, cast

import torch
from torch import nn

from opensd.kernel_routes import Routes
from opensd.models.attention import multihead_attention

# The blocked kernel is chosen when it takes at most this fraction of SDPA's time ...
BLOCKED_MARGIN = 0.9
# ... and when its output agrees with float32 SDPA to this (max |diff| / max |reference|), per dtype.
AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# The scores of one block of query rows: at most this many bytes (2 MiB: 256 rows of 4096 keys
# in bfloat16). 8 MiB blocks measured no faster with ATen's softmax, and with oneDNN's, whose
# answer is a fresh tensor per block, 5x slower (docs/benchmarks.md, "oneDNN's softmax").
BLOCK_BYTES = 2 * 2**20
# What is timed: each distinct attention shape at TIMED_WORK / channels query tokens (at least
# MIN_TOKENS): 1024 tokens at 320 channels, SD 1.5's 32x32 level of a 256² image, and fewer at
# the wider, coarser levels, as in the U-Net; cross-attention at CONTEXT_TOKENS keys (a CLIP prompt).
# At most MAX_TOKENS: narrower models (under 320 channels) are not timed at more tokens than
# SD 1.5's widest timed level (a 32-channel model would be at 10,240, a hundred times the work).
TIMED_WORK = 1024 * 320
MIN_TOKENS = 64
MAX_TOKENS = 1024
CONTEXT_TOKENS = 77


class Softmax(StrEnum):
    """Which softmax the blocked kernel takes over each block of scores."""

    ATEN = "aten"  # ATen's row kernel, in place in the score buffer
    ONEDNN = "onednn"  # oneDNN's softmax primitive: a copy into its layout and back, faster rows


_BLOCKED: Routes[Softmax] = Routes()  # the attention modules on the blocked kernel, with its softmax


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      softmax: Softmax = Softmax.ATEN) -> torch.Tensor:
    """Softmax attention over ``heads`` heads as blocked GEMMs (no autograd: inference only).

    q: (B, Nq, C), k and v: (B, Nk, C) -> (B, Nq, C), as :func:`multihead_attention` without a mask.
    ``softmax``: :class:`Softmax` (oneDNN's raises where oneDNN has no such primitive, e.g. float16).
    """
    block = _block_onednn if softmax is Softmax.ONEDNN else _block
    b, n, c = q.shape
    m, d = k.shape[1], c // heads
    bh = b * heads
    q3 = (q * d**-0.5).reshape(b, n, heads, d).transpose(1, 2).reshape(bh, n, d)  # (BH, Nq, d), scaled
    kt = k.reshape(b, m, heads, d).permute(0, 2, 3, 1).reshape(bh, d, m)  # (BH, d, Nk)
    v3 = v.reshape(b, m, heads, d).transpose(1, 2).reshape(bh, m, d)  # (BH, Nk, d)
    out = q.new_empty(bh, n, d)
    rows = max(1, BLOCK_BYTES // (m * q.element_size()))  # query rows whose scores fit a block
    if rows >= n:  # whole heads per block
        per = min(bh, rows // n)
        buf = q.new_empty(per, n, m)
        for i in range(0, bh, per):
            j = min(bh, i + per)
            block(torch.bmm, q3[i:j], kt[i:j], v3[i:j], buf[: j - i], out[i:j])
    else:  # row blocks within each head
        buf = q.new_empty(rows, m)
        for h in range(bh):
            for r in range(0, n, rows):
                e = min(n, r + rows)
                block(torch.mm, q3[h, r:e], kt[h], v3[h], buf[: e - r], out[h, r:e])
    return out.view(b, heads, n, d).transpose(1, 2).reshape(b, n, c)  # (B, Nq, C)


def _block(mm: Callable[..., torch.Tensor], q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor,
           scores: torch.Tensor, out: torch.Tensor) -> None:
    """One block: ``scores = q kt``; their softmax over the keys in place; ``out = scores v``."""
    mm(q, kt, out=scores)
    torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    mm(scores, v, out=out)


def _block_onednn(mm: Callable[..., torch.Tensor], q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor,
                  scores: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`_block` with oneDNN's softmax: the scores copied into oneDNN's layout, its softmax
    (about half ATen's time per bfloat16 score here, 0.2 ns against 0.44), and back."""
    mm(q, kt, out=scores)
    probs = torch._softmax(scores.to_mkldnn(), -1, False).to_dense()
    mm(probs, v, out=out)


def onednn_softmax_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN has a softmax for ``dtype`` on this CPU (an AVX2-only CPU has none in
    bfloat16). :func:`measure` leaves a kernel that raises out, so ``auto`` never routes to it."""
    try:
        torch._softmax(torch.zeros(1, 2, dtype=dtype).to_mkldnn(), -1, False)
    except RuntimeError:
        return False
    return True


def _fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``module``'s attention (q: (B, Nq, C), k, v: (B, Nk, C)) on the kernel its model's selection chose."""
    softmax = _BLOCKED.get(module)
    if softmax is not None and _fits(q, k, v):
        return blocked_attention(q, k, v, heads, softmax)
    return multihead_attention(q, k, v, heads)


class _Routable(Protocol):
    def attention_shape(self, queries: int, context: int) -> tuple[int, int, int, int]: ...


def routable(module: nn.Module) -> list[nn.Module]:
    """The attention modules of ``module`` that :func:`attend` serves (they carry ``attention_shape``)."""
    return [m for m in module.modules() if hasattr(m, "attention_shape")]


def route(module: nn.Module, blocked: bool, softmax: Softmax = Softmax.ATEN) -> int:
    """Put every routable attention of ``module`` on the blocked kernel with ``softmax`` (or back
    on SDPA); returns how many."""
    return _BLOCKED.set(routable(module), softmax if blocked else None)


def routed(module: nn.Module) -> bool:
    return module in _BLOCKED


def routed_softmax(module: nn.Module) -> Softmax | None:
    """The softmax of ``module``'s blocked route, or None where it is on SDPA."""
    return _BLOCKED.value(module)


# ----------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class AttentionShape:
    """One timed attention: ``heads`` heads of ``head_dim``, ``queries`` x ``keys`` tokens, batch 2
    (a guided step); ``weight``: how many of the model's modules it stands for."""

    heads: int
    head_dim: int
    queries: int
    keys: int
    weight: int = 1


@dataclass(frozen=True)
class AttentionTiming:
    """The kernels timed at ``shapes`` (seconds for the work they stand for, fastest of the repeats):
    SDPA, the blocked kernel with ATen's softmax and with oneDNN's (``inf`` where it cannot run)."""

    shapes: tuple[AttentionShape, ...]
    dtype: torch.dtype
    threads: int
    sdpa_s: float
    blocked_s: float
    blocked_err: float  # max |blocked - float32 SDPA| / max |float32 SDPA| over the shapes
    sdpa_err: float  # the same for SDPA in the dtype itself
    onednn_s: float = float("inf")  # the blocked kernel with oneDNN's softmax
    onednn_err: float = float("inf")

    @property
    def ratio(self) -> float:
        """The blocked kernel's time (ATen's softmax) / SDPA's (below 1: blocked is faster)."""
        return self.blocked_s / self.sdpa_s if self.sdpa_s > 0 else float("inf")

    @property
    def onednn_ratio(self) -> float:
        """The blocked kernel's time with oneDNN's softmax / SDPA's."""
        return self.onednn_s / self.sdpa_s if self.sdpa_s > 0 else float("inf")


def timed_tokens(module: nn.Module) -> int:
    """The query tokens ``module``'s attention is timed at: :data:`TIMED_WORK` / its channels,
    from :data:`MIN_TOKENS` to :data:`MAX_TOKENS`."""
    heads, head_dim, _, _ = cast(_Routable, module).attention_shape(1, 1)
    return max(MIN_TOKENS, min(MAX_TOKENS, TIMED_WORK // (heads * head_dim)))


def attention_shapes(module: nn.Module) -> tuple[AttentionShape, ...]:
    """The distinct attention shapes of ``module``'s routable modules, as timed (largest work first)."""
    counts = Counter(cast(_Routable, m).attention_shape(timed_tokens(m), CONTEXT_TOKENS) for m in routable(module))
    shapes = [AttentionShape(h, d, n, k, count) for (h, d, n, k), count in counts.items()]
    return tuple(sorted(shapes, key=lambda s: (-s.weight * s.heads * s.head_dim * s.queries * s.keys, s.heads, s.head_dim)))


def _seconds(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


Timer = Callable[[str, AttentionShape], float]
KERNELS = ("sdpa", "blocked", "blocked-onednn")  # what measure() times, by the names a Timer is given


def _calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> dict[str, Callable[[], torch.Tensor]]:
    return {"sdpa": lambda: multihead_attention(q, k, v, heads),
            "blocked": lambda: blocked_attention(q, k, v, heads),
            "blocked-onednn": lambda: blocked_attention(q, k, v, heads, Softmax.ONEDNN)}


def measure(shapes: Iterable[AttentionShape], dtype: torch.dtype, *, repeats: int = 3,
            timer: Timer | None = None) -> AttentionTiming:
    """Time SDPA and both blocked kernels (:data:`KERNELS`) at ``shapes`` in ``dtype`` (interleaved,
    fastest of ``repeats``), and compare each with float32 SDPA on the same inputs. A kernel that
    raises (oneDNN's softmax in float16) is left out: ``inf`` seconds and error.

    ``timer(kernel, shape) -> seconds`` replaces the clock (tests); the outputs are still computed and compared."""
    shapes = tuple(shapes)
    g = torch.Generator().manual_seed(0)
    total = dict.fromkeys(KERNELS, 0.0)
    err = dict.fromkeys(KERNELS, 0.0)
    with torch.inference_mode():
        for s in shapes:
            c = s.heads * s.head_dim
            q = torch.randn(2, s.queries, c, generator=g)
            k, v = (torch.randn(2, s.keys, c, generator=g) for _ in range(2))
            ref = multihead_attention(q, k, v, s.heads)
            calls = {n: fn for n, fn in _calls(q.to(dtype), k.to(dtype), v.to(dtype), s.heads).items() if total[n] < float("inf")}
            for name, fn in list(calls.items()):  # also the warm-up
                try:
                    out = fn()
                except RuntimeError:  # no such primitive for this dtype or CPU
                    total[name] = err[name] = float("inf")
                    del calls[name]
                    continue
                err[name] = max(err[name], float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(repeats):
                for name, fn in calls.items():
                    best[name] = min(best[name], timer(name, s) if timer is not None else _seconds(fn))
            for name in calls:
                total[name] += best[name] * s.weight
    return AttentionTiming(shapes, dtype, torch.get_num_threads(), total["sdpa"], total["blocked"],
                           err["blocked"], err["sdpa"], total["blocked-onednn"], err["blocked-onednn"])


def choose(timing: AttentionTiming) -> tuple[bool, Softmax, str]:
    """``(blocked, softmax, reason)``: the faster blocked kernel within :data:`AGREEMENT` of float32
    (ATen's softmax on a tie), when it takes at most :data:`BLOCKED_MARGIN` of SDPA's time."""
    if not timing.shapes:
        return False, Softmax.ATEN, "no attention to route"
    bound = AGREEMENT.get(timing.dtype, 1e-4)
    options = [(timing.ratio, timing.blocked_err, Softmax.ATEN), (timing.onednn_ratio, timing.onednn_err, Softmax.ONEDNN)]
    agreeing = [o for o in options if o[1] <= bound]
    ratio, error, softmax = min(agreeing or options, key=lambda o: o[0])
    which = "blocked GEMMs" + (" with oneDNN's softmax" if softmax is Softmax.ONEDNN else "")
    measured = (f"measured: {which} take {ratio:.2f}x SDPA's time at {len(timing.shapes)} shapes, "
                f"error {error:.1e} against SDPA's {timing.sdpa_err:.1e}")
    if not agreeing:
        return False, softmax, f"{measured}, above {bound:g}"
    return ratio <= BLOCKED_MARGIN, softmax, measured


_timings: dict[tuple, AttentionTiming] = {}


def measure_cached(shapes: tuple[AttentionShape, ...], dtype: torch.dtype, *, timer: Timer | None = None) -> AttentionTiming:
    """:func:`measure`, once per process for a set of shapes, a dtype and a thread count (an injected timer is never cached)."""
    if timer is not None:
        return measure(shapes, dtype, timer=timer)
    key = (shapes, dtype, torch.get_num_threads())
    with _BLOCKED.lock:
        hit = _timings.get(key)
    if hit is None:
        hit = measure(shapes, dtype)
        with _BLOCKED.lock:
            hit = _timings.setdefault(key, hit)
    return hit
