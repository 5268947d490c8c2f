"""Reading and writing ControlNets: original single files and diffusers ``ControlNetModel`` folders.

:func:`load_controlnet` takes, for the model it will steer (its :class:`SDConfig`):

- an original file (``.safetensors``, or ``.pth``/``.pt``/``.ckpt``/``.bin`` read with
  ``torch.load(weights_only=True)``): lllyasviel's layout, with the ``control_model.``
  prefix (ControlNet 1.0 files that also carry a whole SD model: only ``control_model.*``
  is read, as A1111 does) or without it; a single file in diffusers' layout
  (``controlnet_cond_embedding.*``) is renamed through the key table;
- a diffusers folder (``config.json`` with ``"_class_name": "ControlNetModel"``,
  ``diffusion_pytorch_model.safetensors`` or ``.bin``).

The ControlNet is built from the model's own U-Net config (the latent's channels in), so
it loads strictly (:func:`opensd.checkpoints.io.load_strict`): a ControlNet for another
family (another context width, SDXL's ``label_emb``), of another width or with a hint
block that does not fit the VAE's downsampling is one line (:class:`ControlNetError` or
:class:`~opensd.checkpoints.io.StateDictMismatch`) naming the file and the key and shapes.
SDXL ControlNets are not supported yet. :func:`save_controlnet` writes the original layout,
:func:`save_controlnet_diffusers` a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from opensd.checkpoints.io import (
    CheckpointError,
    add_prefix,
    first_existing,
    load_strict,
    read_json,
    read_weights,
    short_hash,
    strip_prefix,
    write_json,
    write_safetensors,
)
from opensd.checkpoints.keymap_controlnet import (
    diffusers_to_original,
    from_diffusers_controlnet_config,
    original_to_diffusers,
    to_diffusers_controlnet_config,
)
from opensd.models.controlnet import ControlNet, ControlNetConfig
from opensd.models.stable_diffusion import ModelFamily, SDConfig
from opensd.models.unet import UNetConfig

PREFIX = "control_model."
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
DIFFUSERS_CLASS = "ControlNetModel"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_CONTEXT_KEY = re.compile(r"input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight")
_FAMILY_OF_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_HINT = re.compile(r"input_hint_block\.(\d+)\.weight")


class ControlNetError(CheckpointError):
    """A path holds no ControlNet opensd can run, or one made for another model."""

    kind = "ControlNetError"


@dataclass
class LoadedControlNet:
    """A ControlNet ready for a request, with what the infotext names (A1111's ``Model: name [hash]``)."""

    model: ControlNet
    name: str
    path: Path
    format: str  # "original" | "diffusers"
    hash: str  # first 10 hex digits of the weight file's SHA-256

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash[:8]}]"


def controlnet_config_for(model: SDConfig, hint_block_channels: tuple[int, ...], hint_channels: int = 3) -> ControlNetConfig:
    """The ControlNet of a model of ``model``: its U-Net's config with the latent's channels in."""
    c = model.vae.embed_dim
    return ControlNetConfig(dataclasses.replace(model.unet, in_channels=c, out_channels=c), hint_channels, hint_block_channels)


def _family(model: SDConfig, where: str) -> None:
    if model.family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        raise ControlNetError(f"{where}: ControlNets for {model.family.value} models are not supported yet (SD 1.x and 2.x are)")


# ----------------------------------------------------------------------------- original files


def _control_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors, original keys without ``control_model.``."""
    if any(k.startswith(PREFIX) for k in state):
        return strip_prefix(state, PREFIX)
    if "input_hint_block.0.weight" in state or "controlnet_cond_embedding.conv_in.weight" in state:
        return state
    if any(k.startswith("model.diffusion_model.") for k in state):
        raise ControlNetError(f"{where} is a Stable Diffusion model, not a ControlNet: give it as the model (-m)")
    first = ", ".join(list(state)[:3])
    raise ControlNetError(f"{where} is not a ControlNet: it has no input_hint_block (control_model.input_hint_block.*) "
                          f"nor diffusers' controlnet_cond_embedding.* (first keys: {first})")


def hint_config(state: Mapping[str, torch.Tensor], where: str) -> tuple[int, tuple[int, ...]]:
    """(hint_channels, hint_block_channels) read from ``input_hint_block``'s conv shapes:
    conv_in, then pairs (c_i -> c_i, c_i -> c_i+1 strided), then conv_out."""
    idx = sorted(int(m.group(1)) for k in state if (m := _HINT.fullmatch(k)))
    convs = [state[f"input_hint_block.{i}.weight"] for i in idx]
    if len(convs) < 2 or len(convs) % 2 or idx != list(range(0, 2 * len(convs), 2)) or any(w.ndim != 4 for w in convs):
        raise ControlNetError(f"{where}: its input_hint_block is not a ControlNet's (convs at indices {idx}: "
                              "expected 0, 2, 4, ... an even number of 3x3 convs)")
    widths = [convs[0].shape[0]] + [convs[2 + 2 * j].shape[0] for j in range(len(convs) // 2 - 1)]
    return int(convs[0].shape[1]), tuple(int(w) for w in widths)


def _diffusers_hint_config(state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """(hint_block_channels, hint_channels) of diffusers' ``controlnet_cond_embedding``: the widths
    are conv_in's and those of the strided blocks (the odd ones: 1, 3, 5)."""
    conv_in = state["controlnet_cond_embedding.conv_in.weight"]
    blocks = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight", k)))
    widths = [conv_in.shape[0]] + [state[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0] for j in blocks[1::2]]
    return tuple(int(w) for w in widths), int(conv_in.shape[1])


def _check_original(state: Mapping[str, torch.Tensor], model: SDConfig, cfg: ControlNetConfig, where: str) -> None:
    """The family (context width, ``label_emb``), width and latent factor, named before a strict load would."""
    key = next((k for k in state if _CONTEXT_KEY.fullmatch(k)), None)
    want = model.unet.context_dim
    if key is not None and state[key].ndim == 2 and state[key].shape[1] != want:
        got = int(state[key].shape[1])
        family = _FAMILY_OF_CONTEXT.get(got, f"a model of context width {got}")
        raise ControlNetError(f"{where} is a ControlNet for {family} ({key}: {tuple(state[key].shape)}, context width {got}); "
                              f"the model is {model.family.value} (context width {want}): use a ControlNet made for its family")
    if any(k.startswith("label_emb.") for k in state):
        raise ControlNetError(f"{where} is an SDXL ControlNet (label_emb.*); the model is {model.family.value}")
    conv_in = state.get("input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and tuple(conv_in.shape[:2]) != (model.unet.model_channels, model.vae.embed_dim):
        raise ControlNetError(f"{where}: input_blocks.0.0.weight is {tuple(conv_in.shape)}, but the model's U-Net takes "
                              f"{model.vae.embed_dim} latent channels to {model.unet.model_channels}: a ControlNet of another width")
    _factor(cfg, model, where)


def _factor(cfg: ControlNetConfig, model: SDConfig, where: str) -> None:
    if cfg.downsample_factor != model.vae.downsample_factor:
        raise ControlNetError(f"{where}: its hint block halves the control image {len(cfg.hint_block_channels) - 1} time(s) "
                              f"(x{cfg.downsample_factor}) but the model's VAE downsamples x{model.vae.downsample_factor}")


def _build(cfg: ControlNetConfig, state: Mapping[str, torch.Tensor], where: str, dtype: torch.dtype) -> ControlNet:
    with torch.device("meta"):
        net = ControlNet(cfg).to(dtype)
    load_strict(net, state, f"ControlNet {where}")
    return net.eval().requires_grad_(False)


def _load_file(path: Path, model: SDConfig, dtype: torch.dtype) -> ControlNet:
    where = str(path)
    state = _control_state(read_weights(path), where)
    if "controlnet_cond_embedding.conv_in.weight" in state:  # diffusers' layout in one file
        cfg = controlnet_config_for(model, *_diffusers_hint_config(state))
        state = diffusers_to_original(state, cfg, where)
    else:
        hint_channels, widths = hint_config(state, where)
        cfg = controlnet_config_for(model, widths, hint_channels)
    _check_original(state, model, cfg, where)
    return _build(cfg, state, where, dtype)


# ----------------------------------------------------------------------------- diffusers folders


def is_diffusers_controlnet(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    try:
        return read_json(folder / "config.json").get("_class_name") == DIFFUSERS_CLASS
    except CheckpointError:
        return False


def _differences(a: UNetConfig, b: UNetConfig) -> list[str]:
    return [f"{f.name} {getattr(a, f.name)!r} (file) vs {getattr(b, f.name)!r} (model)"
            for f in dataclasses.fields(UNetConfig) if getattr(a, f.name) != getattr(b, f.name)]


def _load_folder(folder: Path, model: SDConfig, dtype: torch.dtype) -> ControlNet:
    where = str(folder / "config.json")
    cfg = from_diffusers_controlnet_config(read_json(folder / "config.json"), where)
    want = controlnet_config_for(model, cfg.hint_block_channels, cfg.hint_channels)
    diff = _differences(cfg.unet, want.unet)
    if diff:
        ctx = cfg.unet.context_dim
        family = _FAMILY_OF_CONTEXT.get(ctx, f"a model of context width {ctx}") if ctx != want.unet.context_dim else "another U-Net"
        raise ControlNetError(f"{where} describes a ControlNet for {family}, not this {model.family.value} model: {'; '.join(diff[:3])}")
    _factor(cfg, model, where)
    weights = first_existing(folder, DIFFUSERS_WEIGHTS)
    if weights is None:
        raise ControlNetError(f"{folder} is a ControlNetModel folder without weights ({' or '.join(DIFFUSERS_WEIGHTS)})")
    return _build(cfg, diffusers_to_original(read_weights(weights), cfg, str(weights)), str(weights), dtype)


# ----------------------------------------------------------------------------- entry points


def load_controlnet(path: str | Path, model: SDConfig, dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """The ControlNet at ``path`` (any layout of the module doc) for a model of config ``model``,
    its floating-point weights in ``dtype``, in eval mode and without gradients."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ControlNetError(f"ControlNet not found: {path}")
    _family(model, str(path))
    if path.is_dir():
        if not is_diffusers_controlnet(path):
            raise ControlNetError(f"{path} is a folder but no diffusers ControlNet (config.json with "
                                  f"\"_class_name\": \"{DIFFUSERS_CLASS}\"); give that folder or an original file")
        weights = first_existing(path, DIFFUSERS_WEIGHTS)
        return LoadedControlNet(_load_folder(path, model, dtype), path.name, path, "diffusers", short_hash(weights) if weights else "")
    if path.suffix.lower() not in SUFFIXES:
        raise ControlNetError(f"{path}: not a ControlNet file; give a {', '.join(SUFFIXES)} file or a diffusers ControlNetModel folder")
    return LoadedControlNet(_load_file(path, model, dtype), path.stem, path, "original", short_hash(path))


def save_controlnet(net: ControlNet, path: str | Path, *, prefix: bool = True, dtype: torch.dtype | None = None,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``net`` as an original single ``.safetensors`` file (keys under ``control_model.``
    unless ``prefix`` is False, as some converted files have them), its floating-point
    tensors in ``dtype`` (None: as they are), with the file's ``metadata`` strings."""
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in net.state_dict().items()}
    write_safetensors(add_prefix(state, PREFIX) if prefix else state, path, metadata=dict(metadata or {}) or None)
    return Path(path)


def save_controlnet_diffusers(net: ControlNet, folder: str | Path) -> Path:
    """Write ``net`` as a diffusers ``ControlNetModel`` folder (config.json and weights)."""
    folder = Path(folder)
    write_json(to_diffusers_controlnet_config(net.cfg), folder / "config.json")
    write_safetensors(original_to_diffusers(net.state_dict(), net.cfg), folder / DIFFUSERS_WEIGHTS[0])
    return folder
