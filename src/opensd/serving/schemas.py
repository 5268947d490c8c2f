"""Request and response bodies: AUTOMATIC1111's ``/sdapi/v1`` JSON and OpenAI's Images API.

Field names, types and defaults follow A1111's API (``modules/api/models.py``, v1.10),
so existing clients work unchanged. ``enable_hr`` and its ``hr_*`` fields run the hires fix
(:mod:`opensd.serving.hires_api`); ``alwayson_scripts.controlnet`` runs ControlNet units
(:mod:`opensd.serving.controlnet_api`). Fields A1111 accepts that do not apply here
(``styles``, ``subseed``, ``restore_faces``, other scripts, ...) and any field nobody
knows are ignored, as A1111 ignores unknown fields.

Defaults that differ from A1111, on purpose:

- ``width``/``height``: A1111 defaults to 512; here an omitted size means the model's
  native size (``SDConfig.image_size``): 512 for SD 1.x, 768 for SD 2.x 768-v, 512 for
  SD 2.x base, 1024 for SDXL and its refiner, and what small models are trained at.
- ``refiner_switch_at``: A1111 leaves it None (its web UI shows 0.8); here a refiner
  without it switches at 0.8.
- ``steps``: 50 and ``cfg_scale``: 7.0 as A1111; ``sampler_index``: ``"Euler"`` as A1111.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Lenient(BaseModel):
    """A request body: unknown fields are ignored and ``null`` means "the default", as in A1111's API."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- generation requests


class Txt2ImgRequest(_Lenient):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1 picks a random seed; image i of a batch uses seed + i.")
    sampler_name: str | None = Field(None, description="An A1111 name ('DPM++ 2M', 'Euler a') or an opensd id.")
    sampler_index: str = Field("Euler", description="Older name of sampler_name; used when sampler_name is empty.")
    scheduler: str | None = Field(None, description="'Automatic', 'Karras', 'Exponential' or 'SGM Uniform' (A1111 >= 1.9).")
    batch_size: int = 1
    n_iter: int = Field(1, description="Batches run one after the other; batch k starts at seed + k * batch_size.")
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="Default: the model's native size.")
    height: int | None = Field(None, description="Default: the model's native size.")
    override_settings: dict[str, Any] | None = Field(
        None, description="Per-request options: sd_model_checkpoint, CLIP_stop_at_last_layers."
    )
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(
        None, description="A model (as sd_model_checkpoint names one, see /sdapi/v1/sd-models) that takes over sampling at "
        "refiner_switch_at, e.g. the SDXL refiner; it must share the model's latent space. '' or 'None': no refiner (A1111 >= 1.6).",
    )
    refiner_switch_at: float | None = Field(
        None, description="With refiner_checkpoint: the fraction of the steps after which the refiner samples, 0 to 1 (default 0.8).",
    )
    enable_hr: bool = Field(False, description="The hires fix: draw at width x height, upscale, redraw at the large size (txt2img).")
    denoising_strength: float = Field(0.75, description="The hires fix's second pass (img2img: the image's) denoising strength, 0..1.")
    hr_scale: float = Field(2.0, description="Hires fix: how much larger, 1..8 (when hr_resize_x and hr_resize_y are 0).")
    hr_upscaler: str | None = Field(
        None, description="Hires fix upscaler: a latent mode (/sdapi/v1/latent-upscale-modes) or an upscaler (/sdapi/v1/upscalers); "
        "default 'Latent'.",
    )
    hr_second_pass_steps: int = Field(0, description="Steps the hires fix's second pass runs; 0: steps.")
    hr_resize_x: int = Field(0, description="Hires fix to this width instead of hr_scale (0: from the aspect ratio or the scale).")
    hr_resize_y: int = Field(0, description="Hires fix to this height instead of hr_scale.")
    hr_prompt: str = Field("", description="The second pass's prompt; '': prompt.")
    hr_negative_prompt: str = Field("", description="The second pass's negative prompt; '': negative_prompt.")
    hr_sampler_name: str | None = Field(None, description="The second pass's sampler; empty: sampler_name.")
    alwayson_scripts: dict[str, Any] | None = Field(
        None, description="{'controlnet': {'args': [unit, ...]}}: sd-webui-controlnet's units (see /controlnet/model_list).",
    )
    script_name: str | None = None
    send_images: bool = True
    save_images: bool = False
    force_task_id: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = Field(None, description="One base64 PNG/JPEG (a data: URL prefix is allowed).")
    mask: str | None = Field(None, description="Base64 image the size of the init image; white is repainted.")
    inpainting_mask_invert: int = Field(0, description="1: repaint the black part of the mask instead.")
    mask_blur: int = Field(4, description="Gaussian blur radius applied to the mask, in pixels (A1111's default 4).")
    inpainting_fill: int = Field(
        0, description="Masked content: 0 fill (the colours around the mask), 1 original, 2 latent noise, 3 latent nothing (A1111's)."
    )
    inpaint_full_res: bool = Field(
        False, description="Inpaint area: true only the mask's region (plus inpaint_full_res_padding), cut out and "
        "generated at width x height, then pasted back; false the whole picture (A1111's default).",
    )
    inpaint_full_res_padding: int = Field(
        32, description="With inpaint_full_res: pixels of the picture kept around the mask's bounding box, 0 to 256 (A1111's default 32).",
    )
    include_init_images: bool = False


# ---------------------------------------------------------------- generation responses


class ImageResponse(BaseModel):
    """A1111's ``TextToImageResponse`` / ``ImageToImageResponse``."""

    images: list[str] = Field(description="Base64 PNGs, each with its infotext in the 'parameters' text chunk.")
    parameters: dict[str, Any] = Field(description="The request as understood.")
    info: str = Field(description="A JSON string: seed, all_seeds, infotexts, prompt, steps, sampler_name, ...")


class PngInfoRequest(_Lenient):
    image: str = Field(description="A base64 image (a data: URL prefix is allowed).")


class PngInfoResponse(BaseModel):
    info: str = Field(description="The raw infotext ('' when the image carries none).")
    items: dict[str, Any] = Field(default_factory=dict, description="Other text chunks of the image.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The infotext parsed into fields.")


class ProgressState(_Out):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queue_pending: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 over all batches of the current job.")
    eta_relative: float = Field(description="Estimated seconds left.")
    state: ProgressState
    current_image: str | None = Field(None, description="Base64 PNG decoded from the current x0 prediction.")
    textinfo: str | None = None


# ---------------------------------------------------------------- listings


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None
    family: str | None = Field(None, description="opensd: 'sd1', 'sd2', 'sdxl' or 'sdxl_refiner'; null when unknown until loaded.")
    image_size: int | None = Field(
        None, description="opensd: the native size in pixels (the default width and height); null when unknown until loaded."
    )


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- OpenAI Images API


class OpenAIImageRequest(_Lenient):
    """``POST /v1/images/generations``. ``negative_prompt``, ``steps``, ``seed``, ``cfg_scale`` and
    ``sampler_name`` are opensd extensions (send them with the client's ``extra_body``)."""

    prompt: str
    model: str | None = Field(
        None, description="A model this server lists (/sdapi/v1/sd-models) draws this request; omitted, or an OpenAI model "
        "name (dall-e-*, gpt-image-*): the current model.",
    )
    n: int = 1
    size: str | None = Field(
        None, description="'WxH' (multiples of 8, e.g. '1024x1024') or 'auto'; default: the model's native size (512, 768, 1024 ...)."
    )
    response_format: str | None = Field("b64_json", description="Only 'b64_json'.")
    output_format: str | None = Field(None, description="Only 'png'.")
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    negative_prompt: str = ""
    steps: int = 20
    seed: int = -1
    cfg_scale: float = 7.0
    sampler_name: str = "DPM++ 2M"


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: str = "png"
    size: str
    warnings: list[str] | None = Field(None, description="opensd: what to know about the result (e.g. clip skip has no effect).")


# ---------------------------------------------------------------- upscaling (A1111's Extras)


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class ExtrasSingleImageRequest(_Lenient):
    """A1111's ``ExtrasSingleImageRequest`` (its face restorers are not here: their fields are ignored)."""

    image: str = Field("", description="A base64 image.")
    resize_mode: int = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h.")
    upscaling_resize: float = Field(2.0, description="How much larger (resize_mode 0).")
    upscaling_resize_w: int = Field(512, description="Target width (resize_mode 1).")
    upscaling_resize_h: int = Field(512, description="Target height (resize_mode 1).")
    upscaling_crop: bool = Field(True, description="resize_mode 1: cover the target and crop the overflow (else: stretch).")
    upscaler_1: str = Field("None", description="An upscaler of /sdapi/v1/upscalers; 'None': the image as it is.")
    upscaler_2: str = Field("None", description="A second upscaler blended in at extras_upscaler_2_visibility.")
    extras_upscaler_2_visibility: float = 0.0


class ExtrasImage(_Lenient):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasSingleImageRequest):
    imageList: list[ExtrasImage] = Field(default_factory=list, description="Base64 images, each {'data', 'name'}.")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = ""
    image: str = ""


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = ""
    images: list[str] = Field(default_factory=list)
