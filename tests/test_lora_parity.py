"""LoRAs proven equal to diffusers: the same random LoRA files (kohya with text-encoder, attention
and conv LoCon layers; PEFT with diffusers' adapter metadata; SDXL's LDM-spelled kohya) on the
same tiny random models, loaded by ``pipe.load_lora_weights`` there and by ``bind_loras`` +
``generate(networks=)`` here, give the same images (<= 1e-3 on pixels, plus 8-bit rounding)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_family_model

import opensd
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.lora import LoRAFile, LoRAUse, bind_loras
from opensd.checkpoints.lora_names import kohya_names, lora_targets
from opensd.models.stable_diffusion import ModelFamily
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import GenerationRequest

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
SIZE = 32
STEPS = 6
TOL = 1e-3 + 0.5 / 255  # ours are 8-bit PNGs, diffusers' floats in [0, 1]
RANK = 4


@functools.cache
def _folder(family: ModelFamily, root: str) -> Path:
    model, tok = tiny_family_model(family, seed=5)
    return save_diffusers(model, tok, Path(root) / family.value)


def _pipes(family: ModelFamily, root: Path):
    import diffusers

    folder = _folder(family, str(root))
    cls = diffusers.StableDiffusionXLPipeline if family is ModelFamily.SDXL else diffusers.StableDiffusionPipeline
    kw = {"add_watermarker": False} if family is ModelFamily.SDXL else {}
    ref = cls.from_pretrained(folder, local_files_only=True, **kw)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    return opensd.load(folder), ref


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora_parity")


def _factors(shape: tuple[int, ...], g: torch.Generator, scale: float = 0.25):
    """Random (down, up) for a layer of weight ``shape``; convs get a kohya LoCon pair."""
    out_f, *rest = shape
    down = torch.randn((RANK, *rest), generator=g) * scale
    up = torch.randn((out_f, RANK, *((1, 1) if len(rest) == 3 else ())), generator=g) * scale
    return down, up


def kohya_file(model, path: Path, seed: int, ldm: bool | None = None) -> Path:
    """Every U-Net and text-encoder layer of ``model`` under its kohya name, with one alpha (as
    sd-scripts writes; diffusers drops per-layer alphas of attention layers, so the file has
    one, and the unit tests prove per-layer alphas against LyCORIS)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    alpha = float(torch.randint(1, 2 * RANK, (1,), generator=g))
    for name, t in sorted(kohya_names(model, ldm_unet=ldm).items()):
        down, up = _factors(t.weight_shape, g)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    write_safetensors(tensors, path)
    return path


def peft_file(model, path: Path, seed: int) -> Path:
    """Every layer under its PEFT name (diffusers paths), alphas in diffusers' lora_adapter_metadata;
    text encoders spelled as diffusers saves them under transformers 5 (no ``text_model.``)."""
    g = torch.Generator().manual_seed(seed)
    tensors, modules = {}, {}
    for name, t in sorted(lora_targets(model).items()):
        if not name.startswith(("unet.", "text_encoder")):
            continue
        down, up = _factors(t.weight_shape, g)
        prefix, _, module = name.partition(".")
        module = module.removeprefix("text_model.")
        tensors |= {f"{prefix}.{module}.lora_A.weight": down, f"{prefix}.{module}.lora_B.weight": up}
        modules.setdefault(prefix, []).append(module)
    meta = {}
    for i, (prefix, mods) in enumerate(sorted(modules.items())):
        meta |= {f"{prefix}.r": RANK, f"{prefix}.lora_alpha": 2 + 3 * i, f"{prefix}.target_modules": mods}
    write_safetensors(tensors, path, {"lora_adapter_metadata": json.dumps(meta)})
    return path


def _adapted_modules(module: torch.nn.Module, adapter: str) -> int:
    return sum(1 for m in module.modules() if adapter in getattr(m, "lora_A", {}))


def _run(ours, ref, files: list[tuple[Path, float, float]], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ours, diffusers', ours without LoRAs) for ``files`` as (path, U-Net weight, text weight)."""
    names = []
    for i, (path, _unet_w, _te_w) in enumerate(files):
        ref.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
        lora = LoRAFile.load(path)
        te_layers = sum(n.startswith(("lora_te", "text_encoder")) for n in lora.layers)
        loaded = _adapted_modules(ref.unet, f"l{i}") + _adapted_modules(ref.text_encoder, f"l{i}") + \
            (_adapted_modules(ref.text_encoder_2, f"l{i}") if getattr(ref, "text_encoder_2", None) is not None else 0)
        assert te_layers > 0 and loaded == len(lora.layers), (path.name, loaded, len(lora.layers))  # diffusers took all
    weights = [{k: (u if k == "unet" else t) for k in ref._lora_loadable_modules} for _, u, t in files]
    ref.set_adapters(names, adapter_weights=weights)
    lat = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))
    want = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE, width=SIZE,
               latents=lat.clone(), output_type="np").images
    ref.delete_adapters(names)
    aset = bind_loras(ours.model, [LoRAUse(LoRAFile.load(p), unet=u, te=t) for p, u, t in files])
    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="euler", cfg_scale=7.0,
                            width=SIZE, height=SIZE)
    got = ours.generate(req, latents=lat, networks=RequestNetworks(adapters=aset)).images
    plain = ours.generate(req, latents=lat).images
    return _np(got), want, _np(plain)


def _np(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def _check(got, want, plain):
    assert np.abs(got - plain).max() > 0.05  # the LoRA does change the image
    diff = np.abs(got - want).max()
    assert diff <= TOL, f"max abs diff {diff}"


@pytest.fixture(scope="module")
def sd1(root):
    return _pipes(ModelFamily.SD1, root)


def test_sd1_kohya_with_conv_locon_matches_diffusers(sd1, root):
    ours, ref = sd1
    path = kohya_file(ours.model, root / "kohya_sd1.safetensors", seed=1)
    assert any(v.ndim == 4 and v.shape[2:] == (3, 3) for v in LoRAFile.load(path).layers[
        next(n for n in LoRAFile.load(path).layers if n.endswith("resnets_0_conv1"))].tensors.values())
    _check(*_run(ours, ref, [(path, 0.8, 0.6)], seed=2))


def test_sd1_peft_with_metadata_matches_diffusers(sd1, root):
    ours, ref = sd1
    path = peft_file(ours.model, root / "peft_sd1.safetensors", seed=3)
    _check(*_run(ours, ref, [(path, 1.0, 0.7)], seed=4))


def test_sd1_two_files_at_once_match_diffusers(sd1, root):
    ours, ref = sd1
    a = kohya_file(ours.model, root / "a_sd1.safetensors", seed=5)
    b = peft_file(ours.model, root / "b_sd1.safetensors", seed=6)
    _check(*_run(ours, ref, [(a, 0.5, 0.4), (b, 0.6, 0.8)], seed=7))


@pytest.fixture(scope="module")
def sdxl(root):
    return _pipes(ModelFamily.SDXL, root)


def test_sdxl_kohya_ldm_spelling_matches_diffusers(sdxl, root):
    ours, ref = sdxl
    path = kohya_file(ours.model, root / "kohya_sdxl.safetensors", seed=8, ldm=True)
    assert any(n.startswith("lora_unet_input_blocks_") for n in LoRAFile.load(path).layers)
    assert any(n.startswith("lora_te2_") for n in LoRAFile.load(path).layers)
    _check(*_run(ours, ref, [(path, 0.9, 0.7)], seed=9))


def test_sdxl_peft_matches_diffusers(sdxl, root):
    ours, ref = sdxl
    path = peft_file(ours.model, root / "peft_sdxl.safetensors", seed=10)
    _check(*_run(ours, ref, [(path, 1.0, 0.5)], seed=11))
