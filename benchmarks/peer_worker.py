"""One engine in its own process, driven by ``peers.py`` over stdin/stdout JSON lines.

Runs under each engine's own interpreter (opensd: the project's venv; stable-diffusion.cpp
and OpenVINO: their own venvs), so it imports only the standard library at the top and
the engine inside :func:`load`. Protocol, one JSON object a line:

- argv[1]: the job, ``{"engine", "variant", "model", "width", "height", "steps", "cfg",
  "seed", "prompt", "negative", "threads", "cache"}``;
- the worker loads the model, then prints ``{"ready": true, "load_s": ..., "info": {...}}``
  (what the engine runs in: opensd's precision decision, OpenVINO's inference precision);
- each ``run`` line on stdin: one whole txt2img generation (text encoding, ``steps``
  Euler steps with classifier-free guidance, VAE decode), answered ``{"s": seconds}``, with
  ``"info"`` where the run returns a dict (opensd: its kernel choice, made on the first run);
- ``quit`` (or end of input): exit. A failure is answered ``{"error": "Type: message"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _say(obj: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


Loaded = tuple[Callable[[], Any], dict[str, str]]


def load_opensd(job: dict[str, Any]) -> Loaded:
    """opensd's pipeline: precision "auto" (its default) or "fp32"."""
    import torch

    import opensd

    torch.set_num_threads(job["threads"])
    pipe = opensd.load(job["model"], precision=job["variant"])

    def run() -> Any:
        pipe.txt2img(job["prompt"], job["negative"], steps=job["steps"], sampler="euler", cfg_scale=job["cfg"],
                     width=job["width"], height=job["height"], seed=job["seed"])
        return {"kernels": pipe.kernels.selection().describe()}

    return run, {"dtype": str(pipe.precision.dtype).removeprefix("torch."), "reason": pipe.precision.reason}


def load_sdcpp(job: dict[str, Any]) -> Loaded:
    """stable-diffusion.cpp, weights converted on load to ``variant`` (f32, f16, q8_0)."""
    from stable_diffusion_cpp import StableDiffusion

    sd = StableDiffusion(model_path=job["model"], wtype=job["variant"], n_threads=job["threads"], verbose=False)
    if not sd._model.model:  # a NULL context: sd.cpp logs "get sd version from file failed" for an unknown layout
        raise RuntimeError("stable-diffusion.cpp loaded no model: it does not recognise this architecture "
                           "(its version detection from the tensor shapes fails)")

    def run() -> Any:
        return sd.generate_image(prompt=job["prompt"], negative_prompt=job["negative"], width=job["width"],
                                 height=job["height"], cfg_scale=job["cfg"], sample_method="euler",
                                 sample_steps=job["steps"], seed=job["seed"])

    return run, {"wtype": job["variant"]}


def load_openvino(job: dict[str, Any]) -> Loaded:
    """optimum-intel's OpenVINO pipeline, exported once from the diffusers folder (kept in
    ``cache``), reshaped to the static size, inference precision ``variant`` (f32, bf16)."""
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    ir = Path(job["cache"]) / "openvino-ir"
    cfg = {"INFERENCE_NUM_THREADS": str(job["threads"]), "INFERENCE_PRECISION_HINT": job["variant"]}
    if not (ir / "model_index.json").exists():
        pipe = OVStableDiffusionPipeline.from_pretrained(job["model"], export=True, compile=False, local_files_only=True)
        pipe.save_pretrained(ir)
        del pipe
    pipe = OVStableDiffusionPipeline.from_pretrained(str(ir), compile=False, ov_config=cfg, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=job["height"], width=job["width"], num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)

    def run() -> Any:
        import numpy as np

        return pipe(job["prompt"], negative_prompt=job["negative"], num_inference_steps=job["steps"],
                    guidance_scale=job["cfg"], height=job["height"], width=job["width"],
                    generator=np.random.RandomState(job["seed"])).images

    info = {"requested": job["variant"]}
    try:  # what the CPU plugin really runs in (a bf16 hint on a CPU without bf16 stays f32)
        info["inference_precision"] = str(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT"))
    except Exception as e:
        info["inference_precision"] = f"unknown ({type(e).__name__})"
    return run, info


LOADERS = {"opensd": load_opensd, "sdcpp": load_sdcpp, "openvino": load_openvino}


def main() -> int:
    job = json.loads(sys.argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.stdout = sys.stderr  # engines' prints must not mix with the protocol
    try:
        t0 = time.perf_counter()
        run, info = LOADERS[job["engine"]](job)
        _say({"ready": True, "load_s": time.perf_counter() - t0, "info": info})
    except Exception as e:  # reported to the driver as a table cell, not a traceback
        _say({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        return 1
    for line in sys.stdin:
        if line.strip() != "run":
            break
        try:
            t0 = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t0
            _say({"s": seconds, **({"info": out} if isinstance(out, dict) else {})})
        except Exception as e:
            _say({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
