"""Sampler names -> samplers, and the one-call :func:`sample` pipelines use.

Names are snake_case ids (``dpmpp_2m``, ``euler_a``), AUTOMATIC1111 web-UI names
(``"DPM++ 2M Karras"``, ``"Euler a"``) or A1111's k-diffusion aliases
(``k_dpmpp_2m``); matching ignores case and surrounding spaces. A `` Karras`` /
`` Exponential`` / `` SGM Uniform`` (or ``_karras`` / ``_exponential`` / ``_sgm_uniform``)
suffix selects the sigma spacing;
every sampler runs with any spacing.

The consistency samplers (``lcm``, ``tcd``: :mod:`opensd.diffusion.consistency`) also get
the run's noise schedule, and their ``original_inference_steps`` option is their
timestep grid's (:class:`TimestepRule`), not their function's.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from opensd.diffusion import consistency as C
from opensd.diffusion import samplers as S
from opensd.diffusion.denoisers import Denoiser
from opensd.diffusion.protocols import DenoiserFn, SamplerCallback, SamplerFn
from opensd.diffusion.schedules import (
    DDIM_RULE,
    DDPM_RULE,
    DPM_RULE,
    EULER_RULE,
    LCM_RULE,
    TCD_RULE,
    DiscreteSchedule,
    SigmaSpacing,
    TimestepRule,
    initial_noise_scale,
    to_vp,
)
from opensd.errors import OpenSDError


class UnknownSamplerError(OpenSDError):
    """A sampler name that is not registered; the message lists the known names."""


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``rule``: how its sigmas are built (the diffusers scheduler it matches).
    ``stochastic``: draws fresh noise each step (its result depends on ``generator``).
    ``calls_per_step``: network calls per step (the last step may use fewer).
    ``needs_schedule``: ``fn`` takes the model's ``schedule`` keyword (the consistency samplers).
    """

    id: str
    a1111_name: str
    fn: SamplerFn
    rule: TimestepRule
    stochastic: bool
    calls_per_step: int = 1
    aliases: tuple[str, ...] = ()
    needs_schedule: bool = False

    def options(self) -> dict[str, Any]:
        """The sampler's extra keyword options and their defaults (with its grid's
        ``original_inference_steps`` on the LCM grid)."""
        common = {"extra_args", "callback", "generator", "schedule"}
        opts = {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in common
        }
        if self.rule.original_steps is not None:
            opts[GRID_OPTION] = self.rule.original_steps
        return opts

    def timestep_rule(self, options: dict[str, Any] | None = None) -> TimestepRule:
        """The sigma rule of a run with ``options`` (``original_inference_steps`` sets the LCM grid's)."""
        if self.rule.original_steps is None or GRID_OPTION not in (options or {}):
            return self.rule
        return dataclasses.replace(self.rule, original_steps=(options or {})[GRID_OPTION])

    def fn_options(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """``options`` less the grid's: what goes to ``fn``."""
        return {k: v for k, v in (options or {}).items() if k != GRID_OPTION}


GRID_OPTION = "original_inference_steps"  # the LCM grid's option (LCMScheduler's name)


_SPECS = (
    SamplerSpec("ddpm", "DDPM", S.sample_ddpm, DDPM_RULE, True),
    SamplerSpec("ddim", "DDIM", S.sample_ddim, DDIM_RULE, False),
    SamplerSpec("euler", "Euler", S.sample_euler, EULER_RULE, False, aliases=("k_euler",)),
    SamplerSpec(
        "euler_ancestral", "Euler a", S.sample_euler_ancestral, EULER_RULE, True, aliases=("euler_a", "k_euler_a")
    ),
    SamplerSpec("heun", "Heun", S.sample_heun, EULER_RULE, False, 2, aliases=("k_heun",)),
    SamplerSpec("dpm2", "DPM2", S.sample_dpm2, EULER_RULE, False, 2, aliases=("k_dpm_2", "dpm_2")),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", S.sample_dpmpp_2m, DPM_RULE, False, aliases=("k_dpmpp_2m",)),
    SamplerSpec(
        "dpmpp_2s_ancestral",
        "DPM++ 2S a",
        S.sample_dpmpp_2s_ancestral,
        EULER_RULE,
        True,
        2,
        aliases=("dpmpp_2s_a", "k_dpmpp_2s_a"),
    ),
    SamplerSpec("dpmpp_sde", "DPM++ SDE", S.sample_dpmpp_sde, EULER_RULE, True, 2, aliases=("k_dpmpp_sde",)),
    SamplerSpec("lms", "LMS", S.sample_lms, EULER_RULE, False, aliases=("k_lms",)),
    SamplerSpec("unipc", "UniPC", S.sample_unipc, DPM_RULE, False),
    SamplerSpec("lcm", "LCM", C.sample_lcm, LCM_RULE, True, aliases=("k_lcm",), needs_schedule=True),
    SamplerSpec("tcd", "TCD", C.sample_tcd, TCD_RULE, True, needs_schedule=True),
)


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


_BY_NAME: dict[str, SamplerSpec] = {}
for _spec in _SPECS:
    for _n in (_spec.id, _spec.a1111_name, *_spec.aliases):
        _BY_NAME[_key(_n)] = _spec

_SUFFIXES = {
    " karras": SigmaSpacing.KARRAS,
    "_karras": SigmaSpacing.KARRAS,
    " exponential": SigmaSpacing.EXPONENTIAL,
    "_exponential": SigmaSpacing.EXPONENTIAL,
    " sgm uniform": SigmaSpacing.SGM_UNIFORM,
    "_sgm_uniform": SigmaSpacing.SGM_UNIFORM,
}


def list_samplers() -> list[SamplerSpec]:
    """All registered samplers, in a stable order."""
    return list(_SPECS)


def known_names() -> list[str]:
    """Every accepted base name (without spacing suffix)."""
    return sorted({n for s in _SPECS for n in (s.id, s.a1111_name, *s.aliases)})


def resolve_sampler(name: str, karras: bool | None = None) -> tuple[SamplerSpec, SigmaSpacing]:
    """``(spec, spacing)`` for a sampler name.

    The spacing comes from the name's suffix (none: ``DEFAULT``). ``karras=True``
    selects Karras sigmas; ``karras=False`` conflicts with a Karras/Exponential suffix
    and raises; ``None`` leaves the name to decide.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownSamplerError(f"sampler name must be a non-empty string; known: {', '.join(known_names())}")
    key, spacing = _key(name), SigmaSpacing.DEFAULT
    for suffix, sp in _SUFFIXES.items():
        if key.endswith(suffix) and key[: -len(suffix)].strip() in _BY_NAME:
            key, spacing = key[: -len(suffix)].strip(), sp
            break
    spec = _BY_NAME.get(key)
    if spec is None:
        raise UnknownSamplerError(
            f"unknown sampler {name!r}; known: {', '.join(known_names())} "
            f"(optionally with a ' Karras', ' Exponential' or ' SGM Uniform' suffix)"
        )
    if karras is True:
        if spacing is not SigmaSpacing.DEFAULT and spacing is not SigmaSpacing.KARRAS:
            raise UnknownSamplerError(f"sampler {name!r} asks for {spacing.value} sigmas but karras=True")
        spacing = SigmaSpacing.KARRAS
    elif karras is False and spacing is not SigmaSpacing.DEFAULT:
        raise UnknownSamplerError(f"sampler {name!r} asks for {spacing.value} sigmas but karras=False")
    return spec, spacing


@dataclass(frozen=True)
class SamplingRun:
    """A run laid out before its first network call: what :func:`sample` executes.

    ``sigmas`` (k + 1,) float32, the steps actually taken (img2img: the last ``k``);
    ``x`` the start latent at ``sigmas[0]`` in k-diffusion space. A two-model run
    (:mod:`opensd.pipelines.refiner`) runs :meth:`sampler` on two slices of ``sigmas``.
    """

    spec: SamplerSpec
    spacing: SigmaSpacing
    sigmas: torch.Tensor
    x: torch.Tensor
    schedule: DiscreteSchedule | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def sampler(self) -> SamplerFn:
        """``spec.fn`` with the run's options (and, for the consistency samplers, its schedule) bound:
        call it as ``f(denoiser, x, sigmas, extra_args=..., callback=..., generator=...)``."""
        kw = dict(self.options)
        if self.spec.needs_schedule:
            kw["schedule"] = self.schedule
        return functools.partial(self.spec.fn, **kw)


def plan_sampling(
    noise: torch.Tensor,
    schedule: DiscreteSchedule,
    sampler_name: str,
    steps: int,
    *,
    karras: bool = False,
    strength: float = 1.0,
    init_latent: torch.Tensor | None = None,
    options: dict[str, Any] | None = None,
) -> SamplingRun:
    """The sampler, its sigmas and the start latent of :func:`sample` (its arguments checked)."""
    spec, spacing = resolve_sampler(sampler_name, True if karras else None)
    allowed = spec.options()
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise S.SamplerError(
            f"sampler {spec.id!r} has no option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) if allowed else 'none'}"
        )
    if not isinstance(noise, torch.Tensor) or not torch.is_floating_point(noise):
        raise S.SamplerError("noise must be a floating point tensor")
    if init_latent is not None and init_latent.shape != noise.shape:
        raise S.SamplerError(
            f"init_latent shape {tuple(init_latent.shape)} does not match noise shape {tuple(noise.shape)}"
        )
    if strength != 1.0 and init_latent is None:
        raise S.SamplerError("strength < 1 needs an init_latent (image-to-image)")
    sigmas = schedule.sigmas_for(steps, spacing, rule=spec.timestep_rule(options), strength=strength)
    if init_latent is None:
        x = noise * initial_noise_scale(sigmas[0].item())
    else:
        x = init_latent.to(noise) + noise * sigmas[0].item()
    return SamplingRun(spec, spacing, sigmas, x, schedule, spec.fn_options(options))


def sample(
    denoiser: DenoiserFn,
    noise: torch.Tensor,
    schedule: DiscreteSchedule,
    sampler_name: str,
    steps: int,
    *,
    karras: bool = False,
    generator: torch.Generator | None = None,
    callback: SamplerCallback | None = None,
    strength: float = 1.0,
    init_latent: torch.Tensor | None = None,
    extra_args: dict[str, Any] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Run a named sampler for ``steps`` steps and return the VP-space latent.

    Text-to-image: ``x = noise * sqrt(sigmas[0]**2 + 1)`` (:func:`initial_noise_scale`). Image-to-image (``init_latent`` given):
    the last ``int(steps * strength)`` steps of the schedule from
    ``x = init_latent + noise * sigmas[0]`` (diffusers' img2img rule). ``karras=True``
    forces Karras sigmas (a "... Karras" name also selects them). A :class:`Denoiser`
    is switched to integer network timesteps when the sampler's diffusers scheduler
    does that (``TimestepRule.quantize_t``). ``options`` go to the sampler (e.g.
    ``eta`` for ``ddim``, ``gamma`` for ``tcd``; ``original_inference_steps`` to the LCM
    grid); ``extra_args`` go to every denoiser call.
    """
    run = plan_sampling(
        noise, schedule, sampler_name, steps, karras=karras, strength=strength, init_latent=init_latent, options=options
    )
    if isinstance(denoiser, Denoiser):
        denoiser = denoiser.with_quantize_t(run.spec.rule.quantize_t(run.spacing))
    x = run.sampler()(denoiser, run.x, run.sigmas, extra_args=extra_args, callback=callback, generator=generator)
    return to_vp(x, run.sigmas[-1])
