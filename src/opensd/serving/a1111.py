"""AUTOMATIC1111's web-UI API, ``/sdapi/v1``, on opensd's pipeline.

A request first takes its place in the generation queue (a full queue answers 429 before
anything is parsed), then is *planned* (off the event loop): names resolved, sizes and
counts checked against :class:`Limits`, the prompts against the prompt budget, the
request's work against the work budget, images decoded, the model picked; every problem
becomes a 4xx before any generation work starts. The plan then runs on a worker, which
also encodes the response (base64 PNGs with their infotext, and A1111's ``info`` JSON).

Samplers are named as A1111 names them (``"DPM++ 2M"``, ``"Euler a"``; a ``" Karras"``
suffix still works) or by opensd id; ``scheduler`` (A1111 >= 1.9) picks the sigma
spacing: ``Automatic``, ``Karras`` or ``Exponential``. A suffix on the sampler name wins
over ``scheduler``, as in A1111.

Every model family draws here: an omitted width/height is the model's native size
(``cfg.image_size``: 512 SD 1.x, 768 SD 2.x 768-v, 512 SD 2.x base, 1024 SDXL), and
``refiner_checkpoint`` / ``refiner_switch_at`` hand the last steps to a refiner
(:mod:`opensd.serving.refiner`). SDXL's size conditioning is not in A1111's API: it is
the output size, as A1111 sends it. ``CLIP_stop_at_last_layers`` on a model whose text
layer is fixed (SD 2.x, SDXL) is no error: the result's warnings (``info["warnings"]``)
say it had no effect.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image, ImageOps

import opensd
from opensd.diffusion.registry import SamplerSpec, UnknownSamplerError, resolve_sampler
from opensd.diffusion.schedules import SigmaSpacing
from opensd.pipelines.control import with_control
from opensd.pipelines.infotext import parse_infotext, read_parameters
from opensd.pipelines.inpaint import MAX_MASK_BLUR, MAX_ONLY_MASKED_PADDING, InpaintMask, MaskedContent
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import SEED_RANGE, GenerationRequest, validate
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.prompts.budget import PromptBudgetError, check_prompt
from opensd.serving.codec import decode_image, encode_png
from opensd.serving.controlnet_api import control_units
from opensd.serving.embeddings import request_networks as embedding_networks
from opensd.serving.errors import ApiError
from opensd.serving.hires_api import HiresRequest, plan_hires_for
from opensd.serving.loras import request_networks as lora_networks
from opensd.serving.models import Checkpoint
from opensd.serving.queue import Job, run_batches
from opensd.serving.refiner import RefinerPlan, plan_refiner
from opensd.serving.schemas import (
    ImageResponse,
    Img2ImgRequest,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible"])

# (name, label, spacing, default_rho) as A1111 >= 1.9 lists them; only those opensd implements.
SCHEDULERS = (
    ("automatic", "Automatic", SigmaSpacing.DEFAULT, -1.0),
    ("karras", "Karras", SigmaSpacing.KARRAS, 7.0),
    ("exponential", "Exponential", SigmaSpacing.EXPONENTIAL, -1.0),
    ("sgm_uniform", "SGM Uniform", SigmaSpacing.SGM_UNIFORM, -1.0),  # SD-Turbo / SDXL-Turbo
)
_SUFFIX = {
    SigmaSpacing.DEFAULT: "", SigmaSpacing.KARRAS: "_karras", SigmaSpacing.EXPONENTIAL: "_exponential",
    SigmaSpacing.SGM_UNIFORM: "_sgm_uniform",
}
_LABEL = {spacing: label for _, label, spacing, _ in SCHEDULERS}

# Options GET /options reports but no client may change.


# ---------------------------------------------------------------- helpers


def resolve_a1111_sampler(sampler_name: str | None, sampler_index: str | None, scheduler: str | None) -> tuple[str, SamplerSpec, str]:
    """``(opensd sampler string, spec, schedule label)`` for A1111's sampler and scheduler fields."""
    name = sampler_name or sampler_index or "Euler"
    try:
        spec, spacing = resolve_sampler(name)
    except UnknownSamplerError as e:
        raise ApiError(404, f"Sampler not found: {e}", param="sampler_name") from None
    if scheduler is not None and scheduler.strip():
        key = scheduler.strip().lower()
        found = next((sp for n, label, sp, _ in SCHEDULERS if key in (n, label.lower())), None)
        if found is None:
            allowed = ", ".join(label for _, label, _, _ in SCHEDULERS)
            raise ApiError(422, f"unknown scheduler {scheduler!r}; allowed: {allowed}", param="scheduler")
        if spacing is SigmaSpacing.DEFAULT:
            spacing = found
    return spec.id + _SUFFIX[spacing], spec, _LABEL[spacing]


@dataclass
class Plan:
    """A checked request, ready for the queue."""

    pipeline: StableDiffusionPipeline
    requests: list[GenerationRequest]
    sampler: SamplerSpec
    schedule_label: str
    clip_skip: int
    init_image: Image.Image | None = None
    mask: InpaintMask | None = None
    refiner: RefinerPlan | None = None
    networks: RequestNetworks | None = None  # the LoRAs (<lora:...> tags, bound), embeddings and ControlNet units
    hires: HiresRequest | None = None  # txt2img's enable_hr


def _model_for(st: ServerState, overrides: dict[str, Any]) -> tuple[Checkpoint, StableDiffusionPipeline]:
    name = overrides.get("sd_model_checkpoint")
    if name is None:
        return st.registry.current_pair()
    ckpt: Checkpoint = st.registry.find(name)
    return ckpt, st.registry.get(ckpt)


A1111_CLIP_SKIP_MAX = 12  # A1111's slider; where clip skip has no effect (SD 2.x, SDXL) any of it is accepted


def clip_skip_option(st: ServerState, overrides: dict[str, Any], pipe: StableDiffusionPipeline) -> int:
    """The request's ``CLIP_stop_at_last_layers`` (override, else the option), checked for ``pipe``'s model."""
    value = overrides.get("CLIP_stop_at_last_layers", st.options["CLIP_stop_at_last_layers"])
    layers = pipe.cfg.text.layers
    if not pipe.conditioner.clip_skip_applies():
        layers = max(layers, A1111_CLIP_SKIP_MAX)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= layers:
        raise ApiError(422, f"CLIP_stop_at_last_layers must be an integer from 1 to {layers}, got {value!r}", param="CLIP_stop_at_last_layers")
    return value


DECODE_METHODS = ("Full", "TAESD")  # A1111's sd_vae_decode_method


def decoder_option(st: ServerState, overrides: dict[str, Any], pipe: StableDiffusionPipeline) -> str:
    """The request's final decode: A1111's ``sd_vae_decode_method`` (override, else the option);
    ``TAESD`` decodes with the model's tiny autoencoder where it has one, else with its VAE."""
    value = overrides.get("sd_vae_decode_method", st.options["sd_vae_decode_method"])
    if value not in DECODE_METHODS:
        raise ApiError(422, f"sd_vae_decode_method must be 'Full' or 'TAESD', got {value!r}", param="sd_vae_decode_method")
    return "tiny" if value == "TAESD" and pipe.tiny_vae is not None else "full"


def check_prompts(
    st: ServerState, pipe: StableDiffusionPipeline, prompt: str, negative_prompt: str, networks: RequestNetworks | None = None,
) -> None:
    """422 when the prompt or the negative prompt is over the server's prompt budget (bytes first, then tokens;
    an embedding of ``networks`` counts its vectors)."""
    budget = st.limits.prompt_budget
    counts = {name: ti.count for name, ti in networks.embeddings.items()} if networks is not None else None
    for what, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        try:
            check_prompt(text, pipe.tokenizer, budget, what=what, embeddings=counts)
        except PromptBudgetError as e:
            raise ApiError(422, f"{e} on this server (--max-prompt-bytes, --max-prompt-tokens)", kind="PromptTooLong", param=what) from None


def plan_generation(
    st: ServerState, body: Txt2ImgRequest, *, strength: float = 1.0, init_image: Image.Image | None = None,
    mask: InpaintMask | None = None,
) -> Plan:
    """Resolve and check everything in ``body``; raise a 4xx :class:`ApiError` on the first problem."""
    if body.script_name:
        raise ApiError(422, f"Script not found: {body.script_name!r} (opensd runs no scripts)", param="script_name")
    overrides = body.override_settings or {}
    if not isinstance(overrides, dict):
        raise ApiError(422, "override_settings must be an object", param="override_settings")
    sampler, spec, label = resolve_a1111_sampler(body.sampler_name, body.sampler_index, body.scheduler)
    ckpt, pipe = _model_for(st, overrides)
    clip_skip = clip_skip_option(st, overrides, pipe)
    decoder = decoder_option(st, overrides, pipe)
    refiner = plan_refiner(st.registry, body.refiner_checkpoint, body.refiner_switch_at, pipe, ckpt)
    if init_image is not None:  # the image's own size, rounded down to a multiple of 8
        default_w, default_h = (max(8, side // 8 * 8) for side in init_image.size)
    else:
        default_w = default_h = pipe.cfg.image_size
    width = default_w if body.width is None else body.width
    height = default_h if body.height is None else body.height
    st.limits.check(width=width, height=height, steps=body.steps, batch_size=body.batch_size, n_iter=body.n_iter)
    check_prompts(st, pipe, body.prompt, body.negative_prompt)
    embeddings = embedding_networks(st, pipe, body.prompt, body.negative_prompt)
    if embeddings is not None and embeddings.embeddings:  # their vectors count in the budget
        check_prompts(st, pipe, body.prompt, body.negative_prompt, embeddings)
    seed = -1 if body.seed is None else body.seed
    if not -1 <= seed < SEED_RANGE:
        raise ApiError(422, f"seed must be from 0 to {SEED_RANGE - 1}, or -1 for a random one; got {seed}", param="seed")
    if seed == -1:
        seed = random.randrange(SEED_RANGE)
    switch: dict[str, Any] = {"refiner_switch_at": refiner.switch_at} if refiner is not None else {}
    requests = [
        GenerationRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, sampler=sampler,
            cfg_scale=body.cfg_scale, width=width, height=height, seed=(seed + k * body.batch_size) % SEED_RANGE,
            batch_size=body.batch_size, strength=strength, clip_skip=clip_skip, decoder=decoder, **switch,
        )
        for k in range(body.n_iter)
    ]
    for req in requests:
        validate(req, multiple=8, min_side=max(8, pipe.cfg.vae.downsample_factor))
    hires = plan_hires_for(st, pipe, body, requests[0], refiner) if init_image is None else None  # A1111: txt2img only
    st.limits.check_work(
        native=pipe.cfg.image_size, width=width, height=height, steps=body.steps, batch_size=body.batch_size,
        n_iter=body.n_iter, strength=strength,
        refiner=(refiner.pipeline.cfg.image_size, refiner.switch_at) if refiner is not None else None,
        hires=(*hires.size, hires.steps) if hires is not None else None,
    )
    units = control_units(st, pipe, body.alwayson_scripts, init_image, (width, height))
    networks = RequestNetworks.merge([lora_networks(st, pipe, requests[0]), embeddings])  # every batch has the same prompt
    if hires is not None and hires.networks is not None:
        hires = dataclasses.replace(hires, networks=with_control(hires.networks, units))
    return Plan(pipe, requests, spec, label, clip_skip, init_image, mask, refiner, with_control(networks, units), hires)


def build_response(body: Txt2ImgRequest, plan: Plan, results: list, job: Job) -> dict:
    """A1111's response: base64 PNGs, the request echoed, and ``info`` as a JSON string."""
    images = [im for r in results for im in r.images]
    seeds = [s for r in results for s in r.seeds]
    infotexts = [t for r in results for t in r.infotexts]
    first = plan.requests[0]
    loaded = plan.pipeline.loaded
    inpainting_unet = plan.pipeline.cfg.is_inpainting
    info = {
        "prompt": first.prompt,
        "all_prompts": [first.prompt] * len(images),
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [first.negative_prompt] * len(images),
        "seed": seeds[0] if seeds else first.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(images),
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": plan.sampler.a1111_name,
        "scheduler": plan.schedule_label,
        "cfg_scale": first.cfg_scale,
        "steps": first.steps,
        "batch_size": first.batch_size,
        "n_iter": len(plan.requests),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": loaded.name,
        "sd_model_hash": loaded.hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.strength if plan.init_image is not None else (
            plan.hires.hires.denoising_strength if plan.hires is not None else None),
        "extra_generation_params": {"Schedule type": plan.schedule_label, **_refiner_params(plan.refiner),
                                    **(plan.hires.fields if plan.hires is not None else {})},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": job.timestamp(),
        "clip_skip": plan.clip_skip,
        "warnings": list(dict.fromkeys(w for r in results for w in getattr(r, "warnings", []))),
        "is_using_inpainting_conditioning": bool(inpainting_unet and plan.mask is not None),
        "version": f"opensd {opensd.__version__}",
        "interrupted": job.interrupted.is_set(),  # by /interrupt or a client that went away (not by /skip)
    }
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest):
        if not body.include_init_images:
            parameters["init_images"] = None
        parameters["mask"] = None
    encoded = [encode_png(im, text) for im, text in zip(images, infotexts, strict=False)] if body.send_images else []
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}


def _refiner_params(refiner: RefinerPlan | None) -> dict[str, Any]:
    """A1111's infotext fields for a refiner (none without one)."""
    return {"Refiner": refiner.title, "Refiner switch at": refiner.switch_at} if refiner is not None else {}


async def _generate(request: Request, body: Txt2ImgRequest, kind: str, plan_fn) -> dict:
    st = server_state(request)
    job = Job(kind, max_seconds=st.limits.max_seconds)

    def prepare() -> Plan:
        plan: Plan = plan_fn(st)
        job.n_iter = len(plan.requests)
        return plan

    def work(j: Job, plan: Plan) -> dict:
        refiner = plan.refiner.pipeline if plan.refiner is not None else None
        results = run_batches(
            j, plan.pipeline, plan.requests, init_image=plan.init_image, mask=plan.mask, refiner=refiner, networks=plan.networks,
            hires=plan.hires,
        )
        return build_response(body, plan, results, j)

    return await st.queue.submit(job, work, prepare=prepare, disconnected=request.is_disconnected)


def _img2img_inputs(st: ServerState, body: Img2ImgRequest) -> tuple[Image.Image, InpaintMask | None]:
    """The init image and, with a mask, the mask (inverted if asked) with its blur, masked content and inpaint area."""
    if not body.init_images:
        raise ApiError(422, "init_images must hold one base64 image", param="init_images")
    if len(body.init_images) > 1:
        raise ApiError(422, f"init_images holds {len(body.init_images)} images; send one per request", param="init_images")
    px = st.limits.max_input_pixels
    image = decode_image(body.init_images[0], "init_images[0]", max_pixels=px)
    if body.mask is None:
        return image, None
    mask = decode_image(body.mask, "mask", max_pixels=px)
    if mask.size != image.size:
        raise ApiError(
            422, f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is {image.size[0]}x{image.size[1]}; "
            "they must be the same size", param="mask",
        )
    if body.inpainting_mask_invert not in (0, 1):
        raise ApiError(422, f"inpainting_mask_invert must be 0 or 1, got {body.inpainting_mask_invert}", param="inpainting_mask_invert")
    if not 0 <= body.mask_blur <= MAX_MASK_BLUR:
        raise ApiError(422, f"mask_blur must be from 0 to {MAX_MASK_BLUR}, got {body.mask_blur}", param="mask_blur")
    if not 0 <= body.inpainting_fill < len(MaskedContent):
        names = ", ".join(f"{i} {m.value}" for i, m in enumerate(MaskedContent))
        raise ApiError(422, f"inpainting_fill must be one of {names}; got {body.inpainting_fill}", param="inpainting_fill")
    if not 0 <= body.inpaint_full_res_padding <= MAX_ONLY_MASKED_PADDING:
        raise ApiError(
            422, f"inpaint_full_res_padding must be from 0 to {MAX_ONLY_MASKED_PADDING} pixels, got {body.inpaint_full_res_padding}",
            param="inpaint_full_res_padding",
        )
    mask = mask.convert("L")
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    content = MaskedContent.parse(body.inpainting_fill)
    return image, InpaintMask(mask, body.mask_blur, content, body.inpaint_full_res, body.inpaint_full_res_padding)


# ---------------------------------------------------------------- generation


@router.post("/txt2img", response_model=ImageResponse, summary="Text to image")
async def txt2img(body: Txt2ImgRequest, request: Request) -> dict:
    return await _generate(request, body, "txt2img", lambda st: plan_generation(st, body))


@router.post("/img2img", response_model=ImageResponse, summary="Image to image and inpainting")
async def img2img(body: Img2ImgRequest, request: Request) -> dict:
    def plan(st: ServerState) -> Plan:
        image, mask = _img2img_inputs(st, body)
        return plan_generation(st, body, strength=body.denoising_strength, init_image=image, mask=mask)

    return await _generate(request, body, "img2img", plan)


@router.post("/png-info", response_model=PngInfoResponse, summary="Read the generation parameters of an image")
def png_info(body: PngInfoRequest, request: Request) -> dict:
    if not body.image.strip():
        return {"info": "", "items": {}, "parameters": {}}
    image = decode_image(body.image, "image", max_pixels=server_state(request).limits.max_input_pixels)
    text = read_parameters(image)  # a PNG's text chunk, a JPEG's or WebP's EXIF UserComment
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    if not isinstance(text, str):
        return {"info": "", "items": items, "parameters": {}}
    fields: dict[str, Any] = parse_infotext(text)
    if "x" in fields.get("Size", ""):  # A1111 also splits the size
        fields["Size-1"], fields["Size-2"] = fields["Size"].split("x", 1)
    return {"info": text, "items": items, "parameters": fields}


# ---------------------------------------------------------------- progress and control


@router.get("/progress", response_model=ProgressResponse, summary="Progress of the current generation")
def progress(request: Request, skip_current_image: bool = False) -> dict:
    st = server_state(request)
    job = st.queue.current()
    pending = st.queue.pending()
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": {"queue_pending": pending}, "current_image": None, "textinfo": None}
    running = job.started is not None
    image = None
    if running and not skip_current_image and st.options["live_previews_enable"]:
        image = job.preview_png(st.options["show_progress_type"], st.options["live_previews_image_format"])
    state = {
        "skipped": job.skipped.is_set(),
        "interrupted": job.interrupted.is_set(),
        "job": f"{job.kind}-{job.id}",
        "job_count": job.n_iter,
        "job_timestamp": job.timestamp(),
        "job_no": job.iteration,
        "sampling_step": job.step,
        "sampling_steps": job.steps,
        "queue_pending": pending,
    }
    text = f"Batch {job.iteration + 1}/{job.n_iter}, step {job.step}/{job.steps}" if running else "Waiting in the queue..."
    return {"progress": job.progress if running else 0.0, "eta_relative": job.eta(), "state": state, "current_image": image, "textinfo": text}


@router.post("/interrupt", summary="Stop the running generation after its current step")
def interrupt(request: Request) -> dict:
    server_state(request).queue.interrupt()
    return {}


@router.post("/skip", summary="End the current batch of the running generation")
def skip(request: Request) -> dict:
    server_state(request).queue.skip()
    return {}
