"""``opensd train lcm``: latent consistency distillation (LCD) of a frozen model into a LoRA.

Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", alg. 1)
teaches a student ``f(x_t, t)`` to map every point of the teacher's guided
probability-flow trajectory to the same end point, so that the ``lcm`` sampler
(:mod:`opensd.diffusion.consistency`) makes an image in a few steps. Stored as a LoRA on
the teacher itself (LCM-LoRA, Luo et al. 2023b, "LCM-LoRA: A Universal Stable-Diffusion
Acceleration Module"): the teacher is the frozen model without the LoRA, the student the
same model with it, and the file is a few MB where a second U-Net would be the model's
size again. Per sample of a step:

* a latent ``x0`` of the training data and its caption ``c``, a grid index ``n`` uniform in
  ``0 .. N-1`` of the skipping-step grid ``t_n = (n + 1) k - 1`` (``k = T / N``, ``N =
  original_steps``: the sampler's ``original_inference_steps`` grid), ``t = t_n``,
  ``s = max(t - k, 0)``, noise ``eps`` and ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``;
* the student: ``f_theta(x_t, t) = c_skip(t) x_t + c_out(t) x0_theta(x_t, t)`` (LCM's boundary
  condition, :func:`opensd.diffusion.consistency.boundary_scalings`, the sampler's own);
* the augmented target: the teacher's classifier-free-guided x0 and eps at ``x_t`` with a
  guidance scale ``w`` uniform in [``guidance_min``, ``guidance_max``] (fixed when equal;
  the student is not told ``w``, so it is run without guidance), one DDIM step of the
  solver to ``s``: ``x_s = sqrt(a_s) x0_w + sqrt(1 - a_s) eps_w``, then the target network
  ``f_target(x_s, s)``, without gradients;
* the loss: pseudo-Huber ``sqrt(d^2 + c^2) - c`` (Song & Dhariwal 2023, as diffusers'
  LCD scripts) or L2 on ``d = f_theta - f_target``, averaged.

The target network is an EMA of the student's LoRA (``target_decay``, LCD's ``mu``; 0: the
student itself, as diffusers' LCM-LoRA script). It is part of the trainable module (as
frozen factors) and the stage's ``trainable()`` keeps it in checkpoints beside the student,
so a resumed run is exact. ``train.ema_decay`` (0 here) would keep a further EMA of the
student (only: the target is not averaged) for the export, as in the other stages.

The export is ``<out>/<output_name>.safetensors``, a kohya LoRA over the U-Net with
sd-scripts' ``ss_*`` metadata and ``opensd_lcm_*`` keys for the distillation settings;
``opensd generate --lora FILE --sampler lcm --steps 4 --cfg-scale 1`` uses it.
"""

from __future__ import annotations

import copy
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.diffusion.consistency import boundary_scalings
from opensd.diffusion.schedules import DiscreteSchedule, Prediction
from opensd.models.adapters import use_adapters
from opensd.training.config import DataConfig, DataSource, StageConfig, TrainConfig, _check_float, _check_int
from opensd.training.data import batch_indices
from opensd.training.lora import check_image_size, load_frozen
from opensd.training.lora_network import LoRANetwork, LoRATargets, Shared, kohya_metadata
from opensd.training.records import SAMPLES, save_grid
from opensd.training.stage import RunContext, Stage, Trainable, Update


class ConsistencyLoss(enum.Enum):
    """The distance between student and target: pseudo-Huber (``huber_c``) or squared error."""

    HUBER = "huber"
    L2 = "l2"


@dataclass(frozen=True)
class LCMStageConfig(StageConfig):
    """``opensd train lcm``. ``model``: the teacher, any model opensd loads ("" = the default
    model). ``rank``/``alpha``/``targets``: the LoRA (``all``: with the convolutions, as
    LCM-LoRA). ``original_steps``: the solver's grid (N). ``guidance_min``/``guidance_max``:
    the teacher's CFG scale range. ``target_decay``: the target network's EMA decay (0: the
    student). ``eval_per_category``: on the shapes world, the judge's validation
    prompts per category scored at each evaluation with ``sample_steps`` of the ``lcm``
    sampler at CFG 1 (0: none);
    ``sample_images``: images per prompt of ``sample_prompts`` drawn then (0: none).
    ``export_half``: the file in float16."""

    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"sample_images", "sample_prompts", "sample_steps", "output_name",
                                                   "export_half"}

    model: str = ""
    rank: int = 16
    alpha: float = 16.0
    targets: LoRATargets = LoRATargets.ALL
    original_steps: int = 50
    guidance_min: float = 5.0
    guidance_max: float = 5.0
    loss: ConsistencyLoss = ConsistencyLoss.HUBER
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    target_decay: float = 0.95
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/lcm", steps=1000, batch_size=32, lr=1e-3, warmup_steps=50, log_every=10, sample_every=250,
        checkpoint_every=100))
    data: DataConfig = field(default_factory=lambda: DataConfig(source=DataSource.SHAPES, pool_size=8000))
    cache_batch: int = 64
    eval_per_category: int = 8
    sample_prompts: tuple[str, ...] = ("a red circle above a blue square", "two green triangles")
    sample_images: int = 4
    sample_steps: int = 4
    output_name: str = ""
    export_half: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.targets, LoRATargets):
            raise ConfigError(f"targets must be one of {', '.join(t.value for t in LoRATargets)}, got {self.targets!r}")
        if not isinstance(self.loss, ConsistencyLoss):
            raise ConfigError(f"loss must be one of {', '.join(k.value for k in ConsistencyLoss)}, got {self.loss!r}")
        for name, low in (("rank", 1), ("original_steps", 1), ("cache_batch", 1), ("eval_per_category", 0),
                          ("sample_images", 0), ("sample_steps", 1)):
            _check_int(name, getattr(self, name), low)
        _check_float("alpha", self.alpha, 1e-12)
        _check_float("guidance_min", self.guidance_min, 1.0)
        _check_float("guidance_max", self.guidance_max, self.guidance_min)
        _check_float("huber_c", self.huber_c, 0.0)
        _check_float("timestep_scaling", self.timestep_scaling, 1e-12)
        _check_float("target_decay", self.target_decay, 0.0, 0.999999)
        if self.sample_steps > self.original_steps:
            raise ConfigError(f"sample_steps ({self.sample_steps}) must be at most original_steps ({self.original_steps})")
        if any(c in self.output_name for c in "/\\") or self.output_name.startswith("."):
            raise ConfigError(f"output_name must be a plain file name (no folders), got {self.output_name!r}")


# ----------------------------------------------------------------------------- the objective


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)  # (B,) -> (B, 1, 1, 1)


def x0_and_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction: Prediction) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's x0 and eps at the VP latent ``x`` of ``alphas_cumprod`` ``a`` (B,)."""
    sa, sb = _expand(a.sqrt(), x), _expand((1 - a).sqrt(), x)
    if prediction is Prediction.EPS:
        return (x - sb * out) / sa, out
    return sa * x - sb * out, sa * out + sb * x  # v-prediction (Salimans & Ho 2022)


class LCDLoss(nn.Module):
    """The trainable module: ``forward(x0, cond, uncond, index, noise, w) -> (B,)`` per-sample loss.

    ``network``: the student's LoRA (trained); ``target``: the target network's (frozen
    factors, moved by :meth:`update_target`). The teacher is the frozen base model,
    referenced, not registered. ``cond``/``uncond``: the U-Net's conditioning dicts of the
    captions and of the empty caption (B rows each); ``index`` (B,) grid indices, ``w`` (B,)
    guidance scales."""

    alphas_cumprod: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, network: LoRANetwork, frozen: Any, cfg: LCMStageConfig) -> None:
        super().__init__()
        self.network = network
        self.target = copy.deepcopy(network).requires_grad_(False)  # shares the base layers (Shared)
        self._frozen = Shared(base=frozen)  # not a child module: not moved, put in train mode or copied with this one
        schedule = DiscreteSchedule(frozen.model.cfg.schedule)
        T = schedule.num_train_timesteps
        if cfg.original_steps > T:
            raise ConfigError(f"original_steps ({cfg.original_steps}) must be at most the model's {T} timesteps")
        self.skip = T // cfg.original_steps
        self.prediction = schedule.config.prediction
        self.loss_kind, self.huber_c, self.scaling = cfg.loss, cfg.huber_c, cfg.timestep_scaling
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone(), persistent=False)

    @property
    def frozen(self) -> Any:
        return self._frozen["base"]

    def _consistency(self, x: torch.Tensor, t: torch.Tensor, cond: dict, network: LoRANetwork) -> torch.Tensor:
        """``c_skip(t) x + c_out(t) x0(x, t)`` with ``network``'s LoRA on the U-Net."""
        with use_adapters(network.adapters()):
            out = self.frozen.model.unet(x, t.float(), **cond).float()
        x0, _ = x0_and_eps(out, x, self.alphas_cumprod[t], self.prediction)
        c_skip, c_out = boundary_scalings(t.double(), self.scaling)  # (B,) each, the sampler's formula
        return _expand(c_skip, x) * x + _expand(c_out, x) * x0

    @torch.no_grad()
    def _solver_step(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: dict, uncond: dict,
                     w: torch.Tensor) -> torch.Tensor:
        """One DDIM step of the guided teacher (no LoRA) from ``t`` to ``s``."""
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        out = self.frozen.model.unet(torch.cat([x, x]), torch.cat([t, t]).float(), **both).float()  # (2B, ...)
        a_t = self.alphas_cumprod[t]
        x0_u, eps_u = x0_and_eps(out[: x.shape[0]], x, a_t, self.prediction)
        x0_c, eps_c = x0_and_eps(out[x.shape[0]:], x, a_t, self.prediction)
        x0 = x0_u + _expand(w, x) * (x0_c - x0_u)
        eps = eps_u + _expand(w, x) * (eps_c - eps_u)
        a_s = self.alphas_cumprod[s]
        return _expand(a_s.sqrt(), x) * x0 + _expand((1 - a_s).sqrt(), x) * eps

    def forward(self, x0: torch.Tensor, cond: dict, uncond: dict, index: torch.Tensor, noise: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
        t = (index + 1) * self.skip - 1  # (B,) the grid's timesteps
        s = (t - self.skip).clamp(min=0)
        a = self.alphas_cumprod[t]
        x_t = _expand(a.sqrt(), x0) * x0 + _expand((1 - a).sqrt(), x0) * noise
        student = self._consistency(x_t, t, cond, self.network)
        x_s = self._solver_step(x_t, t, s, cond, uncond, w)
        with torch.no_grad():
            target = self._consistency(x_s, s, cond, self.target)
        d = (student - target).flatten(1)  # (B, C * h * w)
        if self.loss_kind is ConsistencyLoss.HUBER:
            return ((d.square() + self.huber_c**2).sqrt() - self.huber_c).mean(dim=1)
        return d.square().mean(dim=1)

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """``target <- decay * target + (1 - decay) * student`` (``decay`` 0: a copy)."""
        for p_t, p in zip(self.target.parameters(), self.network.parameters(), strict=False):
            if decay == 0:
                p_t.copy_(p)
            else:
                p_t.lerp_(p, 1.0 - decay)


# ----------------------------------------------------------------------------- the stage


def _loss_of(module: nn.Module) -> LCDLoss:
    """The stage's module (an :class:`LCDLoss`, or its EMA copy) as its type."""
    assert isinstance(module, LCDLoss)
    return module


@dataclass
class Teacher:
    """The frozen model and what conditions it (what :class:`LCDLoss` uses but does not own)."""

    model: Any
    conditioner: Any
    size_request: Any


class LCMStage(Stage):
    name = "lcm"
    ema_groups = ("lcm",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        from opensd.pipelines.conditioning import Conditioner
        from opensd.pipelines.request import GenerationRequest

        cfg = self.cfg
        self.ctx, self.t0 = ctx, time.time()
        self.loaded = load_frozen(cfg.model)
        model = self.loaded.model.to(ctx.device)
        check_image_size(model, cfg.data.image_size)
        self.conditioner = Conditioner(model, self.loaded.tokenizer, budget=None)
        size = cfg.data.image_size
        self.size_request = GenerationRequest("", width=size, height=size, original_size=(size, size))
        self._cache_data()
        network = LoRANetwork(model, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, text_encoder=False,
                              seed=cfg.train.seed)
        if not len(network.layers):
            raise ConfigError(f"targets {cfg.targets.value!r} selects no layer of this model")
        return {"lcm": LCDLoss(network, Teacher(model, self.conditioner, self.size_request), cfg)}

    def trainable(self) -> dict[str, Trainable]:
        """The student's LoRA trains (and its EMA, if any, averages it); checkpoints also hold
        the target network's factors, which :meth:`LCDLoss.update_target` moves, so that a
        resumed run is exact."""
        loss = _loss_of(self.ctx.modules["lcm"])
        student = Trainable.of(loss.network, "network.")
        target = tuple(f"target.{k}" for k in loss.target.state_dict())
        return {"lcm": Trainable(student.parameters, (*student.state, *target))}

    def _cache_data(self) -> None:
        """The data's latents and caption conditioning, encoded once by the frozen model (cached in the run)."""
        from opensd.training.finetune_data import cached_latents, open_images
        from opensd.training.text_encoding import caption_encoder

        cfg, ctx = self.cfg, self.ctx
        images = open_images(cfg.data, "", "data")
        cache = cached_latents(images, self.loaded.model.vae, caption_encoder(self.conditioner, self.loaded.tokenizer),
                               folder=ctx.run_dir / "cache", model_hash=self.loaded.hash, size=cfg.data.image_size,
                               device=ctx.device, batch_size=cfg.cache_batch, progress=cfg.train.progress,
                               main=ctx.is_main, barrier=ctx.barrier)
        self.latents = cache.latents.to(ctx.device)  # (N, C, h, w)
        self.cond = {k: v.to(ctx.device) for k, v in cache.cond.items()}  # (N, L, D)...
        self.empty = {k: v.to(ctx.device) for k, v in cache.empty.items()}  # (1, L, D)...
        self.pool = images.pool

    def _unet_cond(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from opensd.pipelines.conditioning import TextEmbedding

        return self.conditioner.to_dict(TextEmbedding(text["context"], text.get("pooled")), self.size_request)

    def batch(self, step: int) -> dict[str, Any]:
        ctx = self.ctx
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, len(self.latents))
        return {"x0": self.latents[idx], "text": {k: v[idx] for k, v in self.cond.items()}}

    def updates(self, batch: dict[str, Any], step: int) -> Iterator[Update]:
        ctx, cfg = self.ctx, self.cfg
        x0 = batch["x0"]
        b = x0.shape[0]
        g = ctx.generator(step)
        index = ctx.to_device(torch.randint(0, cfg.original_steps, (b,), generator=g))
        noise = ctx.to_device(torch.randn(x0.shape, generator=g))
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=g)
        cond = self._unet_cond(batch["text"])
        uncond = self._unet_cond({k: v.expand(b, *v.shape[1:]) for k, v in self.empty.items()})
        with ctx.autocast():
            per_sample = ctx.wrapped["lcm"](x0, cond, uncond, index, noise, ctx.to_device(w))  # (B,)
        loss = per_sample.mean()
        yield Update("lcm", loss, {"loss": loss})

    def after_update(self, group: str) -> None:
        _loss_of(self.ctx.modules["lcm"]).update_target(self.cfg.target_decay)

    # -- sampling, scoring and export (rank 0) ---------------------------------------------

    def pipeline(self):
        if getattr(self, "_pipe", None) is None:
            from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

            self._pipe = StableDiffusionPipeline(self.loaded, prompt_budget=None)
        return self._pipe

    def evaluate(self, step: int) -> dict[str, float]:
        """A sample grid of ``sample_prompts``, then the stage's evaluator (a
        :class:`~opensd.training.evaluation.GenerationEvaluator`; on the shapes world the
        validation suite scored, its grid in ``step_XXXXXXXX_eval.png``), both with the student
        at ``sample_steps`` LCM steps and CFG 1."""
        from opensd.pipelines.networks import RequestNetworks
        from opensd.pipelines.request import GenerationRequest

        cfg, pipe, size = self.cfg, self.pipeline(), self.cfg.data.image_size
        networks = RequestNetworks(adapters=_loss_of(self.ctx.averaged("lcm")).network.adapters())
        kw = dict(steps=cfg.sample_steps, sampler="lcm", cfg_scale=1.0, width=size, height=size)
        samples = self.ctx.run_dir / SAMPLES
        if cfg.sample_images and cfg.sample_prompts:
            images: list = []
            for p in cfg.sample_prompts:
                images += pipe.generate(GenerationRequest(p, seed=1000, batch_size=cfg.sample_images, **kw),
                                        networks=networks).images
            path = samples / f"step_{step:08d}.png"
            save_grid(images, path, cfg.sample_images)
            path.with_suffix(".txt").write_text("".join(f"{p}\n" for p in cfg.sample_prompts))
        if self.evaluator is None:
            return {}

        def draw(prompts):
            return [pipe.generate(GenerationRequest(text, seed=1000 + i, **kw), networks=networks).images[0]
                    for i, text in enumerate(prompts)]

        return dict(self.evaluator(draw, samples / f"step_{step:08d}_eval.png"))

    def output_path(self) -> Path:
        run = self.ctx.run_dir
        return run / f"{self.cfg.output_name or run.resolve().name}.safetensors"

    def export(self) -> Path:
        from opensd.checkpoints.io import write_safetensors

        network = _loss_of(self.ctx.averaged("lcm")).network
        dtype = torch.float16 if self.cfg.export_half else torch.float32
        tensors = {k: v.to(dtype) if k.endswith(".weight") else v for k, v in network.kohya_state().items()}
        path = self.output_path()
        write_safetensors(tensors, path, metadata=kohya_metadata(network, self.metadata(path)))
        return path

    def metadata(self, path: Path) -> dict[str, object]:
        """sd-scripts' training keys (``ss_*``) and the distillation's (``opensd_lcm_*``)."""
        cfg, tc = self.cfg, self.cfg.train
        size = cfg.data.image_size
        return {
            "ss_output_name": path.stem, "ss_sd_model_name": self.loaded.name, "ss_new_sd_model_hash": self.loaded.hash,
            "ss_learning_rate": tc.lr, "ss_unet_lr": tc.lr, "ss_text_encoder_lr": 0, "ss_max_train_steps": tc.steps,
            "ss_steps": tc.steps, "ss_lr_warmup_steps": tc.warmup_steps, "ss_lr_scheduler": tc.lr_schedule.value,
            "ss_batch_size_per_device": tc.batch_size // self.ctx.world, "ss_total_batch_size": tc.batch_size,
            "ss_seed": tc.seed, "ss_resolution": f"({size}, {size})", "ss_num_train_images": self.pool,
            "ss_max_grad_norm": tc.grad_clip, "ss_optimizer": "torch.optim.adamw.AdamW",
            "ss_mixed_precision": "bf16" if tc.bf16 else "no", "ss_training_started_at": round(self.t0, 3),
            "ss_training_finished_at": round(time.time(), 3),
            "opensd_lcm_original_inference_steps": cfg.original_steps,
            "opensd_lcm_guidance": [cfg.guidance_min, cfg.guidance_max], "opensd_lcm_loss": cfg.loss.value,
            "opensd_lcm_target_decay": cfg.target_decay, "opensd_lcm_timestep_scaling": cfg.timestep_scaling,
            "opensd_lcm_use": f"--sampler lcm --steps {cfg.sample_steps} --cfg-scale 1",
        }
