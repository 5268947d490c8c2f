"""diffusers pipeline folders: load one into opensd, or export opensd as one.

A folder holds ``model_index.json`` and one sub-folder per component (``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). Weight names differ from
the original SD layout; the key tables in ``keymap_unet``, ``keymap_vae`` and
``keymap_clip`` translate them, and are the only renaming code in opensd.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Mapping

import torch

from opensd.checkpoints.build import build_on_meta, tokenizer_for
from opensd.checkpoints.io import (
    CheckpointError,
    StateDictMismatch,
    first_existing,
    load_strict,
    read_json,
    read_weights,
    write_json,
    write_safetensors,
)
from opensd.checkpoints.keymap_clip import (
    clip_key_map,
    from_transformers_clip_config,
    from_transformers_clip_state_dict,
    to_transformers_clip_config,
)
from opensd.checkpoints.keymap_unet import from_diffusers_unet_config, to_diffusers_unet_config, unet_key_map
from opensd.checkpoints.keymap_vae import from_diffusers_vae_config, needs_reshape, to_diffusers_vae_config, vae_key_map
from opensd.diffusion.schedules import NoiseScheduleConfig
from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.tokenizers import Tokenizer
from opensd.tokenizers.clip_bpe import CLIPTokenizer

DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# (component folder, prefix of its networks' keys in the original layout)
COMPONENTS = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
EXPORTED_DIFFUSERS_VERSION = "0.30.0"


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------
# Renaming: one table per network, applied in either direction.


def _key_maps(cfg: SDConfig) -> dict[str, dict[str, str]]:
    """original key (without component prefix) -> diffusers key, per component."""
    return {"unet": unet_key_map(cfg.unet), "vae": vae_key_map(cfg.vae), "text_encoder": clip_key_map(cfg.text)}


def _fit(value: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Reshape between a 1x1 conv (o, i, 1, 1) and a linear (o, i) weight; else unchanged."""
    if tuple(value.shape) != tuple(shape) and value.numel() == int(torch.Size(shape).numel()):
        return value.reshape(shape)
    return value


def to_original_layout(cfg: SDConfig, component_states: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers component state dicts -> one original-layout state dict.

    Keys the table does not know are kept under their diffusers names, so that the
    strict load reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for comp, kmap in _key_maps(cfg).items():
        inverse = {d: o for o, d in kmap.items()}
        state = component_states[comp]
        if comp == "text_encoder":  # newer transformers write the keys without `text_model.`
            state = from_transformers_clip_state_dict(state)
        for k, v in state.items():
            out[COMPONENTS[comp] + inverse.get(k, f"<diffusers {comp}>.{k}")] = v
    return out


def from_original_layout(model: StableDiffusion) -> dict[str, dict[str, torch.Tensor]]:
    """opensd's state dict -> diffusers component state dicts (VAE attention as Linear)."""
    state = model.state_dict()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for comp, kmap in _key_maps(model.cfg).items():
        prefix = COMPONENTS[comp]
        comp_state = {}
        for o, d in kmap.items():
            v = state[prefix + o]
            if comp == "vae" and needs_reshape(o):
                v = v[:, :, 0, 0]  # (out, in, 1, 1) conv -> (out, in) linear
            comp_state[d] = v
        out[comp] = comp_state
    return out


# ---------------------------------------------------------------------------------------
# Loading.


def _read_component_weights(folder: Path, comp: str) -> dict[str, torch.Tensor]:
    sub = folder / comp
    if not sub.is_dir():
        raise CheckpointError(f"{folder} has no {comp}/ folder (a Stable Diffusion pipeline folder needs it)")
    f = first_existing(sub, DIFFUSERS_WEIGHTS)
    if f is None:
        raise CheckpointError(f"{sub} has no weights file; expected one of {', '.join(DIFFUSERS_WEIGHTS)}")
    return {k: v.float() if v.is_floating_point() else v for k, v in read_weights(f).items()}


def _sample_size(value: object, where: Path) -> int:
    """diffusers' ``sample_size``: a positive integer, or a list of equal positive integers (height, width)."""
    items = value if isinstance(value, list) else [value]
    if not items or any(type(v) is not int or v < 1 for v in items) or len(set(items)) != 1:
        raise CheckpointError(
            f"{where}: sample_size must be a positive integer or a list of equal ones, got {value!r:.60}"
        )
    return items[0]


def _component_config(file: Path, convert: Callable[[dict], object]) -> object:
    """``convert(<the JSON object in file>)``; whatever the converter refuses is an error naming the file."""
    data = read_json(file)
    try:
        return convert(data)
    except CheckpointError:
        raise
    except Exception as e:  # any value of the untrusted config file that the converter trips over
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{file}: unsupported configuration: {text}") from None


def read_diffusers_config(folder: Path) -> SDConfig:
    """The SDConfig of a diffusers folder, from its components' config files.

    Every problem is a one-line :class:`CheckpointError` naming the file at fault.
    """
    index = read_json(folder / "model_index.json")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if c not in index]
    if missing:
        raise CheckpointError(f"{folder / 'model_index.json'} lacks component(s): {', '.join(missing)}")
    unet_file = folder / "unet" / "config.json"
    unet = _component_config(unet_file, from_diffusers_unet_config)
    sample = _sample_size(read_json(unet_file).get("sample_size", 64), unet_file)
    vae = _component_config(folder / "vae" / "config.json", from_diffusers_vae_config)
    text = _component_config(folder / "text_encoder" / "config.json", from_transformers_clip_config)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    schedule = (_component_config(sched_file, NoiseScheduleConfig.from_diffusers) if sched_file.is_file()
                else NoiseScheduleConfig())
    try:
        return SDConfig(unet=unet, vae=vae, text=text, schedule=schedule, image_size=sample * vae.downsample_factor)
    except Exception as e:  # the components disagree (the U-Net's context width and the text encoder's, say)
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{folder}: the components' configurations do not fit together: {text}") from None


def load_diffusers(folder: str | Path) -> tuple[StableDiffusion, Tokenizer]:
    folder = Path(folder)
    cfg = read_diffusers_config(folder)
    states = {comp: _read_component_weights(folder, comp) for comp in COMPONENTS}
    model = build_on_meta(cfg, sum(len(s) for s in states.values()), folder)
    own = model.state_dict()
    state = to_original_layout(cfg, states)
    state = {k: _fit(v, own[k].shape) if k in own else v for k, v in state.items()}
    load_strict(model, state, f"diffusers folder {folder}")
    return model.eval(), tokenizer_for(folder / "tokenizer", cfg)


# ---------------------------------------------------------------------------------------
# Export.


def _save_tokenizer_for_transformers(tokenizer: Tokenizer, folder: Path) -> str:
    """Save the tokenizer so transformers reads it; returns the transformers class name.

    CLIP's BPE is saved as CLIPTokenizer files. opensd's word tokenizer is saved as a
    ``tokenizer.json`` with a bos/eos template, read by ``PreTrainedTokenizerFast``.
    """
    tokenizer.save(folder)
    if isinstance(tokenizer, CLIPTokenizer):
        return "CLIPTokenizer"
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    backend = Backend.from_file(str(folder / "tokenizer.json"))
    bos, eos = backend.id_to_token(tokenizer.bos_id), backend.id_to_token(tokenizer.eos_id)
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.bos_id), (eos, tokenizer.eos_id)]
    )
    backend.save(str(folder / "tokenizer.json"))
    write_json(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": tokenizer.context_length,
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": backend.id_to_token(tokenizer.pad_id),
            "unk_token": backend.id_to_token(getattr(tokenizer, "unk_id", tokenizer.pad_id)),
        },
        folder / "tokenizer_config.json",
    )
    return "PreTrainedTokenizerFast"


def save_diffusers(model: StableDiffusion, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write a folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads offline."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot export a folder over the file {folder}")
    cfg = model.cfg
    states = from_original_layout(model)
    unet_cfg = to_diffusers_unet_config(cfg.unet, sample_size=cfg.latent_size)
    vae_cfg = to_diffusers_vae_config(cfg.vae, sample_size=cfg.image_size)
    writers: dict[str, tuple[dict, str]] = {
        "unet": (unet_cfg, "diffusion_pytorch_model.safetensors"),
        "vae": (vae_cfg, "diffusion_pytorch_model.safetensors"),
        "text_encoder": (
            to_transformers_clip_config(
                cfg.text, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
            ),
            "model.safetensors",
        ),
    }
    for comp, (comp_cfg, weights_name) in writers.items():
        write_safetensors(states[comp], folder / comp / weights_name, metadata={"format": "pt"})
        write_json(comp_cfg, folder / comp / "config.json")
    tok_dir = folder / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer_class = _save_tokenizer_for_transformers(tokenizer, tok_dir)
    sched = {"_class_name": "PNDMScheduler", "_diffusers_version": EXPORTED_DIFFUSERS_VERSION, "skip_prk_steps": True}
    sched.update(cfg.schedule.to_diffusers())
    write_json(sched, folder / "scheduler" / "scheduler_config.json")
    write_json(
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": EXPORTED_DIFFUSERS_VERSION,
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", tokenizer_class],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        folder / "model_index.json",
    )
    return folder


__all__ = [
    "is_diffusers_folder",
    "load_diffusers",
    "save_diffusers",
    "read_diffusers_config",
    "to_original_layout",
    "from_original_layout",
    "StateDictMismatch",
]
