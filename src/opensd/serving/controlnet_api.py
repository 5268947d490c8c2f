"""sd-webui-controlnet's API on opensd: ``alwayson_scripts.controlnet.args`` units in txt2img
and img2img, ``GET /controlnet/model_list``, ``/controlnet/module_list``, ``/controlnet/version``.

ControlNet models come from the server's ControlNet folder (``opensd serve --controlnet-dir``,
:class:`~opensd.pipelines.controlnet_library.ControlNetLibrary`), named by file or folder
name or by the title ``model_list`` gives (``name [hash]``). A unit takes the extension's
field names (:func:`control_units`): ``enabled``, ``module``, ``model``, ``weight``,
``image`` (or ``input_image``; a base64 image, or ``{"image": ...}``), ``resize_mode``
(``Just Resize``, ``Crop and Resize``, ``Resize and Fill`` or 0, 1, 2), ``guidance_start``,
``guidance_end``, ``control_mode`` (``Balanced``, ``My prompt is more important``,
``ControlNet is more important`` or 0, 1, 2), ``pixel_perfect``, ``processor_res``,
``threshold_a``, ``threshold_b`` (-1: the preprocessor's default). A unit that is not
``enabled``, or whose model is ``None``, is left out, as the extension leaves it. An img2img
unit without an image takes the init image. A control image of another size is fitted to
the output by the unit's resize mode (and to the hires fix's size on its second pass).

Every unit is checked while the request is planned, before it is queued: an unknown module
or model, a ControlNet for another family or width, a bad setting or an unreadable image
is a 422 naming the unit and the field. Each request gets its own units; the loaded
ControlNets are only read, so concurrent requests with different ControlNets do not
affect each other.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from opensd.errors import OpenSDError
from opensd.pipelines.control import ControlUnit
from opensd.pipelines.control_resize import ResizeMode
from opensd.pipelines.controlnet_library import NO_MODEL
from opensd.pipelines.preprocessors import ALIASES, PREPROCESSORS
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving.codec import decode_image
from opensd.serving.errors import ApiError
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/controlnet", tags=["sd-webui-controlnet-compatible"])

API_VERSION = 2  # what sd-webui-controlnet's /controlnet/version answers
MAX_UNITS = 8
SCRIPT_NAMES = ("controlnet",)  # alwayson_scripts keys, compared lower-cased
MIN_RES, MAX_RES = 64, 4096


def _script_args(alwayson: Any) -> list[Any]:
    if alwayson is None:
        return []
    if not isinstance(alwayson, dict):
        raise ApiError(422, "alwayson_scripts must be an object of script names to {\"args\": [...]}", param="alwayson_scripts")
    for key, value in alwayson.items():
        if isinstance(key, str) and key.strip().lower() in SCRIPT_NAMES:
            args = value.get("args") if isinstance(value, dict) else None
            if not isinstance(args, list):
                raise ApiError(422, f"alwayson_scripts.{key}.args must be a list of ControlNet units", param="alwayson_scripts")
            return args
    return []  # other scripts: ignored, as A1111 ignores scripts it does not have


def _image_of(unit: dict[str, Any], where: str, max_pixels: int) -> Image.Image | None:
    value = unit.get("image", unit.get("input_image"))
    if isinstance(value, dict):  # newer clients: {"image": b64, "mask": b64}
        value = value.get("image")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"{where}.image must be a base64 image, got {type(value).__name__}", param=f"{where}.image")
    return decode_image(value, f"{where}.image", max_pixels=max_pixels)


def _number(unit: dict[str, Any], name: str, default: float, where: str) -> float:
    v = unit.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(422, f"{where}.{name} must be a number, got {v!r:.60}", param=f"{where}.{name}")
    return float(v)


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize: ResizeMode) -> int:
    """sd-webui-controlnet's pixel-perfect preprocessor resolution: the image's shorter side scaled
    as the resize mode will scale it to ``width`` x ``height`` (fill: to fit inside, else: to cover)."""
    k0, k1 = height / image.height, width / image.width
    k = min(k0, k1) if resize is ResizeMode.FILL else max(k0, k1)
    return max(MIN_RES, min(MAX_RES, round(k * min(image.width, image.height))))


def _unit(
    st: ServerState, pipe: StableDiffusionPipeline, raw: Any, i: int, init_image: Image.Image | None, size: tuple[int, int],
) -> ControlUnit | None:
    where = f"alwayson_scripts.controlnet.args[{i}]"
    if not isinstance(raw, dict):
        raise ApiError(422, f"{where} must be an object (a ControlNet unit), got {type(raw).__name__}", param=where)
    if raw.get("enabled", True) is False:
        return None
    model = raw.get("model")
    if model is None or (isinstance(model, str) and model.strip().lower() in NO_MODEL):
        return None
    try:
        entry = st.controlnets.find(model)
        net = st.controlnets.load(entry, pipe)
        image = _image_of(raw, where, st.limits.max_input_pixels)
        if image is None and init_image is None:
            raise ApiError(422, f"{where} has no image: txt2img needs one per unit (img2img takes the init image)",
                           param=f"{where}.image")
        resize = ResizeMode.parse(raw.get("resize_mode", ResizeMode.CROP.value))
        module = raw.get("module", "none") or "none"
        res: int | None = None
        if bool(raw.get("pixel_perfect", False)) and (source := image or init_image) is not None:
            res = pixel_perfect_resolution(source, *size, resize)
        elif str(module).lower() != "none" and _number(raw, "processor_res", -1, where) > 0:
            res = max(MIN_RES, min(MAX_RES, int(_number(raw, "processor_res", -1, where))))
        thresholds = [_number(raw, n, -1, where) for n in ("threshold_a", "threshold_b")]
        return ControlUnit(
            net, image, preprocessor=module, weight=_number(raw, "weight", 1.0, where),
            start=_number(raw, "guidance_start", 0.0, where), end=_number(raw, "guidance_end", 1.0, where),
            mode=raw.get("control_mode", 0), resize=resize, resolution=res,
            threshold_a=None if thresholds[0] < 0 else thresholds[0], threshold_b=None if thresholds[1] < 0 else thresholds[1],
        )
    except ApiError:
        raise
    except OpenSDError as e:
        raise ApiError(422, f"{where}: {' '.join(str(e).split())}", param=where) from None


def control_units(
    st: ServerState, pipe: StableDiffusionPipeline, alwayson: Any, init_image: Image.Image | None, size: tuple[int, int],
) -> list[ControlUnit]:
    """The request's ControlNet units (module doc), each checked for ``pipe``'s model; [] when it has none."""
    raw = _script_args(alwayson)
    if len(raw) > MAX_UNITS:
        raise ApiError(422, f"alwayson_scripts.controlnet.args holds {len(raw)} units; at most {MAX_UNITS}",
                       param="alwayson_scripts")
    units = [_unit(st, pipe, u, i, init_image, size) for i, u in enumerate(raw)]
    return [u for u in units if u is not None]


def module_names() -> list[str]:
    return [*PREPROCESSORS, *ALIASES]


@router.get("/model_list", summary="ControlNet models of the server's folder (--controlnet-dir)")
def model_list(request: Request) -> dict[str, list[str]]:
    st = server_state(request)
    st.controlnets.refresh()
    return {"model_list": st.controlnets.titles()}


@router.get("/module_list", summary="Preprocessors (modules) this server runs")
def module_list() -> dict[str, Any]:
    detail = {name: {"model_free": True, "sliders": []} for name in module_names()}
    return {"module_list": module_names(), "module_detail": detail}


@router.get("/version", summary="The sd-webui-controlnet API version this server follows")
def version() -> dict[str, int]:
    return {"version": API_VERSION}
