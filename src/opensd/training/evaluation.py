"""What a stage's evaluation is handed: the evaluator protocols, one per kind of stage.

Training holds no judge of its own: what a good reconstruction, text encoder or image is
depends on the data. A stage takes an *evaluator*, any callable of its protocol below, and
calls it on rank 0 at each evaluation (``train.sample_every`` and the last step) with the
EMA (or raw) networks; the metrics it returns are logged as the step's ``eval`` record.

``evaluator=FROM_DATA`` (every stage's default) asks the data source for one
(:func:`opensd.training.sources.default_evaluator`): the shapes world's judges
(:mod:`opensd.shapes.stage_eval`) for ``data.source = "shapes"``, none for an image folder;
``evaluator=None`` evaluates nothing beyond what the stage draws itself. An evaluator may
keep state between calls (the shapes judges render their validation scenes once).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image

if TYPE_CHECKING:
    from opensd.models.contrastive import ContrastiveModel

Metrics = Mapping[str, float]


class Default(enum.Enum):
    """``FROM_DATA``: the evaluator the data source brings (see the module docstring)."""

    FROM_DATA = "from the data source"


FROM_DATA = Default.FROM_DATA


class RoundTripEvaluator(Protocol):
    """The VAE stage's. ``round_trip(images)``: the autoencoder's reconstructions of images
    (N, 3, H, W) in [-1, 1], on the CPU, clamped to [-1, 1] (posterior mode, then decode)."""

    def __call__(self, round_trip: Callable[[torch.Tensor], torch.Tensor]) -> Metrics: ...


class TinyRoundTripEvaluator(Protocol):
    """The TAESD stage's. ``round_trips(images)``: images (N, 3, H, W) in [-1, 1] three ways, each
    (N, 3, H, W) in [-1, 1] on the CPU: ``"vae"`` the teacher's full VAE, ``"tiny_decoder"`` the
    teacher's encoder then the tiny decoder (the fast decode of a latent the model made), and,
    when the tiny autoencoder has an encoder, ``"tiny"`` the tiny autoencoder alone."""

    def __call__(self, round_trips: Callable[[torch.Tensor], Mapping[str, torch.Tensor]]) -> Metrics: ...


class RetrievalEvaluator(Protocol):
    """The CLIP stage's: the contrastive model (in eval mode, on the run's device) and the
    run's tokenizer (ids for :meth:`ContrastiveModel.encode_text`, ``eos_id``)."""

    def __call__(self, model: ContrastiveModel, tokenizer: Any) -> Metrics: ...


class GenerationEvaluator(Protocol):
    """The U-Net and LCM stages'. ``draw(prompts)``: one image per prompt from the run's model
    through the real pipeline, prompt ``i`` seeded ``1000 + i`` (U-Net: the EMA U-Net with the
    stage's ``sample_steps``, ``sampler`` and ``cfg_scale``; LCM: the frozen model with the
    student LoRA, ``sample_steps`` of the ``lcm`` sampler at CFG 1). ``samples``: the path of this step's
    sample grid (``.png``) that the evaluator may write (and a ``.txt`` of its prompts beside it)."""

    def __call__(self, draw: Callable[[Sequence[str]], list[Image.Image]], samples: Path) -> Metrics: ...


class SegmentationEvaluator(Protocol):
    """The segment stage's. ``segment(images)``: the segmenter's per-pixel class probabilities
    (N, n_classes, H, W) on the CPU of images (N, 3, H, W) in [-1, 1]; ``classes``: the names of
    the classes, class id = position (the data source's ``segment_classes``)."""

    def __call__(self, segment: Callable[[torch.Tensor], torch.Tensor], classes: tuple[str, ...]) -> Metrics: ...
