"""The shapes world's segmentation ground truth, and the judge of ``opensd train segment``.

A scene's *label map* gives each pixel its object's shape class (:data:`CLASSES`:
background, then the world's shapes): a pixel belongs to an object when the object covers
at least half of it (:func:`opensd.shapes.world.masks`, exact from the scene graph). Objects
never overlap (``MIN_GAP``), so no pixel has two. Colour is not a class: the segmenter is
asked *where each shape is*, which is what ``opensd explain`` sets beside a shape word's
attention (a colour word's object is then found through its shape), and a colour-blind
class set lets the held-out colour-shape pairs (a purple triangle is never trained on) test
whether the shape was learned apart from its colour.

:class:`SegmentationJudge` scores a segmenter on held-out scenes: ``n_scenes`` scenes of the
world drawn with seed :data:`HELD_OUT_SEED` (never a training seed of the default recipe)
and *no* holdout, so they include the colour-shape pairs training never shows. It reports
per-class IoU (``iou_<class>``), ``miou`` (the mean over the shape classes), ``miou_all``
(background too), ``pixel_acc``, and ``miou_heldout_pairs`` (the shape classes' mean IoU
over just the scenes that show a held-out colour-shape pair), all exact against the true
label maps (:mod:`opensd.eval.segmentation`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from opensd.eval.segmentation import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy
from opensd.shapes.dataset import ShapesDataset
from opensd.shapes.world import DEFAULT_HOLDOUT, SHAPES, Scene, ShapesError, masks

CLASSES: tuple[str, ...] = ("background", *SHAPES)  # class id = position
HELD_OUT_SEED = 7_654_321  # the judge's scenes: a seed no training config of this project uses


def label_map(scene: Scene, size: int | None = None) -> np.ndarray:
    """(size, size) uint8 class ids of ``scene`` (0 background, 1 + the index of the shape in SHAPES)."""
    out: np.ndarray | None = None
    for obj, m in zip(scene.objects, masks(scene, size), strict=True):
        out = np.zeros(m.shape, np.uint8) if out is None else out
        out[m] = 1 + SHAPES.index(obj.shape)
    if out is None:  # an empty scene
        side = scene.image_size if size is None else size
        out = np.zeros((side, side), np.uint8)
    return out


def label_maps(scenes: list[Scene], size: int) -> torch.Tensor:
    """(B, size, size) int64 label maps of ``scenes``."""
    return torch.from_numpy(np.stack([label_map(s, size) for s in scenes])).long()


def held_out_scenes(n: int, image_size: int, seed: int = HELD_OUT_SEED) -> list:
    """The judge's ``n`` samples (:class:`~opensd.shapes.dataset.Sample`): seed ``seed``, no holdout."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ShapesError(f"the held-out set needs an integer >= 1 of scenes, got {n!r}")
    return ShapesDataset(seed, image_size, holdout=None).take(n)


def iou_metrics(confusion: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """``iou_<class>``, ``miou`` (shape classes), ``miou_all`` and ``pixel_acc`` of a confusion matrix."""
    iou = per_class_iou(confusion)
    out = {f"{prefix}iou_{name}": float(v) for name, v in zip(CLASSES, iou, strict=True)}
    out[f"{prefix}miou"] = mean_iou(confusion, range(1, len(CLASSES)))
    out[f"{prefix}miou_all"] = mean_iou(confusion)
    out[f"{prefix}pixel_acc"] = pixel_accuracy(confusion)
    return out


Segment = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, H, W) in [-1, 1] -> probabilities (N, C, H, W)


class SegmentationJudge:
    """The segment stage's evaluator (:class:`opensd.training.evaluation.SegmentationEvaluator`):
    see the module docstring. The scenes are rendered once, on the first call."""

    def __init__(self, n_scenes: int, image_size: int, seed: int = HELD_OUT_SEED) -> None:
        self.n_scenes, self.image_size, self.seed = n_scenes, image_size, seed
        self._val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def scenes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (N, 3, H, W) in [-1, 1], true labels (N, H, W) int64, shows-a-held-out-pair (N,) bool)."""
        if self._val is None:
            samples = held_out_scenes(self.n_scenes, self.image_size, self.seed)
            pixels = np.stack([np.asarray(s.image.convert("RGB")) for s in samples])  # (N, H, W, 3) uint8
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
            labels = label_maps([s.scene for s in samples], self.image_size)
            pairs = torch.tensor([DEFAULT_HOLDOUT.blocks_scene(s.scene) for s in samples])
            self._val = (images, labels, pairs)
        return self._val

    def __call__(self, segment: Segment, classes: tuple[str, ...]) -> dict[str, float]:
        if tuple(classes) != CLASSES:
            raise ShapesError(f"the segmenter's classes are {', '.join(classes)}; the shapes world's are "
                              f"{', '.join(CLASSES)}")
        images, labels, pairs = self.scenes()
        pred = segment(images).argmax(dim=1)  # (N, H, W)
        n = len(CLASSES)
        out = iou_metrics(confusion_matrix(pred, labels, n))
        if bool(pairs.any()):
            out["miou_heldout_pairs"] = mean_iou(confusion_matrix(pred[pairs], labels[pairs], n), range(1, n))
        return out


__all__ = ["CLASSES", "HELD_OUT_SEED", "SegmentationJudge", "held_out_scenes", "iou_metrics", "label_map", "label_maps"]
