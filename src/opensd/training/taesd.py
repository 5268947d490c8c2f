"""``opensd train taesd``: a tiny autoencoder (TAESD) distilled from a model's KL-VAE.

The teacher is a model opensd loads (``teacher``, "" = the default model); only its VAE
is used, frozen. Before the first step the stage renders the data pool (``data.pool_size``
scenes, or every image of a ``data.path`` folder) and runs the teacher on it once, in
``cache_batch`` chunks:
each scene's *diffusion* latent ``vae.to_latent(vae.encode(x).mode())`` (what the U-Net
makes and what TAESD decodes, see :mod:`opensd.models.taesd`) and, with ``target =
teacher``, the teacher's decode of it. The cache is in memory and made again, bit for
bit, on resume. Each step then draws a batch of the pool and minimises::

    decoder:  l1_weight * |D(z) - y| + mse_weight * (D(z) - y)^2      y: the teacher's decode (or the image)
    encoder:  encoder_weight * (E(x) - z)^2                            (when model.encoder)

with ``z`` the teacher's latent, so the decoder learns the VAE decoder's map and the
encoder the VAE encoder's (Bohan 2023 distils TAESD the same way, with an adversarial
term this stage leaves out). Both halves are one module, one optimiser, one EMA; the
gradients do not mix (the decoder sees the teacher's latents, never the encoder's). With
``model.encoder = false`` only the decoder trains (what ``decoder="tiny"`` and the TAESD
preview use). The networks and batches are kept channels-last: the same arithmetic, and
faster convolutions on CPUs (with ``train.bf16``, about twice as fast again on CPUs with
AMX/AVX-512 bf16).

``evaluate`` writes a grid of pool images above their round trips and hands the round
trips (teacher encoder -> tiny decoder, the fast decode of a latent the model made; tiny
encoder -> tiny decoder; the full VAE, the reference) to the stage's evaluator (a
:class:`~opensd.training.evaluation.TinyRoundTripEvaluator`): on the shapes world, the
validation suite's ground-truth renders round-tripped and scored with the exact scorer
(:class:`opensd.shapes.stage_eval.TinyRoundTripJudge`: ``kept``, ``tiny_kept``, ``vae_kept``
and the PSNRs). ``export`` writes ``taesd/taesd_decoder.safetensors``
(and ``taesd_encoder.safetensors``) in the original TAESD layout, which
:func:`opensd.checkpoints.taesd.load_tiny_autoencoder` and A1111 read; copied into a
model's folder, the pipeline uses it for ``decoder="tiny"`` and TAESD previews.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opensd.config import ConfigError
from opensd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from opensd.pipelines.images import from_uint8, tensor_to_pil, to_uint8
from opensd.training.config import DataConfig, DataSource, StageConfig, TrainConfig, _check_float, _check_int
from opensd.training.data import batch_indices, load_batch
from opensd.training.records import SAMPLES, save_grid
from opensd.training.sources import open_source
from opensd.training.stage import RunContext, Stage, Update

EXPORT_FOLDER = "taesd"


class DistillTarget(enum.Enum):
    """What the tiny decoder learns to draw: the teacher's decode of the latent, or the image itself."""

    TEACHER = "teacher"
    IMAGE = "image"


@dataclass(frozen=True)
class TAESDStageConfig(StageConfig):
    """``opensd train taesd``: see the module docstring for the losses."""

    PRESETS: ClassVar = {"shapes": TinyAutoencoderConfig.shapes, "sd": TinyAutoencoderConfig.sd,
                         "tiny": TinyAutoencoderConfig.tiny}
    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"grid_images", "cache_batch", "export_half"}

    teacher: str = ""
    model_preset: str = "shapes"
    model: TinyAutoencoderConfig = field(default_factory=TinyAutoencoderConfig.shapes)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/taesd", steps=4000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999,
        sample_every=500, checkpoint_every=500))
    data: DataConfig = field(default_factory=lambda: DataConfig(pool_size=10000))
    target: DistillTarget = DistillTarget.TEACHER
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    encoder_weight: float = 1.0
    cache_batch: int = 256
    eval_per_category: int = 16
    grid_images: int = 8
    export_half: bool = True

    def __post_init__(self) -> None:
        for name in ("l1_weight", "mse_weight", "encoder_weight"):
            _check_float(name, getattr(self, name), 0.0)
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise ConfigError("l1_weight and mse_weight are both 0: the tiny decoder would learn nothing")
        if not isinstance(self.target, DistillTarget):
            raise ConfigError(f"target must be one of {', '.join(t.value for t in DistillTarget)}, got {self.target!r}")
        for name, low in (("cache_batch", 1), ("eval_per_category", 0), ("grid_images", 1)):
            _check_int(name, getattr(self, name), low)
        if not self.model.decoder:
            raise ConfigError("model.decoder = false: this stage trains a decoder (and optionally an encoder)")
        if self.model.scaling_factor != 1.0 or self.model.shift_factor != 0.0:
            raise ConfigError("model.scaling_factor must be 1 and model.shift_factor 0: the stage distils on the "
                              "teacher's diffusion latents, as TAESD does")
        if self.data.source is DataSource.SHAPES and self.data.pool_size < 1:
            raise ConfigError("data.pool_size must be > 0: the stage caches the teacher's latents of that many scenes")
        if self.data.image_size % self.model.downsample_factor:
            raise ConfigError(f"data.image_size {self.data.image_size} must be a multiple of the tiny autoencoder's "
                              f"downsampling factor {self.model.downsample_factor}")


def load_teacher(path: str):
    """The VAE of the model at ``path`` ("" = the default model), float32, frozen."""
    from opensd.training.lora import load_frozen

    return load_frozen(path).model.vae


def check_fits(tiny: TinyAutoencoderConfig, vae: Any) -> None:
    """The tiny autoencoder must share the teacher's latent shape."""
    if tiny.latent_channels != vae.cfg.embed_dim or tiny.downsample_factor != vae.cfg.downsample_factor:
        raise ConfigError(
            f"the teacher's VAE has {vae.cfg.embed_dim} latent channels and downsamples x{vae.cfg.downsample_factor}; "
            f"model has {tiny.latent_channels} and x{tiny.downsample_factor}: set model.latent_channels and "
            f"model.stages to match (model_preset 'sd' for SD's x8, 'shapes' for the default model's x4)"
        )


@torch.no_grad()
def teacher_outputs(vae: Any, x: torch.Tensor, decode: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(diffusion latents (B, C, h, w), the teacher's decode (B, 3, H, W) in [-1, 1] or None) of images x."""
    z = vae.encode(x).mode()
    return vae.to_latent(z), (vae.decode(z).clamp(-1, 1) if decode else None)


class TAESDLoss(nn.Module):
    """The trainable module: ``forward(x, z, y) -> (loss, metrics)``; x images, z teacher
    latents, y the decoder's target (see the module doc)."""

    def __init__(self, tiny: TinyAutoencoder, l1: float, mse: float, enc: float) -> None:
        super().__init__()
        self.tiny, self.l1, self.mse, self.enc = tiny, l1, mse, enc

    def forward(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor):
        out = self.tiny.decode(self.tiny.from_latent(z)).float()
        l1 = (out - y).abs().mean()
        mse = (out - y).pow(2).mean()
        loss = self.l1 * l1 + self.mse * mse
        metrics = {"l1": l1.detach(), "mse": mse.detach()}
        if self.tiny.encoder is not None:
            enc = (self.tiny.to_latent(self.tiny.encode(x)).float() - z).pow(2).mean()
            loss = loss + self.enc * enc
            metrics["enc_mse"] = enc.detach()
        return loss, metrics


def _tiny_of(module: nn.Module) -> TinyAutoencoder:
    """The tiny autoencoder inside the stage's module (a :class:`TAESDLoss`, or its EMA copy)."""
    assert isinstance(module, TAESDLoss)
    return module.tiny


class TAESDStage(Stage):
    name = "taesd"
    ema_groups = ("taesd",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        cfg = self.cfg
        self.ctx = ctx
        self.vae = load_teacher(cfg.teacher).to(ctx.device)
        check_fits(cfg.model, self.vae)
        self.source = open_source(cfg.data)
        self.cache = self._cache()
        tiny = TinyAutoencoder(cfg.model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # a documented form of Module.to that torch's overloads lack
        return {"taesd": TAESDLoss(tiny, cfg.l1_weight, cfg.mse_weight, cfg.encoder_weight)}

    def _cache(self) -> dict[str, torch.Tensor]:
        """The pool's images (uint8), teacher latents and targets (uint8), in memory."""
        cfg, ctx = self.cfg, self.ctx
        n, step = self.source.pool, cfg.cache_batch  # the shapes pool, or every image of a folder
        assert n is not None  # both sources have a pool (the config checks the shapes world's)
        images, latents, targets = [], [], []
        for start in range(0, n, step):
            x = load_batch(self.source, range(start, min(n, start + step))).images
            z, y = teacher_outputs(self.vae, ctx.to_device(x), cfg.target is DistillTarget.TEACHER)
            images.append(to_uint8(x))
            latents.append(z.float().cpu())
            if y is not None:  # every batch or none: decoded when the target is the teacher's
                targets.append(to_uint8(y.cpu()))
        out = {"images": torch.cat(images), "latents": torch.cat(latents)}
        out["targets"] = torch.cat(targets) if targets else out["images"]
        return out

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, self.source.pool)
        return {k: v[idx] for k, v in self.cache.items()}

    def updates(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[Update]:
        ctx = self.ctx
        last = torch.channels_last
        x = ctx.to_device(from_uint8(batch["images"])).contiguous(memory_format=last)
        y = ctx.to_device(from_uint8(batch["targets"])).contiguous(memory_format=last)
        z = ctx.to_device(batch["latents"]).contiguous(memory_format=last)
        with ctx.autocast():
            loss, metrics = ctx.wrapped["taesd"](x, z, y)
        yield Update("taesd", loss, {**metrics, "loss": loss})

    # -- evaluation and export (rank 0) ----------------------------------------------

    @torch.no_grad()
    def round_trips(self, tiny: TinyAutoencoder, x: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
        """Images x (N, 3, H, W) through the full VAE, teacher encoder -> tiny decoder and
        (with an encoder) the tiny autoencoder alone; each (N, 3, H, W) in [-1, 1] on the CPU."""
        out: dict[str, list[torch.Tensor]] = {"vae": [], "tiny_decoder": [], "tiny": []}
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(self.ctx.device)
            z, y = teacher_outputs(self.vae, xb, decode=True)
            assert y is not None  # decoded
            out["vae"].append(y.float().cpu())
            out["tiny_decoder"].append(tiny.decode(tiny.from_latent(z)).float().clamp(-1, 1).cpu())
            if tiny.encoder is not None:
                out["tiny"].append(tiny.decode(tiny.encode(xb)).float().clamp(-1, 1).cpu())
        return {k: torch.cat(v) for k, v in out.items() if v}

    def evaluate(self, step: int) -> dict[str, float]:
        tiny = _tiny_of(self.ctx.averaged("taesd")).eval()
        n = self.cfg.grid_images
        grid = from_uint8(self.cache["images"][:n])
        rows = self.round_trips(tiny, grid)
        save_grid(tensor_to_pil(torch.cat([grid, *rows.values()])), self.ctx.run_dir / SAMPLES / f"step_{step:08d}.png", n)
        if self.evaluator is None:
            return {}
        return dict(self.evaluator(lambda images: self.round_trips(tiny, images)))

    def export(self) -> Path:
        from opensd.checkpoints.taesd import save_tiny_autoencoder

        tiny = copy.deepcopy(_tiny_of(self.ctx.averaged("taesd"))).eval().cpu()
        folder = self.ctx.run_dir / EXPORT_FOLDER
        save_tiny_autoencoder(tiny, folder, dtype=torch.float16 if self.cfg.export_half else None)
        return folder
