"""The training cases of bench.py: one AdamW step of the small U-Net and of the small VAE.

Each side has its own copy of the same initial weights (and its own optimizer); fp16/bf16
runs keep fp32 master weights and use autocast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from cases_sd15 import diffusers_unet_sharing, diffusers_vae_sharing
from harness import Row, Settings, interleave, maybe_compile, silence_reference_logs


def _train_rows(name: str, what: str, batch: int, ours_step, ref_step, s: Settings) -> list[Row]:
    row = Row(name, what, "samples/s", float(batch))
    interleave(row, ours_step, ref_step, s, False)
    return [row]


def _autocast(s: Settings):
    if s.dtype == torch.float32:
        return torch.autocast(s.device.type, enabled=False)
    return torch.autocast(s.device.type, dtype=s.dtype)


def train_stepper(model: torch.nn.Module, call: Callable, loss_fn: Callable, s: Settings) -> Callable[[], torch.Tensor]:
    """One AdamW training step of ``model``: ``loss_fn(call(model).float())``, autocast as ``s`` says."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = maybe_compile(model, s)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(s):
            loss = loss_fn(call(fwd).float())
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def case_train_unet(s: Settings) -> list[Row]:
    """eps-prediction MSE, AdamW, fp32 master weights (autocast for fp16/bf16)."""
    from opensd.diffusion.schedules import DiscreteSchedule, NoiseScheduleConfig
    from opensd.models.unet import UNetConfig, UNetModel

    silence_reference_logs()
    cfg = UNetConfig.small()
    torch.manual_seed(0)
    with torch.device(s.device):
        ours = UNetModel(cfg)
    ref = diffusers_unet_sharing(ours, cfg, sample_size=8, copy=True)
    ours.train(), ref.train()
    batch, length = 64, 32  # small CLIP's context length
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(batch, 4, 8, 8, generator=g).to(s.device)
    eps = torch.randn(batch, 4, 8, 8, generator=g).to(s.device)
    context = torch.randn(batch, length, cfg.context_dim, generator=g).to(s.device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(s.device)
    ab = DiscreteSchedule(NoiseScheduleConfig()).alphas_cumprod.float().to(s.device)[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(pred: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(pred, eps)

    ours_step = train_stepper(ours, lambda m: m(xt, t, context), loss, s)
    ref_step = train_stepper(ref, lambda m: m(xt, t, encoder_hidden_states=context).sample, loss, s)
    return _train_rows("train_unet", "train small U-Net, 8x8x4 latents, batch 64", batch, ours_step, ref_step, s)


def case_train_vae(s: Settings) -> list[Row]:
    """L1 + MSE reconstruction through a posterior sample, AdamW."""
    from opensd.models.vae import AutoencoderKL, VAEConfig

    silence_reference_logs()
    cfg = VAEConfig.small()
    torch.manual_seed(0)
    with torch.device(s.device):
        ours = AutoencoderKL(cfg)
    ref = diffusers_vae_sharing(ours, cfg, sample_size=32, copy=True)
    ours.train(), ref.train()
    batch = 32
    x = (torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(s.device)

    def loss(recon: torch.Tensor) -> torch.Tensor:
        return (recon - x).abs().mean() + ((recon - x) ** 2).mean()

    ours_step = train_stepper(ours, lambda m: m(x, sample_posterior=True)[0], loss, s)
    ref_step = train_stepper(ref, lambda m: m(x, sample_posterior=True).sample, loss, s)
    return _train_rows("train_vae", "train small VAE, 32 px, batch 32", batch, ours_step, ref_step, s)
