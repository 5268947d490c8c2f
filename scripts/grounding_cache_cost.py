"""Where the time of building a grounded latent cache goes (docs/training.md, "On a GPU").

    python scripts/grounding_cache_cost.py [-n 2000] [--workers 2] [--model PATH]

Renders ``n`` shapes-world scenes in ``workers`` processes (``ShapesSource.prefill``), then
builds the U-Net stage's latent cache with grounding from the model's (default: the default
model's) VAE, text encoder and tokenizer under cProfile, and prints the time per scene of the rendering and of
``grounding_targets`` (which runs in the main process), and the cache's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from opensd.checkpoints import load_model
from opensd.defaults import resolve_model
from opensd.pipelines.conditioning import Conditioner
from opensd.shapes.source import ShapesSource
from opensd.training.config import DataConfig
from opensd.training.data import build_latent_cache
from opensd.training.unet import caption_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="scenes (default 2000)")
    ap.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    ap.add_argument("--model", default=None, help="the model whose VAE and text encoder encode (default: the default model)")
    args = ap.parse_args()
    loaded = load_model(resolve_model(args.model))
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    encode = caption_encoder(Conditioner(model, tokenizer, budget=None), tokenizer)  # what the U-Net stage caches
    source = ShapesSource(DataConfig(image_size=model.cfg.image_size))
    t0 = time.perf_counter()
    source.prefill(args.n, args.workers)
    render = time.perf_counter() - t0
    print(f"rendering: {render:.2f} s for {args.n} scenes in {args.workers} processes, "
          f"{1000 * render * args.workers / args.n:.2f} ms per scene per process")
    profile = cProfile.Profile()
    with torch.no_grad():
        profile.runcall(build_latent_cache, source, args.n, model.vae, encode, tokenizer, batch_size=512,
                        grounding=True)
    stats = pstats.Stats(profile)
    targets = next(v[3] for k, v in stats.stats.items() if k[2] == "grounding_targets")  # cumulative time
    print(f"grounding_targets: {targets:.2f} s, {1000 * targets / args.n:.2f} ms per scene (main process)")
    stats.sort_stats("cumulative").print_stats(12)


if __name__ == "__main__":
    main()
