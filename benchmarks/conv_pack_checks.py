"""The facts behind opensd's packed convolutions (opensd.conv_kernels), measured on one guided U-Net call.

Three measurements on the same weights (a model folder; the U-Net at ``--size``, batch 2,
77 context tokens, 1 thread by default), each call timed after a warm-up, medians:

* ``reorders``: oneDNN's own log (``ONEDNN_VERBOSE=1``, in a child process) of one call on
  torch's route: how many primitives of each kind run, and the milliseconds in reorders;
* ``pack size``: the packed route with its weights packed for this input, against weights
  packed for a 16x16 latent and then used at this size, against torch's route;
* ``channels-last``: the packed route fed a channels-last input (so every activation after it
  stays channels-last), against the same route fed the usual NCHW input.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/conv_pack_checks.py /work/peers/weights/sd15/diffusers \\
        --precision bf16 --size 256 --json docs/bench/conv-pack-checks-sd15-256-bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch


def unet_inputs(unet: Any, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = next(unet.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.cfg.in_channels, side, side, generator=g).to(p.dtype)
    return x, torch.tensor([500.0, 500.0]), torch.randn(2, 77, unet.cfg.context_dim, generator=g).to(p.dtype)


def median_call(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_unet(args: argparse.Namespace) -> Any:
    import opensd

    torch.set_num_threads(args.threads)
    pipe = opensd.load(args.model, precision=args.precision, kernels="default")
    return pipe.model.unet.requires_grad_(False)


def child(args: argparse.Namespace) -> None:
    """One call on torch's route, under the oneDNN log the parent set."""
    unet = load_unet(args)
    x, t, ctx = unet_inputs(unet, args.size // 8)
    with torch.inference_mode():
        unet(x, t, ctx)
        print("### measured call", flush=True)
        unet(x, t, ctx)


def reorders(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "src")}
    cmd = [sys.executable, __file__, args.model, "--precision", args.precision, "--size", str(args.size),
           "--threads", str(args.threads), "--_child"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    lines = out.split("### measured call", 1)[1].splitlines()
    kinds: Counter[str] = Counter()
    ms: Counter[str] = Counter()
    for line in lines:
        f = line.split(",")
        if line.startswith("onednn_verbose") and len(f) > 6 and f[3] == "exec":
            kinds[f[5]] += 1
            ms[f[5]] += float(f[-1])
    return {"primitives": dict(kinds), "ms": {k: round(v, 1) for k, v in ms.items()}}


def packing(args: argparse.Namespace) -> dict[str, float]:
    from opensd import conv_kernels as ck

    unet = load_unet(args)
    side = args.size // 8
    x, t, ctx = unet_inputs(unet, side)
    small = unet_inputs(unet, 16)
    out: dict[str, float] = {}
    with torch.inference_mode():
        out["torch's route"] = median_call(lambda: unet(x, t, ctx), args.repeats)
        ck.route(unet, True)
        out["packed for this size"] = median_call(lambda: unet(x, t, ctx), args.repeats)
        out["packed, channels-last input"] = median_call(
            lambda: unet(x.contiguous(memory_format=torch.channels_last), t, ctx), args.repeats)
        unet(*small)  # packs every layer again, for a 16x16 latent
        real = ck._packed_weight
        ck._packed_weight = lambda layer, inp: ck._packs[layer][1]  # keep those packs at this size
        try:
            out["packed for 16x16, used here"] = median_call(lambda: unet(x, t, ctx), args.repeats)
        finally:
            ck._packed_weight = real
            ck.route(unet, False)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--_child", dest="child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    result = {"model": args.model, "precision": args.precision, "size": args.size, "threads": args.threads,
              "reorders": reorders(args), "seconds_per_call": packing(args)}
    base = result["seconds_per_call"]["torch's route"]
    print(json.dumps(result["reorders"]))
    for k, s in result["seconds_per_call"].items():
        print(f"{k}: {s:.3f} s ({s / base:.2f}x torch's route)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
