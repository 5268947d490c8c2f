"""``opensd train embedding``: textual inversion (Gal et al. 2022, "An Image is Worth One Word").

A new word ``token`` is ``vectors`` token embeddings per text encoder, (N, width_i); they
alone train, everything else is frozen. In a caption the token takes N consecutive positions
and the text encoders see the trained vectors there (``token_embeds`` of
:mod:`opensd.models.clip` / :mod:`opensd.models.open_clip`, through
:func:`opensd.training.text_encoding.encode_ids`); every other position keeps its lookup,
as A1111 places an embedding's vectors where the prompt names it. The vectors start as the
embedding of ``init_word`` (its tokens' vectors, cycled to fill N).

Captions: each step draws, per image, one of ``templates`` (``{}`` marks the token; Gal et
al.'s "a photo of {}" kind), or, with ``templates`` empty, the folder's captions, each of
which must contain ``token``. The objective, the latent cache, the checkpoints (the vectors,
their optimiser, EMA, RNG) and exact resume are the LoRA trainer's and the shared loop's.

The export is A1111's embedding file ``<out>/<token>.safetensors``: ``emb_params`` (N, width)
for SD 1.x / 2.x, ``clip_l`` and ``clip_g`` for SDXL (``clip_g`` alone for the refiner), with
``name`` and ``step`` (and the base model) in the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.models.clip import CLIPTextModel
from opensd.models.stable_diffusion import ModelFamily
from opensd.training.config import DataConfig, DataSource, StageConfig, TrainConfig, _check_float, _check_int
from opensd.training.data import batch_indices
from opensd.training.loop import SAMPLES, RunContext, Stage, Update, save_grid
from opensd.training.lora import Frozen, check_image_size, load_frozen
from opensd.training.lora_network import Shared
from opensd.training.text_encoding import encode_ids
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


# ----------------------------------------------------------------------------- tokens


def token_table(encoder: nn.Module) -> nn.Embedding:
    """The token-embedding lookup of a CLIP or OpenCLIP text encoder."""
    return encoder.text_model.embeddings.token_embedding if isinstance(encoder, CLIPTextModel) else encoder.token_embedding


def placeholder_ids(tokenizer: Any, template: str, n: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``template``'s ids (L,) with N slots (id ``fill``) where ``{}`` is, and their mask (L,) bool."""
    from opensd.tokenizers import frame

    before, after = template.split("{}")
    a = tokenizer.encode(before.strip()) if before.strip() else []
    b = tokenizer.encode(after.strip()) if after.strip() else []
    length = tokenizer.context_length
    if len(a) + n + len(b) > length - 2:
        raise ConfigError(f"{template!r} with {n} token vectors is longer than the tokenizer's {length - 2} tokens")
    ids = frame([a + [fill] * n + b], bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                context_length=length)[0]
    mask = torch.zeros(length, dtype=torch.bool)
    mask[1 + len(a): 1 + len(a) + n] = True
    return ids, mask


class EmbeddingLoss(nn.Module):
    """The trainable module: ``vectors[i]`` (N, width_i) per text encoder; ``forward(x0, ids,
    mask, t, noise) -> (B,)`` per-sample loss, ``mask`` (B, L) marking the token's N slots."""

    def __init__(self, init: list[torch.Tensor], frozen: Frozen) -> None:
        super().__init__()
        self.vectors = nn.ParameterList([nn.Parameter(v.clone().float()) for v in init])
        self._frozen = Shared(base=frozen)  # not a child module: neither saved nor copied with this one

    @property
    def frozen(self) -> Frozen:
        return self._frozen["base"]

    def token_embeds(self, i: int, encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        base = token_table(encoder)(ids.long())  # (B, L, width)
        v = self.vectors[i].to(base.dtype)  # (N, width)
        out = base.clone()
        out[mask] = v.repeat(ids.shape[0], 1)  # each row's N masked positions, in order
        return out

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.frozen
        return encode_ids(f.model, f.tokenizer, ids, lambda i, enc, x: self.token_embeds(i, enc, x, mask))

    def forward(self, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        from opensd.pipelines.conditioning import TextEmbedding

        f = self.frozen
        enc = self.encode(ids, mask)
        cond = f.conditioner.to_dict(TextEmbedding(enc["context"], enc.get("pooled")), f.size_request)
        return f.diffusion(x0, cond, t, noise)[0]


# ----------------------------------------------------------------------------- the stage


class EmbeddingStage(Stage):
    name = "embedding"
    ema_groups = ("embedding",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        from opensd.pipelines.conditioning import Conditioner
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
        self.fill = init_ids[0]
        texts = list(cfg.templates) or [self._caption_template(c) for c in images.texts]
        rows = [placeholder_ids(tok, t, cfg.vectors, self.fill) for t in texts]
        self.ids = torch.stack([r[0] for r in rows]).to(ctx.device)  # (T, L): templates, or one per image
        self.masks = torch.stack([r[1] for r in rows]).to(ctx.device)  # (T, L)
        ids = torch.tensor(init_ids)
        with torch.no_grad():
            init = [token_table(e)(ids.to(ctx.device))[torch.arange(cfg.vectors) % len(init_ids)]  # (N, width)
                    for e in model.text_encoders]
        frozen = Frozen(model, tok, conditioner, diffusion, request)
        return {"embedding": EmbeddingLoss(init, frozen)}

    def _caption_template(self, caption: str) -> str:
        token = self.cfg.token
        if caption.count(token) != 1:
            raise ConfigError(f"with templates = [] every caption must name the token {token!r} once; "
                              f"{caption!r} does not")
        return caption.replace(token, "{}")

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, self.latents.shape[0])
        if self.cfg.templates:  # each image's template, drawn from this step's stream
            g = ctx.generator(step, stream=1)
            rows = torch.randint(0, len(self.cfg.templates), (len(idx),), generator=g).tolist()
        else:
            rows = idx
        return self.latents[idx], self.ids[rows], self.masks[rows]

    def updates(self, batch: tuple[torch.Tensor, ...], step: int) -> Iterator[Update]:
        ctx = self.ctx
        x0, ids, mask = batch
        g = ctx.generator(step)
        t = ctx.to_device(torch.randint(0, self.loaded.model.cfg.schedule.num_train_timesteps, (x0.shape[0],),
                                        generator=g))
        noise = ctx.to_device(torch.randn(x0.shape, generator=g))
        with ctx.autocast():
            loss = ctx.wrapped["embedding"](x0, ids, mask, t, noise).mean()
        self.step = step + 1
        yield Update("embedding", loss, {"loss": loss})

    # -- sampling and export (rank 0) ----------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        from opensd.pipelines.request import GenerationRequest
        from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

        cfg = self.cfg
        if not cfg.sample_images:
            return {}
        module = self.ctx.averaged("embedding")
        ids, mask = placeholder_ids(self.loaded.tokenizer, cfg.sample_prompt, cfg.vectors, self.fill)
        with torch.no_grad():
            embeds = module.encode(ids[None].to(self.ctx.device), mask[None].to(self.ctx.device))
        pipe = StableDiffusionPipeline(self.loaded, prompt_budget=None)
        prompt, size = cfg.sample_prompt.format(cfg.token), cfg.data.image_size
        req = GenerationRequest(prompt, steps=cfg.sample_steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale,
                                width=size, height=size, seed=1000, batch_size=cfg.sample_images)
        images = pipe.generate(req, prompt_embeds=embeds if "pooled" in embeds else embeds["context"]).images
        path = self.ctx.run_dir / SAMPLES / f"step_{step:08d}.png"
        save_grid(images, path, min(4, len(images)))
        path.with_suffix(".txt").write_text(prompt + "\n")
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The A1111 file's tensors, from the EMA vectors when there is an EMA."""
        vectors = [v.detach().float().cpu() for v in self.ctx.averaged("embedding").vectors]
        family = self.loaded.model.cfg.family
        if family is ModelFamily.SDXL:
            return {"clip_l": vectors[0], "clip_g": vectors[1]}
        if family is ModelFamily.SDXL_REFINER:
            return {"clip_g": vectors[0]}
        return {"emb_params": vectors[0]}

    def export(self) -> Path:
        from opensd.checkpoints.io import write_safetensors

        path = self.ctx.run_dir / f"{self.cfg.token}.safetensors"
        meta = {"name": self.cfg.token, "step": str(getattr(self, "step", self.cfg.train.steps)),
                "sd_checkpoint": self.loaded.hash, "sd_checkpoint_name": self.loaded.name,
                "opensd_init_word": self.cfg.init_word}
        write_safetensors(self.tensors(), path, metadata=meta)
        return path
