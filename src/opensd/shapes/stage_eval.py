"""The shapes world's judges of the training stages (:mod:`opensd.training.evaluation`).

Each renders or draws the validation suite (:func:`opensd.shapes.suites.validation_suite`,
``per_category`` prompts of each category, never the benchmark; the suite of the world the
stage trains on, ``data.world``) and judges with the exact scorer:

* :class:`RoundTripJudge` (VAE): the suite's true renders (seed 1) through the autoencoder:
  ``psnr`` (dB), ``roundtrip_overall`` (the scorer's GenEval-style overall on the
  reconstructions), ``roundtrip_kept`` (the share of scenes still judged true) and
  ``original_overall`` (the same on the originals: the ceiling, 1.0 at 32 px);
* :class:`TinyRoundTripJudge` (TAESD): the same renders round-tripped three ways (the
  teacher's VAE, its encoder then the tiny decoder, the tiny autoencoder alone):
  ``psnr_vs_vae`` and ``psnr`` of the tiny decoder's against the VAE's and the originals,
  and the share of scenes still judged true, ``vae_kept``, ``kept`` and ``tiny_kept``;
* :class:`RetrievalJudge` (CLIP): retrieval and hard-negative accuracy on the true renders
  (:func:`opensd.shapes.retrieval.retrieval_metrics`);
* :class:`GenerationJudge` (U-Net, LCM): the suite's prompts drawn by the model, a grid of them
  (``per_category`` columns, the prompts in a ``.txt`` beside it) and the scores:
  ``overall`` and ``acc_<category>``;
* :class:`~opensd.shapes.segmentation.SegmentationJudge` (segment): per-class IoU on held-out
  scenes (``eval_scenes`` of them, not the validation suite; see :mod:`opensd.shapes.segmentation`);
* :class:`opensd.shapes.control_eval.LayoutJudge` (ControlNet): the suite's prompts drawn
  with their scenes' layout maps and without, ``layout_in_place`` (the share of objects
  whose detected box lies in its control region) and ``free_in_place``.

:func:`judge_for` is what :func:`opensd.training.sources.default_evaluator` gives a stage
on the shapes world.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from opensd.shapes.control_eval import LayoutJudge
from opensd.shapes.scorer import score_images
from opensd.shapes.segmentation import SegmentationJudge
from opensd.shapes.suites import ground_truth_images, score_prompts, validation_suite
from opensd.shapes.world import World


class RoundTripJudge:
    """The VAE stage's evaluator: see the module docstring."""

    def __init__(self, per_category: int, image_size: int, world: World = World.CLASSIC) -> None:
        self.per_category, self.image_size, self.world = per_category, image_size, world
        self._val: tuple | None = None

    def _validation(self) -> tuple:
        """(prompts, true renders (N, 3, H, W) in [-1, 1], the scorer's result on them), made once."""
        if self._val is None:
            from opensd.pipelines.images import pil_to_tensor

            prompts = validation_suite(per_category=self.per_category, world=self.world)
            gts = ground_truth_images(prompts, size=self.image_size, seed=1)
            ref = score_images([(im, p.spec) for im, p in zip(gts, prompts, strict=False)])
            self._val = (prompts, torch.stack([pil_to_tensor(im) for im in gts]), ref)
        return self._val

    def __call__(self, round_trip: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        from opensd.pipelines.images import tensor_to_pil
        from opensd.training.vae import psnr

        prompts, gts, ref = self._validation()
        rec = round_trip(gts)
        out = {"psnr": float(psnr(rec, gts).mean())}
        scored = score_images([(im, p.spec) for im, p in zip(tensor_to_pil(rec), prompts, strict=False)])
        out["roundtrip_overall"] = scored["overall"]
        out["roundtrip_kept"] = sum(r["correct"] for r in scored["items"]) / len(scored["items"])
        out["original_overall"] = ref["overall"]
        return out


class TinyRoundTripJudge:
    """The TAESD stage's evaluator: see the module docstring."""

    def __init__(self, per_category: int, image_size: int, world: World = World.CLASSIC) -> None:
        self.per_category, self.image_size, self.world = per_category, image_size, world
        self._val: tuple | None = None

    def __call__(self, round_trips: Callable[[torch.Tensor], Mapping[str, torch.Tensor]]) -> dict[str, float]:
        from opensd.pipelines.images import pil_to_tensor, tensor_to_pil
        from opensd.training.vae import psnr

        if self._val is None:
            prompts = validation_suite(per_category=self.per_category, world=self.world)
            gts = ground_truth_images(prompts, size=self.image_size, seed=1)
            self._val = (prompts, torch.stack([pil_to_tensor(im) for im in gts]))
        prompts, gts = self._val
        rec = round_trips(gts)
        out = {"psnr_vs_vae": float(psnr(rec["tiny_decoder"], rec["vae"]).mean()),
               "psnr": float(psnr(rec["tiny_decoder"], gts).mean())}
        names = {"vae": "vae_kept", "tiny_decoder": "kept", "tiny": "tiny_kept"}
        for key, images in rec.items():
            scored = score_images([(im, p.spec) for im, p in zip(tensor_to_pil(images), prompts, strict=False)])
            out[names[key]] = sum(r["correct"] for r in scored["items"]) / len(scored["items"])
        return out


class RetrievalJudge:
    """The CLIP stage's evaluator: see the module docstring."""

    def __init__(self, per_category: int, image_size: int, world: World = World.CLASSIC) -> None:
        self.per_category, self.image_size, self.world = per_category, image_size, world
        self._val: tuple | None = None

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        from opensd.pipelines.images import pil_to_tensor
        from opensd.shapes.retrieval import retrieval_metrics

        if self._val is None:
            prompts = validation_suite(per_category=self.per_category, world=self.world)
            images = ground_truth_images(prompts, size=self.image_size, seed=1)
            self._val = (prompts, torch.stack([pil_to_tensor(im) for im in images]))
        prompts, images = self._val
        device = next(model.parameters()).device
        with torch.no_grad():
            out = retrieval_metrics(model, images.to(device), [p.text for p in prompts], [p.spec for p in prompts],
                                    tokenizer)
        return {k: float(v) for k, v in out.items()}


class GenerationJudge:
    """The U-Net stage's evaluator: see the module docstring."""

    def __init__(self, per_category: int, world: World = World.CLASSIC) -> None:
        self.per_category, self.world = per_category, world

    def __call__(self, draw: Callable[[Sequence[str]], list[Image.Image]], samples: Path) -> dict[str, float]:
        from opensd.training.records import save_grid

        prompts = validation_suite(per_category=self.per_category, world=self.world)
        images = draw([p.text for p in prompts])
        save_grid(images, samples, self.per_category)
        samples.with_suffix(".txt").write_text("".join(f"{p.category}\t{p.text}\n" for p in prompts))
        scored = score_prompts(images, prompts)  # per prompt category (a rich suite's sentence forms too)
        return {"overall": scored["overall"], **{f"acc_{k}": v for k, v in scored["accuracy"].items()}}


Judge = RoundTripJudge | TinyRoundTripJudge | RetrievalJudge | GenerationJudge | SegmentationJudge | LayoutJudge


def judge_for(stage: str, cfg: Any) -> Judge | None:
    """The judge of stage ``stage`` (``vae``, ``taesd``, ``clip``, ``unet``, ``lcm`` or
    ``controlnet``) with its config's ``eval_per_category``, or of ``segment`` with its
    ``eval_scenes`` (None when 0, or for any other stage)."""
    if stage == "segment":
        n = getattr(cfg, "eval_scenes", 0)
        return SegmentationJudge(n, cfg.data.image_size) if n else None
    per_category = getattr(cfg, "eval_per_category", 0)
    if not per_category:
        return None
    world = World(cfg.data.world.value)  # the validation suite of the world the stage trains on
    if stage == "vae":
        return RoundTripJudge(per_category, cfg.data.image_size, world)
    if stage == "taesd":
        return TinyRoundTripJudge(per_category, cfg.data.image_size, world)
    if stage == "clip":
        return RetrievalJudge(per_category, cfg.data.image_size, world)
    if stage in ("unet", "lcm"):
        return GenerationJudge(per_category, world)
    if stage == "controlnet":
        return LayoutJudge(per_category, cfg.data.image_size)
    return None
