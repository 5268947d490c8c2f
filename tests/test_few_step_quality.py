"""The committed LCM-LoRA of the default model: 4 steps score close to 20, and only with it.

On the whole benchmark suite (600 prompts, one image each, seed 0, ``opensd eval``'s
seeds), the default model is scored exactly three ways: 20 steps of
DPM++ 2M at CFG 5 (the model card's setting), 4 steps of ``lcm`` at CFG 1 with
``models/opensd-shapes/lcm_lora.safetensors`` (``--few-step``), and the same 4 steps without
the LoRA. The LoRA's run must stay within ``MARGIN`` of the 20-step run (the speed issue's
target: 4 steps within 0.03 of 20), and the plain 4-step run must fall at least ``GAP``
below the LoRA's: a LoRA that does nothing, or is not applied, fails. The numbers are in
the model card ("Few-step generation"). The first 16 prompts of each category are too few
for the target: there the LoRA scored 0.927 against 0.990.
"""

from __future__ import annotations

import time

import pytest
import torch

from opensd.defaults import default_model_path
from opensd.pipelines.few_step import LCM_LORA_FILE

PER_CATEGORY = None  # all 600 prompts: about 3 minutes on one thread
PROMPTS = 600
# Measured (2026-12-03, 2-core AMD EPYC with avx512_bf16, fp32): 0.992 for 20 steps, 0.965 for
# 4 steps with the LoRA, 0.807 for 4 steps without. MARGIN is the target itself: the
# LoRA meets it by 0.003 (two images), so a CPU whose rounding flips three fails it.
MARGIN = 0.03
GAP = 0.10


def _path():
    path = default_model_path()
    if path is None or not (path / LCM_LORA_FILE).is_file():
        pytest.skip(f"needs the default model with its LCM-LoRA (models/opensd-shapes/{LCM_LORA_FILE})")
    return path


@pytest.mark.slow  # about 3 minutes on the 2-core machine
def test_the_lcm_lora_at_4_steps_scores_close_to_20_steps_and_plain_4_steps_do_not() -> None:
    from opensd.pipelines.few_step import few_step_kwargs
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
    from opensd.shapes.run import EvalConfig, evaluate
    from opensd.shapes.world import World

    path = _path()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = StableDiffusionPipeline.from_path(path, precision="fp32")
        fast = few_step_kwargs(pipe)
        runs = {
            "20 steps": (EvalConfig(per_category=PER_CATEGORY, images_per_prompt=1, cfg_scale=5.0, world=World.CLASSIC), None),
            "4 lcm + LoRA": (EvalConfig(per_category=PER_CATEGORY, images_per_prompt=1, steps=fast["steps"],
                                        sampler=fast["sampler"], cfg_scale=fast["cfg_scale"], world=World.CLASSIC), fast["networks"]),
            "4 lcm": (EvalConfig(per_category=PER_CATEGORY, images_per_prompt=1, steps=fast["steps"],
                                 sampler=fast["sampler"], cfg_scale=fast["cfg_scale"], world=World.CLASSIC), None),
        }
        scores = {}
        for name, (cfg, networks) in runs.items():
            t = time.perf_counter()
            results, _ = evaluate(pipe, cfg, networks=networks)
            scores[name] = results
            print(f"{name}: overall {results['overall']:.3f} {results['accuracy']} in {time.perf_counter() - t:.1f} s")
    finally:
        torch.set_num_threads(threads)
    full, distilled, plain = (scores[k] for k in runs)
    assert full["prompts"] == distilled["prompts"] == plain["prompts"] == PROMPTS
    assert distilled["overall"] >= full["overall"] - MARGIN, (full["accuracy"], distilled["accuracy"])
    assert plain["overall"] <= distilled["overall"] - GAP, (plain["accuracy"], distilled["accuracy"])
