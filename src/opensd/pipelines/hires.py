"""The hires fix: A1111's two-pass txt2img (``StableDiffusionProcessingTxt2Img.sample_hr_pass``).

Models draw best at the size they were trained at; asked for a larger one directly they
repeat their subject. The hires fix draws at the requested size first, upscales the
result, and redraws it at the large size with img2img at ``denoising_strength``, so the
layout comes from the small image and the detail from the second pass.

1. **First pass**: the request as it is (width x height), with its LoRAs, embeddings and
   ControlNets (:class:`~opensd.pipelines.networks.RequestNetworks`).
2. **Target size** (A1111's ``calculate_target_resolution``): ``hr_scale`` times the size,
   or ``hr_resize_x`` x ``hr_resize_y`` (one of them 0: the other from the aspect ratio;
   both: scaled to cover them, the overflow cut equally on both sides, in whole 8-pixel
   cells). Sides are rounded down to a multiple of 8 (of the latent factor when larger),
   as A1111's latents are ``size // 8``.
3. **Upscale** (:mod:`opensd.pipelines.upscalers`): a latent mode interpolates the final
   latent itself (no decode); any other upscaler upscales the decoded 8-bit image, which
   the VAE then encodes (the posterior's mean) for the second pass.
4. **Second pass**: img2img from that latent, with fresh noise drawn from the same seeds
   at the new size (A1111's ``ImageRNG`` over the new shape), ``hr_prompt`` /
   ``hr_negative_prompt`` (empty: the first pass's), ``hr_sampler_name`` (None: the first
   pass's; a sampler name without a schedule suffix keeps the first pass's schedule, as
   A1111's ``hr_scheduler`` does) and the same ControlNets, their control images fitted
   to the new size. ``hr_second_pass_steps`` (0: the first pass's steps) are the steps the
   second pass *runs*, as in A1111 (``setup_img2img_steps`` with steps given): the last
   ``steps`` steps of a schedule of ``int(steps / min(strength, 0.999))`` steps.
   Strength 0 keeps the upscaled picture (no sampling).

An interrupted first pass returns its own images, as A1111 does. The infotext is the
first pass's (its ``Steps``, its ``Size``) with ``Denoising strength`` and A1111's hires
fields after the ControlNet units: ``Hires sampler``, ``Hires prompt``, ``Hires negative
prompt``, ``Hires schedule type`` (each only where it differs), ``Hires upscale`` or
``Hires resize``, ``Hires steps`` (when not 0) and ``Hires upscaler`` (when named).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from opensd.diffusion import resolve_sampler
from opensd.diffusion.registry import UnknownSamplerError
from opensd.diffusion.schedules import SigmaSpacing
from opensd.pipelines.generation import GenerationResult, StepCallback, StopCheck, check_stop
from opensd.pipelines.images import pil_to_tensor, to_pil
from opensd.pipelines.infotext import image_infotext, schedule_type
from opensd.pipelines.networks import NO_NETWORKS, RequestNetworks
from opensd.pipelines.request import MAX_SIDE, MAX_STEPS, GenerationRequest, RequestError
from opensd.pipelines.upscalers import DEFAULT_LATENT, Upscaler, UpscalerLibrary, upscale_latent

if TYPE_CHECKING:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

MAX_SCALE = 8.0
DEFAULT_DENOISING = 0.7  # A1111's web UI (its API's default is 0.75)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _g(v: float) -> int | float:
    """A number as A1111 writes a whole one (2, not 2.0)."""
    return int(v) if float(v).is_integer() else v


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix settings (its ``hr_*`` fields); checked on creation (:class:`RequestError`)."""

    scale: float = 2.0  # hr_scale, used when resize_x and resize_y are 0
    upscaler: str | None = None  # hr_upscaler; None: "Latent", not written in the infotext (A1111)
    steps: int = 0  # hr_second_pass_steps; 0: the first pass's
    denoising_strength: float = DEFAULT_DENOISING
    resize_x: int = 0  # hr_resize_x / hr_resize_y: a target size instead of the scale
    resize_y: int = 0
    prompt: str = ""  # hr_prompt; "": the first pass's
    negative_prompt: str = ""
    sampler: str | None = None  # hr_sampler_name; None: the first pass's

    def __post_init__(self) -> None:
        if not _number(self.scale) or not 1.0 <= self.scale <= MAX_SCALE:
            raise RequestError(f"hires scale must be a number from 1 to {MAX_SCALE:g}, got {self.scale!r}")
        if not _int(self.steps) or not 0 <= self.steps <= MAX_STEPS:
            raise RequestError(f"hires steps must be an integer from 0 (the first pass's) to {MAX_STEPS}, got {self.steps!r}")
        if not _number(self.denoising_strength) or not 0 <= self.denoising_strength <= 1:
            raise RequestError(f"hires denoising strength must be a number from 0 to 1, got {self.denoising_strength!r}")
        for name in ("resize_x", "resize_y"):
            v = getattr(self, name)
            if not _int(v) or not (v == 0 or 8 <= v <= MAX_SIDE):
                raise RequestError(f"hires {name} must be 0 (from the scale) or a size from 8 to {MAX_SIDE} pixels, got {v!r}")
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise RequestError(f"hires {name} must be text, got {type(getattr(self, name)).__name__}")
        if self.upscaler is not None and not isinstance(self.upscaler, str):
            raise RequestError(f"hires upscaler must be an upscaler name, got {self.upscaler!r:.60}")
        if self.sampler is not None and not isinstance(self.sampler, str):
            raise RequestError(f"hires sampler must be a sampler name, got {self.sampler!r:.60}")


@dataclass(frozen=True)
class HiresSize:
    """Where the upscale goes: the upscaled size, then the crop to the final size (pixels, whole cells)."""

    upscaled: tuple[int, int]  # (width, height)
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the final picture in the upscaled one

    @property
    def final(self) -> tuple[int, int]:
        left, top, right, bottom = self.box
        return right - left, bottom - top


def target_size(width: int, height: int, hires: HiresFix, unit: int = 8) -> HiresSize:
    """A1111's ``calculate_target_resolution`` for a first pass of ``width`` x ``height``
    (module doc, step 2); ``unit``: the multiple every side is rounded down to."""
    trunc_x = trunc_y = 0
    if hires.resize_x == 0 and hires.resize_y == 0:
        to_x, to_y = int(width * hires.scale), int(height * hires.scale)
    elif hires.resize_y == 0:
        to_x, to_y = hires.resize_x, hires.resize_x * height // width
    elif hires.resize_x == 0:
        to_x, to_y = hires.resize_y * width // height, hires.resize_y
    else:
        if width / height < hires.resize_x / hires.resize_y:
            to_x, to_y = hires.resize_x, hires.resize_x * height // width
        else:
            to_x, to_y = hires.resize_y * width // height, hires.resize_y
        trunc_x, trunc_y = (to_x - hires.resize_x) // unit, (to_y - hires.resize_y) // unit
    up_w, up_h = to_x // unit * unit, to_y // unit * unit
    left, top = trunc_x // 2 * unit, trunc_y // 2 * unit
    right, bottom = up_w - (trunc_x + 1) // 2 * unit, up_h - (trunc_y + 1) // 2 * unit
    return HiresSize((up_w, up_h), (left, top, right, bottom))


def second_pass_steps(steps: int, strength: float) -> tuple[int, float]:
    """(schedule steps, strength) of an opensd img2img run that runs exactly ``steps`` steps, the
    last ones of A1111's schedule of ``int(steps / min(strength, 0.999))`` (module doc, step 4)."""
    if strength <= 0:
        return steps, 0.0
    total = int(steps / min(strength, 0.999))
    if total <= steps:
        return steps, 1.0  # the whole schedule, from the upscaled latent plus full noise
    return total, (steps + 0.5) / total  # int(total * this) == steps, whatever the float rounding


def _sampler_for(first: GenerationRequest, name: str | None) -> str:
    """The second pass's sampler string: ``name`` (None: the first's), with the first's schedule
    when ``name`` names none."""
    if name is None or not name.strip():
        return first.sampler
    try:
        spec, spacing = resolve_sampler(name)
        _, first_spacing = first.resolved_sampler()
    except (UnknownSamplerError, ValueError) as e:
        raise RequestError(f"hires sampler: {e}") from None
    if spacing is SigmaSpacing.DEFAULT and first_spacing is not SigmaSpacing.DEFAULT:
        return f"{spec.id}_{first_spacing.value}"
    if spacing is SigmaSpacing.DEFAULT and first.karras:
        return f"{spec.id}_karras"
    return name


@dataclass(frozen=True)
class HiresPlan:
    """A checked hires run: both passes' requests, the upscaler and where it goes."""

    first: GenerationRequest
    second: GenerationRequest
    upscaler: Upscaler
    size: HiresSize
    hires: HiresFix


def plan_hires(
    pipe: StableDiffusionPipeline, req: GenerationRequest, hires: HiresFix, upscalers: UpscalerLibrary | None = None,
) -> HiresPlan:
    """Both passes of ``req`` with ``hires`` checked for ``pipe`` before any work (a
    :class:`RequestError` or :class:`~opensd.pipelines.upscale_models.UpscalerError` naming the problem)."""
    if not isinstance(hires, HiresFix):
        raise RequestError(f"hires must be a HiresFix, got {type(hires).__name__}")
    if req.strength < 1.0:
        raise RequestError("the hires fix is txt2img's: its request must have strength 1")
    library = upscalers if upscalers is not None else UpscalerLibrary(None)
    upscaler = library.resolve(hires.upscaler if hires.upscaler is not None else DEFAULT_LATENT, what="hires upscaler")
    seed = pipe._seeds(req.seed, 1)[0]  # fixed once: both passes draw from the same seeds
    first = dataclasses.replace(req, seed=seed)
    size = target_size(first.width, first.height, hires, max(8, pipe.cfg.vae.downsample_factor))
    steps, strength = second_pass_steps(hires.steps or first.steps, hires.denoising_strength)
    width, height = size.final
    second = dataclasses.replace(
        first, prompt=hires.prompt or first.prompt, negative_prompt=hires.negative_prompt or first.negative_prompt,
        width=width, height=height, steps=steps, strength=strength, sampler=_sampler_for(first, hires.sampler),
    )
    try:
        pipe._check(first, None, None)
        pipe._check(second, None, None)
    except RequestError as e:
        raise RequestError(f"hires fix to {width}x{height}: {e}") from None
    return HiresPlan(first, second, upscaler, size, hires)


def _upscaled_latents(
    pipe: StableDiffusionPipeline, plan: HiresPlan, first: GenerationResult, should_stop: StopCheck | None,
) -> torch.Tensor:
    """The second pass's init latent (B, C, H/f, W/f) from the first pass's result (module doc, step 3)."""
    f = pipe.cfg.vae.downsample_factor
    (up_w, up_h), (left, top, right, bottom) = plan.size.upscaled, plan.size.box
    if plan.upscaler.latent:
        assert first.latents is not None
        lat = upscale_latent(first.latents.float(), up_h // f, up_w // f, plan.upscaler.name)  # (B, C, up_h/f, up_w/f)
        return lat[:, :, top // f:bottom // f, left // f:right // f]
    pixels = []
    for image in first.images:
        check_stop(should_stop, "upscaling")
        big = plan.upscaler.upscale_image(image, up_w, up_h).crop((left, top, right, bottom))
        pixels.append(pil_to_tensor(big))  # (3, H, W) in [-1, 1]
    batch = torch.stack(pixels).to(pipe.model.device)  # (B, 3, H, W)
    posterior = pipe.encode_pixels(batch, plan.second.tiled_vae, should_stop=should_stop)
    return pipe.model.vae.to_latent(posterior.mean.float())


def hires_fields(plan: HiresPlan) -> dict[str, Any]:
    """A1111's hires infotext fields, in its order (module doc); None values are left out."""
    h, first, second = plan.hires, plan.first, plan.second
    spec1, spacing1 = first.resolved_sampler()
    spec2, spacing2 = second.resolved_sampler()
    return {
        "Hires sampler": spec2.a1111_name if h.sampler and spec2.id != spec1.id else None,
        "Hires prompt": h.prompt if h.prompt and h.prompt != first.prompt else None,
        "Hires negative prompt": h.negative_prompt if h.negative_prompt and h.negative_prompt != first.negative_prompt else None,
        "Hires schedule type": schedule_type(spacing2.value) if spacing2 is not spacing1 else None,
        "Hires upscale": _g(h.scale) if not (h.resize_x or h.resize_y) else None,
        "Hires resize": f"{h.resize_x}x{h.resize_y}" if h.resize_x or h.resize_y else None,
        "Hires steps": h.steps or None,
        "Hires upscaler": plan.upscaler.name if h.upscaler is not None else None,
    }


def hires_infotext(pipe: StableDiffusionPipeline, plan: HiresPlan, seed: int, networks: RequestNetworks) -> str:
    """One image's infotext: the first pass's, the hires fields after its ControlNet units."""
    units = {k: v for k, v in networks.infotext.items() if k.startswith("ControlNet ")}
    rest = {k: v for k, v in networks.infotext.items() if k not in units}
    extra = {**units, **{k: v for k, v in hires_fields(plan).items() if v is not None}, **rest}
    return image_infotext(plan.first, seed, pipe.loaded, None, extra, denoising=_g(plan.hires.denoising_strength))


def hires_fix(
    pipe: StableDiffusionPipeline,
    req: GenerationRequest,
    hires: HiresFix,
    *,
    networks: RequestNetworks | None = None,
    hires_networks: RequestNetworks | None = None,
    upscalers: UpscalerLibrary | None = None,
    callback: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    latents: torch.Tensor | None = None,
) -> GenerationResult:
    """``req`` (txt2img) drawn with the hires fix ``hires`` (module doc).

    ``networks``: the request's LoRAs, embeddings and ControlNet units, for both passes;
    ``hires_networks``: the second pass's where its prompt names other LoRAs (None: ``networks``).
    ``upscalers``: where upscaler names are looked up (None: only the latent modes and the
    resamplers). ``callback`` sees both passes' steps (each pass counts its own);
    ``latents`` replaces the first pass's seeded noise. A refiner is not taken."""
    plan = plan_hires(pipe, req, hires, upscalers)
    networks = networks or NO_NETWORKS
    first = pipe.generate(plan.first, networks=networks, callback=callback, should_stop=should_stop, latents=latents,
                          decode=not plan.upscaler.latent)
    if first.interrupted:  # as A1111: the first pass's images
        assert first.latents is not None  # generate always sets it
        images = first.images or to_pil(pipe.decode_latents(first.latents, plan.first.tiled_vae, should_stop=should_stop))
        result = first
    else:
        init = _upscaled_latents(pipe, plan, first, should_stop)
        result = pipe.generate(plan.second, init_latent=init, networks=hires_networks or networks, callback=callback,
                               should_stop=should_stop)
        images = result.images
    infotexts = [hires_infotext(pipe, plan, s, networks) for s in first.seeds]
    for im, text in zip(images, infotexts, strict=False):
        im.info["parameters"] = text
    warnings = list(dict.fromkeys(first.warnings + result.warnings))
    return GenerationResult(images, first.seeds, infotexts, result.interrupted, warnings, result.latents)
