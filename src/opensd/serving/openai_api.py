"""OpenAI's Images API, ``POST /v1/images/generations``, on the current model.

Accepts ``prompt``, ``n`` and ``size`` (``"WxH"``, any multiple of 8 within the server's
limits, or ``"auto"``; omitted or ``"auto"``: the model's native size, 512 SD 1.x, 768
SD 2.x 768-v, 1024 SDXL) and answers ``{"created", "data": [{"b64_json"}],
"output_format", "size"}`` (plus opensd's ``warnings`` when there are any). Images are
returned inline only: ``response_format="url"`` is a 400, since this server keeps no
files to link to. ``model`` naming one of the server's models (``/sdapi/v1/sd-models``)
draws with it; omitted, or one of OpenAI's own names (``dall-e-*``, ``gpt-image-*``), the
current model draws; any other name is a 404. ``quality``, ``style`` and ``user`` are
accepted and ignored.
Through the client's ``extra_body`` a caller may also send ``negative_prompt``,
``steps``, ``seed``, ``cfg_scale`` and ``sampler_name`` (opensd extensions).
"""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Request

from opensd.serving.a1111 import Plan, plan_generation
from opensd.serving.codec import encode_png
from opensd.serving.errors import ApiError
from opensd.serving.queue import Job, run_batches
from opensd.serving.schemas import OpenAIImageRequest, OpenAIImagesResponse, Txt2ImgRequest
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

_SIZE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$")


OPENAI_MODELS = ("dall-e", "gpt-image")  # name prefixes of OpenAI's own models: the current model draws


def parse_size(size: str | None, native: int = 512) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (W, H); ``None``/``"auto"`` -> (None, None) for the model's native size (``native``, for the error)."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    m = _SIZE.match(size)
    if not m:
        raise ApiError(
            400, f"size must be 'WIDTHxHEIGHT' in multiples of 8 (this model's native size is '{native}x{native}') or "
            f"'auto', got {size!r}", param="size",
        )
    return int(m.group(1)), int(m.group(2))


def _model_override(model: str | None) -> dict:
    """``override_settings`` for the ``model`` field: none when omitted or one of OpenAI's names (module doc)."""
    if model is None or not model.strip() or model.strip().lower().startswith(OPENAI_MODELS):
        return {}
    return {"sd_model_checkpoint": model}


def _plan(st: ServerState, body: OpenAIImageRequest) -> Plan:
    if body.response_format not in (None, "b64_json"):
        raise ApiError(
            400, f"response_format {body.response_format!r} is not supported: this server keeps no image files "
            "to link to; use response_format='b64_json'", param="response_format",
        )
    if body.output_format not in (None, "png"):
        raise ApiError(400, f"output_format {body.output_format!r} is not supported; only 'png'", param="output_format")
    if not 1 <= body.n <= st.limits.max_batch_size:
        raise ApiError(400, f"n must be from 1 to {st.limits.max_batch_size} on this server, got {body.n}", param="n")
    overrides = _model_override(body.model)
    ckpt = st.registry.find(overrides["sd_model_checkpoint"], param="model") if overrides else st.registry.current_checkpoint  # 404 naming `model`
    width, height = parse_size(body.size, st.registry.kind(ckpt).image_size or 512)
    a1111 = Txt2ImgRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed, sampler_name=body.sampler_name,
        batch_size=body.n, steps=body.steps, cfg_scale=body.cfg_scale, width=width, height=height,
        override_settings=overrides,
    )
    return plan_generation(st, a1111)


@router.post("/images/generations", response_model=OpenAIImagesResponse, response_model_exclude_none=True,
             summary="Create images (OpenAI Images API)")
async def images_generations(body: OpenAIImageRequest, request: Request) -> dict:
    st = server_state(request)

    def work(job: Job, plan: Plan) -> dict:
        results = run_batches(job, plan.pipeline, plan.requests, networks=plan.networks)  # the prompt's <lora:...> tags
        data = [{"b64_json": encode_png(im, text)} for r in results for im, text in zip(r.images, r.infotexts, strict=False)]
        req = plan.requests[0]
        warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
        return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{req.width}x{req.height}",
                "warnings": warnings or None}

    job = Job("openai", max_seconds=st.limits.max_seconds)
    return await st.queue.submit(job, work, prepare=lambda: _plan(st, body), disconnected=request.is_disconnected)
