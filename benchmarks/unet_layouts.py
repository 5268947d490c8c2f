"""One guided SD 1.5 U-Net call three ways: the default layout, ``channels_last``, and
``torch.compile`` with Inductor's weight freezing; same random weights, interleaved, medians.

    PYTHONPATH=src python benchmarks/unet_layouts.py --size 256 --dtype bf16 --threads 1

Prints each variant's median seconds, its ratio to the default layout and its largest
difference from it (docs/benchmarks.md, "Results: AMD EPYC ... avx512_bf16").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch._inductor.config as inductor_config

from opensd.models.unet import UNetConfig, UNetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="image side (latents: size / 8)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype, side = DTYPES[a.dtype], a.size // 8
    unet = UNetModel(UNetConfig.sd15()).to(dtype).eval()
    x = torch.randn(2, 4, side, side, dtype=dtype)  # the guided batch: (2, 4, h, w)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, dtype=dtype)
    variants = {"default": (unet, x),
                "channels_last": (copy.deepcopy(unet).to(memory_format=torch.channels_last),
                                  x.to(memory_format=torch.channels_last))}
    if not a.no_compile:
        inductor_config.freezing = True
        variants["compile+freezing"] = (torch.compile(copy.deepcopy(unet)), x)

    @torch.no_grad()
    def call(name: str) -> tuple[float, torch.Tensor]:
        module, inp = variants[name]
        t0 = time.perf_counter()
        out = module(inp, t, ctx)
        return time.perf_counter() - t0, out

    for name in variants:  # warm-up (and compilation)
        print(f"{name}: first call {call(name)[0]:.2f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in variants}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(a.repeats):
        for name in variants:
            s, outs[name] = call(name)
            times[name].append(s)
    base = statistics.median(times["default"])
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = (outs[name].float() - outs["default"].float()).abs().max().item()
        print(f"{name}: {med:.3f} s, {med / base:.2f}x the default, max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
