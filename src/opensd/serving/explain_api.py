"""``POST /opensd/v1/explain``: one generation with its word attention maps and denoising path.

The server side of :mod:`opensd.explain` (what ``opensd explain`` writes to a folder):
the image, one heatmap overlay per word of the prompt (DAAM, Tang et al. 2022: the
cross-attention each word got, summed over heads, layers and steps, normalized to its
maximum) and the denoising path strip (current latent above, predicted x0 below, at
the steps ``path_steps``), all as base64 PNGs. ``raw=true`` adds the maps as numbers.
With a segmenter (``segmenter="auto"``, the default: the model folder's
``segmenter.safetensors`` when it has one; :mod:`opensd.serving.segmenters`) the answer's
``segmentation`` adds, as ``opensd explain --segmenter`` does, the segmenter's probability map
of each shape class and, per shape word of the prompt, how much of its attention lies inside
the segmenter's region for its shape (:mod:`opensd.explain.segmentation`); without one,
``segmentation`` is null and ``segmentation_reason`` says why.

The request is checked as ``/sdapi/v1/txt2img`` checks one (the same sampler names,
limits, prompt and work budgets, size rules and ``override_settings``, through
:func:`opensd.serving.a1111.plan_generation`) once it holds a place in the generation
queue (a full queue answers 429 before the prompt is parsed), and then runs like any
generation: it waits its turn, counts against ``max_queue``, shows in
``/sdapi/v1/progress``, stops on ``/sdapi/v1/interrupt``, on the wall-time limit and
when its client goes away. Auth and the body limit are the app's middleware, as for
every route. Every model family is explained the same way: the maps are the U-Net's
cross-attention over the prompt's context (SDXL: one position per token, its CLIP-L and
bigG features side by side; its ``y`` vector has no tokens and no map).

Capture (:mod:`opensd.models.capture`) records only the U-Net calls of the worker thread
that runs the explain job, and sets nothing on the shared U-Net: explain jobs and
generations run side by side on ``--workers`` threads like any others, and neither
changes what the other records or draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Request
from pydantic import AliasChoices, BaseModel, Field, StrictInt

from opensd.explain import (
    AttentionCollector,
    AttentionResult,
    ExplainError,
    PathError,
    PathRecorder,
    build_result,
    compare_with_attention,
)
from opensd.explain.path import path_from_recorder
from opensd.explain.render import RenderError, heatmap_overlay
from opensd.explain.segmentation import AUTO, THRESHOLD
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import GenerationRequest
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline, StepInfo
from opensd.prompts.syntax import context_length, tokenize_prompt
from opensd.serving.a1111 import plan_generation
from opensd.serving.codec import encode_png
from opensd.serving.errors import ApiError
from opensd.serving.queue import Job
from opensd.serving.schemas import Txt2ImgRequest, _Lenient
from opensd.serving.segmenters import SegmenterChoice, check_choice, choose
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/opensd/v1", tags=["opensd"])

MAX_WORDS = 75  # overlays in one answer (one CLIP chunk of one-token words)
MAX_PATH_STEPS = 16  # denoising-path columns in one answer (two VAE decodes each)
DEFAULT_PATH_STEPS = 8  # columns when path_steps is omitted: evenly spaced, ending at the last step
PATH_PANEL = 96  # the strip's panels are enlarged (integer factor) to at least this many pixels


# ---------------------------------------------------------------- bodies


class ExplainRequest(_Lenient):
    """What to generate and explain; fields and defaults as ``/sdapi/v1/txt2img`` where they overlap."""

    prompt: str = Field("", description="What to draw; each of its words gets a heatmap.")
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1 picks a random seed; the answer says which one ran.")
    sampler_name: str | None = Field(
        None, validation_alias=AliasChoices("sampler_name", "sampler"),
        description="An A1111 name ('DPM++ 2M', 'Euler a') or an opensd id (also accepted as 'sampler'). Default 'DPM++ 2M'.",
    )
    scheduler: str | None = Field(None, description="'Automatic', 'Karras' or 'Exponential'.")
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="Default: the model's native size.")
    height: int | None = Field(None, description="Default: the model's native size.")
    path_steps: list[StrictInt] | None = Field(
        None, description=f"1-based steps shown in the denoising strip (at most {MAX_PATH_STEPS}); "
        f"default: {DEFAULT_PATH_STEPS} evenly spaced, ending at the last step.",
    )
    raw: bool = Field(False, description="Also return the attention maps (and the segmenter's) as nested lists of numbers.")
    segmenter: str = Field(
        AUTO, description="'auto': the model folder's segmenter.safetensors, if it has one, beside the shape words' "
        "maps (none if it has none: segmentation is then null, with the reason); 'none': no segmenter. "
        "No path: the server reads only segmenters beside its models.",
    )
    override_settings: dict[str, Any] | None = Field(
        None, description="Per-request options: sd_model_checkpoint, CLIP_stop_at_last_layers."
    )


class RawMaps(BaseModel):
    """The maps as numbers, at latent resolution (h, w) = (height, width) / the VAE's factor."""

    tokens: list[str] = Field(description="One label per context position: '<bos>', word pieces, '<eos>', '<pad>'.")
    token_words: list[int] = Field(description="The word (index into words) of each context position; -1 for none.")
    token_maps: list[list[list[float]]] = Field(
        description="(L, h, w): mean attention probability per context position; sums to 1 over L at every pixel."
    )
    word_maps: list[list[list[float]]] = Field(
        description="(n_words, h, w): token_maps summed over each word's tokens (the overlays before upsampling)."
    )


class ShapeAgreementOut(BaseModel):
    """One shape word of the prompt against the segmenter's region for its shape (its most probable class)."""

    word: str = Field(description="The prompt's word (the shape's name or its plural).")
    shape: str = Field(description="The segmenter's class it names.")
    inside: float = Field(description="The share of the word's attention mass inside the region (0 when there is none).")
    area: float = Field(description="The region's share of the image: what a flat map would score.")
    iou: float = Field(description="IoU of the region and the word's map cut at threshold times its maximum.")


class SegmentationOut(BaseModel):
    """The segmenter's reading of the generated image (as ``opensd explain --segmenter``)."""

    classes: list[str] = Field(description="The segmenter's classes, class id = position, background first.")
    maps: list[str] = Field(description="Base64 PNGs the size of the image: each shape class's (classes[1:]) probability "
                            "over the image, as is (1 = certain; not normalized to its maximum).")
    class_map: str = Field(description="Base64 PNG: the most probable class per pixel (background white, then red, green, blue, ...).")
    agreements: list[ShapeAgreementOut] = Field(description="One per shape class a word of the prompt names, in class order.")
    threshold: float = Field(description="The fraction of a word map's maximum at which it is cut for iou.")
    probabilities: list[list[list[float]]] | None = Field(
        None, description="With raw=true: (n_classes, height, width), each pixel's class probabilities (sum 1)."
    )


class ExplainResponse(BaseModel):
    image: str = Field(description="Base64 PNG of the generated image, with its infotext.")
    info: str = Field(description="The infotext (A1111's 'parameters').")
    seed: int
    width: int
    height: int
    words: list[str] = Field(description="The prompt's words, syntax removed; one overlay each, in order.")
    overlays: list[str] = Field(description="Base64 PNGs the size of the image: each word's attention over the image.")
    path: str | None = Field(description="Base64 PNG strip: current latent (top row) and predicted x0 (bottom) per step.")
    path_steps: list[int] = Field(description="The steps shown in the strip, left to right.")
    path_sigmas: list[float] = Field(description="The noise level at each of those steps.")
    interrupted: bool = Field(description="True when /sdapi/v1/interrupt stopped sampling early.")
    warnings: list[str] = Field(default_factory=list, description="What to know about the result (e.g. clip skip has no effect).")
    raw: RawMaps | None = None
    segmentation: SegmentationOut | None = Field(None, description="The segmenter's maps and numbers; null without one.")
    segmentation_reason: str | None = Field(None, description="Why segmentation is null; null when it is not.")


# ---------------------------------------------------------------- planning


@dataclass
class ExplainPlan:
    """A checked explain request, ready for the queue."""

    pipeline: StableDiffusionPipeline
    request: GenerationRequest
    words: list[str]
    path_steps: list[int]
    networks: RequestNetworks | None = None  # the prompt's <lora:...> tags, bound (as txt2img)
    segmenter: SegmenterChoice = SegmenterChoice(None, "no segmenter was asked for")


def default_path_steps(steps: int, n: int = DEFAULT_PATH_STEPS) -> list[int]:
    """``n`` steps spread evenly over 1..``steps``, the last one included (all of them when ``steps <= n``)."""
    return sorted({-(-k * steps // n) for k in range(1, n + 1)}) if steps > n else list(range(1, steps + 1))


def _path_steps(asked: list[int] | None, steps: int) -> list[int]:
    if asked is None:
        return default_path_steps(steps)
    if not asked:
        raise ApiError(422, f"path_steps is empty; list step numbers from 1 to {steps}, or omit it", param="path_steps")
    bad = [s for s in asked if not 1 <= s <= steps]
    if bad:
        raise ApiError(422, f"path_steps must be step numbers from 1 to {steps} (the request's steps), got {bad}", param="path_steps")
    chosen = sorted(set(asked))
    if len(chosen) > MAX_PATH_STEPS:
        raise ApiError(422, f"path_steps lists {len(chosen)} steps; at most {MAX_PATH_STEPS} are shown", param="path_steps")
    return chosen


def plan_explain(st: ServerState, body: ExplainRequest) -> ExplainPlan:
    """Check everything in ``body`` (raise a 4xx :class:`ApiError` on the first problem) and pick the model."""
    if not body.prompt.strip():
        raise ApiError(422, "prompt is empty; explain maps each word of the prompt, so give at least one word", param="prompt")
    segmenter = check_choice(body.segmenter)
    txt2img = Txt2ImgRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed,
        sampler_name=body.sampler_name or "DPM++ 2M", scheduler=body.scheduler, steps=body.steps,
        cfg_scale=body.cfg_scale, width=body.width, height=body.height, override_settings=body.override_settings,
    )
    try:
        plan = plan_generation(st, txt2img)  # sampler, limits, size, seed, model: as txt2img
    except ApiError as e:
        if e.status != 404:
            raise
        raise ApiError(422, e.detail, param=e.param) from None  # an unknown sampler or model is bad input here (A1111 says 404)
    req = plan.requests[0]
    pipe = plan.pipeline
    if plan.networks is not None and plan.networks.embeddings:
        names = ", ".join(sorted(plan.networks.embeddings))
        raise ApiError(422, f"explain maps the prompt's words and cannot map embeddings ({names}); use the words", param="prompt")
    try:
        words = tokenize_prompt(pipe.tokenizer, req.prompt, context_length(pipe.tokenizer, pipe.model.text_encoder)).words
    except ValueError as e:
        raise ApiError(422, f"prompt: {e}", param="prompt") from None
    if not words:
        raise ApiError(422, f"prompt {req.prompt!r} has no words once its syntax is removed; nothing to map", param="prompt")
    if len(words) > MAX_WORDS:
        raise ApiError(422, f"prompt has {len(words)} words; explain maps at most {MAX_WORDS}", param="prompt")
    steps = _path_steps(body.path_steps, req.steps)
    seg = choose(st.segmenters, segmenter, pipe.loaded.path, pipe.loaded.name)  # loaded once per model, then cached
    return ExplainPlan(pipe, req, list(words), steps, plan.networks, seg)


# ---------------------------------------------------------------- running


def _numbers(t: torch.Tensor) -> list:
    """Nested lists of floats rounded to 6 decimals (short JSON)."""
    return t.double().round(decimals=6).tolist()


def _raw(attn: AttentionResult) -> dict:
    per_token = attn.per_token_maps  # (L, h, w)
    keep = attn.token_words >= 0
    word_maps = torch.zeros(len(attn.words), *per_token.shape[1:])
    word_maps.index_add_(0, attn.token_words[keep], per_token[keep])  # (n_words, h, w)
    return {
        "tokens": attn.tokens,
        "token_words": attn.token_words.tolist(),
        "token_maps": _numbers(per_token),
        "word_maps": _numbers(word_maps),
    }


def _segmentation(choice: SegmenterChoice, attn: AttentionResult, raw: bool) -> tuple[dict | None, str | None]:
    """(the answer's segmentation, its reason): the segmenter's maps beside ``attn``'s, or why there are none."""
    if choice.segmenter is None:
        return None, choice.reason
    try:
        view = compare_with_attention(attn, *choice.segmenter)  # one forward of the small U-Net, on the CPU
    except ExplainError as e:  # a segmenter that cannot read this image: no error for the explanation
        return None, f"the segmenter cannot read this image: {e}"
    return {
        "classes": list(view.classes),
        "maps": [encode_png(m) for m in view.shape_overlays()],
        "class_map": encode_png(view.class_map()),
        "agreements": [a.as_dict() for a in view.agreements],
        "threshold": THRESHOLD,
        "probabilities": _numbers(view.probabilities) if raw else None,
    }, None


def run_explain(job: Job, plan: ExplainPlan, *, raw: bool = False) -> dict:
    """The worker body: generate while recording attention and the path, then render the answer."""
    pipe, req = plan.pipeline, plan.request
    job.pipeline = pipe
    job.next_batch(0)
    recorder = PathRecorder(plan.path_steps)

    def step(info: StepInfo) -> bool:
        recorder(info)
        return job.callback(info)  # progress, and False on /interrupt

    f = pipe.cfg.vae.downsample_factor
    try:
        with AttentionCollector(pipe.model.unet, (req.height // f, req.width // f)) as collector:
            result = pipe.generate(req, callback=step, should_stop=job.should_stop, networks=plan.networks)
        image = result.images[0]
        attn = build_result(pipe, req.prompt, image, collector)
        path = path_from_recorder(pipe, recorder, image) if recorder.steps else None
        overlays = [encode_png(heatmap_overlay(image, m)) for m in attn.maps]  # each (H, W), normalized to its max
        strip = encode_png(path.strip(PATH_PANEL)) if path is not None else None
    except (ExplainError, PathError, RenderError) as e:
        raise ApiError(422, str(e)) from None
    segmentation, reason = _segmentation(plan.segmenter, attn, raw)
    return {
        "image": encode_png(image, result.infotexts[0]),
        "info": result.infotexts[0],
        "seed": result.seeds[0],
        "width": req.width,
        "height": req.height,
        "words": attn.words,
        "overlays": overlays,
        "path": strip,
        "path_steps": path.steps if path is not None else [],
        "path_sigmas": path.sigmas if path is not None else [],
        "interrupted": result.interrupted,
        "warnings": result.warnings,
        "raw": _raw(attn) if raw else None,
        "segmentation": segmentation,
        "segmentation_reason": reason,
    }


@router.post("/explain", response_model=ExplainResponse, summary="Generate one image with its word attention maps and denoising path")
async def explain(body: ExplainRequest, request: Request) -> dict:
    st = server_state(request)
    job = Job("explain", max_seconds=st.limits.max_seconds)
    return await st.queue.submit(
        job, lambda j, plan: run_explain(j, plan, raw=body.raw), prepare=lambda: plan_explain(st, body),
        disconnected=request.is_disconnected,
    )
