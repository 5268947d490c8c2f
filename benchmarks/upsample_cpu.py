"""SD 1.5's upsamplers at a 512² image, plain (nearest 2x, then the 3x3 convolution) and sub-pixel.

Each row: one upsampler's input (batch 1; the U-Net's run twice per guided step), random
weights with PyTorch's default init (seed 0), timed both ways (median of ``--repeats`` after a
warm-up, one thread by default) through torch's ``F.conv2d`` (the sub-pixel form's phase
convolution also goes through it), with the sub-pixel form's difference from the plain one in
float32 and each form's error in ``--dtype`` against float32's plain form.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/upsample_cpu.py --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from opensd.precision import cpu_features
from opensd.upsample_kernels import subpixel_upsample_conv

# (where, channels, input side) at a 512² image: the U-Net's three, the VAE decoder's three.
SHAPES = (("U-Net 8->16", 1280, 8), ("U-Net 16->32", 1280, 16), ("U-Net 32->64", 640, 32),
          ("VAE 64->128", 512, 64), ("VAE 128->256", 512, 128), ("VAE 256->512", 256, 256))


def median_s(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    rows = []
    print("| upsampler | channels | input | plain | sub-pixel | sub-pixel / plain | fp32 difference | error: plain, sub-pixel |\n"
          "|---|---:|---:|---:|---:|---:|---:|---|")
    with torch.inference_mode():
        for where, c, side in SHAPES:
            conv = torch.nn.Conv2d(c, c, 3, padding=1)
            x = torch.randn(1, c, side, side)
            ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            exact = float((subpixel_upsample_conv(conv, x) - ref).abs().max() / ref.abs().max())
            conv, xd = conv.to(dtype), x.to(dtype)
            plain = lambda conv=conv, xd=xd: conv(F.interpolate(xd, scale_factor=2.0, mode="nearest"))  # noqa: E731
            sub = lambda conv=conv, xd=xd: subpixel_upsample_conv(conv, xd)  # noqa: E731
            errs = [float((fn().float() - ref).abs().max() / ref.abs().max()) for fn in (plain, sub)]
            a, b = median_s(plain, args.repeats), median_s(sub, args.repeats)
            rows.append({"where": where, "channels": c, "side": side, "plain_s": a, "subpixel_s": b,
                         "fp32_difference": exact, "error_plain": errs[0], "error_subpixel": errs[1]})
            print(f"| {where} | {c} | {side}² | {1e3 * a:.1f} ms | {1e3 * b:.1f} ms | **{b / a:.2f}** | {exact:.1e} | "
                  f"{errs[0]:.1e}, {errs[1]:.1e} |", flush=True)
    flags = sorted(cpu_features().flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"})
    out = {"date": time.strftime("%Y-%m-%d"), "cpu_flags": flags, "torch": torch.__version__, "dtype": args.dtype,
           "threads": args.threads, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
