"""Original Stable Diffusion 1.x single-file checkpoints (``.safetensors`` or ``.ckpt``).

The file's keys equal :class:`~opensd.models.stable_diffusion.StableDiffusion`'s
attribute paths, so loading is a strict ``load_state_dict``. Only the entries that are
not network weights are set aside first: the training schedule's buffers, EMA
bookkeeping and the text encoder's ``position_ids`` buffer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from opensd.checkpoints.build import build_on_meta
from opensd.checkpoints.io import CheckpointError, load_strict, read_weights, write_safetensors
from opensd.models.stable_diffusion import SDConfig, StableDiffusion

# Buffers of LDM's DDPM class that SD files carry; the schedule lives in SDConfig instead.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
# Entries that are bookkeeping, not weights of the three networks.
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
IGNORED_KEYS = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of an original checkpoint that belong to the three networks."""
    return {
        k: v
        for k, v in state.items()
        if k not in SCHEDULE_BUFFERS and k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)
    }


def infer_config(state: dict[str, torch.Tensor]) -> SDConfig:
    """The SD 1.x configuration of an original checkpoint (an inpainting U-Net takes 9 channels)."""
    if any(k.startswith("cond_stage_model.model.") for k in state):
        raise CheckpointError(
            "this is an SD 2.x checkpoint (OpenCLIP text encoder); opensd loads SD 1.x "
            "single files, or any diffusers folder whose text encoder is CLIPTextModel"
        )
    if any(k.startswith("conditioner.") for k in state):
        raise CheckpointError("this is an SDXL checkpoint; opensd loads SD 1.x single files")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    if key not in state:
        raise CheckpointError(
            f"not a Stable Diffusion checkpoint: it has no {key!r} "
            f"(first keys: {', '.join(list(state)[:5]) or 'none'})"
        )
    cfg = SDConfig.sd15()
    in_ch = state[key].shape[1]
    if in_ch != cfg.unet.in_channels:
        cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=int(in_ch)))
    return cfg


def load_original(path: str | Path, config: SDConfig | None = None) -> StableDiffusion:
    """Load an original single-file checkpoint; ``config`` defaults to SD 1.5's (inferred)."""
    state = read_weights(path)
    try:
        cfg = config or infer_config(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build_on_meta(cfg, len(state), path)
    load_strict(model, network_state(state), f"checkpoint {path}")
    return model.eval()


def save_original(model: StableDiffusion, path: str | Path) -> None:
    """Write the model as an original-layout single ``.safetensors`` file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save as .safetensors, not {path.suffix or '(no suffix)'}: {path}")
    write_safetensors(model.state_dict(), path, metadata={"format": "pt"})
