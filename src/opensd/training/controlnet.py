"""``opensd train controlnet``: a ControlNet that steers a frozen SD 1.x/2.x model with a control image.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"
(lllyasviel's ``cldm``). The ControlNet (:class:`opensd.models.controlnet.ControlNet`) starts
as the original does: its ``time_embed``, ``input_blocks`` and ``middle_block`` are a copy
of the frozen U-Net's encoder (:func:`init_controlnet`), its zero convolutions (and the
hint block's last conv) are zero, so step 0 is the frozen model exactly; the rest of the
hint block is randomly initialised (``train.seed``). Only the ControlNet trains: AdamW and
the EMA see its parameters alone, and checkpoints hold it (:meth:`ControlNetStage.trainable`),
never the model it steers.

Each step, for a batch of cached latents ``x0`` with their captions' conditioning and
their control maps ``c`` (in [0, 1], as inference feeds them): a timestep ``t`` (uniform,
or with ``timesteps = "cubic"`` ``t = (1 - u^3) T``, T2I-Adapter's schedule, Mou et al.
2023, which trains the early, high-noise steps where an image's layout is decided), noise
``eps``, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, and the loss is the frozen U-Net's
objective with the ControlNet's residuals added to its skips and middle block:
``|| unet(x_t, t, text, control=controlnet(x_t, c, t, text)) - eps ||^2`` (the target is
``v`` for a v-prediction model; min-SNR weighting with ``min_snr_gamma``). With
``caption_dropout`` a caption becomes the empty one (the original drops half of them so
that the ControlNet learns to read the map alone; the default here is lower, since a
layout map says nothing of what to draw). With ``word_dropout`` another share of the
captions loses the words of ``drop_words`` (whole words, any case): what the control map
says instead of the caption, as a layout map's box colours do for colour words, is then
learned from the map (:func:`strip_words`).

The data (:mod:`opensd.training.control_data`): an image folder with a control image per
image, or the shapes world, whose control image is its layout map (:mod:`opensd.shapes.layout`).
The export ``<out>/<output_name>.safetensors`` is an original ControlNet file
(``control_model.*`` keys, float16 with ``export_half``) that ``opensd generate --controlnet``
and :func:`opensd.checkpoints.controlnet.load_controlnet` read (and diffusers' single-file
converter, for SD's four-width hint block); its metadata names the base model and the control map.
"""

from __future__ import annotations

import copy
import enum
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.diffusion.schedules import DiscreteSchedule
from opensd.models.controlnet import SD_HINT_CHANNELS, ControlNet
from opensd.pipelines.preprocessors import MapKind
from opensd.training.config import DataConfig, DataSource, StageConfig, TrainConfig, _check_float, _check_int
from opensd.training.data import batch_indices
from opensd.training.lora import check_image_size, load_frozen
from opensd.training.lora_network import Shared
from opensd.training.records import SAMPLES, save_grid
from opensd.training.stage import RunContext, Stage, Trainable, Update
from opensd.training.unet import min_snr_weight, noisy_latents_and_target


class TimestepSampling(enum.Enum):
    """How a step's timesteps are drawn: ``uniform`` in 0..T-1, or ``cubic``, ``t = (1 - u^3) T``
    for u uniform (T2I-Adapter's: mostly the high-noise steps, where the layout forms)."""

    UNIFORM = "uniform"
    CUBIC = "cubic"


@dataclass(frozen=True)
class ControlNetStageConfig(StageConfig):
    """``opensd train controlnet``. ``model``: the frozen model the ControlNet steers (SD 1.x or
    2.x, any layout opensd loads; "" = the default model). ``hint_block_channels``: the widths
    of the hint block (empty: SD's 16, 32, 96, 256 cut to the VAE's downsampling, one halving
    per width after the first). ``control_map``: how a folder's control images are resized
    (``image``, ``edges`` or ``flat``: nearest neighbours only, for segmentation and layout
    maps) and which preprocessor the samples use (``flat``: ``segmentation``; else ``none``).
    ``timesteps``: :class:`TimestepSampling`. ``caption_dropout``: the share of empty captions;
    ``word_dropout``: a further share of captions without the words of ``drop_words``.
    ``eval_per_category``: on the shapes world, the layout judge's prompts per category at
    each evaluation (0: none; :mod:`opensd.shapes.control_eval`); ``sample_images``: the first
    training items drawn with their control maps then (0: none), with ``sample_steps`` of
    ``sampler`` at ``cfg_scale``. ``export_half``: the file in float16. ``output_scale``: the
    export's zero convolutions (``zero_convs``, ``middle_block_out``) multiplied by it, so that
    the file at weight 1 acts as the trained ControlNet at weight ``output_scale`` (a
    calibration chosen on the validation suite; 1: the trained weights as they are)."""

    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"sample_images", "sample_steps", "sampler", "cfg_scale",
                                                   "output_name", "export_half", "output_scale"}

    model: str = ""
    hint_block_channels: tuple[int, ...] = ()
    control_map: MapKind = MapKind.IMAGE
    timesteps: TimestepSampling = TimestepSampling.UNIFORM
    caption_dropout: float = 0.1
    drop_words: tuple[str, ...] = ()
    word_dropout: float = 0.0
    min_snr_gamma: float = 0.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/controlnet", steps=1000, batch_size=16, lr=1e-4, warmup_steps=0, log_every=10, sample_every=0,
        checkpoint_every=100))
    data: DataConfig = field(default_factory=lambda: DataConfig(source=DataSource.FOLDER, path="data"))
    cache_batch: int = 64
    eval_per_category: int = 4
    sample_images: int = 4
    sample_steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg_scale: float = 5.0
    output_name: str = ""
    export_half: bool = True
    output_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hint_block_channels", "drop_words"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, kind in (("control_map", MapKind), ("timesteps", TimestepSampling)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be one of {', '.join(k.value for k in kind)}, got {getattr(self, name)!r}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in self.hint_block_channels):
            raise ConfigError(f"hint_block_channels must be positive integers (or empty), got {self.hint_block_channels!r}")
        for name, low in (("cache_batch", 1), ("eval_per_category", 0), ("sample_images", 0), ("sample_steps", 1)):
            _check_int(name, getattr(self, name), low)
        _check_float("caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.caption_dropout == 1.0:
            raise ConfigError("caption_dropout must be below 1 (1 would train on empty captions only)")
        _check_float("word_dropout", self.word_dropout, 0.0, 1.0)
        if self.caption_dropout + self.word_dropout > 1.0:
            raise ConfigError(f"caption_dropout + word_dropout must be at most 1, got {self.caption_dropout} + {self.word_dropout}")
        if not all(isinstance(w, str) and w.strip() and " " not in w.strip() for w in self.drop_words):
            raise ConfigError(f"drop_words must be single words, got {self.drop_words!r}")
        if self.word_dropout > 0 and not self.drop_words:
            raise ConfigError("word_dropout needs drop_words: the words a caption loses")
        _check_float("min_snr_gamma", self.min_snr_gamma, 0.0)
        _check_float("cfg_scale", self.cfg_scale, 1.0)
        _check_float("output_scale", self.output_scale, 0.0)
        if self.output_scale <= 0:
            raise ConfigError(f"output_scale must be above 0, got {self.output_scale}")
        if any(c in self.output_name for c in "/\\") or self.output_name.startswith("."):
            raise ConfigError(f"output_name must be a plain file name (no folders), got {self.output_name!r}")


def scaled_outputs(net: ControlNet, scale: float) -> ControlNet:
    """A copy of ``net`` whose residuals are ``scale`` times ``net``'s: its zero convolutions'
    weights and biases multiplied by ``scale`` (the residuals are their outputs)."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        for conv in [*out.zero_convs, out.middle_block_out]:
            for p in conv.parameters():
                p.mul_(scale)
    return out


def strip_words(caption: str, words: Sequence[str]) -> str:
    """``caption`` without the whole words ``words`` (any case), spaces closed up:
    ``strip_words("a red circle above a blue square", ["red", "blue"])`` is
    ``"a circle above a square"``."""
    if not words:
        return caption
    pattern = r"\b(?:" + "|".join(re.escape(w.strip()) for w in words) + r")\b"
    return " ".join(re.sub(pattern, " ", caption, flags=re.IGNORECASE).split())


# ----------------------------------------------------------------------------- the network


def hint_widths(model_cfg: Any, widths: Sequence[int] = ()) -> tuple[int, ...]:
    """``widths``, or SD's hint block cut to the VAE's downsampling factor (8: all four, 4: three)."""
    if widths:
        return tuple(widths)
    factor = model_cfg.vae.downsample_factor
    n = int(round(math.log2(factor))) + 1
    if 2 ** (n - 1) != factor or n > len(SD_HINT_CHANNELS):
        raise ConfigError(f"the model's VAE downsamples x{factor}; give hint_block_channels (one width per halving, plus one)")
    return SD_HINT_CHANNELS[:n]


def init_controlnet(model: Any, widths: Sequence[int] = (), seed: int = 0) -> ControlNet:
    """A ControlNet for ``model`` (a :class:`~opensd.models.stable_diffusion.StableDiffusion`)
    as cldm starts one: the U-Net's ``time_embed``, ``input_blocks`` and ``middle_block``
    copied, zero convolutions at zero, the hint block drawn from ``seed`` (its last conv zero)."""
    from opensd.checkpoints.controlnet import controlnet_config_for

    cfg = controlnet_config_for(model.cfg, hint_widths(model.cfg, widths))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNet(cfg)
    unet = model.unet.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
                continue
            source = unet.get(name)
            if source is None or source.shape != tensor.shape:
                raise ConfigError(f"the U-Net has no {name} of shape {tuple(tensor.shape)} to start the ControlNet from")
            tensor.copy_(source)
            copied += 1
    return net.to(next(model.unet.parameters()).device)


def _controlnet_of(module: nn.Module) -> ControlNet:
    """The ControlNet inside the stage's module (a :class:`ControlNetLoss`, or its EMA copy)."""
    assert isinstance(module, ControlNetLoss)
    return module.controlnet


class ControlNetLoss(nn.Module):
    """The trainable module: ``forward(x0, cond, hint, t, noise) -> (B,)`` per-sample loss.

    ``controlnet`` trains; the U-Net it steers is referenced, not registered. ``cond``: the
    U-Net's conditioning dict (``context``, SDXL's ``y``); ``hint``: (B, 3, H, W) in [0, 1]."""

    controlnet: ControlNet
    _frozen: Shared
    alphas_cumprod: torch.Tensor

    def __init__(self, controlnet: ControlNet, unet: nn.Module, schedule: Any, min_snr_gamma: float = 0.0) -> None:
        super().__init__()
        self.controlnet = controlnet
        self._frozen = Shared(unet=unet)  # not a child module: not moved, put in train mode or copied with this one
        self.prediction = schedule.prediction
        self.gamma = min_snr_gamma
        self.register_buffer("alphas_cumprod", DiscreteSchedule(schedule).alphas_cumprod.clone(), persistent=False)

    @property
    def unet(self) -> nn.Module:
        return self._frozen["unet"]

    def forward(self, x0: torch.Tensor, cond: dict[str, torch.Tensor], hint: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t]  # (B,)
        xt, target = noisy_latents_and_target(x0, noise, a, self.prediction)
        residuals = self.controlnet(xt, hint, t.float(), cond["context"], cond.get("y"))
        pred = self.unet(xt, t.float(), **cond, control=residuals).float()
        per_sample = (pred - target).pow(2).flatten(1).mean(dim=1)  # (B,)
        return per_sample * min_snr_weight(a, self.gamma, self.prediction)


# ----------------------------------------------------------------------------- the stage


class ControlNetStage(Stage):
    name = "controlnet"
    ema_groups = ("controlnet",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        from opensd.models.stable_diffusion import ModelFamily
        from opensd.pipelines.conditioning import Conditioner
        from opensd.pipelines.request import GenerationRequest

        cfg = self.cfg
        self.ctx, self.t0 = ctx, time.time()
        self.loaded = load_frozen(cfg.model)
        model = self.loaded.model.to(ctx.device)
        if model.cfg.family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
            raise ConfigError(f"model: ControlNets for {model.cfg.family.value} models are not supported yet (SD 1.x and 2.x are)")
        check_image_size(model, cfg.data.image_size)
        self.conditioner = Conditioner(model, self.loaded.tokenizer, budget=None)
        size = cfg.data.image_size
        self.size_request = GenerationRequest("", width=size, height=size, original_size=(size, size))
        self._cache_data()
        net = init_controlnet(model, cfg.hint_block_channels, cfg.train.seed)
        return {"controlnet": ControlNetLoss(net, model.unet, model.cfg.schedule, cfg.min_snr_gamma)}

    def trainable(self) -> dict[str, Trainable]:
        """The ControlNet: all that trains, all that a checkpoint holds."""
        return {"controlnet": Trainable.of(_controlnet_of(self.ctx.modules["controlnet"]), "controlnet.")}

    def _cache_data(self) -> None:
        """Latents and caption conditioning encoded once by the frozen model (cached in the run), control maps in memory."""
        from opensd.training.control_data import open_control_pairs
        from opensd.training.finetune_data import cached_latents
        from opensd.training.unet import caption_encoder

        cfg, ctx = self.cfg, self.ctx
        pairs = open_control_pairs(cfg.data, cfg.control_map)
        cache = cached_latents(pairs.images, self.loaded.model.vae, caption_encoder(self.conditioner, self.loaded.tokenizer),
                               folder=ctx.run_dir / "cache", model_hash=self.loaded.hash, size=cfg.data.image_size,
                               device=ctx.device, batch_size=cfg.cache_batch, progress=cfg.train.progress,
                               main=ctx.is_main, barrier=ctx.barrier)
        self.pairs = pairs
        self.latents = cache.latents.to(ctx.device)  # (N, C, h, w)
        self.cond = {k: v.to(ctx.device) for k, v in cache.cond.items()}  # (N, L, D)...
        self.empty = {k: v.to(ctx.device) for k, v in cache.empty.items()}  # (1, L, D)...
        self.controls = pairs.controls  # (N, 3, H, W) uint8, on the CPU
        self.stripped: dict[str, torch.Tensor] = {}
        if cfg.word_dropout > 0:  # the captions without drop_words, encoded once (not cached on disk)
            encode = caption_encoder(self.conditioner, self.loaded.tokenizer)
            texts = [strip_words(c, cfg.drop_words) for c in pairs.images.texts]
            with torch.no_grad():
                parts = [encode(texts[i:i + cfg.cache_batch]) for i in range(0, len(texts), cfg.cache_batch)]
            self.stripped = {k: torch.cat([p[k] for p in parts]).float().to(ctx.device) for k in parts[0]}

    def _unet_cond(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from opensd.pipelines.conditioning import TextEmbedding

        return self.conditioner.to_dict(TextEmbedding(text["context"], text.get("pooled")), self.size_request)

    def batch(self, step: int) -> dict[str, Any]:
        ctx = self.ctx
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, len(self.latents))
        hint = ctx.to_device(self.controls[idx].float() / 255.0)  # (B, 3, H, W) in [0, 1], as inference's
        out = {"x0": self.latents[idx], "text": {k: v[idx] for k, v in self.cond.items()}, "hint": hint}
        if self.stripped:
            out["stripped"] = {k: v[idx] for k, v in self.stripped.items()}
        return out

    def _timesteps(self, b: int, g: torch.Generator) -> torch.Tensor:
        T = self.loaded.model.cfg.schedule.num_train_timesteps
        if self.cfg.timesteps is TimestepSampling.UNIFORM:
            return torch.randint(0, T, (b,), generator=g)
        u = torch.rand(b, generator=g, dtype=torch.float64)
        return ((1 - u**3) * T).long().clamp(0, T - 1)

    def updates(self, batch: dict[str, Any], step: int) -> Iterator[Update]:
        ctx = self.ctx
        x0, text = batch["x0"], batch["text"]
        b = x0.shape[0]
        g = ctx.generator(step)
        t = ctx.to_device(self._timesteps(b, g))
        noise = ctx.to_device(torch.randn(x0.shape, generator=g))
        cd, wd = self.cfg.caption_dropout, self.cfg.word_dropout
        if cd > 0 or wd > 0:
            u = ctx.to_device(torch.rand(b, generator=g))  # one draw per sample: empty, stripped or whole caption
            if wd > 0:
                strip = (u >= cd) & (u < cd + wd)
                text = {k: torch.where(strip.reshape(-1, *[1] * (v.ndim - 1)), batch["stripped"][k], v)
                        for k, v in text.items()}
            drop = u < cd
            text = {k: torch.where(drop.reshape(-1, *[1] * (v.ndim - 1)), self.empty[k].expand_as(v), v)
                    for k, v in text.items()}
        with ctx.autocast():
            per_sample = ctx.wrapped["controlnet"](x0, self._unet_cond(text), batch["hint"], t, noise)  # (B,)
        loss = per_sample.mean()
        yield Update("controlnet", loss, {"loss": loss})

    # -- sampling, scoring and export (rank 0) ---------------------------------------------

    def pipeline(self):
        if getattr(self, "_pipe", None) is None:
            from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

            self._pipe = StableDiffusionPipeline(self.loaded, prompt_budget=None)
        return self._pipe

    def drawer(self, net: ControlNet):
        """``draw(prompts, controls) -> images``: the frozen model's pipeline with ``net`` on the
        control maps (PIL images; None: that prompt without control), prompt i at seed 1000 + i."""
        from opensd.pipelines.control import ControlUnit, with_control
        from opensd.pipelines.request import GenerationRequest

        cfg, pipe, size = self.cfg, self.pipeline(), self.cfg.data.image_size
        pre = "segmentation" if cfg.control_map is MapKind.FLAT else "none"

        def draw(prompts: Sequence[str], controls: Sequence[Any]) -> list:
            out = []
            for i, (text, control) in enumerate(zip(prompts, controls, strict=True)):
                req = GenerationRequest(text, seed=1000 + i, steps=cfg.sample_steps, sampler=cfg.sampler,
                                        cfg_scale=cfg.cfg_scale, width=size, height=size)
                units = [] if control is None else [ControlUnit(net, image=control, preprocessor=pre)]
                out.append(pipe.generate(req, networks=with_control(None, units)).images[0])
            return out

        return draw

    def evaluate(self, step: int) -> dict[str, float]:
        """A grid of the first ``sample_images`` training items (their control maps, then what
        the model draws for their captions with them), then the stage's evaluator with the
        EMA ControlNet (on the shapes world the layout judge, :mod:`opensd.shapes.control_eval`)."""
        from opensd.training.data import tensor_to_pil

        cfg = self.cfg
        draw = self.drawer(_controlnet_of(self.ctx.averaged("controlnet")))
        samples = self.ctx.run_dir / SAMPLES
        n = min(cfg.sample_images, len(self.pairs))
        if n:
            maps = tensor_to_pil(self.controls[:n].float() / 127.5 - 1)
            captions = self.pairs.images.texts[:n]
            path = samples / f"step_{step:08d}.png"
            save_grid(maps + draw(captions, maps), path, n)
            path.with_suffix(".txt").write_text("".join(f"{c}\n" for c in captions))
        if self.evaluator is None:
            return {}
        return dict(self.evaluator(draw, samples / f"step_{step:08d}_eval.png"))

    def output_path(self) -> Path:
        run = self.ctx.run_dir
        return run / f"{self.cfg.output_name or run.resolve().name}.safetensors"

    def export(self) -> Path:
        from opensd.checkpoints.controlnet import save_controlnet

        net = _controlnet_of(self.ctx.averaged("controlnet"))
        if self.cfg.output_scale != 1.0:
            net = scaled_outputs(net, self.cfg.output_scale)
        dtype = torch.float16 if self.cfg.export_half else torch.float32
        return save_controlnet(net, self.output_path(), dtype=dtype, metadata=self.metadata())

    def metadata(self) -> dict[str, str]:
        """What the file records of its training (strings, as safetensors keeps them)."""
        cfg, tc = self.cfg, self.cfg.train
        data = "shapes" if cfg.data.source is DataSource.SHAPES else Path(cfg.data.path).name
        return {
            "opensd_controlnet_base_model": self.loaded.name, "opensd_controlnet_base_hash": self.loaded.hash,
            "opensd_controlnet_control_map": cfg.control_map.value,
            "opensd_controlnet_preprocessor": "segmentation" if cfg.control_map is MapKind.FLAT else "none",
            "opensd_controlnet_data": data, "opensd_controlnet_images": str(len(self.pairs)),
            "opensd_controlnet_resolution": str(cfg.data.image_size), "opensd_controlnet_steps": str(tc.steps),
            "opensd_controlnet_batch_size": str(tc.batch_size), "opensd_controlnet_lr": str(tc.lr),
            "opensd_controlnet_timesteps": cfg.timesteps.value, "opensd_controlnet_seed": str(tc.seed),
            "opensd_controlnet_trained_at": f"{self.t0:.0f}",
        }
