"""The hires fix and upscaling over A1111's API: enable_hr and its fields (equal to the library's
hires_fix), /sdapi/v1/upscalers, latent-upscale-modes, extra-single-image and extra-batch-images,
their limits and bad input, and the webuiapi client driving all of it (with a ControlNet unit)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import decode_png, png_pixels, randomize, tiny_word_bundle
from PIL import Image
from test_upscalers import tiny_compact_state

import opensd
from opensd.checkpoints.controlnet import controlnet_config_for, save_controlnet
from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.opensd_format import save_opensd
from opensd.models.controlnet import ControlNet
from opensd.pipelines.hires import HiresFix, hires_fix
from opensd.pipelines.upscalers import LATENT_MODES, UpscalerLibrary
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread

TIMEOUT = 60.0


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-hires")
    model, tok = tiny_word_bundle()
    pipe = opensd.load(save_opensd(model, tok, root / "tiny-shapes"))
    for name in ("ESRGAN", "ControlNet"):
        (root / name).mkdir()
    write_safetensors(tiny_compact_state(2), root / "ESRGAN" / "compact_x2.safetensors")
    torch.manual_seed(3)
    save_controlnet(randomize(ControlNet(controlnet_config_for(model.cfg, (16, 32))), 3, 0.1), root / "ControlNet" / "edges.safetensors")
    return pipe, root


@pytest.fixture(scope="module")
def client(setup):
    pipe, root = setup
    app = create_app(pipe, upscaler_dir=root / "ESRGAN", controlnet_dir=root / "ControlNet",
                     limits=Limits(max_width=128, max_height=128, max_work=300))
    with TestClient(app) as c:
        yield c


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(seed: int, w: int = 24, h: int = 20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _txt2img(http, **kw):
    body = {"prompt": "a red circle", "steps": 3, "seed": 5, "width": 32, "height": 32, "sampler_name": "Euler",
            "enable_hr": True, **kw}
    return http.post("/sdapi/v1/txt2img", json=body)


def test_enable_hr_equals_the_librarys_hires_fix(client, setup):
    pipe, root = setup
    r = _txt2img(client, hr_scale=2, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=2, denoising_strength=0.6)
    assert r.status_code == 200, r.text
    req = pipe.request("a red circle", steps=3, seed=5, sampler="euler", cfg_scale=7.0)
    want = hires_fix(pipe, req, HiresFix(scale=2, upscaler="Latent (bicubic)", steps=2, denoising_strength=0.6))
    got = decode_png(r.json()["images"][0])
    assert got.size == (64, 64) and np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.images[0]))
    info = json.loads(r.json()["info"])
    assert info["infotexts"][0] == want.infotexts[0] and info["width"] == 32 and info["denoising_strength"] == 0.6
    assert info["extra_generation_params"]["Hires upscale"] == 2 and info["extra_generation_params"]["Hires steps"] == 2
    plain = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 5, "width": 32, "height": 32,
                                                    "hr_scale": 3})  # enable_hr off: the hr_* fields do nothing
    assert decode_png(plain.json()["images"][0]).size == (32, 32) and "Hires" not in json.loads(plain.json()["info"])["infotexts"][0]


def test_hires_with_an_upscaler_model_a_size_a_prompt_a_sampler_and_a_controlnet(client, setup):
    pipe, root = setup
    unit = {"model": "edges", "image": _b64(_image(1, 32, 32)), "module": "none"}
    r = _txt2img(client, hr_resize_x=48, hr_resize_y=40, hr_upscaler="compact_x2", hr_prompt="a blue square",
                 hr_sampler_name="DPM++ 2M", alwayson_scripts={"controlnet": {"args": [unit]}})
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["images"][0]).size == (48, 40)
    params = json.loads(r.json()["info"])["infotexts"][0].splitlines()[-1]
    assert re.search(r'ControlNet 0: "Module: none, Model: edges \[\w{8}\].*", Hires sampler: DPM\+\+ 2M, Hires prompt: a blue square, '
                     r"Hires resize: 48x40, Hires upscaler: compact_x2$", params), params
    assert "Denoising strength: 0.75" in params  # A1111's API default


@pytest.mark.parametrize("fields, message", [
    ({"hr_scale": 5}, r"hr_scale would make 160x160 from 32x32; this server draws at most 128x128 \(--max-size\)"),
    ({"hr_resize_x": 256}, r"hr_resize_x/hr_resize_y would make 256x256 from 32x32"),
    ({"hr_upscaler": "R-ESRGAN 4x+"}, r"unknown hires upscaler 'R-ESRGAN 4x\+' \(folder .*\); known: Latent, .*compact_x2"),
    ({"hr_scale": 0.5}, "hires scale must be a number from 1 to 8"),
    ({"denoising_strength": 2}, "hires denoising strength must be a number from 0 to 1"),
    ({"hr_sampler_name": "Euler z"}, "Sampler not found"),
    ({"hr_scale": 4, "steps": 20}, r"too much work .* \+ the hires fix's 20 steps at 128x128"),
    ({"hr_prompt": "a red circle <lora:nothing:1>"}, "no LoRA folder is set"),
])
def test_bad_hires_fields_are_4xx_with_one_line(client, fields, message):
    r = _txt2img(client, **fields)
    assert 400 <= r.status_code < 500 and re.search(message, r.json()["detail"]), r.text
    assert "\n" not in r.json()["detail"]


def test_upscaler_listings(client):
    items = client.get("/sdapi/v1/upscalers").json()
    assert [i["name"] for i in items] == ["None", "Lanczos", "Nearest", "compact_x2"]
    assert items[-1]["scale"] == 2 and items[-1]["model_path"].endswith("compact_x2.safetensors")
    assert [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()] == list(LATENT_MODES)


def test_extra_single_and_batch_images(client, setup):
    _, root = setup
    image = _image(0)
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(image), "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    assert np.array_equal(png_pixels(r.json()["image"]), np.asarray(image.resize((48, 40), Image.Resampling.LANCZOS)))
    assert r.json()["html_info"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    model = UpscalerLibrary(root / "ESRGAN").resolve("compact_x2")
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(image), "upscaler_1": "compact_x2", "resize_mode": 1,
                                                            "upscaling_resize_w": 40, "upscaling_resize_h": 40, "upscaling_crop": True})
    assert r.status_code == 200, r.text
    big = model.upscale_image(image, 48, 40)  # covers 40x40: 48x40, then the middle 40x40
    assert np.array_equal(png_pixels(r.json()["image"]), np.asarray(big.crop((4, 0, 44, 40))))
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(image)})  # upscaler_1 None: the image as it is
    assert np.array_equal(png_pixels(r.json()["image"]), np.asarray(image))
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": _b64(image), "name": "a"}, {"data": _b64(_image(1))}],
                                                           "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
                                                           "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.text
    want = Image.blend(image.resize((48, 40), Image.Resampling.NEAREST), image.resize((48, 40), Image.Resampling.LANCZOS), 0.5)
    assert len(r.json()["images"]) == 2 and np.array_equal(png_pixels(r.json()["images"][0]), np.asarray(want))


@pytest.mark.parametrize("body, message", [
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8}, r"would be upscaled to 192x160; this server makes at most 128x128"),
    ({"upscaler_1": "4x-UltraSharp"}, r"unknown upscaler_1 '4x-UltraSharp'.*known: None, Lanczos, Nearest, compact_x2"),
    ({"upscaler_1": "Latent"}, r"upscaler_1 'Latent' upscales latents"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 0.5}, "upscaling_resize must be from 1 to 8"),
    ({"upscaler_1": "Lanczos", "resize_mode": 3}, "resize_mode must be 0"),
    ({"upscaler_1": "Lanczos", "image": "%%%"}, "image is not valid base64"),
])
def test_bad_extras_are_4xx_with_one_line(client, body, message):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_image(0)), **body})
    assert 400 <= r.status_code < 500 and re.search(message, r.json()["detail"]), r.text


def test_webuiapi_drives_hires_extras_and_controlnet(setup):
    webuiapi = pytest.importorskip("webuiapi")
    pipe, root = setup
    app = create_app(pipe, upscaler_dir=root / "ESRGAN", controlnet_dir=root / "ControlNet")
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
        import functools

        api.session.request = functools.partial(api.session.request, timeout=TIMEOUT)
        assert "compact_x2" in [u["name"] for u in api.get_upscalers()]
        unit = webuiapi.ControlNetUnit(image=_image(2, 32, 32), module="canny", model=api.controlnet_model_list()[0])
        res = api.txt2img(prompt="a red circle", seed=3, width=32, height=32, enable_hr=True, hr_scale=1.5,
                          hr_upscaler=webuiapi.HiResUpscaler.Lanczos, denoising_strength=0.5, controlnet_units=[unit])
        assert res.image.size == (48, 48)
        text = res.image.info["parameters"]
        assert "Hires upscale: 1.5" in text and "Hires upscaler: Lanczos" in text and 'ControlNet 0: "Module: canny' in text
        up = api.extra_single_image(image=res.image, upscaler_1="compact_x2", upscaling_resize=2)
        assert up.image.size == (96, 96)
        assert api.controlnet_version() == 2 and "canny" in api.controlnet_module_list()
