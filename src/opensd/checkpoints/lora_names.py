"""Where a LoRA key lands: every adaptable layer of a model under every name files use.

LoRA files name the layer they change, not a weight, and in one of several spellings:

* kohya / A1111 (sd-scripts, most ``.safetensors`` LoRAs): ``lora_unet_`` + the U-Net
  module path with ``.`` -> ``_``, in diffusers' names (``lora_unet_down_blocks_0_
  attentions_0_transformer_blocks_0_attn1_to_q``, what sd-scripts writes for SD 1.x/2.x)
  or in the original LDM names (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_
  to_q``, what it writes for SDXL); text encoders as ``lora_te_`` (SD 1.x/2.x) or
  ``lora_te1_`` / ``lora_te2_`` (SDXL) + the transformers CLIP path
  (``text_model_encoder_layers_0_self_attn_q_proj``);
* diffusers / PEFT: ``unet.`` + the diffusers module path, ``text_encoder.`` /
  ``text_encoder_2.`` + the transformers CLIP path, dots kept.

OpenCLIP encoders (SD 2.x, SDXL's bigG) are named as the transformers model diffusers
converts them to; their q, k and v land on row blocks of OpenCLIP's fused ``in_proj``
(:class:`Target.rows`). Underscored names cannot be turned back into module paths (``to_q``
has one), so the table is built forward from the model: every layer's path, spelled
every way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opensd.checkpoints.keymap_open_clip import _QKV, _block_keys
from opensd.checkpoints.keymap_unet import unet_key_map
from opensd.models.adapters import Conv2d, Linear
from opensd.models.clip import CLIPTextModel
from opensd.models.open_clip import OpenCLIPAttention, OpenCLIPTextModel
from opensd.models.stable_diffusion import ModelFamily, StableDiffusion

UNET_PATH = "model.diffusion_model."


@dataclass(frozen=True, eq=False)
class Target:
    """One adaptable layer: the module, its path in the model, which network it is in
    (``"unet"``, ``"te1"``, ``"te2"``), and for a q/k/v block of a fused projection
    ``rows = (start, total)``."""

    module: nn.Module
    path: str
    network: str
    rows: tuple[int, int] | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape ``ΔW`` must have (one row block of a fused projection)."""
        if self.rows is None:
            weight = self.module.weight
            assert isinstance(weight, torch.Tensor)
            return tuple(weight.shape)
        w = self.module.in_proj_weight
        assert isinstance(w, torch.Tensor)
        return (w.shape[0] // 3, w.shape[1])


def kohya_name(prefix: str, path: str) -> str:
    """``lora_unet_`` + ``down_blocks.0.resnets.0.conv1`` -> ``lora_unet_down_blocks_0_resnets_0_conv1``."""
    return prefix + path.replace(".", "_")


def _unet_targets(model: StableDiffusion) -> dict[str, Target]:
    to_diffusers = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in unet_key_map(model.cfg.unet).items()
                    if k.endswith(".weight")}
    out: dict[str, Target] = {}
    for path, module in model.unet.named_modules():
        if not isinstance(module, (Linear, Conv2d)):
            continue
        t = Target(module, UNET_PATH + path, "unet")
        diffusers = to_diffusers[path]
        out[kohya_name("lora_unet_", path)] = t
        out[kohya_name("lora_unet_", diffusers)] = t
        out["unet." + diffusers] = t
    return out


def _clip_targets(encoder: CLIPTextModel, base: str, network: str, kohya: str, peft: str) -> dict[str, Target]:
    out: dict[str, Target] = {}
    for path, module in encoder.named_modules():
        if isinstance(module, Linear):
            t = Target(module, base + path, network)
            out[kohya_name(kohya, path)] = t
            out[peft + path] = t
    return out


def _open_clip_targets(encoder: OpenCLIPTextModel, base: str, network: str, kohya: str, peft: str) -> dict[str, Target]:
    modules = dict(encoder.named_modules())
    out: dict[str, Target] = {}
    for n in range(encoder.cfg.layers):
        names = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in _block_keys(n).items() if k.endswith(".weight")}
        names = {k: v for k, v in names.items() if isinstance(modules[k], Linear)}
        for path, hf in names.items():
            t = Target(modules[path], base + path, network)
            out[kohya_name(kohya, hf)] = out[peft + hf] = t
        attn_path = f"transformer.resblocks.{n}.attn"
        attn = modules[attn_path]
        assert isinstance(attn, OpenCLIPAttention)
        width = attn.in_proj_weight.shape[1]
        for i, q in enumerate(_QKV):
            hf = f"text_model.encoder.layers.{n}.self_attn.{q}"
            t = Target(attn, f"{base}{attn_path}.in_proj[{q[0]}]", network, rows=(i * width, 3 * width))
            out[kohya_name(kohya, hf)] = out[peft + hf] = t
    return out


def _text_spellings(family: ModelFamily, index: int) -> tuple[str, str, str]:
    """(network, kohya prefix, PEFT prefix) of text encoder ``index`` in ``family``."""
    if family in (ModelFamily.SD1, ModelFamily.SD2):
        return "te1", "lora_te_", "text_encoder."
    if family is ModelFamily.SDXL_REFINER:  # its one encoder is the base's second (diffusers: text_encoder_2)
        return "te2", "lora_te2_", "text_encoder_2."
    return ("te1", "lora_te1_", "text_encoder.") if index == 0 else ("te2", "lora_te2_", "text_encoder_2.")


def lora_targets(model: StableDiffusion) -> dict[str, Target]:
    """Every spelling of every adaptable layer of ``model`` -> its :class:`Target`."""
    out = _unet_targets(model)
    for i, (encoder, base) in enumerate(zip(model.text_encoders, model.text_prefixes, strict=False)):
        network, kohya, peft = _text_spellings(model.cfg.family, i)
        if isinstance(encoder, OpenCLIPTextModel):
            out |= _open_clip_targets(encoder, base, network, kohya, peft)
        elif isinstance(encoder, CLIPTextModel):
            out |= _clip_targets(encoder, base, network, kohya, peft)
        # a BERT text encoder has no LoRA names (no LoRA format knows one): U-Net layers only
    return out


def kohya_names(model: StableDiffusion, *, ldm_unet: bool | None = None) -> dict[str, Target]:
    """The one kohya name each layer is written under (what ``opensd train lora`` saves).

    U-Net layers are spelled as sd-scripts spells them: diffusers names for SD 1.x/2.x,
    LDM names for SDXL (``ldm_unet`` overrides).
    """
    if ldm_unet is None:
        ldm_unet = model.cfg.family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER)
    to_diffusers = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in unet_key_map(model.cfg.unet).items()
                    if k.endswith(".weight")}
    out: dict[str, Target] = {}
    for name, t in lora_targets(model).items():
        if not name.startswith("lora_"):
            continue
        if t.network == "unet":
            path = t.path[len(UNET_PATH):]
            want = kohya_name("lora_unet_", path if ldm_unet else to_diffusers[path])
            if name != want:
                continue
        out[name] = t
    return out
