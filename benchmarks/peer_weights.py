"""The same weights for every engine of ``peers.py``, written once.

For each model: an original-layout single-file ``model.safetensors`` (what
stable-diffusion.cpp reads) and a diffusers folder ``diffusers/`` from the very same
tensors (what opensd loads here and optimum-intel exports to OpenVINO IR).

- ``sd15``: the SD 1.5 architecture (``SDConfig.sd15()``) with random weights (PyTorch's
  default init, seed 0). Its tokenizer is opensd's word tokenizer trained on the
  benchmark's captions, as ``bench.py``'s memory case does (nothing from a hub): opensd
  and OpenVINO (transformers' ``PreTrainedTokenizerFast``) read it from the folder;
  stable-diffusion.cpp always uses its built-in CLIP BPE vocabulary, so its token ids
  differ, but every engine pads to 77 tokens, so the work is the same.
- ``tiny``: the default model ``models/opensd-shapes`` (32 px), re-saved in both layouts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

CAPTIONS = [
    "a red circle above a blue square",
    "a green triangle",
    "a small blue square above a green triangle",
    "three yellow circles on a black background",
]
MODELS = ("sd15", "tiny")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Where one model's files are, and the image side it is benchmarked at by default."""

    name: str
    single_file: Path
    diffusers: Path
    native_size: int


def files(root: Path, name: str) -> ModelFiles:
    size = 32 if name == "tiny" else 512
    return ModelFiles(name, root / name / "model.safetensors", root / name / "diffusers", size)


def _sd15():
    from opensd.models.clip import CLIPTextConfig
    from opensd.models.stable_diffusion import SDConfig, StableDiffusion
    from opensd.tokenizers.word import WordTokenizer

    tok = WordTokenizer.train(CAPTIONS, vocab_size=64, context_length=CLIPTextConfig.sd15().max_length)
    torch.manual_seed(0)
    return StableDiffusion(SDConfig.sd15()).eval(), tok


def _tiny():
    from opensd.checkpoints import load_model
    from opensd.defaults import default_model_path

    path = default_model_path()
    if path is None or not path.exists():
        raise FileNotFoundError("the default model (models/opensd-shapes) is missing")
    loaded = load_model(path)
    return loaded.model, loaded.tokenizer


def write(root: Path, name: str) -> ModelFiles:
    """Write ``name``'s files under ``root`` unless they are there already."""
    from opensd.checkpoints.diffusers_folder import save_diffusers
    from opensd.checkpoints.original import save_original

    out = files(root, name)
    if out.single_file.exists() and (out.diffusers / "model_index.json").exists():
        return out
    model, tok = {"sd15": _sd15, "tiny": _tiny}[name]()
    out.single_file.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        save_diffusers(model, tok, out.diffusers)
        save_original(model, out.single_file)
    return out
