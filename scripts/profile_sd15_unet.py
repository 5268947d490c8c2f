"""Where the CPU time of one SD 1.5 U-Net call goes, opensd against diffusers, and two candidate speedups.

    python scripts/profile_sd15_unet.py              # op profile of both, then channels_last
    python scripts/profile_sd15_unet.py --bf16       # also bf16 weights and input (very slow on some CPUs)

Random weights shared by both sides; batch 2, 64x64x4 latents (512 px), 77x768 context, fp32.
Needs diffusers (the test extra). Times are the minimum of --calls calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench import diffusers_unet_sharing  # noqa: E402

from opensd.models.unet import UNetConfig, UNetModel  # noqa: E402


def best(fn, calls: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(calls):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = UNetConfig.sd15()
    ours = UNetModel(cfg).eval().requires_grad_(False)
    ref = diffusers_unet_sharing(ours, cfg, 64)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        sides = {"opensd": lambda: ours(x, t, ctx), "diffusers": lambda: ref(x, t, encoder_hidden_states=ctx).sample}
        for name, fn in sides.items():
            fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"{name}: one call profiled")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        base, out = best(sides["opensd"], args.calls)
        print(f"opensd fp32: {base:.2f} s")
        ours_cl = ours.to(memory_format=torch.channels_last)
        cl, out_cl = best(lambda: ours_cl(x.to(memory_format=torch.channels_last), t, ctx), args.calls)
        print(f"channels_last: {cl:.2f} s ({cl / base:.2f}x), max |diff| {float((out_cl - out).abs().max()):.1e}")
        if args.bf16:
            ours_bf = ours.to(memory_format=torch.contiguous_format).to(torch.bfloat16)
            bf, out_bf = best(lambda: ours_bf(x.bfloat16(), t.bfloat16(), ctx.bfloat16()), args.calls)
            print(f"bf16: {bf:.2f} s ({bf / base:.2f}x), max |diff| {float((out_bf.float() - out).abs().max()):.1e}")


if __name__ == "__main__":
    main()
