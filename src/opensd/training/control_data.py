"""The ControlNet stage's data: (image, control image, caption) triples.

* **An image folder**: the image-caption folder of the fine-tuning stages
  (:mod:`opensd.data.imagefolder`: ``metadata.jsonl``, or ``name.png`` + ``name.txt``),
  and each image's control image found by its name: ``name.control.EXT`` beside it, or
  ``control/REL/name.EXT`` under the folder (``REL``: the image's subfolder, ``EXT`` any
  image extension). Control images need no caption and are never items themselves. The
  image is centre-cropped and resized as in the other stages
  (:func:`opensd.training.data.square_resize`); the control image is fitted to the same
  square as inference fits it (A1111's "Crop and Resize",
  :func:`opensd.pipelines.control_resize.fit_map`), resized as the map ``kind`` allows
  (flat maps with nearest neighbours only).
* **A data source that draws control maps** (:class:`~opensd.training.data.ControlMapSource`):
  the shapes world's layout maps (``data.source = "shapes"``, :mod:`opensd.shapes.layout`),
  over a pool of ``data.pool_size`` scenes.

Both give a :class:`ControlPairs`: the images as an :class:`~opensd.training.finetune_data.ImageList`
(for the latent cache), the control maps (N, 3, H, W) uint8 in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opensd.data.imagefolder import IMAGE_EXTENSIONS, list_imagefolder
from opensd.pipelines.control_resize import ResizeMode, fit_map
from opensd.pipelines.preprocessors import MapKind
from opensd.training.config import DataConfig, DataSource
from opensd.training.data import ControlMapSource, TrainingDataError, square_resize
from opensd.training.finetune_data import ImageList
from opensd.training.sources import open_source

CONTROL_FOLDER = "control"
CONTROL_SUFFIX = ".control"


@dataclass
class ControlPairs:
    """Training images with their captions and, row for row, their control maps (N, 3, H, W) uint8."""

    images: ImageList
    controls: torch.Tensor

    def __len__(self) -> int:
        return self.images.pool


def is_control_image(path: Path, root: Path) -> bool:
    """Whether ``path`` is a control image of folder ``root`` (``*.control.EXT`` or under ``control/``)."""
    rel = path.relative_to(root)
    return rel.parts[0] == CONTROL_FOLDER or path.stem.endswith(CONTROL_SUFFIX)


def control_image_of(image: Path, root: Path) -> Path:
    """The control image of ``image`` in folder ``root`` (module doc); a TrainingDataError names both places."""
    rel = image.relative_to(root)
    stem = image.with_suffix("").name
    beside = [image.with_name(f"{stem}{CONTROL_SUFFIX}{ext}") for ext in IMAGE_EXTENSIONS]
    under = [(root / CONTROL_FOLDER / rel).with_suffix(ext) for ext in IMAGE_EXTENSIONS]
    for candidate in beside + under:
        if candidate.is_file():
            return candidate
    raise TrainingDataError(f"{image} has no control image: expected {stem}{CONTROL_SUFFIX}.png beside it "
                            f"or {CONTROL_FOLDER}/{rel.with_suffix('.png')} under {root}")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise TrainingDataError(f"{path} cannot be read as an image ({e})") from None


def _to_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def read_control_folder(folder: Path, size: int, kind: MapKind) -> ControlPairs:
    """A folder's triples (module doc) at ``size`` pixels, control maps fitted as ``kind``."""
    if not folder.is_dir():
        raise TrainingDataError(f"data: {folder} is not a folder" if folder.exists() else f"data: {folder} does not exist")
    root = folder.resolve()
    items = [(p.resolve(), t) for p, t in list_imagefolder(root, skip=lambda p: is_control_image(p, root))]
    items = [(p, t) for p, t in items if not is_control_image(p, root)]
    if not items:
        raise TrainingDataError(f"data: {folder} holds control images but no training images")
    images = [square_resize(_open(p), size) for p, _ in items]
    controls = [fit_map(_open(control_image_of(p, root)), size, size, ResizeMode.CROP, kind) for p, _ in items]
    return ControlPairs(ImageList(_to_uint8(images), [t for _, t in items]), _to_uint8(controls))


def open_control_pairs(data: DataConfig, kind: MapKind = MapKind.IMAGE) -> ControlPairs:
    """The triples ``data`` names: a folder (module doc), or ``data.pool_size`` items of a
    source that draws control maps (the shapes world)."""
    if data.source is DataSource.FOLDER:
        return read_control_folder(Path(data.path), data.image_size, kind)
    if not data.pool_size:
        raise TrainingDataError("data: the ControlNet stage needs data.pool_size > 0 on a generated source "
                                "(a fixed set of images and control maps)")
    source = open_source(data)
    if not isinstance(source, ControlMapSource):
        raise TrainingDataError(f"data: source {data.source.value!r} draws no control maps")
    items = [source[i] for i in range(data.pool_size)]
    images = torch.stack([((e.image + 1) * 127.5).round().to(torch.uint8) for e in items])  # (N, 3, H, W)
    return ControlPairs(ImageList(images, [e.caption for e in items]), source.control_maps(items, data.image_size))
