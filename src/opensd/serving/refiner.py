"""A refiner on the A1111 API: ``refiner_checkpoint`` and ``refiner_switch_at`` (A1111 >= 1.6).

As in A1111 (and SDXL's two-stage sampling, Podell et al. 2023, section 2.5), the base
model samples the first ``refiner_switch_at`` of the steps and the refiner the rest, on
the same noise schedule: the refiner continues the base's latent, so the two must share
their latent space (:func:`opensd.serving.model_kind.latent_space`); a model of another
one is refused with a 422 naming both. The refiner is found in the server's models by
any name ``sd_model_checkpoint`` takes (title, model_name, file name, hash or path): an
unknown one is a 404. ``""``, ``"None"`` or ``null`` mean no refiner, as does naming the
base model itself (A1111 then does not switch). ``refiner_switch_at`` omitted is 0.8.

What it costs: the refiner's steps count in the work budget at *its* native size
(:meth:`opensd.serving.limits.Limits.check_work`), and a request may not need more
models in memory at once (the current one, the one drawing, the refiner) than the
server keeps (``max_loaded``): then it is a 422 before anything is loaded.

The generation itself is the pipeline's: ``pipe.generate(req, refiner=other)`` with
``req.refiner_switch_at``. An opensd whose pipeline has no refiner yet answers a
request for one with a 422 saying so (after the checks above).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

from opensd.pipelines.request import GenerationRequest
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving.errors import ApiError
from opensd.serving.model_kind import describe_latent_space, latent_space
from opensd.serving.models import Checkpoint, ModelRegistry

DEFAULT_SWITCH_AT = 0.8
NO_REFINER = ("", "none")  # compared lower-cased and stripped: A1111's "None"


@dataclass(frozen=True)
class RefinerPlan:
    """The refiner of a checked request: its pipeline, its title (for the infotext) and where it takes over."""

    pipeline: StableDiffusionPipeline
    title: str
    switch_at: float


def refiner_api_available() -> bool:
    """Whether this opensd's pipeline takes a refiner (``generate(..., refiner=)`` and ``GenerationRequest.refiner_switch_at``)."""
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    return "refiner_switch_at" in fields and "refiner" in inspect.signature(StableDiffusionPipeline.generate).parameters


def wants_refiner(name: Any) -> bool:
    return name is not None and not (isinstance(name, str) and name.strip().lower() in NO_REFINER)


def _switch_at(value: Any) -> float:
    if value is None:
        return DEFAULT_SWITCH_AT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ApiError(422, f"refiner_switch_at must be a number from 0 to 1 (the fraction of the steps before the refiner "
                       f"takes over), got {value!r}", param="refiner_switch_at")
    return float(value)


def plan_refiner(
    registry: ModelRegistry, name: Any, switch_at: Any, base: StableDiffusionPipeline, base_ckpt: Checkpoint,
) -> RefinerPlan | None:
    """The refiner ``name`` names for drawing with ``base`` (found as ``base_ckpt``), checked (module doc); None for none."""
    if not wants_refiner(name):
        return None
    at = _switch_at(switch_at)
    ckpt = registry.find(name, param="refiner_checkpoint")
    if ckpt.key == base_ckpt.key:
        return None  # the base refining itself: A1111 does not switch
    needed = {registry.current_checkpoint.key, base_ckpt.key, ckpt.key}
    if len(needed) > registry.max_loaded:
        raise ApiError(
            422, f"this request needs {len(needed)} models in memory at once (the current model, the one drawing and the "
            f"refiner) but this server keeps at most {registry.max_loaded}; draw with the current model, or switch to the "
            "model first (sd_model_checkpoint)", param="refiner_checkpoint",
        )
    refiner = registry.get(ckpt, param="refiner_checkpoint")
    if latent_space(refiner.cfg) != latent_space(base.cfg):
        raise ApiError(
            422, f"refiner {ckpt.label!r} works in another latent space ({describe_latent_space(refiner.cfg)}) than the model "
            f"drawing, {base_ckpt.label!r} ({describe_latent_space(base.cfg)}); a refiner must continue the model's own "
            "latents, e.g. the SDXL refiner after an SDXL model", param="refiner_checkpoint",
        )
    if not refiner_api_available():
        raise ApiError(422, "refiners are not supported by this opensd version yet (its pipeline takes no refiner); "
                       "leave refiner_checkpoint empty", kind="RefinerUnsupported", param="refiner_checkpoint")
    return RefinerPlan(refiner, registry.describe(ckpt)["title"], at)
