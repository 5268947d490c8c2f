"""LCM-LoRA files load as LoRAs, and generate as diffusers generates with them.

diffusers' published LCM-LoRA for SD 1.5 (``latent-consistency/lcm-lora-sdv1-5``,
``pytorch_lora_weights.safetensors``) is a kohya-style file with diffusers' module
spellings (``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` / ``.lora_up``
/ ``.alpha``) over the U-Net only: attention q/k/v/out, the feed-forward, ``proj_in`` /
``proj_out``, the resnets' ``conv1`` / ``conv2`` (3x3 LoCon pairs), ``time_emb_proj`` and
``conv_shortcut``, and the down/upsamplers' convs (278 layers on SD 1.5; float16). The
file here has that shape on a small SD 1.x-shaped U-Net (attention at every level but the
last, two resnets a level, a mid block), with random weights: opensd must read every key
strictly and bind every layer, and LCM sampling with it must equal diffusers'
``LCMScheduler`` + ``load_lora_weights`` (<= 1e-3 on pixels, plus 8-bit rounding).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clip_tokenizer, randomize
from safetensors.torch import load_file

import opensd
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.lora import LoRAError, LoRAFile, LoRAUse, bind_loras
from opensd.checkpoints.lora_names import kohya_names
from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import SEED_RANGE, GenerationRequest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "a red circle above a blue square"
SIZE = 32
TOL = 1e-3 + 0.5 / 255
RANK, ALPHA = 8, 4.0

# the module kinds LCM-LoRA's training script targets (diffusers' train_lcm_distill_lora_sd*.py), kohya-spelled
LCM_LORA_LAYERS = re.compile(
    r"_(to_q|to_k|to_v|to_out_0|proj_in|proj_out|ff_net_0_proj|ff_net_2|conv1|conv2|conv_shortcut"
    r"|downsamplers_0_conv|upsamplers_0_conv|time_emb_proj)$"
)


def sd15_shaped_model(seed: int = 0) -> tuple[StableDiffusion, object]:
    """A small SD 1.x model laid out as SD 1.5's U-Net: cross-attention at every level but the
    last, two resnets per level, a mid block; the real CLIP vocabulary."""
    tok = clip_tokenizer()
    cfg = SDConfig.tiny()
    text = dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, max_length=tok.context_length)
    unet = dataclasses.replace(cfg.unet, channel_mult=(1, 2, 2), attention_levels=(0, 1), num_res_blocks=2)
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg.replace(unet=unet, text=text)), seed).eval(), tok


def lcm_lora_file(model: StableDiffusion, path: Path, seed: int, dtype=torch.float16) -> Path:
    """A random file of the LCM-LoRA's shape for ``model``: its layers, spellings, factor shapes
    (3x3 convs: a (r, in, 3, 3) down and a (out, r, 1, 1) up) and one alpha, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in sorted(kohya_names(model).items()):
        if not (name.startswith("lora_unet_") and LCM_LORA_LAYERS.search(name)):
            continue
        out_f, *rest = t.weight_shape
        down = torch.randn((RANK, *rest), generator=g) * 0.3
        up = torch.randn((out_f, RANK, *((1, 1) if len(rest) == 3 else ())), generator=g) * 0.3
        tensors |= {f"{name}.lora_down.weight": down.to(dtype), f"{name}.lora_up.weight": up.to(dtype),
                    f"{name}.alpha": torch.tensor(ALPHA, dtype=dtype)}
    write_safetensors(tensors, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("lcm_lora")
    model, tok = sd15_shaped_model(seed=4)
    folder = save_diffusers(model, tok, root / "sd15ish")
    ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return opensd.load(folder), ref, lcm_lora_file(model, root / "pytorch_lora_weights.safetensors", seed=1)


def test_every_key_is_read_and_every_layer_bound(setup):
    ours, _, path = setup
    lora = LoRAFile.load(path)
    kinds = {LCM_LORA_LAYERS.search(n).group(1) for n in lora.layers}
    assert kinds == {"to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2", "conv1",
                     "conv2", "conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "time_emb_proj"}
    assert any("mid_block_attentions_0" in n for n in lora.layers) and any("up_blocks_2_attentions_2" in n for n in lora.layers)
    keys = set(load_file(path))
    assert len(keys) == 3 * len(lora.layers)  # down, up and alpha of each: nothing skipped
    assert all(layer.kind == "lora" and layer.alpha == ALPHA for layer in lora.layers.values())
    aset = bind_loras(ours.model, [LoRAUse(lora)])
    assert len(aset.deltas) == len(lora.layers)  # one delta on each layer: every layer found
    # strict: a layer this model lacks is an error naming it, not a skipped key
    bad = path.with_name("bad.safetensors")
    tensors = load_file(path)
    layer = "lora_unet_down_blocks_0_resnets_0_conv1."
    tensors = {k.replace(layer, "lora_unet_down_blocks_9_resnets_0_conv1."): v for k, v in tensors.items()}
    write_safetensors(tensors, bad)
    with pytest.raises(LoRAError, match="down_blocks_9_resnets_0_conv1"):
        bind_loras(ours.model, [LoRAUse(LoRAFile.load(bad))])


def _lcm_scheduler(config, seed: int):
    """diffusers' LCMScheduler whose steps draw from opensd's samplers' stream (seed + 0x5EED)."""
    from diffusers import LCMScheduler

    stream = torch.Generator().manual_seed((seed + 0x5EED) % SEED_RANGE)

    def step(self, *args, generator=None, **kw):
        return LCMScheduler.step(self, *args, generator=stream, **kw)

    step.__signature__ = inspect.signature(LCMScheduler.step)
    return type("StepNoiseLCMScheduler", (LCMScheduler,), {"step": step}).from_config(config)


def _np(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


@pytest.mark.parametrize("steps, cfg_scale, weight", [(4, 1.0, 1.0), (2, 1.5, 0.7)])
def test_lcm_sampling_with_the_lora_matches_diffusers(setup, steps, cfg_scale, weight):
    ours, ref, path = setup
    ref.load_lora_weights(str(path), adapter_name="lcm")
    try:
        assert sum(1 for m in ref.unet.modules() if "lcm" in getattr(m, "lora_A", {})) == len(LoRAFile.load(path).layers)
        ref.set_adapters(["lcm"], adapter_weights=[weight])
        original = ref.scheduler
        ref.scheduler = _lcm_scheduler(original.config, seed=3)
        lat = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(2))
        want = ref([PROMPT, PROMPT], num_inference_steps=steps, guidance_scale=cfg_scale, height=SIZE, width=SIZE,
                   latents=lat.clone(), output_type="np").images
    finally:
        ref.scheduler = original
        ref.delete_adapters(["lcm"])
    aset = bind_loras(ours.model, [LoRAUse(LoRAFile.load(path), unet=weight)])
    req = GenerationRequest(prompt=PROMPT, steps=steps, sampler="lcm", cfg_scale=cfg_scale, width=SIZE, height=SIZE,
                            seed=3, batch_size=2)
    got = _np(ours.generate(req, latents=lat, networks=RequestNetworks(adapters=aset)).images)
    plain = _np(ours.generate(req, latents=lat).images)
    assert np.abs(got - plain).max() > 0.05  # the LoRA does change the image
    diff = np.abs(got - want).max()
    assert diff <= TOL, f"max abs diff {diff}"
