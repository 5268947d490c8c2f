"""Diffusion: noise schedules, denoiser wrappers, guidance and stateless samplers.

Composition, outermost last: network -> :class:`ClassifierFreeGuidance` (raw output
space) -> :class:`Denoiser` (eps/v -> x0, k-diffusion form) -> a sampler from
:func:`resolve_sampler` run on :meth:`DiscreteSchedule.sigmas_for`; :func:`sample`
does the whole run and returns the VP latent for the decoder. The types of that
composition (:class:`ModelFn`, :class:`DenoiserFn`, :class:`SamplerFn`) are
:mod:`opensd.diffusion.protocols`'; how a run stops (:class:`Interrupted`,
:func:`check_stop`) is :mod:`opensd.diffusion.interruption`'s.
"""

from opensd.diffusion.denoisers import Denoiser, DenoiserError
from opensd.diffusion.guidance import ClassifierFreeGuidance, GuidanceError, rescale_guided
from opensd.diffusion.interruption import Interrupted, StopCheck, asks_to_stop, check_stop
from opensd.diffusion.protocols import DenoiserFn, ModelFn, SamplerCallback, SamplerFn
from opensd.diffusion.registry import (
    SamplerSpec,
    UnknownSamplerError,
    known_names,
    list_samplers,
    resolve_sampler,
    sample,
)
from opensd.diffusion.samplers import SamplerError
from opensd.diffusion.schedules import (
    DDIM_RULE,
    DDPM_RULE,
    DPM_RULE,
    EULER_RULE,
    LCM_RULE,
    TCD_RULE,
    BetaSchedule,
    DiscreteSchedule,
    FinalSigma,
    NoiseScheduleConfig,
    Prediction,
    ScheduleError,
    SigmaRange,
    SigmaSpacing,
    TimestepGrid,
    TimestepRule,
    TimestepSpacing,
    exponential_sigmas,
    karras_sigmas,
    strength_start,
    to_vp,
)

__all__ = [
    "BetaSchedule",
    "ClassifierFreeGuidance",
    "DDIM_RULE",
    "DDPM_RULE",
    "DPM_RULE",
    "Denoiser",
    "DenoiserError",
    "DenoiserFn",
    "DiscreteSchedule",
    "EULER_RULE",
    "LCM_RULE",
    "TCD_RULE",
    "FinalSigma",
    "GuidanceError",
    "Interrupted",
    "ModelFn",
    "NoiseScheduleConfig",
    "Prediction",
    "SamplerCallback",
    "SamplerError",
    "SamplerFn",
    "SamplerSpec",
    "ScheduleError",
    "StopCheck",
    "SigmaRange",
    "SigmaSpacing",
    "TimestepGrid",
    "TimestepRule",
    "TimestepSpacing",
    "UnknownSamplerError",
    "asks_to_stop",
    "check_stop",
    "exponential_sigmas",
    "karras_sigmas",
    "known_names",
    "list_samplers",
    "rescale_guided",
    "resolve_sampler",
    "sample",
    "strength_start",
    "to_vp",
]
