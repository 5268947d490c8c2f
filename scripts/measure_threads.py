"""Seconds per image of a few-step generate with 1 and with 2 torch threads, interleaved.

The measurement behind the ``--threads`` default (``opensd.cli.common.default_threads``):
each round runs every size once with each thread count, alternating which goes first,
so a busy machine slows both alike. Prints each run, then the median and the minimum.

    python scripts/measure_threads.py [--model models/opensd-shapes] [--sizes 32,128] [--rounds 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import opensd
from opensd.defaults import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sizes", default="32,128", help="Image sides in pixels, comma-separated.")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    pipe = opensd.load(resolve_model(args.model))
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(t) for t in args.threads.split(",")]
    times: dict[tuple[int, int], list[float]] = {(s, t): [] for s in sizes for t in counts}

    def run(size: int, threads: int) -> float:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        pipe.txt2img("a red circle above a blue square", steps=args.steps, seed=0, width=size, height=size)
        return time.perf_counter() - t0

    for size in sizes:  # warm up every size and thread count once
        for t in counts:
            run(size, t)
    for r in range(args.rounds):
        for size in sizes:
            order = counts if r % 2 == 0 else counts[::-1]
            for t in order:
                dt = run(size, t)
                times[(size, t)].append(dt)
                print(f"round {r} size {size} threads {t}: {dt:.3f} s", flush=True)
    print(f"\nmodel {pipe.loaded.name}, {args.steps} steps, {args.rounds} rounds; seconds per image")
    for (size, t), v in times.items():
        print(f"{size:>4} px, {t} thread(s): median {statistics.median(v):.3f}  min {min(v):.3f}")


if __name__ == "__main__":
    main()
