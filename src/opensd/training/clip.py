"""Stage 2: a text encoder pre-trained contrastively on captioned images (Radford et al. 2021).

The stage trains a word tokenizer on the training captions (:class:`WordTokenizer`),
then a :class:`opensd.models.contrastive.ContrastiveModel` (a CLIP text transformer
and a small image encoder in a joint embedding space) with the symmetric InfoNCE
loss plus, from a source that writes them (a :class:`~opensd.training.data.HardNegativeSource`:
the shapes world), ``hard_negatives`` hard negative captions per image (there: the
same scene with colours swapped, a relation reversed, a count, colour, shape, size or
background changed, worded like the true caption; NegCLIP, Yuksekgonul et al. 2023)
so the text encoder must tell apart what the diffusion model will draw. The
contrastive batch is each rank's own batch (no negatives are gathered across ranks).

``evaluate`` hands the EMA model and the tokenizer to the stage's evaluator (a
:class:`~opensd.training.evaluation.RetrievalEvaluator`; on the shapes world, retrieval
on the validation suite's true renders, :class:`opensd.shapes.stage_eval.RetrievalJudge`);
``export`` writes ``text_encoder/`` (the CLIP text transformer + tokenizer) that the
U-Net stage takes with ``--clip``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.models.contrastive import ContrastiveConfig, ContrastiveModel
from opensd.training.config import DataConfig, LRSchedule, StageConfig, TrainConfig
from opensd.training.contrastive_loss import contrastive_loss
from opensd.training.data import (
    TEXT_FOLDER,
    Batch,
    HardNegativeSource,
    batch_indices,
    load_batch,
    save_text_encoder,
)
from opensd.training.sources import open_source
from opensd.training.stage import RunContext, Stage, Update, step_seed

TOKENIZER_FOLDER = "tokenizer"


def _presets() -> dict:
    return {name: getattr(ContrastiveConfig, name) for name in ("tiny", "small") if hasattr(ContrastiveConfig, name)}


@dataclass(frozen=True)
class CLIPStageConfig(StageConfig):
    """``opensd train clip``. The text encoder's ``vocab_size`` and ``max_length`` are the
    trained tokenizer's (``vocab_size`` here caps it; ``model.text.max_length`` is its context)."""

    PRESETS: ClassVar = _presets()

    model_preset: str = "small"
    model: ContrastiveConfig = field(default_factory=lambda: _presets().get("small", ContrastiveConfig)())
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/clip", steps=5000, batch_size=128, lr=5e-4, warmup_steps=200, weight_decay=0.1,
        lr_schedule=LRSchedule.COSINE, sample_every=500, checkpoint_every=500))
    data: DataConfig = field(default_factory=DataConfig)
    vocab_size: int = 2048
    tokenizer_corpus: int = 5000
    hard_negatives: int = 3
    eval_per_category: int = 16

    def __post_init__(self) -> None:
        for name, low in (("vocab_size", 8), ("tokenizer_corpus", 1), ("hard_negatives", 0), ("eval_per_category", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")


class ContrastiveObjective(nn.Module):
    """The trainable module: ``forward(images, ids, hard_negative_ids) -> (loss, metrics)``."""

    def __init__(self, model: ContrastiveModel, eos_id: int) -> None:
        super().__init__()
        self.model = model
        self.eos_id = eos_id

    def forward(self, images: torch.Tensor, ids: torch.Tensor, hard_negative_ids: torch.Tensor | None = None):
        return contrastive_loss(self.model, images, ids, self.eos_id, hard_negative_ids=hard_negative_ids)


def _model_of(module: nn.Module) -> ContrastiveModel:
    """The CLIP model inside the stage's module (a :class:`ContrastiveObjective`, or its EMA copy)."""
    assert isinstance(module, ContrastiveObjective)
    return module.model


class CLIPStage(Stage):
    name = "clip"
    ema_groups = ("clip",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        cfg = self.cfg
        self.ctx = ctx
        self.source = open_source(cfg.data)
        self.tokenizer = self._tokenizer()
        text = dataclasses.replace(cfg.model.text, vocab_size=self.tokenizer.vocab_size,
                                   max_length=self.tokenizer.context_length)
        model = ContrastiveModel(dataclasses.replace(cfg.model, text=text))
        return {"clip": ContrastiveObjective(model, self.tokenizer.eos_id)}

    def _tokenizer(self):
        """Train the word tokenizer on the first ``tokenizer_corpus`` captions (rank 0), or read the run's.

        On the shapes world the captions come from the stream, past any pool, so the
        vocabulary covers the validation prompts' words."""
        from opensd.tokenizers.word import WordTokenizer

        cfg, ctx = self.cfg, self.ctx
        folder = ctx.run_dir / TOKENIZER_FOLDER
        if ctx.is_main and not (ctx.resuming and folder.is_dir()):
            WordTokenizer.train(self.source.captions(cfg.tokenizer_corpus), vocab_size=cfg.vocab_size,
                                context_length=cfg.model.text.max_length).save(folder)
        ctx.barrier()
        return WordTokenizer.load(folder)

    def batch(self, step: int) -> Batch:
        ctx = self.ctx
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, self.source.pool)
        return load_batch(self.source, idx)

    def _hard_negatives(self, batch: Batch, step: int) -> torch.Tensor | None:
        """(B, K, L) ids of K captions false for each image, worded like its caption (sources that write them only)."""
        k = self.cfg.hard_negatives
        if not k or not isinstance(self.source, HardNegativeSource):
            return None
        rng = random.Random(step_seed(self.ctx.cfg.seed, step, self.ctx.rank, stream=1))
        texts = [t for negatives in self.source.hard_negative_captions(batch, rng, k) for t in negatives]
        return self.tokenizer(texts).reshape(len(batch.captions), k, -1)  # (B * K, L) -> (B, K, L)

    def updates(self, batch: Batch, step: int) -> Iterator[Update]:
        ctx = self.ctx
        images = ctx.to_device(batch.images)
        ids = ctx.to_device(self.tokenizer(batch.captions))
        hard = self._hard_negatives(batch, step)
        with ctx.autocast():
            loss, metrics = ctx.wrapped["clip"](images, ids, None if hard is None else ctx.to_device(hard))
        yield Update("clip", loss, {**metrics, "loss": loss})

    def after_update(self, group: str) -> None:
        _model_of(self.ctx.modules["clip"]).clamp_logit_scale_()  # CLIP clamps the scale after each step

    # -- evaluation and export (rank 0) ----------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        model = _model_of(self.ctx.averaged("clip")).eval()
        return dict(self.evaluator(model, self.tokenizer))

    def export(self) -> Path:
        model = _model_of(self.ctx.averaged("clip"))
        return save_text_encoder(model.text, self.tokenizer, self.ctx.run_dir / TEXT_FOLDER)
