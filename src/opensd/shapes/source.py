"""The shapes world as a training data source (:class:`opensd.training.data.Source`).

Items are :class:`~opensd.shapes.dataset.ShapesDataset`'s, drawn on the fly; with a pool,
rendered items are kept in memory as 8-bit and :meth:`ShapesSource.prefill` renders them up
front in worker processes. Each :class:`~opensd.training.data.Example` carries the caption's
spec and the exact scene, which the source uses to offer what only this world can: hard
negative captions (:class:`~opensd.training.data.HardNegativeSource`), grounding targets
(:class:`~opensd.training.data.GroundedSource`), per-pixel shape classes
(:class:`~opensd.training.data.SegmentedSource`) and layout maps for a ControlNet
(:class:`~opensd.training.data.ControlMapSource`, :mod:`opensd.shapes.layout`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from opensd.pipelines.images import from_uint8
from opensd.shapes.dataset import ShapesDataset
from opensd.shapes.grounding import CLASSIC_GROUPS, grounding_targets
from opensd.shapes.layout import scene_layout
from opensd.shapes.negatives import hard_negative_captions
from opensd.shapes.segmentation import CLASSES, label_maps
from opensd.shapes.world import DEFAULT_HOLDOUT, MAX_GROUPS, PromptSpec, Scene, World
from opensd.training.config import DataConfig
from opensd.training.data import Batch, Example


class ShapesSource:
    """The shapes world drawn on the fly; with a pool, rendered items are kept in memory (as 8-bit)."""

    segment_classes = CLASSES  # background, circle, square, triangle (opensd.shapes.segmentation)

    def __init__(self, cfg: DataConfig) -> None:
        self.world = World(cfg.world.value)
        self.dataset = ShapesDataset(cfg.seed, cfg.image_size, holdout=DEFAULT_HOLDOUT if cfg.holdout else None,
                                     world=self.world)
        self.pool = cfg.pool_size or None
        self._memo: dict[int, tuple[torch.Tensor, str, PromptSpec, Scene]] = {}

    def __getitem__(self, index: int) -> Example:
        if index in self._memo:
            pixels, caption, spec, scene = self._memo[index]
            return Example(from_uint8(pixels), caption, spec, scene)
        s = self.dataset[index]
        pixels = torch.from_numpy(np.array(s.image.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        if self.pool is not None and index < self.pool:
            self._memo[index] = (pixels, s.caption, s.spec, s.scene)
        return Example(from_uint8(pixels), s.caption, s.spec, s.scene)

    def captions(self, n: int) -> list[str]:
        """The captions of items ``0 .. n-1`` of the stream (past the pool too: the world's vocabulary)."""
        return [self.dataset[i].caption for i in range(n)]

    def prefill(self, n: int, workers: int) -> None:
        """Render items ``0 .. n-1`` now, in ``workers`` processes, and keep them in memory.

        What is drawn depends only on (seed, index), so this changes speed, never data.
        """
        todo = [i for i in range(n) if i not in self._memo]
        if not todo or workers < 1:
            return
        import concurrent.futures as cf
        import multiprocessing as mp

        ds = self.dataset
        chunk = max(256, min(4096, len(todo) // (4 * workers) + 1))
        spans = [(todo[k], todo[min(k + chunk, len(todo)) - 1] + 1) for k in range(0, len(todo), chunk)]
        # fork where the platform has it (as torch's DataLoader): no __main__ guard needed in the
        # caller's script, and the children only draw with PIL and numpy, never torch or CUDA.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            jobs = [pool.submit(_render_span, ds.seed, ds.image_size, ds.holdout is not None, a, b, ds.world)
                    for a, b in spans]
            for (a, _), job in zip(spans, jobs, strict=False):
                pixels, captions, specs, scenes = job.result()  # (n, H, W, 3) uint8
                tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (n, 3, H, W)
                for k, (caption, spec, scene) in enumerate(zip(captions, specs, scenes, strict=False)):
                    if a + k not in self._memo:
                        self._memo[a + k] = (tensor[k].contiguous(), caption, spec, scene)


    def hard_negative_captions(self, batch: Batch, rng: random.Random, k: int) -> list[list[str]]:
        """``k`` captions false for each item's scene, worded like its caption (:func:`opensd.shapes.negatives.hard_negative_captions`)."""
        return [hard_negative_captions(spec, rng, k, like=cap) for spec, cap in zip(batch.specs, batch.captions, strict=False)]

    def grounding_targets(self, batch: Batch, tokenizer: Any,
                          latent_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each caption's grounded word positions (B, G, K) and group masks (B, G, h, w)
        (:func:`opensd.shapes.grounding.grounding_targets`; the rich world's G = 3 groups, and
        their numbers grounded too, K = 4)."""
        rich = self.world is World.RICH
        groups = MAX_GROUPS if rich else CLASSIC_GROUPS
        pairs = [grounding_targets(c, sp, sc, tokenizer, latent_size, max_groups=groups, numbers=rich)
                 for c, sp, sc in zip(batch.captions, batch.specs, batch.scenes, strict=False)]
        return torch.stack([t for t, _ in pairs]), torch.stack([m for _, m in pairs])

    def label_maps(self, batch: Batch) -> torch.Tensor:
        """(B, H, W) int64 shape class of each pixel of ``batch``'s scenes (:func:`opensd.shapes.segmentation.label_map`)."""
        return label_maps(batch.scenes, self.dataset.image_size)

    def control_maps(self, examples: Sequence[Example], size: int) -> torch.Tensor:
        """Each example's layout map (N, 3, size, size) uint8: its scene's objects as boxes in
        their colours on black (:func:`opensd.shapes.layout.scene_layout`)."""
        maps = [np.asarray(scene_layout(e.scene, size)) for e in examples]
        return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).contiguous()


def _render_span(seed: int, image_size: int, holdout: bool, start: int, stop: int, world: World = World.CLASSIC):
    """Worker of :meth:`ShapesSource.prefill`: items ``start .. stop-1`` as (uint8 array, captions, specs, scenes)."""
    ds = ShapesDataset(seed, image_size, holdout=DEFAULT_HOLDOUT if holdout else None, world=world)
    samples = [ds[i] for i in range(start, stop)]
    pixels = np.stack([np.asarray(s.image.convert("RGB")) for s in samples])
    return pixels, [s.caption for s in samples], [s.spec for s in samples], [s.scene for s in samples]
