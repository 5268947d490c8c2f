"""Upscaler model files (ESRGAN, Real-ESRGAN, SwinIR and kin) through spandrel.

The networks are not written here: spandrel (the loader library ComfyUI uses) detects the
architecture from a state dict's keys and builds it (``RRDBNet`` of ESRGAN, Wang et al.
2018; Real-ESRGAN's ``SRVGGNetCompact``, Wang et al. 2021; SwinIR, Liang et al. 2021;
HAT, DAT, SPAN, OmniSR...). Only super-resolution models are taken (spandrel's purpose
``SR``, scale 2 or more, RGB in and out): a face restorer, an inpainter or a 1x
restoration model is refused with one line naming what it is.

The weights are read by opensd, never by spandrel's pickle loader: ``.safetensors``, or
``.pth``/``.pt``/``.ckpt``/``.bin`` with ``torch.load(weights_only=True)``
(:mod:`opensd.checkpoints.io`); wrappers such as ``{"params_ema": ...}`` are unwrapped by
spandrel's ``canonicalize_state_dict``.

:func:`run_tiled` runs a model on overlapping tiles (default 192 px with 16 px of context
on every side, A1111's ``ESRGAN_tile``), so memory is bounded by the tile, not the image:
each tile's context is cut away after the model, so the tiles meet without seams for any
model whose receptive field is within the context.

spandrel's package imports torchvision for two architectures opensd does not take (LaMa,
RestoreFormer). Where torchvision is not installed (the CPU wheel of torch here has no
matching one on PyPI), spandrel is imported with a stand-in for the three names those two
import, removed from ``sys.modules`` right after, so nothing else ever sees it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from opensd.checkpoints.io import CheckpointError, read_torch_object, read_weights, short_hash
from opensd.errors import OpenSDError
from opensd.pipelines.images import to_unit_tensor, unit_to_pil

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
DEFAULT_TILE = 192  # pixels of input per tile (A1111's ESRGAN_tile)
DEFAULT_TILE_CONTEXT = 16  # pixels of context on each side of a tile, cut after the model
SPANDREL = "spandrel>=0.4.2"


class UpscalerError(OpenSDError):
    """An upscaler name, file or setting that cannot be used; the message says what can."""

    kind = "UpscalerError"


def _stand_in_torchvision() -> dict[str, types.ModuleType]:
    """Modules for the names spandrel's LaMa and RestoreFormer import; they fail if ever called."""

    def unavailable(*_: Any, **__: Any) -> Any:
        raise UpscalerError("this architecture needs torchvision, which is not installed")

    mods = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")}
    fn = mods["torchvision.transforms.functional"]
    fn.InterpolationMode = type("InterpolationMode", (), {"NEAREST": "nearest", "BILINEAR": "bilinear"})  # type: ignore[attr-defined]
    fn.rotate = unavailable  # type: ignore[attr-defined]
    fn.normalize = unavailable  # type: ignore[attr-defined]
    return mods


def spandrel() -> Any:
    """The spandrel package (module doc); a one-line :class:`UpscalerError` when it is not installed."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        raise UpscalerError(f"upscaler model files need the spandrel package: pip install --no-deps '{SPANDREL}' "
                            "(make install does); Lanczos, Nearest and the latent upscalers work without it")
    if importlib.util.find_spec("torchvision") is not None:
        import spandrel as module
        return module
    stand_ins = _stand_in_torchvision()
    sys.modules.update(stand_ins)
    try:
        import spandrel as module
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return module


@dataclass(frozen=True, eq=False)
class UpscalerModel:
    """A loaded upscaler network: ``scale`` x in each direction, RGB [0, 1] in and out."""

    name: str
    path: Path
    architecture: str  # spandrel's name for it ("ESRGAN", "RealESRGAN Compact", "SwinIR"...)
    scale: int
    hash: str  # first 10 hex digits of the file's SHA-256
    call: Callable[[torch.Tensor], torch.Tensor]  # (1, 3, h, w) -> (1, 3, h*scale, w*scale), inference mode
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.name}: {self.architecture}, {self.scale}x"


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name, unwrapped as spandrel canonicalizes them."""
    if path.suffix.lower() == ".safetensors":
        state: Any = read_weights(path)
    else:
        state = read_torch_object(path)
    if not isinstance(state, dict):
        raise UpscalerError(f"{path} holds a {type(state).__name__}, not a dict of tensors: not an upscaler model")
    state = spandrel().canonicalize_state_dict(state)
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UpscalerError(f"{path} holds no tensors an upscaler is made of")
    return tensors


def load_upscaler_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> UpscalerModel:
    """The upscaler in ``path`` on ``device`` in ``dtype`` (module doc); one line naming the file for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UpscalerError(f"upscaler model not found: {path}" if not path.exists() else f"{path} is not a file")
    if path.suffix.lower() not in SUFFIXES:
        raise UpscalerError(f"{path}: an upscaler model is a {', '.join(SUFFIXES)} file")
    try:
        state = _state_dict(path)
    except CheckpointError as e:
        raise UpscalerError(str(e)) from None
    sp = spandrel()
    try:
        desc = sp.ModelLoader(torch.device("cpu")).load_from_state_dict(state)
    except sp.UnsupportedModelError:
        raise UpscalerError(f"{path} is no upscaler architecture spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, "
                            "SPAN...): its keys match none") from None
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
        raise UpscalerError(f"{path} looks like a {_arch_guess(sp, state)} file but does not load: "
                            f"{' '.join(str(e).split())[:200]}") from None
    kind = desc.architecture.name
    if not isinstance(desc, sp.ImageModelDescriptor) or desc.purpose != "SR" or desc.scale < 2:
        what = getattr(desc, "purpose", type(desc).__name__)
        raise UpscalerError(f"{path} is a {kind} model for {what} (scale {getattr(desc, 'scale', '?')}), not an upscaler; "
                            "give a super-resolution model (2x, 4x...)")
    if desc.input_channels != 3 or desc.output_channels != 3:
        raise UpscalerError(f"{path} is a {kind} model with {desc.input_channels} input and {desc.output_channels} output "
                            "channels; opensd upscales RGB images (3 and 3)")
    desc.to(device)
    if dtype != torch.float32:
        try:
            desc.to(dtype)
        except sp.UnsupportedDtypeError:  # this architecture runs in float32 only
            dtype = torch.float32
    desc.model.requires_grad_(False)
    return UpscalerModel(path.stem, path, kind, int(desc.scale), short_hash(path), desc, torch.device(device), dtype)


def _arch_guess(sp: Any, state: dict[str, torch.Tensor]) -> str:
    for support in sp.MAIN_REGISTRY.architectures("detection"):
        if support.detect(state):
            name: str = support.architecture.name
            return name
    return "model"


def _tile_starts(size: int, tile: int) -> list[int]:
    """Where tiles of ``tile`` start to cover ``size`` (the last one flush with the end)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile))
    return starts + [size - tile]


@torch.inference_mode()
def run_tiled(model: UpscalerModel, image: Image.Image, *, tile: int = DEFAULT_TILE, context: int = DEFAULT_TILE_CONTEXT) -> Image.Image:
    """``image`` through ``model`` once (``model.scale`` x bigger), tile by tile (module doc)."""
    if tile < 16 or context < 0:
        raise UpscalerError(f"upscaler tiles must be at least 16 px with context >= 0, got {tile} and {context}")
    x = to_unit_tensor(image)  # (1, 3, H, W) in [0, 1]
    _, _, h, w = x.shape
    s = model.scale
    out = torch.empty(1, 3, h * s, w * s)
    for top in _tile_starts(h, tile):
        for left in _tile_starts(w, tile):
            th, tw = min(tile, h - top), min(tile, w - left)
            t0, l0 = max(0, top - context), max(0, left - context)
            t1, l1 = min(h, top + th + context), min(w, left + tw + context)
            piece = x[:, :, t0:t1, l0:l1].to(model.device, model.dtype)
            up = model.call(piece).float().cpu()  # (1, 3, (t1-t0)*s, (l1-l0)*s)
            dy, dx = (top - t0) * s, (left - l0) * s
            out[:, :, top * s:(top + th) * s, left * s:(left + tw) * s] = up[:, :, dy:dy + th * s, dx:dx + tw * s]
    return unit_to_pil(out)[0]
