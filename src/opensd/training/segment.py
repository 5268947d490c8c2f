"""``opensd train segment``: a U-Net trained as a semantic segmenter, the network before the denoiser.

Ronneberger et al. 2015 introduced the U-Net to label every pixel of an image; Stable
Diffusion's denoiser is that network with a timestep, text and attention added. This stage
trains the first kind from the second kind's blocks (:class:`opensd.models.segmenter.Segmenter`)
on images and their exact per-pixel class maps, with the plain per-pixel cross-entropy::

    loss = mean over pixels of  -log softmax(f(x))[y]        x: image (B, 3, H, W), y: classes (B, H, W)

The data must be a :class:`~opensd.training.data.SegmentedSource`, one that knows each
pixel's class: the shapes world does (background, circle, square, triangle, exact from
the scene graph; :mod:`opensd.shapes.segmentation`); an image folder does not. With
``data.pool_size = 0`` (the default) every step sees new scenes; the batch of a step depends
only on (``train.seed``, step, rank), so a resumed run is exact.

``evaluate`` writes a grid (images, true classes, predicted classes) and hands the EMA (or
raw) segmenter's probabilities to the evaluator (a
:class:`~opensd.training.evaluation.SegmentationEvaluator`): on the shapes world the
per-class IoU on ``eval_scenes`` held-out scenes
(:class:`opensd.shapes.segmentation.SegmentationJudge`). ``export`` writes
``segmenter.safetensors`` (:mod:`opensd.checkpoints.segmenter`: the weights, float16 with
``export_half``, and the class names), which ``opensd explain --segmenter`` reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from opensd.config import ConfigError
from opensd.models.segmenter import Segmenter, SegmenterConfig
from opensd.training.config import DataConfig, StageConfig, TrainConfig, _check_int
from opensd.training.data import SegmentedSource, TrainingDataError, batch_indices, load_batch, tensor_to_pil
from opensd.training.records import SAMPLES, save_grid
from opensd.training.sources import open_source
from opensd.training.stage import RunContext, Stage, Update

EXPORT_NAME = "segmenter.safetensors"
EVAL_BATCH = 64  # images per forward pass when evaluating


@dataclass(frozen=True)
class SegmentStageConfig(StageConfig):
    """``opensd train segment``: see the module docstring."""

    PRESETS: ClassVar = {"shapes": SegmenterConfig.shapes, "tiny": SegmenterConfig.tiny}
    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"eval_scenes", "grid_images", "export_half"}

    model_preset: str = "shapes"
    model: SegmenterConfig = field(default_factory=SegmenterConfig.shapes)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/segment", steps=1500, batch_size=16, lr=2e-3, warmup_steps=50, ema_decay=0.99,
        log_every=25, sample_every=500, checkpoint_every=500))
    data: DataConfig = field(default_factory=DataConfig)
    eval_scenes: int = 256
    grid_images: int = 8
    export_half: bool = True

    def __post_init__(self) -> None:
        _check_int("eval_scenes", self.eval_scenes, 0)
        _check_int("grid_images", self.grid_images, 1)
        if self.model.in_channels != 3:
            raise ConfigError(f"model.in_channels must be 3: the segmenter reads RGB images, got {self.model.in_channels}")


class SegmentLoss(nn.Module):
    """The trainable module: ``forward(x, labels) -> (loss, metrics)``; x (B, 3, H, W) in
    [-1, 1], labels (B, H, W) int64 class ids."""

    def __init__(self, segmenter: Segmenter) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        logits = self.segmenter(x).float()  # (B, C, H, W)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"pixel_acc": acc}


class SegmentStage(Stage):
    name = "segment"
    ema_groups = ("segment",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        cfg = self.cfg
        self.ctx = ctx
        self.source = open_source(cfg.data)
        if not isinstance(self.source, SegmentedSource):
            raise TrainingDataError("the segment stage needs per-pixel class maps, which only the shapes world "
                                    "(data.source = 'shapes') has; an image folder has none")
        self.classes = tuple(self.source.segment_classes)
        if len(self.classes) != cfg.model.n_classes:
            raise ConfigError(f"the data has {len(self.classes)} classes ({', '.join(self.classes)}); set "
                              f"model.n_classes = {len(self.classes)} (it is {cfg.model.n_classes})")
        return {"segment": SegmentLoss(Segmenter(cfg.model))}

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, self.source.pool)
        b = load_batch(self.source, idx)
        source = self.source
        assert isinstance(source, SegmentedSource)  # checked in build
        return b.images, source.label_maps(b)

    def updates(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> Iterator[Update]:
        ctx = self.ctx
        x, labels = ctx.to_device(batch[0]), ctx.to_device(batch[1])
        with ctx.autocast():
            loss, metrics = ctx.wrapped["segment"](x, labels)
        yield Update("segment", loss, {**metrics, "loss": loss})

    # -- evaluation and export (rank 0) ----------------------------------------------

    @torch.no_grad()
    def probabilities(self, segmenter: Segmenter, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) class probabilities on the CPU of images (N, 3, H, W) in [-1, 1]."""
        out = [segmenter.probabilities(images[i:i + EVAL_BATCH].to(self.ctx.device)).cpu()
               for i in range(0, len(images), EVAL_BATCH)]
        return torch.cat(out)

    def averaged_segmenter(self) -> Segmenter:
        """The segmenter with the averaged (EMA) weights where the run keeps them."""
        loss = self.ctx.averaged("segment")
        assert isinstance(loss, SegmentLoss)
        return loss.segmenter

    def evaluate(self, step: int) -> dict[str, float]:
        segmenter = self.averaged_segmenter().eval()
        images, labels = self.batch(0)
        n = min(self.cfg.grid_images, len(images))
        pred = self.probabilities(segmenter, images[:n]).argmax(dim=1)
        rows = [*tensor_to_pil(images[:n]), *label_pictures(labels[:n]), *label_pictures(pred)]
        save_grid(rows, self.ctx.run_dir / SAMPLES / f"step_{step:08d}.png", n)
        if self.evaluator is None:
            return {}
        return dict(self.evaluator(lambda x: self.probabilities(segmenter, x), self.classes))

    def export(self) -> Path:
        from opensd.checkpoints.segmenter import save_segmenter

        segmenter = self.averaged_segmenter().eval().cpu()
        dtype = torch.float16 if self.cfg.export_half else None
        return save_segmenter(segmenter, self.classes, self.ctx.run_dir / EXPORT_NAME, dtype=dtype)


# class id -> colour of the sample grids: background white, then red, green, blue, and on
_LABEL_COLOURS = np.array([[255, 255, 255], [220, 50, 50], [40, 170, 60], [50, 80, 220], [230, 180, 30],
                           [150, 60, 200], [30, 190, 200], [120, 120, 120]], np.uint8)


def label_pictures(labels: torch.Tensor) -> list[Image.Image]:
    """(B, H, W) class ids -> one RGB picture each (a fixed colour per class, cycling after 8)."""
    ids = labels.cpu().numpy() % len(_LABEL_COLOURS)
    return [Image.fromarray(_LABEL_COLOURS[a]) for a in ids]
