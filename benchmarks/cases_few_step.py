"""Case ``few_step_txt2img``: a whole 4-step LCM generation against diffusers' 20-step one.

opensd draws with the default model and its LCM-LoRA (the model folder's
``lcm_lora.safetensors``; ``--few-step``): 4 steps of the ``lcm`` sampler at CFG 1, one
U-Net call a step. diffusers draws with ``StableDiffusionPipeline`` built from the same
weights (the default model exported once with ``save_diffusers``, loaded offline, as
``default_txt2img`` does) at its ordinary 20 DPM++ 2M steps at CFG 5 (the model card's
setting: two U-Net rows a step). Whole generations: text encoding, the sampling loop, the
VAE decode and PIL output, at batch 1 and 8, interleaved, medians, ratio ``opensd /
diffusers`` (the speed issue's target: <= 0.15). The two sides make different images on
purpose (that is the trade); what the 4 steps keep of the 20 steps' quality is
``opensd eval``'s job (models/opensd-shapes/README.md, "Few-step generation"). The LoRA
file is read and bound once, outside the timings, as diffusers' pipeline is loaded once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from harness import Row, Settings, interleave, silence_reference_logs

PROMPT = "a red circle above a blue square"
REF_STEPS, REF_CFG = 20, 5.0


def case_few_step_txt2img(s: Settings) -> list[Row]:
    silence_reference_logs()
    import diffusers

    import opensd
    from opensd.checkpoints import load_model
    from opensd.checkpoints.diffusers_folder import save_diffusers
    from opensd.defaults import resolve_model
    from opensd.pipelines.few_step import FEW_STEP, few_step_kwargs, few_step_lora

    path = resolve_model(None)
    lora = few_step_lora(path)  # a one-line error when the default model has none
    loaded = load_model(path)
    model = loaded.model
    print(f"# few_step_txt2img: default model {path}, LoRA {lora}", flush=True)
    with tempfile.TemporaryDirectory(prefix="opensd-bench-fs-") as tmp:
        folder = save_diffusers(model, loaded.tokenizer, Path(tmp) / "model")
        rs = s.reference()
        ours = opensd.load(path, device=s.device, precision="auto" if s.auto_reason is not None else s.dtype)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=rs.dtype)
    ref = ref.to(s.device)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        ref.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    fast = few_step_kwargs(ours)
    if not fast["networks"]:
        raise RuntimeError(f"{lora} bound no layer of the default model")
    size = model.cfg.image_size
    f = model.cfg.vae.downsample_factor
    rows = []
    for batch in (1, 8):
        lat = torch.randn(batch, model.cfg.vae.embed_dim, size // f, size // f, generator=torch.Generator().manual_seed(batch))

        def run_ours(lat=lat, batch=batch):
            return ours.txt2img(PROMPT, width=size, height=size, batch_size=batch, latents=lat, seed=1, **fast)

        def run_ref(lat=lat, batch=batch):
            return ref(PROMPT, num_inference_steps=REF_STEPS, guidance_scale=REF_CFG, height=size, width=size,
                       num_images_per_prompt=batch, latents=lat.to(s.device, rs.dtype), output_type="pil").images

        what = (f"txt2img {size}², batch {batch}: opensd {FEW_STEP.steps} steps {FEW_STEP.sampler} + LCM-LoRA, CFG "
                f"{FEW_STEP.cfg_scale:g} vs diffusers {REF_STEPS} steps dpmpp_2m, CFG {REF_CFG:g}")
        if s.auto_reason is not None:
            what += f", opensd default ({ours.precision.name}) vs diffusers default ({rs.dtype_name})"
        row = Row("few_step_txt2img", what, "img/s", float(batch))
        a, b = interleave(row, run_ours, run_ref, s, False)
        assert len(a) == len(b) == batch
        row.extra = {"model": str(path), "lora": str(lora), "opensd_precision": ours.precision.name,
                     "opensd_steps": FEW_STEP.steps, "diffusers_steps": REF_STEPS}
        rows.append(row)
    return rows
