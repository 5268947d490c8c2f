"""Data of the fine-tuning trainers (``opensd train lora`` and ``opensd train embedding``).

* **Instance images**: an image-caption folder (:mod:`opensd.data.imagefolder`:
  ``metadata.jsonl``, or kohya-style ``img.png`` + ``img.txt``), or any images with one
  prompt for all (``instance_prompt``; DreamBooth, Ruiz et al. 2022, "DreamBooth: Fine Tuning
  Text-to-Image Diffusion Models for Subject-Driven Generation").
* **Class images** for DreamBooth's prior preservation: a folder (``prior_data``, captioned,
  or any images with ``class_prompt``), or ``num_class_images`` drawn by the frozen base
  model from ``class_prompt`` (:func:`generate_class_images`, seeded; written once into the
  run folder, so a resumed run trains on the same images).
* **Latents**: each pool is encoded once by the frozen VAE (posterior mode, scaled) with
  :func:`opensd.training.data.build_latent_cache`, and kept in the run's ``cache/`` under a
  name holding the model file's hash, the data settings and the captions; the frozen text
  conditioning rides along when the text encoders do not train.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from opensd.config import to_dict
from opensd.data.imagefolder import (
    IMAGE_EXTENSIONS,
    METADATA,
    read_imagefolder,
    write_imagefolder,
)
from opensd.pipelines.images import from_uint8, to_uint8
from opensd.training.config import DataConfig, DataSource
from opensd.training.data import (
    Example,
    TrainingDataError,
    build_latent_cache,
    read_latent_cache,
    square_resize,
    write_latent_cache,
)
from opensd.training.sources import open_source

if TYPE_CHECKING:
    from opensd.models.vae import AutoencoderKL

CLASS_IMAGES = "class_images"


class ImageList:
    """Images (N, 3, H, W) uint8 with one caption each: a :class:`~opensd.training.data.Source`."""

    def __init__(self, images: torch.Tensor, captions: Sequence[str]) -> None:
        self.images, self.texts = images, list(captions)
        self.pool = len(self.texts)

    def __getitem__(self, index: int) -> Example:
        return Example(from_uint8(self.images[index]), self.texts[index])

    def captions(self, n: int) -> list[str]:
        return self.texts[:n]

    def prefill(self, n: int, workers: int) -> None:
        """Nothing to do: the images are in memory."""


def _stack(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    arrays = [np.asarray(square_resize(im.convert("RGB"), size)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def _plain_images(folder: Path) -> list[Image.Image]:
    """Every image under ``folder`` (sorted by path), captions or not."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise TrainingDataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def open_images(data: DataConfig, prompt: str = "", what: str = "data") -> ImageList:
    """The images of ``data`` with their captions, or with ``prompt`` for every one (then a
    folder needs no captions)."""
    if data.source is DataSource.SHAPES:
        if not data.pool_size:
            raise TrainingDataError(f"{what}: the shapes world needs data.pool_size > 0 (a fixed set of images)")
        source = open_source(data)
        items = [source[i] for i in range(data.pool_size)]
        images = torch.stack([to_uint8(e.image) for e in items])
        return ImageList(images, [prompt or e.caption for e in items])
    folder = Path(data.path)
    if not folder.is_dir():
        raise TrainingDataError(f"{what}: {folder} is not a folder" if folder.exists() else f"{what}: {folder} does not exist")
    if prompt and not (folder / METADATA).is_file():
        plain = _plain_images(folder)
        return ImageList(_stack(plain, data.image_size), [prompt] * len(plain))
    pairs = list(read_imagefolder(folder))
    return ImageList(_stack([im for im, _ in pairs], data.image_size), [prompt or t for _, t in pairs])


# ----------------------------------------------------------------------------- class images


@dataclass(frozen=True)
class ClassImageSpec:
    """What the frozen model draws for prior preservation (the folder records it)."""

    prompt: str
    count: int
    seed: int
    steps: int
    sampler: str
    cfg_scale: float
    size: int
    model_hash: str
    batch: int = 8


def generate_class_images(pipe: Any, spec: ClassImageSpec, run_dir: Path, progress: bool = False) -> Path:
    """``run_dir/class_images``: ``spec.count`` images of ``spec.prompt`` by ``pipe`` (seeds
    ``spec.seed + i``, drawn ``spec.batch`` at a time), written once (into a temporary folder, then renamed); an existing
    folder made with the same spec is reused, one made otherwise is an error."""
    folder = run_dir / CLASS_IMAGES
    record = to_dict(spec)
    if folder.is_dir():
        stamp = folder / "spec.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == record:
            return folder
        raise TrainingDataError(f"{folder} holds class images made otherwise (see its spec.json); delete it, or "
                                "use another run folder")
    from tqdm import tqdm

    tmp = run_dir / f".{CLASS_IMAGES}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    samples = []
    bar = tqdm(total=spec.count, desc="class images", unit="img", disable=not progress)
    for start in range(0, spec.count, spec.batch):
        n = min(spec.batch, spec.count - start)
        images = pipe.txt2img(spec.prompt, steps=spec.steps, sampler=spec.sampler, cfg_scale=spec.cfg_scale,
                              width=spec.size, height=spec.size, seed=spec.seed + start, batch_size=n)
        samples += [(im, spec.prompt) for im in images]
        bar.update(n)
    bar.close()
    write_imagefolder(samples, tmp)
    (tmp / "spec.json").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, folder)
    return folder


# ----------------------------------------------------------------------------- latents


Encode = Callable[[list[str]], dict[str, torch.Tensor]]


def cached_latents(source: ImageList, vae: AutoencoderKL, encode: Encode | None, *, folder: Path,
                   model_hash: str, size: int, device: torch.device, batch_size: int = 16,
                   progress: bool = False, main: bool = True, barrier: Callable[[], None] = lambda: None):
    """The :class:`~opensd.training.data.LatentCache` of ``source``: built by rank 0 (``main``)
    unless ``folder`` has it, then read by every rank. ``encode`` (None: no text) gives the
    frozen text conditioning of the captions, cached in float32."""
    pixels = hashlib.sha256(source.images.numpy().tobytes()).hexdigest()
    key = json.dumps({"model": model_hash, "size": size, "pixels": pixels, "captions": source.texts,
                      "text": encode is not None}, sort_keys=True)
    path = folder / f"latents-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if main and not path.is_file():
        tensors = build_latent_cache(source, source.pool, vae, encode or (lambda captions: {}), None,
                                     batch_size=batch_size, device=device, text_dtype=torch.float32,
                                     progress=progress)
        write_latent_cache(tensors, path, metadata={"model_hash": model_hash})
    barrier()
    text_keys: list[str] = []
    if encode is not None:
        text_keys = ["context"] + (["pooled"] if "cond.pooled" in _keys(path) else [])
    return read_latent_cache(path, text_keys)


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())
