"""The hires fix on A1111's txt2img: ``enable_hr`` and its ``hr_*`` fields.

``hr_scale`` (default 2), ``hr_upscaler`` (a latent mode, ``Lanczos``, ``Nearest``,
``None`` or a model of the server's upscaler folder: ``/sdapi/v1/upscalers`` and
``/sdapi/v1/latent-upscale-modes`` list them), ``hr_second_pass_steps`` (0: ``steps``),
``denoising_strength`` (A1111's API default 0.75), ``hr_resize_x`` / ``hr_resize_y`` (a
size instead of the scale), ``hr_prompt`` / ``hr_negative_prompt`` (empty: the prompts)
and ``hr_sampler_name`` (A1111's names; empty: the sampler) make a
:class:`~opensd.pipelines.hires.HiresFix` (:mod:`opensd.pipelines.hires`).

Planned with the rest of the request, before it is queued: the final size must be within
the server's ``--max-size`` (a 422 naming ``hr_scale`` or ``hr_resize_x``/``hr_resize_y``
and the size it would make), the hires prompts within the prompt budget, their LoRA tags
in the LoRA folder, and the second pass's steps count in the work budget at the final size
(:meth:`~opensd.serving.limits.Limits.check_work`). ``enable_hr`` on img2img is ignored, as
A1111 ignores it there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from opensd.errors import OpenSDError
from opensd.pipelines.hires import HiresFix, hires_fields, plan_hires
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import GenerationRequest
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.pipelines.upscalers import UpscalerLibrary
from opensd.serving.errors import ApiError
from opensd.serving.state import ServerState


@dataclass(frozen=True)
class HiresRequest:
    """A checked hires fix: its settings, the final size, the second pass's steps and its LoRAs (None: the first pass's)."""

    hires: HiresFix
    size: tuple[int, int]
    steps: int  # the steps the second pass runs
    upscalers: UpscalerLibrary
    fields: dict[str, Any]  # A1111's hires infotext fields (its info's extra_generation_params)
    networks: RequestNetworks | None = None


def _field(body: Any, name: str) -> Any:
    return getattr(body, name, None)


def plan_hires_request(
    st: ServerState, pipe: StableDiffusionPipeline, body: Any, req: GenerationRequest, sampler_name: str | None,
) -> HiresRequest | None:
    """The hires fix ``body`` asks for (None unless ``enable_hr``), checked (module doc); ``sampler_name``:
    the second pass's sampler as opensd names it (A1111's ``hr_sampler_name`` resolved), None: the first's."""
    if not _field(body, "enable_hr"):
        return None
    resize = (body.hr_resize_x or 0, body.hr_resize_y or 0)
    try:
        hires = HiresFix(
            scale=body.hr_scale, upscaler=body.hr_upscaler or None, steps=body.hr_second_pass_steps,
            denoising_strength=body.denoising_strength, resize_x=resize[0], resize_y=resize[1],
            prompt=body.hr_prompt or "", negative_prompt=body.hr_negative_prompt or "", sampler=sampler_name,
        )
        plan = plan_hires(pipe, req, hires, st.upscalers)
    except OpenSDError as e:
        param = "hr_upscaler" if "upscaler" in str(e) else "hr_scale"
        raise ApiError(422, str(e), param=param) from None
    width, height = plan.size.final
    field = "hr_resize_x/hr_resize_y" if any(resize) else "hr_scale"
    if width > st.limits.max_width or height > st.limits.max_height:
        raise ApiError(
            422, f"{field} would make {width}x{height} from {req.width}x{req.height}; this server draws at most "
            f"{st.limits.max_width}x{st.limits.max_height} (--max-size): ask for a smaller {field}",
            param=field.split("/")[0],
        )
    fields = {"Denoising strength": body.denoising_strength, **{k: v for k, v in hires_fields(plan).items() if v is not None}}
    return HiresRequest(hires, (width, height), hires.steps or req.steps, st.upscalers, fields)


def plan_hires_for(
    st: ServerState, pipe: StableDiffusionPipeline, body: Any, first: GenerationRequest, refiner: Any,
) -> HiresRequest | None:
    """``enable_hr`` checked (:mod:`opensd.serving.hires_api`), with the second pass's own LoRAs and
    embeddings when its prompts differ; ``refiner``: the request's (the two do not go together yet)."""
    from opensd.serving.a1111 import check_prompts, resolve_a1111_sampler
    from opensd.serving.embeddings import request_networks as embedding_networks
    from opensd.serving.loras import request_networks as lora_networks

    if not body.enable_hr:
        return None
    if refiner is not None:
        raise ApiError(422, "enable_hr with a refiner_checkpoint is not supported yet; send one of them", param="enable_hr")
    sampler = resolve_a1111_sampler(body.hr_sampler_name, None, body.scheduler)[0] if body.hr_sampler_name else None
    hires = plan_hires_request(st, pipe, body, first, sampler)
    if hires is None or not (body.hr_prompt or body.hr_negative_prompt):
        return hires
    prompt, negative = body.hr_prompt or body.prompt, body.hr_negative_prompt or body.negative_prompt
    check_prompts(st, pipe, prompt, negative)
    embeddings = embedding_networks(st, pipe, prompt, negative)
    if embeddings is not None and embeddings.embeddings:
        check_prompts(st, pipe, prompt, negative, embeddings)
    second = RequestNetworks.merge([lora_networks(st, pipe, dataclasses.replace(first, prompt=prompt)), embeddings])
    return dataclasses.replace(hires, networks=second)
