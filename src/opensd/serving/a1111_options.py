"""AUTOMATIC1111's options and listings, ``/sdapi/v1``: ``options`` (read, and set: a new
``sd_model_checkpoint`` switches the model; the read-only keys refuse a change), ``samplers``,
``schedulers``, ``sd-models``, ``refresh-checkpoints``, ``sd-vae`` and ``scripts``.

Option values are checked as a request's ``override_settings`` are (:mod:`opensd.serving.a1111`):
a bad one is a 422 naming the key and what it allows.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request

from opensd.diffusion.registry import list_samplers
from opensd.serving.a1111 import SCHEDULERS, clip_skip_option, decoder_option
from opensd.serving.errors import ApiError
from opensd.serving.queue import PREVIEW_FORMATS, PREVIEW_MODES
from opensd.serving.schemas import SamplerItem, SchedulerItem, ScriptsList, SDModelItem
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible"])

READ_ONLY_OPTIONS = ("sd_checkpoint_hash", "samples_format", "opensd_models_dir")


def _options(st: ServerState) -> dict[str, Any]:
    reg = st.registry
    return {
        "sd_model_checkpoint": reg.current_title(),
        "sd_checkpoint_hash": reg.sha256(reg.current_checkpoint),
        "samples_format": "png",
        "opensd_models_dir": str(reg.models_dir) if reg.models_dir else None,
        **st.options,
    }


@router.get("/options", summary="Current options")
def get_options(request: Request) -> dict[str, Any]:
    return _options(server_state(request))


@router.post("/options", summary="Set options; sd_model_checkpoint switches the model")
def set_options(request: Request, body: dict[str, Any] = Body(...)) -> None:
    st = server_state(request)
    current = _options(st)
    for key in READ_ONLY_OPTIONS:
        if key in body and body[key] != current[key]:
            raise ApiError(422, f"option {key!r} is read-only on this server", param=key)
    if "CLIP_stop_at_last_layers" in body:
        clip_skip_option(st, body, st.registry.current)
    if "live_previews_enable" in body and not isinstance(body["live_previews_enable"], bool):
        raise ApiError(422, "live_previews_enable must be true or false", param="live_previews_enable")
    if "show_progress_type" in body and body["show_progress_type"] not in PREVIEW_MODES:
        allowed = ", ".join(repr(m) for m in PREVIEW_MODES)
        raise ApiError(422, f"show_progress_type must be one of {allowed}; got {body['show_progress_type']!r}", param="show_progress_type")
    if "live_previews_image_format" in body and body["live_previews_image_format"] not in PREVIEW_FORMATS:
        allowed = ", ".join(repr(m) for m in PREVIEW_FORMATS)
        raise ApiError(422, f"live_previews_image_format must be one of {allowed}; got {body['live_previews_image_format']!r}",
                       param="live_previews_image_format")
    if "sd_vae_decode_method" in body:
        decoder_option(st, body, st.registry.current)
    if body.get("sd_model_checkpoint") is not None:
        st.registry.switch(body["sd_model_checkpoint"])
    with st.options_lock:
        for key in st.options:
            if key in body:
                st.options[key] = body[key]
    return None  # A1111 answers null; other keys are ignored as A1111 ignores unknown ones


@router.get("/samplers", response_model=list[SamplerItem], summary="Samplers (name: A1111's; aliases: opensd ids)")
def samplers() -> list[dict]:
    out = []
    for spec in list_samplers():
        options = {k: str(v) for k, v in spec.options().items()}
        if spec.stochastic:
            options["uses_ensd"] = "True"
        out.append({"name": spec.a1111_name, "aliases": [spec.id, *spec.aliases], "options": options})
    return out


@router.get("/schedulers", response_model=list[SchedulerItem], summary="Sigma spacings")
def schedulers() -> list[dict]:
    return [
        {"name": n, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
        for n, label, _, rho in SCHEDULERS
    ]


@router.get("/sd-models", response_model=list[SDModelItem], summary="Models this server can switch to")
def sd_models(request: Request) -> list[dict]:
    reg = server_state(request).registry
    return [reg.describe(c) for c in reg.checkpoints()]


@router.post("/refresh-checkpoints", summary="Rescan the models folder (it is rescanned on every listing anyway)")
def refresh_checkpoints() -> None:
    return None


@router.get("/sd-vae", summary="Separate VAEs (none: each model uses its own)")
def sd_vae() -> list:
    return []


@router.get("/scripts", response_model=ScriptsList, summary="Scripts (none)")
def scripts() -> dict:
    return {"txt2img": [], "img2img": []}
