"""Loading and saving models in every format opensd speaks.

:func:`load_model` recognises the format of a path:

- a diffusers pipeline folder (``model_index.json``),
- an opensd model folder (``config.json`` with ``"format": "opensd"``),
- an original SD 1.x single file (``.safetensors``, or ``.ckpt`` read with ``weights_only=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opensd.checkpoints.io import CheckpointError, StateDictMismatch, short_hash
from opensd.models.stable_diffusion import StableDiffusion
from opensd.tokenizers import Tokenizer


@dataclass
class LoadedModel:
    """A model ready for a pipeline, with what A1111-style metadata needs."""

    model: StableDiffusion
    tokenizer: Tokenizer
    name: str
    path: Path
    format: str  # "diffusers" | "opensd" | "original"
    hash: str  # first 10 hex digits of the main weight file's SHA-256


def detect_format(path: Path) -> str:
    from opensd.checkpoints.diffusers_folder import is_diffusers_folder
    from opensd.checkpoints.opensd_format import is_opensd_folder

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
        "or an SD 1.x .safetensors/.ckpt file"
    )


def main_weights_file(path: Path, fmt: str) -> Path:
    if fmt == "original":
        return path
    if fmt == "opensd":
        return path / "model.safetensors"
    from opensd.checkpoints.diffusers_folder import DIFFUSERS_WEIGHTS
    from opensd.checkpoints.io import first_existing

    f = first_existing(path / "unet", DIFFUSERS_WEIGHTS)
    if f is None:
        raise CheckpointError(f"{path / 'unet'} has no weights file")
    return f


def load_model(path: str | Path) -> LoadedModel:
    """Load a model from a diffusers folder, an opensd folder or an original SD file."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    if fmt == "diffusers":
        from opensd.checkpoints.diffusers_folder import load_diffusers

        model, tok = load_diffusers(path)
    elif fmt == "opensd":
        from opensd.checkpoints.opensd_format import load_opensd

        model, tok = load_opensd(path)
    else:
        from opensd.checkpoints.original import load_original
        from opensd.tokenizers.clip_bpe import CLIPTokenizer

        model = load_original(path)
        tok = CLIPTokenizer.from_open_clip()
    name = path.stem if path.is_file() else path.name
    return LoadedModel(model, tok, name, path, fmt, short_hash(main_weights_file(path, fmt)))


__all__ = ["CheckpointError", "StateDictMismatch", "LoadedModel", "load_model", "detect_format"]
