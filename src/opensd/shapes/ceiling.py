"""The autoencoder's ceiling: a suite's ground-truth scenes through the model's VAE, scored.

Every image a latent diffusion model makes passes through its decoder. When the
autoencoder cannot carry a scene (encode a true render, decode it, and the scorer no
longer reads it as true), no denoiser, LoRA or sampler can draw that scene either: the
round trip's score is an upper bound on what generation can reach through this decoder
(Rombach et al. 2022 give the autoencoder's reconstruction error the same role).

:func:`autoencoder_ceiling` renders one true scene per prompt of an eval suite
(:func:`opensd.shapes.suites.ground_truth_images`, at the model's native size, unstated
colours avoiding what the suite keeps out), encodes each to its posterior mean, decodes
it and scores the decoded image against its prompt. ``opensd eval --autoencoder`` runs it;
with ``--decoder tiny`` the decode is the model's tiny autoencoder's (TAESD, on the diffusion
latent ``vae.to_latent(mean)``, as the pipeline's ``decoder="tiny"`` decodes): that decoder's ceiling.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from opensd.pipelines.images import to_pil, to_tensor
from opensd.shapes.run import EvalConfig, Suite, select_prompts
from opensd.shapes.scorer import judge
from opensd.shapes.suites import BenchmarkPrompt, accuracy_by_category, geneval_overall, ground_truth_images
from opensd.shapes.world import DEFAULT_HOLDOUT, Holdout


def ground_truth_holdout(cfg: EvalConfig) -> Holdout | None:
    """What the suite's true scenes keep out of their unstated colours: the concept's
    other held-out pairs, nothing for the holdout suite, else the default holdout."""
    if cfg.suite is Suite.CONCEPT:
        from opensd.shapes.concept import concept_by_name

        return concept_by_name(str(cfg.concept)).others
    return None if cfg.suite is Suite.HOLDOUT else DEFAULT_HOLDOUT


@torch.no_grad()
def round_trip(vae: Any, images: list, batch_size: int = 16, tiny: Any = None) -> list:
    """PIL images -> the VAE's posterior mean -> decoded PIL images (same size); with ``tiny``
    (a :class:`~opensd.models.taesd.TinyAutoencoder`) decoded by it instead of the VAE."""
    from opensd.pipelines.decoders import decode_tiny

    out = []
    param = next(vae.parameters())
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        w, h = chunk[0].size
        x = torch.cat([to_tensor(im, w, h) for im in chunk]).to(param.device, param.dtype)  # (B, 3, H, W)
        mean = vae.encode(x).mean
        out += to_pil(vae.decode(mean) if tiny is None else decode_tiny(tiny, vae.to_latent(mean)))
    return out


def autoencoder_ceiling(pipe: Any, cfg: EvalConfig, seed: int = 0) -> dict:
    """Score ``cfg``'s suite on its ground truth after ``pipe``'s VAE round trip.

    Returns a dict shaped as :func:`opensd.shapes.run.evaluate`'s results (``overall``,
    ``accuracy``, ``n``, ``items``), with ``"kind": "autoencoder_ceiling"``; one scene per
    prompt (``cfg.images_per_prompt`` is not used), scene ``i`` drawn from ``seed``.
    """
    prompts: list[BenchmarkPrompt] = select_prompts(cfg)
    size = pipe.cfg.image_size
    start = time.time()
    truth = ground_truth_images(prompts, size, seed=seed, holdout=ground_truth_holdout(cfg))
    tiny = None
    if cfg.decoder != "full":
        from opensd.pipelines.decoders import require_tiny

        tiny = require_tiny(pipe.tiny_vae)
    decoded = round_trip(pipe.model.vae, truth, tiny=tiny)
    records = []
    for p, im in zip(prompts, decoded, strict=False):
        verdict = judge(im, p.spec)
        records.append({"prompt": p.text, "category": p.category, "correct": verdict.correct, "reason": verdict.reason})
    accuracy, n = accuracy_by_category(records)
    return {
        "kind": "autoencoder_ceiling",
        "suite": cfg.suite.value if cfg.concept is None else f"concept:{cfg.concept}",
        "image_size": size,
        "decoder": cfg.decoder,
        "seed": seed,
        "overall": sum(accuracy.values()) / len(accuracy),
        "overall_geneval": geneval_overall(accuracy),
        "accuracy": accuracy,
        "n": n,
        "prompts": len(prompts),
        "seconds": round(time.time() - start, 1),
        "items": records,
    }
