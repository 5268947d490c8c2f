"""``opensd train lora``: a LoRA (Hu et al. 2021) on a frozen model of any family opensd loads.

Only the low-rank factors train (:class:`opensd.training.lora_network.LoRANetwork`, kohya's
init: ``up = 0``, so step 0 is the base model); AdamW and the optional EMA see those alone,
and the checkpoints hold them, their optimiser and EMA states and the RNG, never the base.
Each step is the U-Net stage's objective (:class:`opensd.training.unet.DiffusionLoss`: noise
``x0`` to ``x_t`` at a random ``t``, regress the schedule's target, optional min-SNR) run
inside :func:`opensd.models.adapters.use_adapters` with the network's deltas; with
``text_encoder`` the captions are encoded in the same block, with gradients
(:func:`opensd.training.text_encoding.encode_ids`), else their frozen encoding is cached.

DreamBooth (Ruiz et al. 2022): ``instance_prompt`` captions every image ("a sks dog");
prior preservation adds a batch of class images (``prior_data``, or drawn by the frozen model
from ``class_prompt``) to each step, ``loss = instance loss + prior_weight · class loss``.
With ``caption_dropout`` a sample's caption becomes the empty one (SDXL families: zeros),
as in the U-Net stage, so the LoRA also learns what guidance's unconditional branch sees.

The export is ``<out>/<output_name>.safetensors`` in kohya's format with sd-scripts' ``ss_*``
metadata; ``opensd generate --lora`` (:class:`opensd.checkpoints.lora.LoRAFile`), A1111 and
diffusers' ``load_lora_weights`` read it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.diffusion.schedules import NoiseScheduleConfig
from opensd.models.adapters import use_adapters
from opensd.models.stable_diffusion import ModelFamily
from opensd.training.config import DataConfig, DataSource, StageConfig, TrainConfig, _check_float, _check_int
from opensd.training.data import batch_indices
from opensd.training.lora_network import LoRANetwork, LoRATargets, Shared, kohya_metadata
from opensd.training.records import SAMPLES, save_grid
from opensd.training.stage import RunContext, Stage, Trainable, Update
from opensd.training.text_encoding import encode_ids
from opensd.training.unet import DiffusionLoss


@dataclass(frozen=True)
class LoRAStageConfig(StageConfig):
    """``opensd train lora``. ``model``: a model opensd loads ("" = the default model).
    ``rank``/``alpha``: ``ΔW = alpha / rank · up @ down``. ``targets``: ``attn``, ``attn+ff``
    or ``all`` (:class:`LoRATargets`). ``text_encoder``: also adapt the text encoder(s).
    ``instance_prompt``: the caption of every image ("" = the folder's captions). Prior
    preservation is on when ``prior_data`` or ``class_prompt`` is set: ``prior_data``'s
    images (captioned, or all ``class_prompt``), else ``num_class_images`` drawn from
    ``class_prompt`` (0 = as many as instance images) with ``sample_steps``, ``sampler``,
    ``cfg_scale``. ``sample_prompts``: what ``evaluate`` draws with the LoRA (empty: the
    instance prompt or the first captions), ``sample_images`` of each (0: none)."""

    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"sample_images", "sample_prompts", "output_name",
                                                   "training_comment"}

    model: str = ""
    rank: int = 4
    alpha: float = 4.0
    targets: LoRATargets = LoRATargets.ATTN_FF
    text_encoder: bool = True
    instance_prompt: str = ""
    prior_data: str = ""
    class_prompt: str = ""
    prior_weight: float = 1.0
    num_class_images: int = 0
    min_snr_gamma: float = 0.0
    caption_dropout: float = 0.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/lora", steps=500, batch_size=8, lr=1e-3, warmup_steps=20, log_every=10, sample_every=0,
        checkpoint_every=100))
    data: DataConfig = field(default_factory=lambda: DataConfig(source=DataSource.FOLDER, path="data"))
    cache_batch: int = 16
    sample_prompts: tuple[str, ...] = ()
    sample_images: int = 4
    sample_steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg_scale: float = 5.0
    output_name: str = ""
    training_comment: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.targets, LoRATargets):
            raise ConfigError(f"targets must be one of {', '.join(t.value for t in LoRATargets)}, got {self.targets!r}")
        _check_int("rank", self.rank, 1)
        for name, low in (("num_class_images", 0), ("cache_batch", 1), ("sample_images", 0), ("sample_steps", 1)):
            _check_int(name, getattr(self, name), low)
        _check_float("alpha", self.alpha, 0.0)
        _check_float("prior_weight", self.prior_weight, 0.0)
        _check_float("min_snr_gamma", self.min_snr_gamma, 0.0)
        if not isinstance(self.caption_dropout, (int, float)) or isinstance(self.caption_dropout, bool) \
                or not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        _check_float("cfg_scale", self.cfg_scale, 1.0)
        if self.alpha == 0:
            raise ConfigError("alpha must be > 0 (the LoRA's scale is alpha / rank)")
        if any(c in self.output_name for c in "/\\") or self.output_name.startswith("."):
            raise ConfigError(f"output_name must be a plain file name (no folders), got {self.output_name!r}")

    @property
    def prior(self) -> bool:
        return bool(self.prior_data or self.class_prompt) and self.prior_weight > 0


# ----------------------------------------------------------------------------- the frozen model


def load_frozen(path: str):
    """(LoadedModel in float32, every weight frozen) of ``path`` ("" = the default model)."""
    from opensd.checkpoints import CheckpointError, load_model
    from opensd.defaults import resolve_model

    try:
        loaded = load_model(resolve_model(path or None))
    except CheckpointError as e:
        raise ConfigError(f"model: {e}") from None
    loaded.model = loaded.model.float().eval().requires_grad_(False)
    return loaded


def check_image_size(model, size: int) -> None:
    """The training size must map to a latent every U-Net level can halve."""
    cfg = model.cfg
    step = cfg.vae.downsample_factor * 2 ** (len(cfg.unet.channel_mult) - 1)
    if size % step:
        raise ConfigError(f"data.image_size {size} must be a multiple of {step} for this model "
                          f"(its native size is {cfg.image_size})")


@dataclass
class Frozen:
    """What the trainable module uses but does not own: the base model and its helpers."""

    model: Any
    tokenizer: Any
    conditioner: Any
    diffusion: DiffusionLoss
    size_request: Any


class LoRALoss(nn.Module):
    """The trainable module: ``forward(x0, text, t, noise) -> (B,)`` per-sample loss.

    ``text``: ``{"ids": (B, L)}`` (encoded here, inside the adapters) or the cached
    conditioning ``{"context"[, "pooled"]}``. Its only parameters are ``network``'s.
    """

    def __init__(self, network: LoRANetwork, frozen: Frozen) -> None:
        super().__init__()
        self.network = network
        self._frozen = Shared(base=frozen)  # not a child module: not moved, put in train mode or copied with this one

    @property
    def frozen(self) -> Frozen:
        return self._frozen["base"]

    def forward(self, x0: torch.Tensor, text: dict[str, torch.Tensor], t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        from opensd.pipelines.conditioning import TextEmbedding

        f = self.frozen
        with use_adapters(self.network.adapters()):
            enc = encode_ids(f.model, f.tokenizer, text["ids"]) if "ids" in text else text
            if "zero" in text:  # dropped captions of SDXL families: zeros, as inference's empty negative
                enc = {k: torch.where(text["zero"].reshape(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v)
                       for k, v in enc.items() if k != "zero"}
            cond = f.conditioner.to_dict(TextEmbedding(enc["context"], enc.get("pooled")), f.size_request)
            per_sample, _ = f.diffusion(x0, cond, t, noise)
        return per_sample


# ----------------------------------------------------------------------------- the stage


def _network_of(module: nn.Module) -> LoRANetwork:
    """The LoRA inside the stage's module (a :class:`LoRALoss`, or its EMA copy)."""
    assert isinstance(module, LoRALoss)
    return module.network


class Pool:
    """One set of training images: latents (N, C, h, w) on the device and their text."""

    def __init__(self, latents: torch.Tensor, text: dict[str, torch.Tensor], captions: list[str]) -> None:
        self.latents, self.text, self.captions = latents, text, captions

    def __len__(self) -> int:
        return self.latents.shape[0]


class LoRAStage(Stage):
    name = "lora"
    ema_groups = ("lora",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        from opensd.pipelines.conditioning import Conditioner
        from opensd.pipelines.request import GenerationRequest

        cfg = self.cfg
        self.ctx, self.t0 = ctx, time.time()
        self.loaded = load_frozen(cfg.model)
        model = self.loaded.model.to(ctx.device)
        check_image_size(model, cfg.data.image_size)
        if cfg.text_encoder and model.cfg.has_bert:
            raise ConfigError("this model's text encoder is a BERT, which takes no LoRA: set text_encoder = false")
        self.conditioner = Conditioner(model, self.loaded.tokenizer, budget=None)
        self.sdxl = model.cfg.family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER)
        size = cfg.data.image_size
        self.size_request = GenerationRequest("", width=size, height=size, original_size=(size, size))
        schedule: NoiseScheduleConfig = model.cfg.schedule
        diffusion = DiffusionLoss(model.unet, schedule, cfg.min_snr_gamma).to(ctx.device)
        self.instance = self._pool(self._instance_images(), "instance")
        self.classes = self._pool(self._class_images(), "class") if cfg.prior else None
        network = LoRANetwork(model, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                              text_encoder=cfg.text_encoder, seed=cfg.train.seed)
        if not len(network.layers):
            raise ConfigError(f"targets {cfg.targets.value!r} selects no layer of this model")
        frozen = Frozen(model, self.loaded.tokenizer, self.conditioner, diffusion, self.size_request)
        return {"lora": LoRALoss(network, frozen)}

    def trainable(self) -> dict[str, Trainable]:
        """The LoRA's factors: all that trains, all that a checkpoint holds."""
        return {"lora": Trainable.of(_network_of(self.ctx.modules["lora"]), "network.")}

    # -- data --------------------------------------------------------------------------

    def _instance_images(self):
        from opensd.training.finetune_data import open_images

        return open_images(self.cfg.data, self.cfg.instance_prompt, "data")

    def _class_images(self):
        import dataclasses

        from opensd.training.finetune_data import ClassImageSpec, generate_class_images, open_images

        cfg, ctx = self.cfg, self.ctx
        if cfg.prior_data:
            data = dataclasses.replace(cfg.data, source=DataSource.FOLDER, path=cfg.prior_data)
            return open_images(data, cfg.class_prompt, "prior_data")
        count = cfg.num_class_images or self.instance_count
        spec = ClassImageSpec(cfg.class_prompt, count, cfg.train.seed, cfg.sample_steps, cfg.sampler, cfg.cfg_scale,
                              cfg.data.image_size, self.loaded.hash, cfg.cache_batch)
        if ctx.is_main:
            generate_class_images(self.pipeline(), spec, ctx.run_dir, cfg.train.progress)
        ctx.barrier()
        data = dataclasses.replace(cfg.data, source=DataSource.FOLDER, path=str(ctx.run_dir / "class_images"))
        return open_images(data, "", "class images")

    def _pool(self, images, what: str) -> Pool:
        from opensd.training.finetune_data import cached_latents
        from opensd.training.text_encoding import caption_encoder

        cfg, ctx = self.cfg, self.ctx
        if what == "instance":
            self.instance_count = images.pool
        tok = self.loaded.tokenizer
        encode = None if cfg.text_encoder else caption_encoder(self.conditioner, tok)
        cache = cached_latents(images, self.loaded.model.vae, encode, folder=ctx.run_dir / "cache",
                               model_hash=self.loaded.hash, size=cfg.data.image_size, device=ctx.device,
                               batch_size=cfg.cache_batch, progress=cfg.train.progress, main=ctx.is_main,
                               barrier=ctx.barrier)
        text = {"ids": tok(images.texts)} if cfg.text_encoder else cache.cond  # (N, L) ids, or (N, L, D)...
        # what a dropped caption becomes: the empty caption (its ids, encoded in the step, or its
        # cached encoding); SDXL families zero it instead (LoRALoss), as the U-Net stage does
        self.empty = {"ids": tok([""])} if cfg.text_encoder else dict(cache.empty)
        if self.sdxl and not cfg.text_encoder:
            self.empty = {k: torch.zeros_like(v) for k, v in self.empty.items()}
        self.empty = {k: v.to(ctx.device) for k, v in self.empty.items()}
        return Pool(cache.latents.to(ctx.device), {k: v.to(ctx.device) for k, v in text.items()}, images.texts)

    def batch(self, step: int) -> dict[str, Any]:
        ctx = self.ctx
        pools = [self.instance] + ([self.classes] if self.classes is not None else [])
        parts = []
        for k, pool in enumerate(pools):  # the class pool's order is its own stream
            idx = batch_indices(ctx.cfg.seed + k, step, ctx.rank, ctx.world, ctx.local_batch, len(pool))
            parts.append((pool.latents[idx], {name: v[idx] for name, v in pool.text.items()}))
        x0 = torch.cat([p[0] for p in parts])  # (B * pools, C, h, w)
        text = {name: torch.cat([p[1][name] for p in parts]) for name in parts[0][1]}
        return {"x0": x0, "text": text, "instances": parts[0][0].shape[0]}

    def updates(self, batch: dict[str, Any], step: int) -> Iterator[Update]:
        ctx = self.ctx
        x0 = batch["x0"]
        b, n = x0.shape[0], batch["instances"]
        g = ctx.generator(step)
        timesteps = self.loaded.model.cfg.schedule.num_train_timesteps
        t = ctx.to_device(torch.randint(0, timesteps, (b,), generator=g))
        noise = ctx.to_device(torch.randn(x0.shape, generator=g))
        text = batch["text"]
        if self.cfg.caption_dropout > 0:  # trains the empty prompt's prediction too, which guidance uses
            drop = ctx.to_device(torch.rand(b, generator=g) < self.cfg.caption_dropout)
            text = {k: torch.where(drop.reshape(-1, *[1] * (v.ndim - 1)), self.empty[k].expand_as(v), v)
                    for k, v in text.items()}
            if self.sdxl and self.cfg.text_encoder:
                text["zero"] = drop
        with ctx.autocast():
            per_sample = ctx.wrapped["lora"](x0, text, t, noise)  # (B * pools,)
        instance = per_sample[:n].mean()
        if b == n:
            yield Update("lora", instance, {"loss": instance})
            return
        prior = per_sample[n:].mean()
        loss = instance + self.cfg.prior_weight * prior
        yield Update("lora", loss, {"loss": loss, "instance_loss": instance, "prior_loss": prior})

    # -- sampling and export (rank 0) ----------------------------------------------------

    def pipeline(self):
        """The frozen model's pipeline (built once; the LoRA joins per call)."""
        if getattr(self, "_pipe", None) is None:
            from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

            self._pipe = StableDiffusionPipeline(self.loaded, prompt_budget=None)
        return self._pipe

    def sample_prompts(self) -> list[str]:
        """What ``evaluate`` draws: ``sample_prompts``, else the instance prompt, else the first
        four distinct captions."""
        cfg = self.cfg
        if cfg.sample_prompts:
            return list(cfg.sample_prompts)
        return [cfg.instance_prompt] if cfg.instance_prompt else list(dict.fromkeys(self.instance.captions))[:4]

    def evaluate(self, step: int) -> dict[str, float]:
        from opensd.pipelines.networks import RequestNetworks
        from opensd.pipelines.request import GenerationRequest

        cfg = self.cfg
        if not cfg.sample_images:
            return {}
        networks = RequestNetworks(adapters=_network_of(self.ctx.averaged("lora")).adapters())
        pipe, size = self.pipeline(), cfg.data.image_size
        prompts = self.sample_prompts()
        images: list = []
        for p in prompts:  # a row of sample_images per prompt, seeds 1000, 1001, ...
            req = GenerationRequest(p, steps=cfg.sample_steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale,
                                    width=size, height=size, seed=1000, batch_size=cfg.sample_images)
            images += pipe.generate(req, networks=networks).images
        path = self.ctx.run_dir / SAMPLES / f"step_{step:08d}.png"
        save_grid(images, path, cfg.sample_images)
        path.with_suffix(".txt").write_text("".join(f"{p}\n" for p in prompts))
        return {}

    def output_path(self) -> Path:
        run = self.ctx.run_dir
        return run / f"{self.cfg.output_name or run.resolve().name}.safetensors"

    def export(self) -> Path:
        from opensd.checkpoints.io import write_safetensors

        network = _network_of(self.ctx.averaged("lora"))
        path = self.output_path()
        write_safetensors(network.kohya_state(), path, metadata=kohya_metadata(network, self.metadata(path)))
        return path

    def metadata(self, path: Path) -> dict[str, object]:
        """sd-scripts' training keys (``ss_*``) of this run."""
        cfg, tc = self.cfg, self.cfg.train
        size = cfg.data.image_size
        info: dict[str, object] = {
            "ss_output_name": path.stem, "ss_training_comment": cfg.training_comment,
            "ss_sd_model_name": self.loaded.name, "ss_new_sd_model_hash": self.loaded.hash,
            "ss_learning_rate": tc.lr, "ss_unet_lr": tc.lr, "ss_text_encoder_lr": tc.lr if cfg.text_encoder else 0,
            "ss_max_train_steps": tc.steps, "ss_steps": tc.steps, "ss_lr_warmup_steps": tc.warmup_steps,
            "ss_lr_scheduler": tc.lr_schedule.value, "ss_batch_size_per_device": tc.batch_size // self.ctx.world,
            "ss_total_batch_size": tc.batch_size, "ss_seed": tc.seed, "ss_resolution": f"({size}, {size})",
            "ss_num_train_images": self.instance_count,
            "ss_num_reg_images": 0 if self.classes is None else len(self.classes),
            "ss_prior_loss_weight": cfg.prior_weight if self.classes is not None else 0,
            "ss_min_snr_gamma": cfg.min_snr_gamma, "ss_max_grad_norm": tc.grad_clip,
            "ss_optimizer": "torch.optim.adamw.AdamW", "ss_mixed_precision": "bf16" if tc.bf16 else "no",
            "ss_clip_skip": 1, "ss_training_started_at": round(self.t0, 3),
            "ss_training_finished_at": round(time.time(), 3),
        }
        if cfg.instance_prompt:
            info["opensd_instance_prompt"] = cfg.instance_prompt
        if cfg.class_prompt:
            info["opensd_class_prompt"] = cfg.class_prompt
        return info
