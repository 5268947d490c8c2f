"""Which Stable Diffusion an original single file holds, read from its keys alone.

Original files name their networks after the code that trained them (LDM for SD 1.x and
2.x, SGM for SDXL), so the text encoders' prefixes tell the families apart:

==========================================  =====================================
keys                                        family (:class:`ModelFamily`)
==========================================  =====================================
``cond_stage_model.transformer.*``          ``sd1``: CLIP ViT-L
``cond_stage_model.model.*``                ``sd2``: OpenCLIP ViT-H
``conditioner.embedders.0.transformer.*``   ``sdxl``: CLIP ViT-L and OpenCLIP bigG
and ``conditioner.embedders.1.model.*``
``conditioner.embedders.0.model.*`` only    ``sdxl_refiner``: OpenCLIP bigG
==========================================  =====================================

every one beside the U-Net at ``model.diffusion_model.*``. Files that are no whole model
of these families (a LoRA, a ControlNet, a VAE or U-Net alone, an embedding, another
architecture such as SD3 or Flux) are recognised too, so that :func:`detect_family`
refuses each with one line saying what it is and what opensd loads instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from opensd.checkpoints.io import CheckpointError
from opensd.models.stable_diffusion import ModelFamily
from opensd.tokenizers.clip_bpe import CLIPTokenizer

UNET_PREFIX = "model.diffusion_model."
FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
WHAT_LOADS = "opensd loads whole SD 1.x, SD 2.x, SDXL and SDXL refiner checkpoints"


def _any(keys: Iterable[str], test) -> bool:
    return any(test(k) for k in keys)


def _is_lora_key(k: str) -> bool:
    return (
        k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_"))
        or any(part in k for part in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up."))
        or k.endswith((".lora_mid.weight", ".hada_w1_a", ".lokr_w1"))
    )


# (test on one key, what the file is): the first match names a file that is no whole SD model
_NOT_A_MODEL: tuple[tuple[object, str], ...] = (
    (_is_lora_key, "this is a LoRA (lora_* tensors), not a model: it only changes a base model; "
     "load the base model it was trained for and the file as a LoRA (--lora FILE, or <lora:name:1> in the prompt)"),
    (lambda k: k.startswith(("control_model.", "controlnet_")) or "input_hint_block" in k,
     "this is a ControlNet (control_model.* tensors), not a model: load the Stable Diffusion model it was "
     "trained for and give the file with --controlnet FILE (load_controlnet in Python)"),
    (lambda k: "joint_blocks." in k,
     "this is an SD3-family model (MMDiT joint_blocks.*), not a U-Net Stable Diffusion; " + WHAT_LOADS),
    (lambda k: "double_blocks." in k or "single_blocks." in k,
     "this is a Flux-family model (double_blocks.*/single_blocks.*), not a U-Net Stable Diffusion; " + WHAT_LOADS),
    (lambda k: k in ("edm_mean", "edm_std"),
     "this is Playground v2.5 (edm_mean/edm_std: an EDM noise schedule and latent statistics opensd "
     "does not implement); " + WHAT_LOADS),
    (lambda k: k.startswith("edm_vpred."),
     "this is an EDM v-prediction model such as CosXL (edm_vpred.* sigmas: a continuous EDM schedule "
     "opensd does not implement); " + WHAT_LOADS),
    (lambda k: k.startswith("depth_model."),
     "this is the SD 2 depth model (depth_model.*: a MiDaS depth estimator and a U-Net of 5 input "
     "channels): opensd has no depth conditioning; " + WHAT_LOADS),
    (lambda k: k in ("emb_params", "clip_l", "clip_g"),
     "this is a textual-inversion embedding, not a model: " + WHAT_LOADS),
)


def _no_unet_hint(keys: list[str]) -> str:
    """What a file without an original U-Net holds, as far as its keys tell."""
    if _any(keys, lambda k: k.startswith(("down_blocks.", "conv_in.", "unet.down_blocks."))):
        return ("this is a diffusers-layout network (down_blocks.*, conv_in.*), not an original single file: "
                "give the whole diffusers pipeline folder (with model_index.json)")
    if _any(keys, lambda k: k.startswith("encoder.conv_in.")) and _any(keys, lambda k: k.startswith("decoder.")):
        return "this is a VAE alone (encoder.*/decoder.*), not a whole model: " + WHAT_LOADS
    if _any(keys, lambda k: k.startswith(("cond_stage_model.", "conditioner.", "text_model."))):
        return "this file holds a text encoder but no U-Net (model.diffusion_model.*): " + WHAT_LOADS
    return ""


def detect_family(keys: Iterable[str]) -> ModelFamily:
    """The family of an original checkpoint with these keys; a one-line :class:`CheckpointError`
    saying what the file is when it is no whole model of a family opensd loads."""
    keys = list(keys)
    for test, message in _NOT_A_MODEL:
        if _any(keys, test):
            raise CheckpointError(message)
    if FIRST_CONV not in keys:
        hint = _no_unet_hint(keys)
        if hint:
            raise CheckpointError(hint)
        raise CheckpointError(
            f"not a Stable Diffusion checkpoint: it has no {FIRST_CONV!r} "
            f"(first keys: {', '.join(keys[:5]) or 'none'}); " + WHAT_LOADS
        )
    has = {p: _any(keys, lambda k, p=p: k.startswith(p)) for p in (
        "cond_stage_model.transformer.", "cond_stage_model.model.", "conditioner.embedders.0.transformer.",
        "conditioner.embedders.0.model.", "conditioner.embedders.1.model.",
    )}
    if has["conditioner.embedders.0.transformer."] and has["conditioner.embedders.1.model."]:
        return ModelFamily.SDXL
    if has["conditioner.embedders.0.model."] and not has["conditioner.embedders.1.model."]:
        return ModelFamily.SDXL_REFINER
    if has["cond_stage_model.model."]:
        return ModelFamily.SD2
    if has["cond_stage_model.transformer."]:
        return ModelFamily.SD1
    if _any(keys, lambda k: k.startswith("conditioner.")):
        raise CheckpointError(
            "an SGM (SDXL-style) checkpoint whose text encoders are neither SDXL's (conditioner.embedders.0.transformer "
            "and .1.model) nor the refiner's (conditioner.embedders.0.model): " + WHAT_LOADS
        )
    raise CheckpointError(
        "this file holds a U-Net (model.diffusion_model.*) but no text encoder (cond_stage_model.* or "
        "conditioner.embedders.*): " + WHAT_LOADS
    )


def original_tokenizer(family: ModelFamily):
    """The tokenizer an original file of ``family`` was trained with (the first one for SDXL).

    OpenAI CLIP pads with end-of-text (SD 1.x, SDXL's first encoder); OpenCLIP pads with
    id 0, ``!`` (SD 2.x, the refiner). SDXL's Conditioner re-pads the first tokenizer's
    ids for bigG itself.
    """
    if family in (ModelFamily.SD2, ModelFamily.SDXL_REFINER):
        return CLIPTokenizer.from_open_clip(pad_token="!")
    return CLIPTokenizer.from_open_clip()
