"""Where one txt2img generation's time goes, per engine: text encoder, U-Net calls, VAE decode.

Run under each engine's own interpreter, like ``peer_worker.py`` (standard library at the
top, the engine inside its function), on the files ``peer_weights.py`` wrote:

    PYTHONPATH=src python benchmarks/peer_profile.py opensd /work/peers/weights/sd15/diffusers --size 256
    /work/peers/sdcpp/bin/python benchmarks/peer_profile.py sdcpp /work/peers/weights/sd15/model.safetensors --size 256
    /work/peers/openvino/bin/python benchmarks/peer_profile.py openvino /work/peers/weights/sd15/diffusers --size 256

One warm-up generation, then one measured. opensd: forward hooks on the text encoder
(each of ``text_encoders``), the U-Net (``model.diffusion_model``) and the VAE decoder
(``first_stage_model.decoder``), then ``torch.profiler``'s top operators by self CPU time.
OpenVINO: the pipeline parts' ``forward`` wrapped with timers. stable-diffusion.cpp: its own
log lines (conditioning, sampling, decoding), printed as they come. JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

PROMPT, NEGATIVE = "a red circle above a blue square", "a green triangle"


class Phases:
    """Seconds and calls per named phase."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[name] += time.perf_counter() - t0
                self.n[name] += 1

        return timed

    def reset(self) -> None:
        self.s.clear()
        self.n.clear()

    def report(self) -> dict[str, Any]:
        return {k: {"s": self.s[k], "calls": self.n[k]} for k in self.s}


def opensd(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import opensd

    torch.set_num_threads(args.threads)
    pipe = opensd.load(args.model, precision=args.precision)
    m, phases = pipe.model, Phases()
    # the text towers themselves: the pipeline calls them, not the conditioner's forward
    for name, mod in (*[("text encoder", e) for e in m.text_encoders], ("U-Net", m.model.diffusion_model),
                      ("VAE decode", m.first_stage_model.decoder)):
        mod.forward = phases.wrap(name, mod.forward)

    def gen() -> Any:
        return pipe.txt2img(PROMPT, NEGATIVE, steps=args.steps, sampler="euler", cfg_scale=7.5,
                            width=args.size, height=args.size, seed=1)

    gen()
    phases.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        gen()
        total = time.perf_counter() - t0
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), file=sys.stderr)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
    all_self = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    top = [{"op": e.key, "self_share": e.self_cpu_time_total / all_self, "calls": e.count} for e in ops]
    return {"total_s": total, "phases": phases.report(), "top_ops": top, "precision": pipe.precision.reason}


def openvino(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    import numpy as np
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    ir = Path(args.model).parent / "openvino-ir"  # what peer_worker.py exported
    cfg = {"INFERENCE_NUM_THREADS": str(args.threads), "INFERENCE_PRECISION_HINT": args.ov_precision}
    pipe = OVStableDiffusionPipeline.from_pretrained(str(ir), compile=False, ov_config=cfg, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=args.size, width=args.size, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    phases = Phases()
    for name, part in (("text encoder", pipe.text_encoder), ("U-Net", pipe.unet), ("VAE decode", pipe.vae_decoder)):
        part.forward = phases.wrap(name, part.forward)

    def gen() -> Any:
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
                    height=args.size, width=args.size, generator=np.random.RandomState(1)).images

    gen()
    phases.reset()
    t0 = time.perf_counter()
    gen()
    return {"total_s": time.perf_counter() - t0, "phases": phases.report()}


def sdcpp(args: argparse.Namespace) -> dict[str, Any]:
    from stable_diffusion_cpp import StableDiffusion

    # verbose: sd.cpp logs "get_learned_condition completed, taking N ms", "sampling completed,
    # taking N s", "decode_first_stage completed, taking N ms" to stderr
    sd = StableDiffusion(model_path=args.model, wtype=args.wtype, n_threads=args.threads, verbose=True)

    def gen() -> Any:
        return sd.generate_image(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size,
                                 cfg_scale=7.5, sample_method="euler", sample_steps=args.steps, seed=1)

    gen()
    print("# measured generation", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    gen()
    return {"total_s": time.perf_counter() - t0, "wtype": args.wtype}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", choices=("opensd", "sdcpp", "openvino"))
    p.add_argument("model", help="diffusers folder (opensd, openvino) or single file (sdcpp)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="auto", help="opensd's precision")
    p.add_argument("--wtype", default="f32", help="stable-diffusion.cpp's weight type")
    p.add_argument("--ov-precision", default="f32", choices=("f32", "bf16"), help="OpenVINO's inference precision")
    p.add_argument("--top", type=int, default=15, help="opensd: operators listed")
    args = p.parse_args()
    out = {"opensd": opensd, "sdcpp": sdcpp, "openvino": openvino}[args.engine](args)
    print(json.dumps({"engine": args.engine, "size": args.size, "steps": args.steps, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
