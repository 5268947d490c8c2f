"""Base-then-refiner generation: one sampling run shared by two models.

SDXL's ensemble of expert denoisers (Podell et al. 2023, Sec. 2.5; Balaji et al. 2022,
eDiff-I): the base model runs the high-noise part of the schedule, a second model (the
SDXL refiner, trained on the low-noise timesteps only) finishes it. Both run on the
*same* latent and the *same* sigma list; only the network, its conditioning (the
refiner's own text encoder, its aesthetic-score ``y``) and the sampler's history change.

Where the run switches (A1111's "Refiner switch at", ``modules/sd_samplers_common.py``):
a step is the refiner's when ``(T - 1 - t) / T >= switch_at``, ``t`` being the training
timestep nearest to the step's starting sigma (T = 1000 for SD). With SD's 20 leading
Euler steps (t = 951, 901, ..., 1) and 0.8 that is t <= 199: the base runs 16 steps, the
refiner 4. This is also diffusers' ``denoising_end`` / ``denoising_start`` rule (the base
keeps the timesteps ``t >= round(T * (1 - switch_at))``, the refiner the rest): for
integer timesteps and a switch given to three decimals the two agree. The switch is
decided per step, at its first network call (A1111 decides at every call, so a two-call
sampler such as Heun may switch between its calls there).

At the switch the latent passes unchanged, in k-diffusion space (``x = x0 + sigma eps``;
diffusers hands over its scaled latents the same way: no re-noising, no VAE round trip),
and the sampler starts again on the remaining sigmas: a multistep sampler (DPM++ 2M,
LMS, UniPC) restarts its history, as diffusers' refiner pipeline does with a fresh
scheduler (A1111 swaps the network inside its running sampler, so there the history
carries over: only first-order samplers such as Euler give the same image in both).
A stochastic sampler keeps drawing from the same generator. The image is decoded with
the model that finished the run (A1111 and diffusers do too: the refiner's VAE).

At ``switch_at`` 1 the refiner never runs (the result is the base's alone, without the
refiner's infotext fields, as A1111 writes them only when it switched); at 0 it runs
every step (the base's network is never called).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from opensd.diffusion.interruption import Interrupted
from opensd.diffusion.protocols import DenoiserFn, SamplerCallback
from opensd.diffusion.registry import SamplingRun, plan_sampling
from opensd.diffusion.schedules import to_vp
from opensd.models.stable_diffusion import ModelFamily, SDConfig
from opensd.pipelines.infotext import refiner_field
from opensd.pipelines.request import GenerationRequest, RequestError

if TYPE_CHECKING:
    from opensd.pipelines.conditioning import Conditioning
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

DEFAULT_SWITCH_AT = 0.8  # A1111's default

# Families whose VAEs share one latent space (SD 1.x and 2.x: the same KL-f8 VAE; SDXL's
# base and refiner: SDXL's VAE, retrained, scale 0.13025).
_LATENT_SPACE = {
    ModelFamily.SD1: "sd",
    ModelFamily.SD2: "sd",
    ModelFamily.SDXL: "sdxl",
    ModelFamily.SDXL_REFINER: "sdxl",
}


def check_pair(base: SDConfig, refiner: SDConfig) -> None:
    """Raise :class:`RequestError` unless ``refiner`` can continue ``base``'s latents.

    They must share a latent space: compatible families (SD 1.x/2.x together, SDXL base
    and refiner together) and the same VAE latent (channels, downsample factor, scale
    and shift). A refiner given as the base model, with an SDXL base as its refiner,
    is told to swap them.
    """
    if base.family is ModelFamily.SDXL_REFINER and refiner.family is ModelFamily.SDXL:
        raise RequestError("the main model is an SDXL refiner and the refiner an SDXL base: swap them (the base model first)")
    if _LATENT_SPACE[base.family] != _LATENT_SPACE[refiner.family]:
        raise RequestError(
            f"a {refiner.family.value} refiner cannot continue a {base.family.value} model: their latent spaces differ "
            f"(sd1/sd2 refine each other, sdxl/sdxl_refiner each other)"
        )
    a, b = base.vae, refiner.vae
    ours = (a.embed_dim, a.downsample_factor, a.scale_factor, a.shift_factor)
    theirs = (b.embed_dim, b.downsample_factor, b.scale_factor, b.shift_factor)
    if ours != theirs:
        raise RequestError(
            f"the refiner's VAE latent (channels, factor, scale, shift) {theirs} differs from the model's {ours}; "
            "they must be the same"
        )


def switch_step(train_sigmas: torch.Tensor, sigmas: torch.Tensor, switch_at: float) -> int:
    """Index of the first step of ``sigmas`` (k + 1 levels, k steps) the refiner runs; k: none.

    ``train_sigmas`` (T,) the schedule's sigma at every training timestep, increasing.
    A step is the refiner's when ``(T - 1 - t) / T >= switch_at`` for ``t`` the training
    timestep nearest its starting sigma (A1111's rule).
    """
    T = len(train_sigmas)
    steps = len(sigmas) - 1
    for i in range(steps):
        t = int(torch.argmin((train_sigmas.double() - float(sigmas[i])).abs()))
        if (T - 1 - t) / T >= switch_at:
            return i
    return steps


def refiner_label(pipe: StableDiffusionPipeline) -> str:
    """A1111's ``Refiner`` infotext value: ``name [hash]`` (its checkpoint's short title)."""
    return refiner_field(pipe.loaded.name, pipe.loaded.hash)


@dataclass
class RefinerPlan:
    """A refiner run decided before sampling: the model, the switch, the step it falls on."""

    pipe: StableDiffusionPipeline
    switch_at: float
    step: int  # index of the refiner's first step among the run's steps
    steps: int  # steps the run takes (img2img: the last int(steps * strength))

    @property
    def runs(self) -> bool:
        """Whether the refiner takes at least one step."""
        return self.step < self.steps


def plan_refiner(
    base: StableDiffusionPipeline, refiner: StableDiffusionPipeline | None, req: GenerationRequest,
    prompt_embeds: Any = None, negative_embeds: Any = None,
) -> RefinerPlan | None:
    """Check the pair and the request before any work; where the refiner takes over on
    the run's sigmas (None: no refiner; a plan that never runs when no step is left)."""
    if refiner is None:
        if req.refiner_switch_at is not None:
            raise RequestError("refiner_switch_at needs a refiner model; give one (refiner=, --refiner) or leave it out")
        return None
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline  # here: the pipeline imports this module

    if not isinstance(refiner, StableDiffusionPipeline):
        raise RequestError(f"refiner must be a loaded pipeline (opensd.load(path)), got {type(refiner).__name__}")
    check_pair(base.cfg, refiner.cfg)
    if prompt_embeds is not None or negative_embeds is not None:
        raise RequestError("prompt_embeds / negative_embeds cannot be used with a refiner (it encodes the prompts with its own text encoder)")
    if refiner.cfg.is_inpainting and not base.cfg.is_inpainting:  # check_pair: one latent
        raise RequestError("an inpainting (9-channel) refiner needs an inpainting model as the base")
    if refiner.model.device != base.model.device:
        raise RequestError(f"the refiner is on {refiner.model.device} but the model on {base.model.device}; load both on one device")
    refiner._check(req, None, None)  # its own prompt budget and limits
    switch_at = DEFAULT_SWITCH_AT if req.refiner_switch_at is None else float(req.refiner_switch_at)
    if req.strength < 1.0 and int(req.steps * req.strength) < 1:
        return RefinerPlan(refiner, switch_at, 0, 0)  # too weak for a step: the image is kept
    spec, spacing = req.resolved_sampler()
    sigmas = base.schedule.sigmas_for(req.steps, spacing, rule=spec.timestep_rule(req.sampler_options), strength=req.strength)
    return RefinerPlan(refiner, switch_at, switch_step(base.schedule.sigmas, sigmas, switch_at), len(sigmas) - 1)


def sample_refined(
    base: StableDiffusionPipeline, plan: RefinerPlan, req: GenerationRequest, denoiser: DenoiserFn,
    start: Any, conds: tuple[Conditioning, Conditioning | None], seeds: list[int], callback: Any, should_stop: Any,
) -> tuple[torch.Tensor, bool, StableDiffusionPipeline]:
    """``(final latent, interrupted, the pipeline that ran the last step)``: ``base``'s
    steps with ``denoiser`` and ``conds``, then the refiner's on the same latent."""
    ref = plan.pipe
    r_cond, r_uncond = ref.conditioner.for_request(req, should_stop=should_stop)
    concat = start.concat if ref.cfg.is_inpainting else None  # a 4-channel refiner inpaints by re-imposing
    r_denoiser = ref._denoiser(req, dataclasses.replace(start, concat=concat))
    run = plan_sampling(
        start.noise, base.schedule, req.sampler, req.steps, karras=bool(req.karras),
        strength=req.strength, init_latent=start.init_latent, options=req.sampler_options,
    )
    state: dict[str, Any] = {"denoised": None, "finisher": base}
    step_cb = base._step_callback(callback, plan.steps, state)

    def phase_cb(d: dict[str, Any]) -> None:
        if d["i"] >= plan.step:
            state["finisher"] = ref
        step_cb(d)

    try:
        x = run_two_phase(
            run, plan.step, (denoiser, guidance_args(*conds)), (r_denoiser, guidance_args(r_cond, r_uncond)),
            generator=base._sampler_generator(seeds), callback=phase_cb,
        )
        return to_vp(x, run.sigmas[-1]), False, ref
    except Interrupted:
        result = state["denoised"]
        if result is None:
            result = start.init_latent if start.init_latent is not None else start.noise * 0
        return result, True, state["finisher"]


def guidance_args(cond: Conditioning, uncond: Conditioning | None) -> dict[str, Any]:
    """The denoiser's keyword arguments: one conditioning dict per guidance branch (none at CFG 1)."""
    return {"cond": cond} if uncond is None else {"cond": cond, "uncond": uncond}


def _offset_callback(callback: SamplerCallback | None, k: int) -> SamplerCallback | None:
    """The sampler's per-step callback with step indices counted from the run's start."""
    if callback is None:
        return None
    return lambda d: callback({**d, "i": d["i"] + k})


def run_two_phase(
    run: SamplingRun,
    k: int,
    base: tuple[DenoiserFn, dict[str, Any]],
    refiner: tuple[DenoiserFn, dict[str, Any]],
    *,
    generator: torch.Generator | None,
    callback: SamplerCallback | None,
) -> torch.Tensor:
    """The k-diffusion latent at ``run.sigmas[-1]``: steps ``[0, k)`` with the base's
    ``(denoiser, extra_args)``, then the rest with the refiner's, its sampler restarted."""
    x, sigmas, fn = run.x, run.sigmas, run.sampler()  # the run's options bound
    if k > 0:
        x = fn(base[0], x, sigmas[: k + 1], extra_args=base[1], callback=callback, generator=generator)
    if k < len(sigmas) - 1:
        # the latent as it is at sigmas[k] (float32, as both denoisers take it): no re-noising
        x = fn(refiner[0], x, sigmas[k:], extra_args=refiner[1], callback=_offset_callback(callback, k), generator=generator)
    return x
