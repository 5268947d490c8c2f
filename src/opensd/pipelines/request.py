"""One generation request, validated in one place for the Python API, the CLI and the server."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from opensd.diffusion import resolve_sampler
from opensd.diffusion.registry import SamplerSpec
from opensd.diffusion.schedules import ScheduleError, SigmaSpacing
from opensd.errors import OpenSDError
from opensd.pipelines.decoders import Decoder
from opensd.prompts.budget import PromptBudgetError, check_text

MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64
SEED_RANGE = 2**32


class RequestError(OpenSDError):
    """A generation parameter is out of range; the message names what is allowed."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides an image, except the model and the input images."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "dpmpp_2m"
    karras: bool | None = None
    cfg_scale: float = 7.5
    guidance_rescale: float = 0.0
    width: int = 512
    height: int = 512
    seed: int | None = None
    batch_size: int = 1
    strength: float = 1.0
    clip_skip: int = 1
    tiled_vae: bool | None = None  # VAE decode (and img2img/inpaint encode) in tiles; None: when a side is over 1.5x the model's native size (SD 1.x: 96 cells, 768 px)
    sampler_options: dict[str, Any] = field(default_factory=dict)
    # SDXL's size conditioning (SGM's names): the size the model is told the training image
    # had, (height, width), None: the output size; the crop's top-left corner (top, left).
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    # The SDXL refiner's aesthetic-score conditioning, of the prompt and of the negative prompt.
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # With a refiner model: the fraction of the run after which it takes over (A1111's
    # "Refiner switch at"); None: 0.8 (A1111's default). See opensd.pipelines.refiner.
    refiner_switch_at: float | None = None
    # The final decode: the model's VAE ("full") or its tiny autoencoder ("tiny", A1111's
    # "TAESD"); see opensd.pipelines.decoders.
    decoder: Decoder | str = Decoder.FULL

    def resolved_sampler(self) -> tuple[SamplerSpec, SigmaSpacing]:
        return resolve_sampler(self.sampler, self.karras)

    def resolved_decoder(self) -> Decoder:
        return Decoder.parse(self.decoder)


def request_from_settings(
    native_size: int, *, width: int | None, height: int | None, options: dict[str, Any], **settings: Any
) -> GenerationRequest:
    """A request from keyword settings: ``width``/``height`` default to the model's
    ``native_size``; ``options`` (consumed) holds the request's other fields by name
    (``karras``, ``clip_skip``, ``original_size``...), and what is left, the sampler's options."""
    names = {f.name for f in dataclasses.fields(GenerationRequest)} - set(settings) - {"width", "height", "sampler_options"}
    fields = {name: options.pop(name) for name in list(options) if name in names}
    return GenerationRequest(
        width=native_size if width is None else width,
        height=native_size if height is None else height,
        sampler_options=options,
        **settings,
        **fields,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(req: GenerationRequest, *, multiple: int = 8, min_side: int = 16) -> None:
    """Raise :class:`RequestError` naming the first bad parameter and what is allowed.

    Prompts must be valid Unicode text: a lone surrogate (from a broken client's JSON,
    or a non-UTF-8 byte in a command-line argument) is refused with its position. Their
    length is the model's to judge (its tokenizer), see :func:`opensd.prompts.budget.check_prompt`.
    """
    if not isinstance(req, GenerationRequest):
        raise RequestError(f"validate expects a GenerationRequest, got {type(req).__name__}")
    for name in ("prompt", "negative_prompt"):
        try:
            check_text(getattr(req, name), what=name)
        except PromptBudgetError as e:
            raise RequestError(str(e)) from None
    for name in ("width", "height"):
        v = getattr(req, name)
        if not _is_int(v):
            raise RequestError(f"{name} must be an integer, got {v!r}")
        if v % multiple or not min_side <= v <= MAX_SIDE:
            raise RequestError(
                f"{name} must be a multiple of {multiple} between {min_side} and {MAX_SIDE}, got {v}"
            )
    if not _is_int(req.steps) or not 1 <= req.steps <= MAX_STEPS:
        raise RequestError(f"steps must be an integer from 1 to {MAX_STEPS}, got {req.steps!r}")
    if not _is_int(req.batch_size) or not 1 <= req.batch_size <= MAX_BATCH:
        raise RequestError(f"batch_size must be an integer from 1 to {MAX_BATCH}, got {req.batch_size!r}")
    if not _is_number(req.cfg_scale) or not 0 <= req.cfg_scale <= 100:
        raise RequestError(f"cfg_scale must be a number from 0 to 100, got {req.cfg_scale!r}")
    if not _is_number(req.guidance_rescale) or not 0 <= req.guidance_rescale <= 1:
        raise RequestError(f"guidance_rescale must be in [0, 1], got {req.guidance_rescale!r}")
    if not _is_number(req.strength) or not 0 <= req.strength <= 1:
        raise RequestError(f"strength must be in [0, 1], got {req.strength!r}")
    if req.seed is not None and (not _is_int(req.seed) or not -1 <= req.seed < SEED_RANGE):
        raise RequestError(f"seed must be an integer from 0 to {SEED_RANGE - 1} (or -1 for random), got {req.seed!r}")
    if not _is_int(req.clip_skip) or req.clip_skip < 1:
        raise RequestError(f"clip_skip must be an integer >= 1, got {req.clip_skip!r}")
    if req.tiled_vae is not None and not isinstance(req.tiled_vae, bool):
        raise RequestError(f"tiled_vae must be true, false or None (automatic), got {req.tiled_vae!r}")
    for name, pair in (("original_size", req.original_size), ("crop_top_left", req.crop_top_left)):
        if name == "original_size" and pair is None:
            continue
        low = 1 if name == "original_size" else 0
        if not isinstance(pair, tuple) or len(pair) != 2 or not all(_is_int(v) and low <= v <= 4 * MAX_SIDE for v in pair):
            raise RequestError(f"{name} must be two integers (height, width / top, left) from {low} to {4 * MAX_SIDE}, got {pair!r}")
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if not _is_number(getattr(req, name)) or not 0 <= getattr(req, name) <= 10:
            raise RequestError(f"{name} must be a number from 0 to 10, got {getattr(req, name)!r}")
    if req.refiner_switch_at is not None and (not _is_number(req.refiner_switch_at) or not 0 <= req.refiner_switch_at <= 1):
        raise RequestError(f"refiner_switch_at must be a number from 0 to 1 (or None: 0.8), got {req.refiner_switch_at!r}")
    try:
        req.resolved_decoder()
    except OpenSDError as e:
        raise RequestError(str(e)) from None
    if not isinstance(req.sampler, str):
        raise RequestError(f"sampler must be a sampler name (text), got {type(req.sampler).__name__}")
    if req.karras is not None and not isinstance(req.karras, bool):
        raise RequestError(f"karras must be true, false or None (as the sampler name says), got {req.karras!r}")
    if not isinstance(req.sampler_options, dict) or not all(isinstance(k, str) for k in req.sampler_options):
        raise RequestError(f"sampler_options must be a mapping of option names to values, got {req.sampler_options!r}")
    try:
        spec, spacing = req.resolved_sampler()
    except ValueError as e:
        raise RequestError(str(e)) from None
    unknown = sorted(set(req.sampler_options) - set(spec.options()))
    if unknown:
        allowed = ", ".join(spec.options()) or "none"
        raise RequestError(f"sampler {spec.id!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}")
    try:  # the LCM grid holds at most original_inference_steps steps
        spec.timestep_rule(req.sampler_options).check_steps(req.steps, spacing)
    except ScheduleError as e:
        raise RequestError(str(e)) from None
