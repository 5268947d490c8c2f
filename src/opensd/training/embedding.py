"""``opensd train embedding``: textual inversion (Gal et al. 2022, "An Image is Worth One Word").

A new word ``token`` is ``vectors`` token embeddings per text encoder, (N, width_i); they
alone train, everything else is frozen. They are a
:class:`~opensd.checkpoints.embeddings.TextualInversion` whose vectors are parameters, and
captions are encoded by the pipeline's own
:meth:`Conditioner.encode(..., embeddings=) <opensd.pipelines.conditioning.Conditioner.encode>`:
where a caption names the token it takes N positions and the text encoders see the vectors
there, exactly as a prompt that names the finished embedding at inference (differentiable in
the vectors). The vectors start as the embedding of ``init_word`` (its tokens' vectors,
cycled to fill N).

Captions: each step draws, per image, one of ``templates`` (``{}`` marks the token; Gal et
al.'s "a photo of {}" kind), or, with ``templates`` empty, the folder's captions, each of
which must contain ``token``. The objective, the latent cache, the checkpoints (the vectors,
their optimiser, EMA, RNG) and exact resume are the LoRA trainer's and the shared loop's.

The export is A1111's embedding file ``<out>/<token>.safetensors``
(:func:`opensd.checkpoints.embeddings.write_embedding`): ``emb_params`` (N, width) for SD 1.x /
2.x, ``clip_l`` and ``clip_g`` for SDXL (``clip_g`` alone for the refiner), with ``name``,
``step`` and the base model in the metadata; ``opensd generate --embeddings-dir`` uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opensd.checkpoints.embeddings import TextualInversion
from opensd.config import ConfigError
from opensd.training.config import DataConfig, DataSource, StageConfig, TrainConfig, _check_float, _check_int
from opensd.training.data import batch_indices
from opensd.training.lora import Frozen, check_image_size, load_frozen
from opensd.training.lora_network import Shared
from opensd.training.records import SAMPLES, save_grid
from opensd.training.stage import RunContext, Stage, Trainable, Update
from opensd.training.unet import DiffusionLoss

TEMPLATES = ("a photo of {}", "a rendering of {}", "a picture of {}", "a close-up photo of {}", "an image of {}")


@dataclass(frozen=True)
class EmbeddingStageConfig(StageConfig):
    """``opensd train embedding``. ``token``: the new word (and the file's name); ``init_word``:
    the text whose embedding the vectors start from; ``vectors``: N, positions per use."""

    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"sample_images", "sample_prompt"}

    model: str = ""
    token: str = ""
    init_word: str = ""
    vectors: int = 1
    templates: tuple[str, ...] = TEMPLATES
    min_snr_gamma: float = 0.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/embedding", steps=500, batch_size=8, lr=5e-3, warmup_steps=20, log_every=10,
        sample_every=0, checkpoint_every=100))
    data: DataConfig = field(default_factory=lambda: DataConfig(source=DataSource.FOLDER, path="data"))
    cache_batch: int = 16
    sample_prompt: str = "a photo of {}"
    sample_images: int = 4
    sample_steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg_scale: float = 5.0

    def __post_init__(self) -> None:
        if any(c.isspace() for c in self.token) or any(c in self.token for c in "/\\{}") or self.token.startswith("."):
            raise ConfigError(f"token must be one word without spaces, slashes or braces, got {self.token!r}")
        _check_int("vectors", self.vectors, 1)
        for name, low in (("cache_batch", 1), ("sample_images", 0), ("sample_steps", 1)):
            _check_int(name, getattr(self, name), low)
        _check_float("min_snr_gamma", self.min_snr_gamma, 0.0)
        _check_float("cfg_scale", self.cfg_scale, 1.0)
        for t in (*self.templates, self.sample_prompt):
            if t.count("{}") != 1:
                raise ConfigError(f"templates and sample_prompt must hold {{}} once (where the token goes), got {t!r}")


# ----------------------------------------------------------------------------- the trainable vectors


class EmbeddingLoss(nn.Module):
    """The trainable module: ``vectors[i]`` (N, width_i) per text encoder; ``forward(x0,
    captions, t, noise) -> (B,)`` per-sample loss, the captions naming ``token``."""

    def __init__(self, token: str, init: list[torch.Tensor], frozen: Frozen) -> None:
        super().__init__()
        self.token = token
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().clone().float()) for v in init])
        self._frozen = Shared(base=frozen)  # not a child module: not moved, put in train mode or copied with this one

    @property
    def frozen(self) -> Frozen:
        return self._frozen["base"]

    def inversion(self, **info: Any) -> TextualInversion:
        """The embedding, live on the parameters."""
        return TextualInversion(self.token, tuple(self.vectors), **info)

    def encode(self, captions: list[str]):
        """The captions' :class:`~opensd.pipelines.conditioning.TextEmbedding`, as the pipeline encodes them."""
        return self.frozen.conditioner.encode(captions, embeddings={self.token: self.inversion()})

    def forward(self, x0: torch.Tensor, captions: list[str], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        f = self.frozen
        cond = f.conditioner.to_dict(self.encode(captions), f.size_request)
        return f.diffusion(x0, cond, t, noise)[0]


# ----------------------------------------------------------------------------- the stage


def _loss_of(module: nn.Module) -> EmbeddingLoss:
    """The stage's module (an :class:`EmbeddingLoss`, or its EMA copy) as its type."""
    assert isinstance(module, EmbeddingLoss)
    return module


class EmbeddingStage(Stage):
    name = "embedding"
    ema_groups = ("embedding",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        from opensd.pipelines.conditioning import Conditioner, token_embedding
        from opensd.pipelines.request import GenerationRequest
        from opensd.tokenizers import unknown_words
        from opensd.training.finetune_data import cached_latents, open_images

        cfg = self.cfg
        self.ctx = ctx
        if not cfg.token or not cfg.init_word.strip():
            raise ConfigError("token and init_word must be given: the new word, and the word its vectors start from")
        self.loaded = load_frozen(cfg.model)
        model, tok = self.loaded.model.to(ctx.device), self.loaded.tokenizer
        check_image_size(model, cfg.data.image_size)
        unknown = unknown_words(tok, cfg.init_word)
        if unknown:
            raise ConfigError(f"init_word {cfg.init_word!r}: the tokenizer does not know {', '.join(unknown)}")
        init_ids = tok.encode(cfg.init_word)
        if not init_ids:
            raise ConfigError(f"init_word {cfg.init_word!r} has no tokens")
        size = cfg.data.image_size
        request = GenerationRequest("", width=size, height=size, original_size=(size, size))
        conditioner = Conditioner(model, tok, budget=None)
        diffusion = DiffusionLoss(model.unet, model.cfg.schedule, cfg.min_snr_gamma).to(ctx.device)
        images = open_images(cfg.data, "", "data")
        self.count = images.pool
        cache = cached_latents(images, model.vae, None, folder=ctx.run_dir / "cache", model_hash=self.loaded.hash,
                               size=size, device=ctx.device, batch_size=cfg.cache_batch,
                               progress=cfg.train.progress, main=ctx.is_main, barrier=ctx.barrier)
        self.latents = cache.latents.to(ctx.device)  # (N, C, h, w)
        self.captions = images.texts
        ids = torch.tensor(init_ids, device=ctx.device)
        with torch.no_grad():
            init = [token_embedding(e)(ids)[torch.arange(cfg.vectors) % len(init_ids)] for e in model.text_encoders]
        module = EmbeddingLoss(cfg.token, init, Frozen(model, tok, conditioner, diffusion, request))
        texts = [t.format(cfg.token) for t in cfg.templates] or self.captions
        for text in dict.fromkeys(texts):
            found = [name for c in conditioner.tokenize(text, {cfg.token: module.inversion()}).chunks
                     for _, name in c.embeddings]
            if len(found) != 1:
                raise ConfigError(f"every caption must name the token {cfg.token!r} once (as a word); {text!r} "
                                  f"names it {len(found)} times" + ("" if cfg.templates else " (templates = [] uses "
                                                                    "the folder's captions)"))
        return {"embedding": module}

    def trainable(self) -> dict[str, Trainable]:
        """The new word's vectors: all that trains, all that a checkpoint holds."""
        return {"embedding": Trainable.of(_loss_of(self.ctx.modules["embedding"]).vectors, "vectors.")}

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        ctx, cfg = self.ctx, self.cfg
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, self.latents.shape[0])
        if cfg.templates:  # each image's template, drawn from this step's stream
            g = ctx.generator(step, stream=1)
            rows = torch.randint(0, len(cfg.templates), (len(idx),), generator=g).tolist()
            captions = [cfg.templates[r].format(cfg.token) for r in rows]
        else:
            captions = [self.captions[i] for i in idx]
        return self.latents[idx], captions

    def updates(self, batch: tuple[torch.Tensor, list[str]], step: int) -> Iterator[Update]:
        ctx = self.ctx
        x0, captions = batch
        g = ctx.generator(step)
        t = ctx.to_device(torch.randint(0, self.loaded.model.cfg.schedule.num_train_timesteps, (x0.shape[0],),
                                        generator=g))
        noise = ctx.to_device(torch.randn(x0.shape, generator=g))
        with ctx.autocast():
            loss = ctx.wrapped["embedding"](x0, captions, t, noise).mean()
        self.step = step + 1
        yield Update("embedding", loss, {"loss": loss})

    # -- sampling and export (rank 0) ----------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        from opensd.pipelines.networks import RequestNetworks
        from opensd.pipelines.request import GenerationRequest
        from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

        cfg = self.cfg
        if not cfg.sample_images:
            return {}
        ti = self.inversion()
        pipe = StableDiffusionPipeline(self.loaded, prompt_budget=None)
        prompt, size = cfg.sample_prompt.format(cfg.token), cfg.data.image_size
        req = GenerationRequest(prompt, steps=cfg.sample_steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale,
                                width=size, height=size, seed=1000, batch_size=cfg.sample_images)
        images = pipe.generate(req, networks=RequestNetworks(embeddings={cfg.token: ti})).images
        path = self.ctx.run_dir / SAMPLES / f"step_{step:08d}.png"
        save_grid(images, path, min(4, len(images)))
        path.with_suffix(".txt").write_text(prompt + "\n")
        return {}

    def inversion(self) -> TextualInversion:
        """The trained embedding (the EMA vectors when there is an EMA), with the file's fields."""
        module = _loss_of(self.ctx.averaged("embedding"))
        step = getattr(self, "step", self.cfg.train.steps)
        return module.inversion(step=step, sd_checkpoint=self.loaded.hash, sd_checkpoint_name=self.loaded.name)

    def export(self) -> Path:
        from opensd.checkpoints.embeddings import write_embedding

        path = self.ctx.run_dir / f"{self.cfg.token}.safetensors"
        return write_embedding(self.inversion(), path, self.loaded.model)
