"""Ways to compute SD 1.5's attention on a CPU, timed at its shapes: torch's SDPA and the alternatives tried.

At 256² the U-Net's self-attention at the 32x32 level is (batch 2, 8 heads, 1024 tokens,
head dim 40); at 512² 4096 tokens; cross-attention has 77 context tokens. Each variant is
timed (median of ``--repeats`` after a warm-up, one thread by default) and its error given
against float32 SDPA on the same inputs:

* ``sdpa``: ``F.scaled_dot_product_attention`` (torch's CPU flash attention), what opensd runs;
* ``padN``: the head dim zero-padded to the next multiple of 16 and of 64 (40: 48, 64), scale kept, then SDPA;
* ``math``: ``softmax(QK^T / sqrt(d)) V`` as two batched matmuls, softmax in the input's dtype;
* ``math_f32_softmax``: the same with the softmax in float32;
* ``heads_in_batch``: SDPA on (batch x heads, tokens, dim);
* ``qk_fresh`` and ``qk_buffer``: the first GEMM alone, ``QK^T`` into fresh memory (what ``math``
  does) and into a buffer made once (what ``blocked`` does): the cost of faulting in a new score matrix;
* ``blocked``: :func:`opensd.attention_kernels.blocked_attention`, the two GEMMs over blocks of
  query rows with the scores in one reused buffer and the row sums from the second GEMM (what
  ``kernels="auto"`` routes a model's attention to where it measures faster).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/attention_cpu.py --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from opensd.attention_kernels import blocked_attention
from opensd.precision import cpu_features

SHAPES = ((1024, 1024, 320), (1024, 77, 320), (256, 256, 640), (4096, 4096, 320))  # (queries, keys, channels)
HEADS = 8


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    d = q.shape[-1]
    out: dict[str, Callable[[], torch.Tensor]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    for pd in sorted({-(-d // 16) * 16, -(-d // 64) * 64} - {d}):  # the next multiples of 16 and 64
        qp, kp, vp = (F.pad(t, (0, pd - d)) for t in (q, k, v))
        out[f"pad{pd}"] = lambda qp=qp, kp=kp, vp=vp: F.scaled_dot_product_attention(qp, kp, vp, scale=d**-0.5)[..., :d]
    out["math"] = lambda: (q @ k.transpose(-1, -2)).mul_(d**-0.5).softmax(-1) @ v
    out["math_f32_softmax"] = lambda: (q @ k.transpose(-1, -2)).float().mul_(d**-0.5).softmax(-1).to(q.dtype) @ v
    q3, k3, v3 = (t.reshape(-1, *t.shape[2:]).contiguous() for t in (q, k, v))
    out["heads_in_batch"] = lambda: F.scaled_dot_product_attention(q3, k3, v3).view_as(q)
    b, h, n, _ = q.shape
    qt, kt, vt = (t.transpose(1, 2).reshape(b, t.shape[2], h * d) for t in (q, k, v))  # (B, N, C)
    out["blocked"] = lambda: blocked_attention(qt, kt, vt, h).view(b, n, h, d).transpose(1, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(0)
    rows = []
    print("| queries x keys, channels | variant | ms | / sdpa | max error vs fp32 |\n|---|---|---:|---:|---:|")
    with torch.inference_mode():
        for n, L, c in SHAPES:
            q32, k32, v32 = (torch.randn(2, HEADS, m, c // HEADS, generator=g) for m in (n, L, L))
            ref = F.scaled_dot_product_attention(q32, k32, v32)
            base = None
            q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
            for name, fn in variants(q, k, v).items():
                s = timed(fn, args.repeats)
                base = base or s
                err = float((fn().float() - ref).abs().max())
                rows.append({"queries": n, "keys": L, "channels": c, "variant": name, "s": s, "max_err": err})
                print(f"| {n} x {L}, {c} | {name} | {1e3 * s:.2f} | {s / base:.2f} | {err:.2g} |", flush=True)
            kt = k.transpose(-1, -2)
            scores = q @ kt
            for name, fn in {"qk_fresh": lambda q=q, kt=kt: q @ kt,
                             "qk_buffer": lambda q=q, kt=kt, o=scores: torch.matmul(q, kt, out=o)}.items():
                s = timed(fn, args.repeats)
                rows.append({"queries": n, "keys": L, "channels": c, "variant": name, "s": s, "max_err": None})
                print(f"| {n} x {L}, {c} | {name} | {1e3 * s:.2f} | {s / base:.2f} | |", flush=True)
    flags = sorted(cpu_features().flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"})
    out = json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_flags": flags, "torch": torch.__version__,
                      "dtype": args.dtype, "threads": args.threads, "rows": rows})
    if args.json:
        args.json.write_text(out + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
