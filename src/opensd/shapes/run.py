"""Generate images for a prompt suite and score them exactly: ``opensd eval``.

For every prompt of the suite, ``images_per_prompt`` images are made with consecutive
seeds (prompt ``i`` starts at ``seed + 1000 i``) and judged by :mod:`opensd.shapes.scorer`.
Results are a JSON-able dict: the settings, the model, GenEval-style per-category
accuracy and the overall mean, and one record per image with the scorer's reason.

``networks`` (a LoRA's deltas, :mod:`opensd.pipelines.networks`) are active for the whole
run, text encoding included; ``Suite.CONCEPT`` scores :func:`opensd.shapes.concept.concept_suite`
of ``EvalConfig.concept``.

The scorer only measures. It never guides sampling or picks checkpoints on the
benchmark suite; selection uses :func:`opensd.shapes.suites.validation_suite`.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from opensd.errors import OpenSDError
from opensd.shapes.scorer import judge
from opensd.shapes.suites import (
    IMAGES_PER_PROMPT,
    BenchmarkPrompt,
    accuracy_by_category,
    benchmark_suite,
    geneval_overall,
    holdout_suite,
    validation_suite,
)
from opensd.shapes.world import World


class Suite(enum.Enum):
    BENCHMARK = "benchmark"
    VALIDATION = "validation"
    HOLDOUT = "holdout"
    CONCEPT = "concept"


SUITES: dict[Suite, Callable[[World], tuple[BenchmarkPrompt, ...]]] = {
    Suite.BENCHMARK: lambda world: benchmark_suite(world=world),
    Suite.VALIDATION: lambda world: validation_suite(world=world),
    Suite.HOLDOUT: lambda world: holdout_suite(world=world),
}


@dataclass(frozen=True)
class EvalConfig:
    suite: Suite = Suite.BENCHMARK
    steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg_scale: float = 7.5
    negative_prompt: str = ""
    images_per_prompt: int = IMAGES_PER_PROMPT
    per_category: int | None = None  # first N prompts of each category (None: all)
    seed: int = 0
    batch_size: int = 16  # images per network call: several prompts share one (same seeds, same images)
    concept: str | None = None  # Suite.CONCEPT's concept (opensd.shapes.concept.CONCEPTS), e.g. "orange-circle"
    decoder: str = "full"  # the final decode: "full" (the VAE) or "tiny" (the model's TAESD), opensd.pipelines.decoders
    world: World = World.RICH  # the suite's world: RICH is CLASSIC's prompts, unchanged and first, and the rich categories

    def __post_init__(self) -> None:
        if not isinstance(self.world, World):
            raise OpenSDError(f"world must be one of {', '.join(World)}, got {self.world!r}")
        if not isinstance(self.images_per_prompt, int) or self.images_per_prompt < 1:
            raise OpenSDError(f"images_per_prompt must be an integer >= 1, got {self.images_per_prompt!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OpenSDError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.per_category is not None and self.per_category < 1:
            raise OpenSDError(f"per_category must be >= 1, got {self.per_category}")
        if (self.suite is Suite.CONCEPT) != (self.concept is not None):
            raise OpenSDError("a concept goes with the concept suite and only with it (suite concept:NAME)")
        from opensd.pipelines.decoders import Decoder

        Decoder.parse(self.decoder)


class Generator(Protocol):
    """What eval needs of a pipeline (StableDiffusionPipeline fits)."""

    def txt2img(self, prompt: str, negative_prompt: str = "", **kw: Any) -> list[Image.Image]: ...


def select_prompts(cfg: EvalConfig) -> list[BenchmarkPrompt]:
    if cfg.suite is Suite.CONCEPT:
        from opensd.shapes.concept import concept_suite

        prompts = list(concept_suite(cfg.concept))
    else:
        prompts = list(SUITES[cfg.suite](cfg.world))
    if cfg.per_category is None:
        return prompts
    taken: dict[str, int] = {}
    out = []
    for p in prompts:
        if taken.get(p.category, 0) < cfg.per_category:
            taken[p.category] = taken.get(p.category, 0) + 1
            out.append(p)
    return out


def _can_share_batches(pipe: Any, cfg: EvalConfig) -> bool:
    """Whether several prompts can share a network call and still give the images each
    prompt gets alone: a full pipeline (prompt encoder, model config) and a sampler that
    draws no fresh noise per step (a stochastic one seeds its noise from the batch's first seed)."""
    if cfg.batch_size <= cfg.images_per_prompt or not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "cfg"):
        return False
    from opensd.diffusion.registry import resolve_sampler

    return not resolve_sampler(cfg.sampler)[0].stochastic


def _generate(
    pipe: Any, cfg: EvalConfig, chunk: list[tuple[int, BenchmarkPrompt]], networks: Any = None
) -> list[list[Image.Image]]:
    """Images of each ``(index, prompt)`` in ``chunk``: prompt ``i`` uses seeds ``seed + 1000 i + j``.

    One prompt: a plain ``txt2img``. Several: one call with each row's text embedding (for
    SDXL families its context and pooled embedding) and its own seeded initial noise, so every image equals the one its prompt gets alone (up
    to float rounding in batched kernels).
    """
    n = cfg.images_per_prompt
    kw: dict[str, Any] = dict(steps=cfg.steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale)
    if cfg.decoder != "full":  # only then: any Generator takes the plain call
        kw["decoder"] = cfg.decoder
    if networks:
        kw["networks"] = networks
    if len(chunk) == 1:
        i, p = chunk[0]
        return [pipe.txt2img(p.text, cfg.negative_prompt, seed=cfg.seed + 1000 * i, batch_size=n, **kw)]
    import torch

    from opensd.models.adapters import use_adapters

    mc = pipe.cfg
    side = mc.image_size // mc.vae.downsample_factor
    with torch.inference_mode(), use_adapters(networks.adapters if networks else None):
        rows = [_text_embeds(pipe, p.text) for _, p in chunk]  # each {"context": (1, L, D)[, "pooled": (1, P)]}
        negative = _text_embeds(pipe, cfg.negative_prompt)
    if len({r["context"].shape for r in rows + [negative]}) > 1:  # prompts of different chunk counts: one call each
        return [_generate(pipe, cfg, [item], networks)[0] for item in chunk]
    embeds = {k: torch.cat([r[k].expand(n, *r[k].shape[1:]) for r in rows]) for k in rows[0]}  # (B, L, D), (B, P)
    if "pooled" in negative and cfg.negative_prompt == "":
        negative_embeds = None  # SDXL zeroes an empty negative prompt (as txt2img alone does); given embeds it would not
    else:
        negative_embeds = _as_embeds(negative)
    seeds = [cfg.seed + 1000 * i + j for i, _ in chunk for j in range(n)]
    noise = torch.cat([torch.randn((1, mc.vae.embed_dim, side, side), generator=torch.Generator("cpu").manual_seed(s))
                       for s in seeds])  # (B, C, h, w): what txt2img draws for each seed
    images = pipe.txt2img(chunk[0][1].text, cfg.negative_prompt, seed=seeds[0], batch_size=len(seeds), latents=noise,
                          prompt_embeds=_as_embeds(embeds), negative_embeds=negative_embeds, **kw)
    return [images[k * n:(k + 1) * n] for k in range(len(chunk))]


def _text_embeds(pipe: Any, text: str) -> dict:
    """``{"context": (1, L, D)}`` of ``text`` (``pipe.encode_prompt``), and for families
    with a pooled text embedding (SDXL) ``"pooled": (1, P)`` too (the pipeline's conditioner)."""
    if getattr(pipe.cfg, "pooled_dim", None) is None or not hasattr(pipe, "conditioner"):
        return {"context": pipe.encode_prompt([text])}
    encoded = pipe.conditioner.encode([text])
    return {"context": encoded.context, "pooled": encoded.pooled}


def _as_embeds(parts: dict) -> Any:
    """What ``txt2img(prompt_embeds=...)`` takes: the bare context, or the dict for SDXL families."""
    return parts["context"] if set(parts) == {"context"} else parts


def evaluate(
    pipe: Generator,
    cfg: EvalConfig,
    *,
    model_info: dict[str, str] | None = None,
    on_image: Callable[[int, int], None] | None = None,
    keep_images: Callable[[dict], bool] | None = None,
    distribution: bool = False,
    networks: Any = None,
) -> tuple[dict, list[tuple[Image.Image, dict]]]:
    """Generate and score. Returns ``(results, kept)``: ``kept`` holds ``(image, record)``
    for the records ``keep_images`` accepts (by default the failures). ``distribution``
    adds ``results["distribution"]`` (:func:`distribution_metrics`). ``networks``: a
    :class:`~opensd.pipelines.networks.RequestNetworks` given to every generation."""
    keep_images = keep_images or (lambda rec: not rec["correct"])
    prompts = select_prompts(cfg)
    total = len(prompts) * cfg.images_per_prompt
    records: list[dict] = []
    kept: list[tuple[Image.Image, dict]] = []
    every: list[Image.Image] = []
    start = time.time()
    per_call = max(1, cfg.batch_size // cfg.images_per_prompt) if _can_share_batches(pipe, cfg) else 1
    for first in range(0, len(prompts), per_call):
        chunk = list(enumerate(prompts[first:first + per_call], start=first))
        for (i, p), images in zip(chunk, _generate(pipe, cfg, chunk, networks), strict=False):
            for j, im in enumerate(images):
                verdict = judge(im, p.spec)
                rec = {
                    "prompt": p.text, "category": p.category, "seed": cfg.seed + 1000 * i + j,
                    "correct": verdict.correct, "reason": verdict.reason,
                }
                records.append(rec)
                if distribution:
                    every.append(im)
                if keep_images(rec):
                    kept.append((im, rec))
                if on_image is not None:
                    on_image(len(records), total)
    accuracy, n = accuracy_by_category(records)
    results = {
        "config": {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(cfg).items()},
        "model": model_info or {},
        "overall": sum(accuracy.values()) / len(accuracy),
        "overall_geneval": geneval_overall(accuracy),
        "accuracy": accuracy,
        "n": n,
        "prompts": len(prompts),
        "seconds": round(time.time() - start, 1),
        "items": records,
    }
    if distribution:
        results["distribution"] = distribution_metrics(every, prompts, cfg)
    return results, kept


def distribution_metrics(images: list[Image.Image], prompts: list[BenchmarkPrompt], cfg: EvalConfig) -> dict:
    """Fréchet distance, k-NN precision/recall and memorization of ``images`` (one per
    (prompt, seed) in order), against ground-truth renders of the same prompts and next to the
    real-vs-real baseline (:func:`opensd.shapes.distribution.distribution_report`). The
    training reference is the shapes world the trainer draws from (seed 0)."""
    import random

    from opensd.shapes.dataset import ShapesDataset
    from opensd.shapes.distribution import distribution_report
    from opensd.shapes.world import realize, render

    size = images[0].size[0]
    reference = [
        render(realize(p.spec, random.Random(f"reference:{r}:{i}:{j}"), size))
        for r in range(2)
        for i, p in enumerate(prompts)
        for j in range(cfg.images_per_prompt)
    ]
    train = [s.image for s in ShapesDataset(seed=0, image_size=size).take(len(images))]
    return distribution_report(images, reference, train)


def write_results(results: dict, kept: list[tuple[Image.Image, dict]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``accuracy.png`` and ``failures.png`` into ``out_dir``."""
    from opensd.shapes.report import bar_plot, failure_grid, markdown_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md", "plot": out / "accuracy.png"}
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    bar_plot(results, paths["plot"])
    if kept:
        paths["failures"] = out / "failures.png"
        failure_grid(kept, paths["failures"])
    paths["report"].write_text(markdown_report(results, paths))
    return paths
