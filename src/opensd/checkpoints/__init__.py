"""Loading and saving models in every format opensd speaks.

:func:`load_model` recognises the format of a path:

- a diffusers pipeline folder (``model_index.json``),
- an opensd model folder (``config.json`` with ``"format": "opensd"``),
- an original single file of SD 1.x, SD 2.x, SDXL or the SDXL refiner (``.safetensors``,
  or ``.ckpt`` read with ``weights_only=True``); its family comes from its keys
  (:mod:`opensd.checkpoints.families`), its parameterization from what it says
  (:mod:`opensd.checkpoints.parameterization`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from opensd.checkpoints.build import WeightsDtype
from opensd.checkpoints.diffusers_folder import DIFFUSERS_WEIGHTS, is_diffusers_folder, load_diffusers
from opensd.checkpoints.families import original_tokenizer
from opensd.checkpoints.io import CheckpointError, StateDictMismatch, first_existing, short_hash
from opensd.checkpoints.opensd_format import is_opensd_folder, load_opensd
from opensd.checkpoints.original import read_original
from opensd.checkpoints.parameterization import Parameterization, parse_prediction
from opensd.diffusion.schedules import Prediction
from opensd.models.stable_diffusion import StableDiffusion
from opensd.tokenizers import Tokenizer


@dataclass
class LoadedModel:
    """A model ready for a pipeline, with what A1111-style metadata needs.

    ``parameterization``: the model's prediction and how it was found (None: not recorded).
    """

    model: StableDiffusion
    tokenizer: Tokenizer
    name: str
    path: Path
    format: str  # "diffusers" | "opensd" | "original"
    hash: str  # first 10 hex digits of the main weight file's SHA-256
    parameterization: Parameterization | None = None


def detect_format(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if path.is_dir():
        if is_diffusers_folder(path):
            return "diffusers"
        if is_opensd_folder(path):
            return "opensd"
        raise CheckpointError(
            f"{path} is a folder but neither a diffusers pipeline (model_index.json) "
            "nor an opensd model (config.json with \"format\": \"opensd\")"
        )
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth"):
        return "original"
    raise CheckpointError(
        f"{path}: not a model; give a diffusers folder, an opensd model folder, "
        "or an original SD 1.x, SD 2.x or SDXL .safetensors/.ckpt file"
    )


def main_weights_file(path: Path, fmt: str) -> Path:
    if fmt == "original":
        return path
    if fmt == "opensd":
        return path / "model.safetensors"
    f = first_existing(path / "unet", DIFFUSERS_WEIGHTS)
    if f is None:
        raise CheckpointError(f"{path / 'unet'} has no weights file")
    return f


FOLDER_SOURCE = {"diffusers": "the folder's scheduler config", "opensd": "the folder's config.json"}


def _with_prediction(model: StableDiffusion, fmt: str, prediction: Prediction | None) -> Parameterization:
    """A folder's parameterization: its config's, or ``prediction`` (which then replaces it)."""
    if prediction is not None:
        model.cfg = model.cfg.replace(schedule=dataclasses.replace(model.cfg.schedule, prediction=prediction))
        return Parameterization(prediction, "set by the caller (--prediction)")
    return Parameterization(model.cfg.schedule.prediction, FOLDER_SOURCE[fmt])


def load_model(path: str | Path, prediction: Prediction | str | None = None, dtype: WeightsDtype = None) -> LoadedModel:
    """Load a model from a diffusers folder, an opensd folder or an original single file.

    ``prediction`` (``Prediction.EPS``/``Prediction.V``, or ``"eps"``/``"v"``; None or
    ``"auto"``: what the model says) overrides the parameterization of any format.
    ``dtype``: the floating-point weights' dtype (None: float32), or a function of the
    model's configuration that picks it (the pipeline's ``precision="auto"``); the file's
    tensors are cast into it as they are read, so a 16-bit model never exists in float32.
    """
    path = Path(path).expanduser()
    prediction = parse_prediction(prediction)
    fmt = detect_format(path)
    if fmt == "original":
        loaded = read_original(path, prediction=prediction, dtype=dtype)
        model, par = loaded.model, loaded.parameterization
        tok = original_tokenizer(model.cfg.family)
    else:
        if fmt == "diffusers":
            model, tok = load_diffusers(path, dtype)
        else:
            model, tok = load_opensd(path, dtype)
        par = _with_prediction(model, fmt, prediction)
    name = path.stem if path.is_file() else path.name
    return LoadedModel(model, tok, name, path, fmt, short_hash(main_weights_file(path, fmt)), par)


__all__ = ["CheckpointError", "StateDictMismatch", "LoadedModel", "load_model", "detect_format", "Prediction"]
