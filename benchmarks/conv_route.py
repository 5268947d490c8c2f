"""opensd's kernel choice against torch's own kernels, side by side: whole txt2img generations.

Two pipelines on the same weights in one process, one with ``kernels="default"`` (torch's
``F.linear`` and ``F.conv2d``) and one with ``kernels="auto"`` (measured: oneDNN linear
layers, packed convolutions; :mod:`opensd.kernels`, :mod:`opensd.conv_kernels`); after a
warm-up each, generations alternate; medians, the U-Net's and the VAE decoder's share of each
(forward timers, as shares of the mean), and the largest pixel difference between the two pipelines' images.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/conv_route.py /work/peers/weights/sd15/diffusers \\
        --precision bf16 --size 256 --steps 2
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/conv_route.py models/opensd-shapes --steps 20

JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from peer_profile import NEGATIVE, PROMPT, Phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model folder or file opensd loads")
    p.add_argument("--precision", default="auto")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per pipeline")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import opensd

    torch.set_num_threads(args.threads)
    pipes, phases = {}, {}
    for k in ("default", "auto"):
        pipe = opensd.load(args.model, precision=args.precision, kernels=k)
        ph = Phases()
        m = pipe.model
        for name, mod in (("U-Net", m.model.diffusion_model), ("VAE decode", m.first_stage_model.decoder)):
            mod.forward = ph.wrap(name, mod.forward)
        pipes[k], phases[k] = pipe, ph
    size = args.size or pipes["auto"].cfg.image_size

    def gen(k: str) -> np.ndarray:
        image = pipes[k].txt2img(PROMPT, NEGATIVE, steps=args.steps, sampler="euler", cfg_scale=7.5,
                                 width=size, height=size, seed=1)[0]
        return np.asarray(image, np.int16)

    t0 = time.perf_counter()
    choice = pipes["auto"].kernels.selection().describe()
    choose_s = time.perf_counter() - t0
    images = {k: gen(k) for k in pipes}  # warm-up (packing included)
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for ph in phases.values():
        ph.reset()
    for _ in range(args.repeats):
        for k in pipes:
            t0 = time.perf_counter()
            gen(k)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {
        "model": args.model, "size": size, "steps": args.steps, "threads": args.threads,
        "precision": pipes["auto"].precision.reason, "auto_kernels": choice, "choice_s": choose_s,
        "median_s": med, "auto_over_default": med["auto"] / med["default"],
        "mean_s": {k: statistics.fmean(v) for k, v in times.items()},
        # each part's share of the timed generations' total (means: the timers sum every call)
        "phase_shares": {k: {n: v["s"] / sum(times[k]) for n, v in phases[k].report().items()} for k in pipes},
        "max_pixel_diff": int(np.abs(images["auto"] - images["default"]).max()),
    }
    print(f"# {choice} (chosen in {choose_s:.2f} s)", file=sys.stderr)
    for k in pipes:
        parts = ", ".join(f"{n} {share:.0%}" for n, share in out["phase_shares"][k].items())
        print(f"# kernels {k}: {med[k]:.3f} s per generation ({parts})", file=sys.stderr)
    print(f"# auto / default: {out['auto_over_default']:.2f}; max pixel difference {out['max_pixel_diff']}/255",
          file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
