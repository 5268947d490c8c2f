"""Decode time: the full VAE against the tiny autoencoder (TAESD), side by side in one run.

    PYTHONPATH=src python benchmarks/decode.py [--cases default,sd15] [--threads 1] [--repeats 5] [--json out/decode.json]

Cases (each times the full decode and the tiny decode of the same diffusion latents,
interleaved full, tiny, full, tiny, ... after one warm-up call of each):

- ``default``: the default model (``models/opensd-shapes``, or ``-m MODEL``) through its
  pipeline: ``decode_latents(latents)`` against ``decode_latents(latents, decoder="tiny")``,
  a batch of ``--batch`` 8x8x4 latents (32 px images), with the model's own tiny
  autoencoder (random weights of the ``shapes`` TAESD where the model has none);
- ``sd15``: SD 1.5's VAE (``VAEConfig.sd15()``, 83.7 M parameters) against TAESD
  (``TinyAutoencoderConfig.sd()``), random weights, one 64x64x4 latent (a 512 px image).

Each row gives the median of each side and ``full / tiny``, the tiny decoder's speed-up.
Absolute times on a shared machine are noise; the ratio of one run is the number to quote,
with the machine's CPU flags, which the output lists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_flags, cpu_model, versions  # noqa: E402


def _time(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def interleaved(full: Callable, tiny: Callable, repeats: int, device: torch.device) -> dict:
    """Warm both up once, then time full, tiny, full, tiny, ... ``repeats`` times each."""
    _time(full, device), _time(tiny, device)
    times: dict[str, list[float]] = {"full": [], "tiny": []}
    for _ in range(repeats):
        times["full"].append(_time(full, device))
        times["tiny"].append(_time(tiny, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"full_median_s": med["full"], "tiny_median_s": med["tiny"], "speedup_full_over_tiny": med["full"] / med["tiny"],
            "full_times_s": times["full"], "tiny_times_s": times["tiny"]}


def case_default(args, device: torch.device) -> dict:
    import opensd
    from opensd.defaults import resolve_model
    from opensd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig

    pipe = opensd.load(resolve_model(args.model), device=device)
    trained = pipe.tiny_vae is not None
    if not trained:
        pipe.tiny_vae = TinyAutoencoder(TinyAutoencoderConfig.shapes()).eval().to(device)
    f, size = pipe.cfg.vae.downsample_factor, pipe.cfg.image_size
    z = torch.randn(args.batch, pipe.cfg.vae.embed_dim, size // f, size // f, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        row = interleaved(lambda: pipe.decode_latents(z), lambda: pipe.decode_latents(z, decoder="tiny"), args.repeats, device)
    params = {"full": sum(p.numel() for p in pipe.model.vae.decoder.parameters()) + sum(p.numel() for p in pipe.model.vae.post_quant_conv.parameters()),
              "tiny": sum(p.numel() for p in pipe.tiny_vae.decoder.parameters())}
    return {"case": "default", "what": f"{args.batch} x {size} px, the default model's VAE decoder vs its tiny decoder"
            f" ({'trained' if trained else 'random weights'})", "decoder_parameters": params, **row}


def case_sd15(args, device: torch.device) -> dict:
    from opensd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
    from opensd.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.sd15()).eval().to(device)
    tiny = TinyAutoencoder(TinyAutoencoderConfig.sd()).eval().to(device)
    latent = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        row = interleaved(lambda: vae.decode(vae.from_latent(latent)), lambda: tiny.decode(tiny.from_latent(latent)),
                          args.repeats, device)
    params = {"full": sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters()),
              "tiny": sum(p.numel() for p in tiny.decoder.parameters())}
    return {"case": "sd15", "what": "1 x 512 px, SD 1.5's VAE decoder vs TAESD's decoder (random weights)",
            "decoder_parameters": params, **row}


CASES = {"default": case_default, "sd15": case_sd15}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="default,sd15")
    ap.add_argument("-m", "--model", default=None, help="the model of the default case (default: the default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="images per call in the default case")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    machine = {"date": date.today().isoformat(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads,
               "device": str(device), **versions()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    print("#", json.dumps(machine))
    rows = []
    for name in names:
        row = CASES[name](args, device)
        rows.append(row)
        print(f"{row['case']:8s} full {row['full_median_s'] * 1e3:9.1f} ms   tiny {row['tiny_median_s'] * 1e3:8.1f} ms   "
              f"full/tiny {row['speedup_full_over_tiny']:6.1f}x   ({row['what']})", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
