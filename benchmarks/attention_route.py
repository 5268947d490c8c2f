"""One guided SD 1.5 U-Net call with its attention on SDPA and on blocked GEMMs (ATen's softmax, oneDNN's), side by side.

The U-Net has PyTorch's default init (seed 0) and runs at ``--size`` (latent size / 8) in
``--dtype``, its linear layers and convolutions routed as ``kernels="auto"`` chooses
(opensd.kernels); then its attention modules are put on SDPA and on the blocked kernel with
each softmax (opensd.attention_kernels.route) in turn, call by call after a warm-up of each.
Reported: median seconds of each, their ratios to SDPA, and each output's error against the float32 U-Net on
the same inputs (max and RMS, relative to the float32 output's max and RMS).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/attention_route.py --size 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from opensd import attention_kernels
from opensd.conv_kernels import Probe
from opensd.kernels import select_kernels
from opensd.models.unet import UNetConfig, UNetModel
from opensd.precision import cpu_features


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="image side (a multiple of 64)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    side = args.size // 8
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.sd15()).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, side, side, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        ref = unet(x, t, context)  # float32, torch's kernels, SDPA
    unet = unet.to(dtype)
    x, context, t = x.to(dtype), context.to(dtype), t.to(dtype)
    routes = {"sdpa": (False, attention_kernels.Softmax.ATEN), "blocked": (True, attention_kernels.Softmax.ATEN),
              "blocked-onednn": (True, attention_kernels.Softmax.ONEDNN)}
    times: dict[str, list[float]] = {name: [] for name in routes}
    errors = {}
    with torch.inference_mode():
        probe = Probe(lambda: unet(x[..., :16, :16].contiguous(), t, context), "the U-Net at a 16x16 latent")
        kernels = select_kernels(unet, "auto", probe=probe).describe()
        print(kernels, flush=True)
        for name in times:  # warm-up (packs the convolutions at this size) and the errors
            attention_kernels.route(unet, *routes[name])
            out = unet(x, t, context).float()
            errors[name] = {"max": float((out - ref).abs().max() / ref.abs().max()),
                            "rms": float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())}
        for _ in range(args.repeats):
            for name in times:
                attention_kernels.route(unet, *routes[name])
                start = time.perf_counter()
                unet(x, t, context)
                times[name].append(time.perf_counter() - start)
    attention_kernels.route(unet, False)
    med = {k: statistics.median(v) for k, v in times.items()}
    each = " | ".join(f"{n} {med[n]:.3f} s ({med[n] / med['sdpa']:.2f}x)" for n in times)
    errs = "; ".join(f"{n} {errors[n]['max']:.2e}, {errors[n]['rms']:.2e}" for n in times)
    print(f"| {args.size}², {args.dtype} | {each} | error vs fp32 (max, RMS): {errs} |")
    flags = sorted(cpu_features().flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"})
    out = {"date": time.strftime("%Y-%m-%d"), "cpu_flags": flags, "torch": torch.__version__, "size": args.size,
           "dtype": args.dtype, "threads": args.threads, "kernels": kernels, "times_s": times, "median_s": med,
           "ratio_blocked_over_sdpa": med["blocked"] / med["sdpa"],
           "ratio_blocked_onednn_over_sdpa": med["blocked-onednn"] / med["sdpa"], "error_vs_fp32": errors}
    if args.json:
        args.json.write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
