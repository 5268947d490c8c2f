"""The segmenter beside the attention maps: where each shape is, and where its word looks.

A segmenter (:class:`opensd.models.segmenter.Segmenter`, a U-Net trained on exact masks
by ``opensd train segment``) reads the generated image and gives every pixel a probability
per class. For each of its classes that a prompt word names (the class name or its plural,
``circle`` / ``circles``) :func:`compare_with_attention` sets the word's DAAM map
(:mod:`opensd.explain.attention`) beside the class's probability map and measures, against
the segmenter's *region* for the class (the pixels whose most probable class it is):

* ``inside``: the share of the word's attention mass that falls inside the region
  (:func:`~opensd.explain.attention.mass_in_mask`; 0 when the segmenter finds no such shape);
* ``area``: the region's share of the image, what a flat map would score;
* ``iou``: the IoU of the region and the word's map thresholded at half its maximum.

All three lie in [0, 1]. The segmenter sees only the image, so it says where the drawn
shapes are whatever the prompt asked; the attention says which pixels the word shaped.
The segmenter runs on the CPU in float32 and is only read: ``opensd explain`` loads it per
command (:func:`load_for_explain`), the server once per model (:mod:`opensd.serving.segmenters`),
and a request sets nothing on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opensd.explain.attention import AttentionResult, ExplainError, mass_in_mask, normalize_word
from opensd.explain.render import grid, heatmap_overlay, upscale, with_label
from opensd.models.segmenter import Segmenter

AUTO, NONE = "auto", "none"  # --segmenter's words: the model folder's file (when it has one), or no segmenter
THRESHOLD = 0.5  # the word's map is cut at this fraction of its maximum for ``iou``
# the class map's colours by class id: background white, then red, green, blue, and on (cycling)
CLASS_COLOURS = np.array([[255, 255, 255], [220, 50, 50], [40, 170, 60], [50, 80, 220], [230, 180, 30],
                          [150, 60, 200], [30, 190, 200], [120, 120, 120]], np.uint8)


@dataclass(frozen=True)
class ShapeAgreement:
    """One shape word of the prompt against the segmenter's region for its class (see the module doc)."""

    word: str
    shape: str
    inside: float
    area: float
    iou: float

    def as_dict(self) -> dict[str, float | str]:
        return {"word": self.word, "shape": self.shape, "inside": self.inside, "area": self.area, "iou": self.iou}


@dataclass
class SegmentationView:
    """The segmenter's reading of one image beside its attention maps."""

    image: Image.Image
    classes: tuple[str, ...]  # class id = position, background first
    probabilities: torch.Tensor  # (n_classes, H, W) at image resolution
    attention: AttentionResult
    agreements: list[ShapeAgreement]

    @property
    def shapes(self) -> tuple[str, ...]:
        return self.classes[1:]

    def shape_overlays(self, base: Image.Image | None = None) -> list[Image.Image]:
        """The segmenter's probability map of each shape class (in :attr:`shapes`' order) over
        ``base`` (default: the image) in grey, as is: 1 is certain, not each map's maximum."""
        base = self.image if base is None else base
        return [heatmap_overlay(base, p, normalize=False) for p in self.probabilities[1:]]

    def class_map(self) -> Image.Image:
        """The segmenter's most probable class per pixel, at the image's size: background white,
        then the classes in :data:`CLASS_COLOURS`' order."""
        ids = self.probabilities.argmax(dim=0).numpy() % len(CLASS_COLOURS)  # (H, W)
        return Image.fromarray(CLASS_COLOURS[ids])

    def figure(self, panel: int = 160) -> Image.Image:
        """Top row: the image, then the segmenter's probability map of each shape class.
        Bottom row: the segmenter's most probable class per pixel (background white, the
        classes in :data:`CLASS_COLOURS`' order), then under each class the attention map of
        the prompt's word for it (its numbers in the label), or a grey panel when no word of
        the prompt names it."""
        base = upscale(self.image, panel)
        found = {a.shape: a for a in self.agreements}
        top = [with_label(base, "image")]
        top += [with_label(overlay, f"segmenter: {name}")
                for name, overlay in zip(self.shapes, self.shape_overlays(base), strict=True)]
        classes = upscale(self.class_map(), panel).resize(base.size, Image.Resampling.NEAREST)
        bottom = [with_label(classes, "segmenter's classes")]
        for name in self.shapes:
            a = found.get(name)
            if a is None:
                bottom.append(with_label(Image.new("RGB", base.size, (235, 235, 235)), f"no word for {name}"))
            else:
                label = f"{a.word}: in {a.inside:.2f} (area {a.area:.2f})"
                bottom.append(with_label(heatmap_overlay(base, self.attention.word_map(a.word)), label))
        return grid(top + bottom, len(top))

    def summary(self) -> dict:
        """What ``segmentation.json`` holds: the classes and one record per shape word."""
        return {"classes": list(self.classes), "threshold": THRESHOLD, "words": [a.as_dict() for a in self.agreements]}


def check_segmenter(segmenter: Segmenter, classes: tuple[str, ...]) -> None:
    """An :class:`ExplainError` unless ``segmenter`` reads RGB and names a background and a shape class."""
    if segmenter.cfg.in_channels != 3:
        raise ExplainError(f"the segmenter reads {segmenter.cfg.in_channels}-channel images; explain needs one "
                           f"that reads RGB (3 channels)")
    if len(classes) < 2 or len(classes) != segmenter.cfg.n_classes:
        raise ExplainError(f"the segmenter must name a background and at least one class for its "
                           f"{segmenter.cfg.n_classes} outputs, got {list(classes)}")


@torch.no_grad()
def segment_image(segmenter: Segmenter, image: Image.Image) -> torch.Tensor:
    """(n_classes, H, W) class probabilities of an RGB image (float32, CPU)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # (1, 3, H, W)
    param = next(segmenter.parameters())
    return segmenter.probabilities(x.to(param.device, param.dtype))[0].float().cpu()


def _word_for(shape: str, words: list[str]) -> str | None:
    """The first prompt word naming ``shape`` (its name, or plural with -s / -es), or None."""
    names = {shape, shape + "s", shape + "es"}
    return next((w for w in words if normalize_word(w) in names), None)


def _agreement(word: str, shape: str, heat: torch.Tensor, region: torch.Tensor) -> ShapeAgreement:
    area = float(region.float().mean())
    if not bool(region.any()) or float(heat.sum()) <= 0:
        return ShapeAgreement(word, shape, 0.0, area, 0.0)
    inside = mass_in_mask(heat, region)
    hot = heat >= THRESHOLD * float(heat.max())
    union = int((hot | region).sum())
    iou = int((hot & region).sum()) / union if union else 0.0
    return ShapeAgreement(word, shape, min(max(inside, 0.0), 1.0), area, iou)


def compare_with_attention(attention: AttentionResult, segmenter: Segmenter, classes: tuple[str, ...]) -> SegmentationView:
    """The segmenter's maps of ``attention.image`` and, per shape word of its prompt, the agreement."""
    classes = tuple(classes)
    check_segmenter(segmenter, classes)
    probs = segment_image(segmenter, attention.image)  # (C, H, W)
    if tuple(probs.shape[-2:]) != tuple(attention.maps.shape[-2:]):
        raise ExplainError(f"the segmenter's maps {tuple(probs.shape[-2:])} and the attention maps "
                           f"{tuple(attention.maps.shape[-2:])} must have one size")
    labels = probs.argmax(dim=0)  # (H, W)
    agreements = []
    for k, shape in enumerate(classes[1:], start=1):
        word = _word_for(shape, attention.words)
        if word is not None:
            agreements.append(_agreement(word, shape, attention.word_map(word).float(), labels == k))
    return SegmentationView(attention.image, classes, probs, attention, agreements)


def find_segmenter(choice: str | None, model_path: Path | None) -> Path | None:
    """The segmenter file ``--segmenter`` means: ``auto`` (or None) the model folder's
    ``segmenter.safetensors`` if it has one, else none; ``none`` none; anything else a path,
    which must be a file."""
    from opensd.checkpoints.segmenter import FILE_NAME

    if choice is None or choice == AUTO:
        beside = None if model_path is None else Path(model_path) / FILE_NAME
        return beside if beside is not None and beside.is_file() else None
    if choice == NONE:
        return None
    path = Path(choice)
    if not path.is_file():
        raise ExplainError(f"--segmenter {choice}: no such file; give a segmenter .safetensors file "
                           f"(opensd train segment writes one), {AUTO} (the model folder's) or {NONE}")
    return path


def load_for_explain(path: Path) -> tuple[Segmenter, tuple[str, ...]]:
    """The segmenter at ``path`` on the CPU, checked for explain (one-line errors)."""
    from opensd.checkpoints.segmenter import load_segmenter

    segmenter, classes = load_segmenter(path)
    check_segmenter(segmenter, classes)
    return segmenter, classes


__all__ = ["AUTO", "NONE", "SegmentationView", "ShapeAgreement", "compare_with_attention", "find_segmenter",
           "load_for_explain", "segment_image"]
