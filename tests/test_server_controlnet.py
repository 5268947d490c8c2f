"""sd-webui-controlnet's API on the server: /controlnet/model_list, module_list, version;
alwayson_scripts.controlnet units in txt2img and img2img (equal to the library's runs), their
bad input, and concurrent requests with different ControlNets against their sequential results."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import png_pixels, randomize, tiny_word_bundle
from PIL import Image

import opensd
from opensd.checkpoints.controlnet import controlnet_config_for, save_controlnet, save_controlnet_diffusers
from opensd.checkpoints.opensd_format import save_opensd
from opensd.models.controlnet import ControlNet
from opensd.pipelines.control import ControlUnit, controlnet_for
from opensd.pipelines.control_resize import ResizeMode
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread
from opensd.serving.controlnet_api import pixel_perfect_resolution

TIMEOUT = 60.0


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-cn")
    model, tok = tiny_word_bundle()
    pipe = opensd.load(save_opensd(model, tok, root / "tiny-shapes"))
    folder = root / "ControlNet"
    folder.mkdir()
    cfg = controlnet_config_for(model.cfg, (16, 32))
    for name, seed in (("edges", 3), ("layout", 4)):
        torch.manual_seed(seed)
        net = randomize(ControlNet(cfg), seed, 0.1)
        save_controlnet(net, folder / f"{name}.safetensors") if name == "edges" else save_controlnet_diffusers(net, folder / name)
    sd2 = ControlNet(dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, context_dim=1024)))
    save_controlnet(sd2, folder / "for_sd2.safetensors")
    return pipe, folder


@pytest.fixture(scope="module")
def client(setup):
    pipe, folder = setup
    with TestClient(create_app(pipe, controlnet_dir=folder)) as c:
        yield c


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _hint(seed: int, size=(32, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _unit(model: str, image: Image.Image | None = None, **kw) -> dict:
    unit = {"enabled": True, "module": "none", "model": model, "weight": 1.0, "resize_mode": "Crop and Resize",
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "pixel_perfect": False, **kw}
    if image is not None:
        unit["image"] = _b64(image)
    return unit


def _txt2img(http, units, **kw) -> httpx.Response:
    body = {"prompt": "a red circle", "steps": 3, "seed": 11, "width": 32, "height": 32, "sampler_name": "Euler",
            "alwayson_scripts": {"controlnet": {"args": units}}, **kw}
    return http.post("/sdapi/v1/txt2img", json=body)


def test_listings(client):
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert [re.sub(r" \[\w{8}\]$", "", m) for m in models] == ["edges", "for_sd2", "layout"]
    modules = client.get("/controlnet/module_list").json()
    assert {"none", "canny", "scribble_xdog", "lineart_standard", "segmentation"} <= set(modules["module_list"])
    assert client.get("/controlnet/version").json() == {"version": 2}


def test_txt2img_units_equal_the_librarys_run(client, setup):
    pipe, folder = setup
    title = next(m for m in client.get("/controlnet/model_list").json()["model_list"] if m.startswith("edges"))
    hint = _hint(1, (48, 40))  # another size: fitted by the resize mode
    r = _txt2img(client, [_unit(title, hint, weight=0.7, control_mode="My prompt is more important", guidance_end=0.6,
                                resize_mode=2), _unit("layout", _hint(2), module="canny", threshold_a=50, threshold_b=150)])
    assert r.status_code == 200, r.text
    units = [ControlUnit(controlnet_for(pipe, folder / "edges.safetensors"), hint, weight=0.7, mode="prompt", end=0.6, resize="fill"),
             ControlUnit(controlnet_for(pipe, folder / "layout"), _hint(2), preprocessor="canny", threshold_a=50, threshold_b=150)]
    want = pipe.txt2img("a red circle", steps=3, seed=11, width=32, height=32, sampler="euler", cfg_scale=7.0, control=units)[0]
    assert np.array_equal(png_pixels(r.json()["images"][0]), np.asarray(want))
    info = json.loads(r.json()["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: none, Model: edges [' in info and "Resize Mode: Resize and Fill" in info
    assert "ControlNet 1: \"Module: canny, Model: layout [" in info
    plain = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 11, "width": 32, "height": 32,
                                                    "sampler_name": "Euler"})
    assert np.abs(png_pixels(plain.json()["images"][0]).astype(int) - np.asarray(want)).max() > 10


def test_disabled_units_and_model_none_are_left_out(client):
    plain = _txt2img(client, [])
    off = _txt2img(client, [_unit("edges", _hint(1), enabled=False), _unit("None", _hint(1))])
    assert off.status_code == 200, off.text
    assert off.json()["images"] == plain.json()["images"]


def test_img2img_unit_takes_the_init_image_and_pixel_perfect(client, setup):
    pipe, folder = setup
    init = _hint(5)
    body = {"prompt": "a blue square", "init_images": [_b64(init)], "steps": 4, "seed": 3, "denoising_strength": 0.6,
            "sampler_name": "Euler", "alwayson_scripts": {"ControlNet": {"args": [_unit("edges", module="canny", pixel_perfect=True)]}}}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    unit = ControlUnit(controlnet_for(pipe, folder / "edges.safetensors"), preprocessor="canny", resolution=64)
    want = pipe.img2img(init, "a blue square", steps=4, seed=3, strength=0.6, sampler="euler", cfg_scale=7.0, control=[unit])[0]
    assert np.array_equal(png_pixels(r.json()["images"][0]), np.asarray(want))
    assert pixel_perfect_resolution(Image.new("RGB", (100, 50)), 512, 512, ResizeMode.CROP) == 512  # covers: short side x 10.24
    assert pixel_perfect_resolution(Image.new("RGB", (100, 50)), 512, 512, ResizeMode.FILL) == 256  # fits: x 5.12


@pytest.mark.parametrize("units, message", [
    (lambda: [_unit("canny_v11", _hint(0))], r"args\[0\]: unknown ControlNet model 'canny_v11' in .*; known: edges \[\w{8}\], for_sd2"),
    (lambda: [_unit("edges", _hint(0), module="openpose")], r"args\[0\]: unknown control preprocessor 'openpose'; known: none"),
    (lambda: [_unit("for_sd2", _hint(0))], r"args\[0\]: .*for_sd2\.safetensors is a ControlNet for SD 2\.x .*the model is sd1"),
    (lambda: [_unit("edges")], r"args\[0\] has no image: txt2img needs one per unit"),
    (lambda: [_unit("edges", _hint(0), weight=5)], r"args\[0\]: control weight must be a number from 0 to 2, got 5"),
    (lambda: [_unit("edges", _hint(0), control_mode="loud")], r"args\[0\]: unknown control mode 'loud'"),
    (lambda: [_unit("edges", _hint(0), resize_mode=7)], r"args\[0\]: unknown control resize mode 7"),
    (lambda: [_unit("edges", _hint(0), guidance_start=0.8, guidance_end=0.2)], "guidance start .* must not be after its end"),
    (lambda: [{**_unit("edges"), "image": "not base64!"}], r"args\[0\]\.image is not valid base64"),
    (lambda: ["edges"], r"args\[0\] must be an object"),
    (lambda: [_unit("edges", _hint(0))] * 9, "holds 9 units; at most 8"),
])
def test_bad_units_are_4xx_with_one_line(client, units, message):
    r = _txt2img(client, units())
    assert 400 <= r.status_code < 500 and re.search(message, r.json()["detail"]), r.text
    assert "\n" not in r.json()["detail"]


def test_without_a_controlnet_folder_a_unit_is_a_422(setup):
    pipe, _ = setup
    with TestClient(create_app(pipe)) as c:
        assert c.get("/controlnet/model_list").json() == {"model_list": []}
        r = _txt2img(c, [_unit("edges", _hint(0))])
        assert r.status_code == 422 and "no ControlNet folder is set on this server" in r.json()["detail"]


def test_concurrent_requests_with_different_controlnets_equal_their_sequential_results(setup):
    pipe, folder = setup
    app = create_app(pipe, controlnet_dir=folder, limits=Limits(workers=3, max_queue=16))
    variants = [[], [_unit("edges", _hint(1))], [_unit("layout", _hint(2), weight=1.5)],
                [_unit("edges", _hint(3), control_mode=2), _unit("layout", _hint(4), guidance_end=0.5)]]
    bodies = [(variants[i % 4], 30 + i // 4) for i in range(8)]
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            alone = [_txt2img(http, units, seed=seed) for units, seed in bodies]

        def post(args):
            with httpx.Client(base_url=url, timeout=TIMEOUT) as h:
                return _txt2img(h, args[0], seed=args[1])

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(post, bodies))
    assert all(r.status_code == 200 for r in alone + together), [r.text for r in alone + together if r.status_code != 200]
    for a, b in zip(alone, together, strict=True):
        assert a.json()["images"] == b.json()["images"]  # identical PNG bytes, infotext included
    assert len({a.json()["images"][0] for a in alone}) == 8  # every ControlNet setting and seed drew its own image
