"""Intersection over union of per-pixel class labels: the semantic-segmentation metric.

Generic over the data: given predicted and true label maps (any shape, integer class ids
``0 .. n_classes - 1``), :func:`confusion_matrix` counts pixels by (true, predicted) class,
and :func:`per_class_iou` gives each class's ``|pred ∩ true| / |pred ∪ true|`` from it
(Everingham et al. 2010, the PASCAL VOC segmentation measure): 1 when the class's
predicted pixels are exactly its true pixels, 0 when they share none. A class that is
neither predicted nor present has no IoU (NaN); :func:`mean_iou` averages the classes
that have one. Counts add, so a data set's confusion is the sum of its batches'.
The shapes world's judge is :class:`opensd.shapes.segmentation.SegmentationJudge`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opensd.errors import OpenSDError


class SegmentationMetricError(OpenSDError):
    """Label maps that cannot be compared (other shapes, ids out of range)."""


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) int64 pixel counts: row = the true class, column = the predicted one."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise SegmentationMetricError(f"predicted labels {tuple(pred.shape)} and true labels {tuple(target.shape)} "
                                      f"must have one shape")
    if pred.is_floating_point() or target.is_floating_point():
        raise SegmentationMetricError("label maps must hold integer class ids, not scores")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    for name, t in (("predicted", pred), ("true", target)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):
            raise SegmentationMetricError(f"{name} labels must lie in 0..{n_classes - 1}, "
                                          f"got {int(t.min())}..{int(t.max())}")
    counts = torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)  # (true, predicted)


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """(n_classes,) float64 IoU of each class; NaN for a class neither true nor predicted anywhere."""
    c = confusion.double()
    hits = c.diagonal()
    union = c.sum(0) + c.sum(1) - hits  # predicted + true - both
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))


def mean_iou(confusion: torch.Tensor, classes: Sequence[int] | None = None) -> float:
    """The mean IoU over ``classes`` (default: all) that have one; NaN when none has."""
    iou = per_class_iou(confusion)
    if classes is not None:
        iou = iou[list(classes)]
    iou = iou[~iou.isnan()]
    return float(iou.mean()) if iou.numel() else float("nan")


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """The share of pixels whose predicted class is the true one."""
    total = int(confusion.sum())
    return float(confusion.diagonal().sum()) / total if total else float("nan")


__all__ = ["SegmentationMetricError", "confusion_matrix", "mean_iou", "per_class_iou", "pixel_accuracy"]
