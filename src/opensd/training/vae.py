"""Stage 1: the KL autoencoder (Rombach et al. 2022, sec. 3.1 and appendix G).

The loss per image, with pixel terms averaged over pixels and the KL term divided by
the same pixel count (so ``kl_weight`` means what LDM's 1e-6 means)::

    l1_weight * |x - D(z)| + mse_weight * (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)
    [+ disc.weight * -D_patch(D(z))   once step >= disc.start_step]

``z`` is the posterior *mode* (``posterior_noise = 0``) or ``mean + posterior_noise * std
* eps`` from step ``posterior_noise_start``: sampling the full posterior with a tiny
KL weight adds noise of about unit variance early and slows learning (measured on
this project's shapes world), so training starts on the mode.

The optional discriminator is a small PatchGAN (Isola et al. 2017, as in Esser et al.
2021's taming transformers) trained from scratch with the hinge loss, off by default.

``evaluate`` writes a grid of training images above their reconstructions and hands the
autoencoder's round trip to the stage's evaluator (a
:class:`~opensd.training.evaluation.RoundTripEvaluator`): on the shapes world, the
validation suite's true renders round-tripped, their PSNR and the exact scorer's verdicts
(:class:`opensd.shapes.stage_eval.RoundTripJudge`), the number that caps every later
quality number (a round trip that loses objects cannot be fixed by the U-Net).
``export`` writes ``vae/`` with ``scale_factor`` set to 1 / std of the latents of
training images, so the diffusion model sees unit-variance latents (LDM's rule, which
gave SD's 0.18215).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from opensd.config import ConfigError
from opensd.models.vae import AutoencoderKL, VAEConfig
from opensd.pipelines.images import tensor_to_pil
from opensd.training.config import DataConfig, StageConfig, TrainConfig
from opensd.training.data import VAE_FOLDER, Batch, batch_indices, load_batch, save_vae
from opensd.training.records import SAMPLES, save_grid
from opensd.training.sources import open_source
from opensd.training.stage import RunContext, Stage, Update

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DiscriminatorConfig:
    """A PatchGAN: ``layers`` stride-2 convs from ``channels`` wide (doubling), hinge loss."""

    enabled: bool = False
    start_step: int = 2000
    weight: float = 0.1
    lr: float = 1e-4
    channels: int = 64
    layers: int = 3
    norm_groups: int = 8

    def __post_init__(self) -> None:
        for name, low in (("start_step", 0), ("channels", 1), ("layers", 1), ("norm_groups", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"disc.{name} must be an integer >= {low}, got {v!r}")
        if self.channels % self.norm_groups:
            raise ConfigError(f"disc.channels {self.channels} must be divisible by disc.norm_groups {self.norm_groups}")
        if not self.weight >= 0 or not self.lr > 0:
            raise ConfigError(f"disc.weight must be >= 0 and disc.lr > 0, got {self.weight!r}, {self.lr!r}")


@dataclass(frozen=True)
class VAEStageConfig(StageConfig):
    """``opensd train vae``: see the module docstring for the loss."""

    PRESETS: ClassVar = {"tiny": VAEConfig.tiny, "small": VAEConfig.small, "sd15": VAEConfig.sd15}
    RESUMABLE: ClassVar = StageConfig.RESUMABLE | {"grid_images"}

    model_preset: str = "small"
    model: VAEConfig = field(default_factory=VAEConfig.small)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/vae", steps=3000, batch_size=32, lr=2e-4, warmup_steps=100, bf16=False,
        sample_every=500, checkpoint_every=500))
    data: DataConfig = field(default_factory=DataConfig)
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6
    posterior_noise: float = 0.0
    posterior_noise_start: int = 0
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    eval_per_category: int = 16
    grid_images: int = 8
    scale_images: int = 256

    def __post_init__(self) -> None:
        for name in ("l1_weight", "mse_weight", "kl_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise ConfigError("l1_weight and mse_weight are both 0: the autoencoder would learn nothing")
        if not 0 <= self.posterior_noise <= 1:
            raise ConfigError(f"posterior_noise must be in [0, 1] (0 = the mode, 1 = a full sample), "
                              f"got {self.posterior_noise!r}")
        for name, low in (("posterior_noise_start", 0), ("eval_per_category", 0), ("grid_images", 1),
                          ("scale_images", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        f = self.model.downsample_factor
        if self.data.image_size % f:
            raise ConfigError(f"data.image_size {self.data.image_size} must be a multiple of the VAE's "
                              f"downsampling factor {f}")


# ----------------------------------------------------------------------------- losses


def kl_per_pixel(mean: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each latent, / ``pixels``, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)  # (B,)
    return kl.mean() / pixels


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return 10.0 * torch.log10(4.0 / mse)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): stride-2 4x4 convs, GroupNorm, LeakyReLU(0.2); a logit per patch."""

    def __init__(self, cfg: DiscriminatorConfig, in_channels: int = 3) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        for _ in range(1, cfg.layers):
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.GroupNorm(cfg.norm_groups, 2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        layers += [nn.Conv2d(ch, 2 * ch, 4, 1, 1), nn.GroupNorm(cfg.norm_groups, 2 * ch), nn.LeakyReLU(0.2),
                   nn.Conv2d(2 * ch, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.layers = cfg.layers

    def output_size(self, image_size: int) -> int:
        s = image_size
        for _ in range(self.layers):
            s = (s + 2 - 4) // 2 + 1
        return s - 2  # the two stride-1 4x4 convs with padding 1 each take one pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) logits


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` of ``module``'s parameters for a block (the generator's pass)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags, strict=False):
            p.requires_grad_(f)


class VAEForward(nn.Module):
    """The trainable module: ``forward(x, noise_scale, eps) -> (recon, mean, logvar)``."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise_scale: float, eps: torch.Tensor | None):
        post = self.vae.encode(x)
        z = post.mean if noise_scale == 0 or eps is None else post.mean + noise_scale * post.std * eps
        return self.vae.decode(z), post.mean, post.logvar


def _vae_of(module: nn.Module) -> AutoencoderKL:
    """The VAE inside the stage's module (a :class:`VAEForward`, or its EMA copy)."""
    assert isinstance(module, VAEForward)
    return module.vae


# ----------------------------------------------------------------------------- the stage


class VAEStage(Stage):
    name = "vae"
    ema_groups = ("vae",)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        cfg = self.cfg
        self.ctx = ctx
        self.source = open_source(cfg.data)
        modules: dict[str, nn.Module] = {"vae": VAEForward(AutoencoderKL(cfg.model))}
        if cfg.disc.enabled:
            disc = PatchDiscriminator(cfg.disc)
            if disc.output_size(cfg.data.image_size) < 1:
                raise ConfigError(f"disc.layers = {cfg.disc.layers} downsamples a {cfg.data.image_size} px image to "
                                  f"nothing; use fewer layers")
            modules["disc"] = disc
        return modules

    def base_lr(self, group: str) -> float:
        return self.cfg.disc.lr if group == "disc" else self.cfg.train.lr

    def batch(self, step: int) -> Batch:
        ctx = self.ctx
        idx = batch_indices(ctx.cfg.seed, step, ctx.rank, ctx.world, ctx.local_batch, self.source.pool)
        return load_batch(self.source, idx)

    def updates(self, batch: Batch, step: int) -> Iterator[Update]:
        cfg, ctx = self.cfg, self.ctx
        x = ctx.to_device(batch.images)
        noise_scale = cfg.posterior_noise if step >= cfg.posterior_noise_start else 0.0
        eps = None
        if noise_scale > 0:
            f = cfg.model.downsample_factor
            shape = (x.shape[0], cfg.model.embed_dim, x.shape[2] // f, x.shape[3] // f)
            eps = ctx.to_device(torch.randn(shape, generator=ctx.generator(step)))
        with ctx.autocast():
            recon, mean, logvar = ctx.wrapped["vae"](x, noise_scale, eps)
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        kl = kl_per_pixel(mean.float(), logvar.float(), x[0].numel())
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        metrics: dict = {"l1": l1, "mse": mse, "kl": kl}
        use_disc = cfg.disc.enabled and step >= cfg.disc.start_step
        if use_disc:
            with frozen(ctx.modules["disc"]) as disc, ctx.autocast():
                g_loss = -disc(recon).float().mean()
            loss = loss + cfg.disc.weight * g_loss
            metrics["g_loss"] = g_loss
        metrics["loss"] = loss
        yield Update("vae", loss, metrics)
        if use_disc:
            with ctx.autocast():  # one forward over real and fake: DDP wants one forward per backward
                logits = ctx.wrapped["disc"](torch.cat([x, recon.detach()])).float()
            real, fake = logits.chunk(2)
            d_loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
            yield Update("disc", d_loss, {"d_loss": d_loss})

    # -- evaluation and export (rank 0) ----------------------------------------------

    @torch.no_grad()
    def _round_trip(self, vae: AutoencoderKL, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(self.ctx.device)
            out.append(vae.decode(vae.encode(xb).mode()).float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def evaluate(self, step: int) -> dict[str, float]:
        vae = _vae_of(self.ctx.averaged("vae")).eval()
        n = self.cfg.grid_images
        grid = load_batch(self.source, range(n)).images
        recon = self._round_trip(vae, grid)
        save_grid(tensor_to_pil(torch.cat([grid, recon])), self.ctx.run_dir / SAMPLES / f"step_{step:08d}.png", n)
        if self.evaluator is None:
            return {}
        return dict(self.evaluator(lambda images: self._round_trip(vae, images)))

    @torch.no_grad()
    def latent_std(self, vae: AutoencoderKL) -> float:
        """Std of the posterior-mode latents of the first ``scale_images`` training items."""
        x = load_batch(self.source, range(min(self.cfg.scale_images, self.source.pool or self.cfg.scale_images)))
        zs = [vae.encode(x.images[i:i + 64].to(self.ctx.device)).mode().float() for i in range(0, len(x.indices), 64)]
        return float(torch.cat(zs).std())

    def export(self) -> Path:
        vae = copy.deepcopy(_vae_of(self.ctx.averaged("vae"))).eval()
        std = self.latent_std(vae)
        if not std > 0:
            raise ValueError(f"the VAE's latents have std {std}; cannot set a scale factor")
        vae.cfg = dataclasses.replace(vae.cfg, scale_factor=1.0 / std, shift_factor=0.0)
        return save_vae(vae, self.ctx.run_dir / VAE_FOLDER)
