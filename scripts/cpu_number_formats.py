"""Which arithmetic is fast on this CPU: the numbers behind docs/benchmarks.md's "Which arithmetic
could be faster" paragraph.

    python scripts/cpu_number_formats.py            # kernels in fp32 and bf16, then two training steps
    python scripts/cpu_number_formats.py --threads 2

Kernels (minimum of 3 calls after one warm-up; the bf16 matmul and convolutions, very slow
on CPUs without native bf16, are timed once, without warm-up):
a 2048² matmul, a 320-channel 3x3 convolution at 64² (batch 2) in NCHW and channels-last,
a 320 -> 1280 linear layer on 8,192 rows, and SDPA over 4,096 tokens (2 x 8 heads of 40).
Training: one AdamW step of the small U-Net (batch 64, 8x8x4 latents) and the small VAE
(batch 32, 32 px), plain, channels-last, and with the fused AdamW, called in turn (median of 6).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from opensd.models.unet import UNetConfig, UNetModel
from opensd.models.vae import AutoencoderKL, VAEConfig


def best(fn: Callable[[], object], calls: int = 3) -> float:
    """Minimum of ``calls`` timed calls after a warm-up; ``calls=1``: one call, no warm-up (very slow kernels)."""
    if calls > 1:
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def kernels() -> None:
    n = 2048
    for dtype, calls in ((torch.float32, 3), (torch.bfloat16, 1)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        print(f"matmul {n}² {dtype}: {2 * n**3 / best(lambda a=a, b=b: a @ b, calls) / 1e9:.2f} GFLOP/s")
    with torch.inference_mode():
        for dtype, calls in ((torch.float32, 3), (torch.bfloat16, 1)):
            conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(dtype)
            x = torch.randn(2, 320, 64, 64, dtype=dtype)
            print(f"conv 3x3 320ch 64² NCHW {dtype}: {best(lambda conv=conv, x=x: conv(x), calls):.3f} s")
            conv_cl, x_cl = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
            print(f"conv 3x3 320ch 64² channels-last {dtype}: {best(lambda conv_cl=conv_cl, x_cl=x_cl: conv_cl(x_cl), calls):.3f} s")
            lin, y = torch.nn.Linear(320, 1280).to(dtype), torch.randn(8192, 320, dtype=dtype)
            print(f"linear 320->1280 x 8192 rows {dtype}: {best(lambda lin=lin, y=y: lin(y)):.3f} s")
            q = torch.randn(2, 8, 4096, 40, dtype=dtype)
            print(f"SDPA 4096 tokens {dtype}: {best(lambda q=q: F.scaled_dot_product_attention(q, q, q)):.3f} s")


def unet_step(channels_last: bool, fused: bool) -> Callable[[], None]:
    cfg = UNetConfig.small()
    torch.manual_seed(0)
    model = UNetModel(cfg).train()
    g = torch.Generator().manual_seed(4)
    x, eps = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    context, t = torch.randn(64, 32, cfg.context_dim, generator=g), torch.randint(0, 1000, (64,), generator=g)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t, context), eps).backward()
        opt.step()

    return step


def vae_step(channels_last: bool, fused: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig.small()).train()
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        r = model(x, sample_posterior=True)[0]
        ((r - x).abs().mean() + (r - x).pow(2).mean()).backward()
        opt.step()

    return step


def training(rounds: int = 6) -> None:
    """The three variants of each step called in turn, ``rounds`` times after two warm-up
    rounds, so that a change in the machine's load hits all of them alike; medians."""
    variants = {"plain": (False, False), "channels-last": (True, False), "fused AdamW": (False, True)}
    for name, make in (("small U-Net, batch 64", unet_step), ("small VAE, batch 32", vae_step)):
        steps = {label: make(*flags) for label, flags in variants.items()}
        times: dict[str, list[float]] = {label: [] for label in steps}
        for r in range(rounds + 2):
            for label, step in steps.items():
                t0 = time.perf_counter()
                step()
                if r >= 2:
                    times[label].append(time.perf_counter() - t0)
        med = {label: sorted(ts)[len(ts) // 2] for label, ts in times.items()}
        print(f"train {name}: " + ", ".join(f"{k} {v:.3f} s ({v / med['plain']:.2f}x)" for k, v in med.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    kernels()
    training()


if __name__ == "__main__":
    main()
