"""Upscaling over A1111's API: ``GET /sdapi/v1/upscalers``, ``/sdapi/v1/latent-upscale-modes``,
``POST /sdapi/v1/extra-single-image`` and ``/sdapi/v1/extra-batch-images`` (A1111's Extras tab).

The server's upscaler folder (``opensd serve --upscaler-dir``,
:class:`~opensd.pipelines.upscalers.UpscalerLibrary`) adds its model files (ESRGAN,
Real-ESRGAN, SwinIR...) to ``None``, ``Lanczos`` and ``Nearest``; a request names them as
``/upscalers`` lists them (never by path). Extras: ``resize_mode`` 0 scales by
``upscaling_resize``, 1 goes to ``upscaling_resize_w`` x ``upscaling_resize_h`` (with
``upscaling_crop``: covering it and cutting the overflow equally, else stretched);
``upscaler_1`` ``None`` returns the image as it is (as A1111), ``upscaler_2`` is blended in
at ``extras_upscaler_2_visibility``. The output must be within ``--max-size`` on each side
(a 422 before any work); the work runs on the generation queue, one image at a time, a
model in tiles (bounded memory). Face restoration fields are ignored.
"""

from __future__ import annotations

import html
import math
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from opensd.errors import OpenSDError
from opensd.pipelines.upscalers import LATENT_MODES, Upscaler
from opensd.serving.codec import decode_image, encode_png
from opensd.serving.errors import ApiError
from opensd.serving.queue import Job
from opensd.serving.schemas import (
    ExtrasBatchImagesRequest,
    ExtrasBatchImagesResponse,
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    LatentUpscalerModeItem,
    UpscalerItem,
)
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible"])

MAX_EXTRAS_SCALE = 8.0
MAX_BATCH_IMAGES = 16


def _upscaler(st: ServerState, name: str, what: str) -> Upscaler | None:
    if name is None or name.strip() == "None":
        return None
    try:
        return st.upscalers.resolve(name, latent=False, what=what)
    except OpenSDError as e:
        raise ApiError(422, str(e), param=what) from None


def _target(st: ServerState, body: ExtrasSingleImageRequest, image: Image.Image, where: str) -> tuple[int, int, tuple[int, int] | None]:
    """(upscaled width, height, the crop size or None), checked against the server's limits."""
    if body.resize_mode == 0:
        s = body.upscaling_resize
        if not math.isfinite(s) or not 1.0 <= s <= MAX_EXTRAS_SCALE:
            raise ApiError(422, f"upscaling_resize must be from 1 to {MAX_EXTRAS_SCALE:g}, got {s}", param="upscaling_resize")
        w, h, crop = round(image.width * s), round(image.height * s), None
    elif body.resize_mode == 1:
        tw, th = body.upscaling_resize_w, body.upscaling_resize_h
        if tw < 1 or th < 1:
            raise ApiError(422, f"upscaling_resize_w and _h must be positive, got {tw}x{th}", param="upscaling_resize_w")
        if body.upscaling_crop:
            k = max(tw / image.width, th / image.height)
            w, h, crop = max(tw, round(image.width * k)), max(th, round(image.height * k)), (tw, th)
        else:
            w, h, crop = tw, th, None
    else:
        raise ApiError(422, f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to a size), got {body.resize_mode}",
                       param="resize_mode")
    if w > st.limits.max_width or h > st.limits.max_height:
        raise ApiError(422, f"{where} would be upscaled to {w}x{h}; this server makes at most "
                       f"{st.limits.max_width}x{st.limits.max_height} (--max-size)", param="upscaling_resize")
    return w, h, crop


def _run(image: Image.Image, size: tuple[int, int, tuple[int, int] | None], first: Upscaler | None,
         second: Upscaler | None, visibility: float) -> Image.Image:
    w, h, crop = size
    if first is None:
        return image
    out = first.upscale_image(image, w, h)
    if second is not None and visibility > 0:
        out = Image.blend(out, second.upscale_image(image, w, h), min(1.0, visibility))
    if crop is not None and out.size != crop:
        left, top = (out.width - crop[0]) // 2, (out.height - crop[1]) // 2
        out = out.crop((left, top, left + crop[0], top + crop[1]))
    return out


def _plan(st: ServerState, body: ExtrasSingleImageRequest, sources: list[tuple[str, str]]) -> list[tuple[Image.Image, Any]]:
    first = _upscaler(st, body.upscaler_1, "upscaler_1")
    second = _upscaler(st, body.upscaler_2, "upscaler_2") if body.extras_upscaler_2_visibility > 0 else None
    if not math.isfinite(body.extras_upscaler_2_visibility) or not 0 <= body.extras_upscaler_2_visibility <= 1:
        raise ApiError(422, "extras_upscaler_2_visibility must be from 0 to 1", param="extras_upscaler_2_visibility")
    work = []
    for data, where in sources:
        image = decode_image(data, where, max_pixels=st.limits.max_input_pixels).convert("RGB")
        work.append((image, (_target(st, body, image, where), first, second, body.extras_upscaler_2_visibility)))
    return work


def _info(body: ExtrasSingleImageRequest) -> str:
    if body.upscaler_1 in (None, "None"):
        return ""
    by = f"Postprocess upscale by: {body.upscaling_resize:g}" if body.resize_mode == 0 else \
         f"Postprocess upscale to: {body.upscaling_resize_w}x{body.upscaling_resize_h}"
    return html.escape(f"{by}, Postprocess upscaler: {body.upscaler_1}")


async def _submit(request: Request, body: ExtrasSingleImageRequest, sources: list[tuple[str, str]]) -> list[str]:
    st = server_state(request)
    job = Job("extras", max_seconds=st.limits.max_seconds)

    def work(j: Job, planned: list) -> list[str]:
        out = []
        for k, (image, args) in enumerate(planned):
            j.next_batch(k)
            if j.must_stop() or j.interrupted.is_set():
                break
            out.append(encode_png(_run(image, *args)))
        return out

    return await st.queue.submit(job, work, prepare=lambda: _plan(st, body, sources), disconnected=request.is_disconnected)


@router.get("/upscalers", response_model=list[UpscalerItem], summary="Upscalers: None, Lanczos, Nearest and the upscaler folder's models")
def upscalers(request: Request) -> list[dict]:
    st = server_state(request)
    st.upscalers.refresh()
    return st.upscalers.listing()


@router.get("/latent-upscale-modes", response_model=list[LatentUpscalerModeItem], summary="The hires fix's latent upscalers")
def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_MODES]


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse, summary="Upscale one image (A1111's Extras)")
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request) -> dict:
    images = await _submit(request, body, [(body.image, "image")])
    return {"html_info": _info(body), "image": images[0] if images else ""}


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse, summary="Upscale several images (A1111's Extras)")
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request) -> dict:
    if not body.imageList or len(body.imageList) > MAX_BATCH_IMAGES:
        raise ApiError(422, f"imageList must hold 1 to {MAX_BATCH_IMAGES} images, got {len(body.imageList)}", param="imageList")
    sources = [(item.data, f"imageList[{i}]") for i, item in enumerate(body.imageList)]
    return {"html_info": _info(body), "images": await _submit(request, body, sources)}
