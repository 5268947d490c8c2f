"""The HTTP server: A1111 and OpenAI JSON shapes, limits and bad input, auth, interrupt, concurrency.

Every request goes to an in-process app (FastAPI's TestClient) or to a real uvicorn on a
free 127.0.0.1 port; each is bounded by a timeout. The model is a tiny random one (32 px).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import typer
from fastapi.testclient import TestClient
from helpers import decode_png as decode
from helpers import png_pixels as pixels
from helpers import tiny_word_bundle
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

import opensd
from opensd.checkpoints import load_model
from opensd.checkpoints.opensd_format import save_opensd
from opensd.pipelines.infotext import parse_infotext
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread

TIMEOUT = 60.0


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("tiny-shapes", 0), ("tiny-other", 1)):
        model, tok = tiny_word_bundle(seed)
        save_opensd(model, tok, root / name)
    return root


@pytest.fixture(scope="module")
def pipe(models_dir: Path) -> StableDiffusionPipeline:
    return opensd.load(models_dir / "tiny-shapes")


@pytest.fixture(scope="module")
def client(models_dir: Path, pipe: StableDiffusionPipeline):
    with TestClient(create_app(pipe, models_dir=models_dir)) as c:
        yield c


class SlowPipeline(StableDiffusionPipeline):
    """The tiny pipeline, with a pause after each step and a record of the steps it finished."""

    def __init__(self, loaded, pause: float):
        super().__init__(loaded)
        self.pause, self.steps_done, self.calls, self.active, self.max_active = pause, 0, 0, 0, 0
        self._lock = threading.Lock()

    def generate(self, req, *, callback=None, **kw):
        def slow(info):
            time.sleep(self.pause)
            self.steps_done = info.step
            return callback(info) if callback is not None else None

        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return super().generate(req, callback=slow, **kw)
        finally:
            with self._lock:
                self.active -= 1


def b64png(image: Image.Image, parameters: str | None = None) -> str:
    buf = io.BytesIO()
    info = None
    if parameters:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def still_serving(client) -> None:
    r = client.get("/sdapi/v1/options")
    assert r.status_code == 200 and "sd_model_checkpoint" in r.json()


# ---------------------------------------------------------------- A1111 shapes


def test_txt2img_shape_seeds_and_infotext_in_png(client) -> None:
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a red circle", "negative_prompt": "a blue square", "steps": 2, "seed": 100, "batch_size": 2,
        "n_iter": 2, "cfg_scale": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
        "styles": [], "enable_hr": False, "alwayson_scripts": {}, "some_future_field": 1,  # ignored, as A1111 does
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert info["seed"] == 100 and info["all_seeds"] == [100, 101, 102, 103]  # batch k starts at seed + k*batch
    assert info["prompt"] == "a red circle" and info["negative_prompt"] == "a blue square"
    assert info["steps"] == 2 and info["cfg_scale"] == 5 and info["width"] == 32 and info["height"] == 32
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras" and info["batch_size"] == 2
    assert info["sd_model_name"] == "tiny-shapes" and len(info["sd_model_hash"]) == 10 and info["interrupted"] is False
    assert len(body["images"]) == 4 == len(info["infotexts"])
    for b64, text, seed in zip(body["images"], info["infotexts"], info["all_seeds"], strict=True):
        im = decode(b64)
        assert im.format == "PNG" and im.size == (32, 32)
        assert im.info["parameters"] == text
        fields = parse_infotext(text)
        assert fields["Seed"] == str(seed) and fields["Steps"] == "2" and fields["Sampler"] == "DPM++ 2M"
        assert fields["Schedule type"] == "Karras" and fields["Negative prompt"] == "a blue square"
        assert fields["Size"] == "32x32" and fields["Model"] == "tiny-shapes"
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["n_iter"] == 2


def test_txt2img_equals_the_library_with_the_same_seed(client, pipe) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a green triangle", "steps": 3, "seed": 42, "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    ref = pipe.txt2img("a green triangle", steps=3, seed=42, sampler="euler_a", cfg_scale=7.0)[0]
    assert np.array_equal(pixels(r.json()["images"][0]), np.asarray(ref))
    # A1111's default sampler is sampler_index "Euler"; null means the default; send_images=false sends none
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": 1, "send_images": False,
                                                "negative_prompt": None, "sampler_name": None, "width": None})
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["sampler_name"] == "Euler"


def test_img2img_strength_and_inpainting_with_mask_and_invert(client) -> None:
    original = Image.new("RGB", (32, 32), (200, 30, 30))
    init = "data:image/png;base64," + b64png(original)  # browsers and webuiapi send a data URL
    r = client.post("/sdapi/v1/img2img", json={"init_images": [init], "prompt": "a blue circle", "steps": 4,
                                                "denoising_strength": 0.5, "seed": 1})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    assert r.json()["parameters"]["init_images"] is None  # not echoed unless include_init_images

    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255  # repaint the top half
    for invert, kept in ((0, slice(16, None)), (1, slice(None, 16))):
        r = client.post("/sdapi/v1/img2img", json={
            "init_images": [init], "mask": b64png(Image.fromarray(mask)), "inpainting_mask_invert": invert,
            "mask_blur": 0, "prompt": "a blue circle", "steps": 3, "denoising_strength": 1.0, "seed": 2,
        })
        assert r.status_code == 200, r.text
        out = pixels(r.json()["images"][0])
        assert (out[kept] == (200, 30, 30)).all()  # outside the mask: the original, exactly
        assert not (out[slice(None, 16) if invert == 0 else slice(16, None)] == (200, 30, 30)).all()


def test_png_info_reads_parameters(client) -> None:
    text = "a red circle\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 5, Size: 32x48"
    r = client.post("/sdapi/v1/png-info", json={"image": b64png(Image.new("RGB", (8, 8)), text)})
    assert r.status_code == 200
    body = r.json()
    assert body["info"] == text
    p = body["parameters"]
    assert p["Prompt"] == "a red circle" and p["Negative prompt"] == "blur" and p["Seed"] == "5"
    assert p["Sampler"] == "Euler a" and p["Size-1"] == "32" and p["Size-2"] == "48"
    r = client.post("/sdapi/v1/png-info", json={"image": b64png(Image.new("RGB", (8, 8)))})
    assert r.status_code == 200 and r.json()["info"] == "" and r.json()["parameters"] == {}


def test_listings(client, models_dir: Path) -> None:
    samplers = client.get("/sdapi/v1/samplers").json()
    by_name = {s["name"]: s for s in samplers}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(by_name)
    assert "euler_ancestral" in by_name["Euler a"]["aliases"] and by_name["Euler a"]["options"]["eta"] == "1.0"
    assert all(isinstance(v, str) for s in samplers for v in s["options"].values())
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == ["Automatic", "Karras", "Exponential", "SGM Uniform"]
    assert schedulers[1] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny-other", "tiny-shapes"]
    for m in models:
        assert m["title"] == f"{m['model_name']} [{m['hash']}]" and len(m["hash"]) == 10
        assert m["sha256"].startswith(m["hash"]) and m["filename"] == str((models_dir / m["model_name"]).resolve())
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    p = client.get("/sdapi/v1/progress").json()
    assert p["progress"] == 0 and p["current_image"] is None
    assert {"job", "job_count", "sampling_step", "sampling_steps", "interrupted", "skipped"} <= set(p["state"])


def test_sgm_uniform_scheduler_runs_turbo_settings(client) -> None:
    """SD-Turbo's settings through A1111's API: 1 step, CFG 1, Euler a, the SGM Uniform schedule."""
    req = {"prompt": "a red circle", "steps": 1, "cfg_scale": 1, "sampler_name": "Euler a", "scheduler": "SGM Uniform", "seed": 3}
    r = client.post("/sdapi/v1/txt2img", json=req)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Schedule type: SGM Uniform" in info["infotexts"][0]
    plain = client.post("/sdapi/v1/txt2img", json={**req, "scheduler": "Automatic"}).json()
    assert plain["images"][0] != r.json()["images"][0]  # the first step starts elsewhere


def test_options_switch_the_model(client) -> None:
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["tiny-shapes"]["title"]
    req = {"prompt": "a red circle", "steps": 2, "seed": 9}
    before = client.post("/sdapi/v1/txt2img", json=req).json()
    try:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models["tiny-other"]["title"], "unknown_option": 1})
        assert r.status_code == 200 and r.json() is None
        opts = client.get("/sdapi/v1/options").json()
        assert opts["sd_model_checkpoint"] == models["tiny-other"]["title"]
        assert opts["sd_checkpoint_hash"] == models["tiny-other"]["sha256"]
        after = client.post("/sdapi/v1/txt2img", json=req).json()
        assert json.loads(after["info"])["sd_model_name"] == "tiny-other"
        assert "Model: tiny-other" in decode(after["images"][0]).info["parameters"]
        assert not np.array_equal(pixels(before["images"][0]), pixels(after["images"][0]))
        # a per-request override draws with the named model and leaves the current one alone
        r = client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"sd_model_checkpoint": "tiny-shapes"}})
        assert np.array_equal(pixels(r.json()["images"][0]), pixels(before["images"][0]))
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["tiny-other"]["title"]
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
        assert r.status_code == 404 and "not found" in r.json()["detail"] and "tiny-shapes" in r.json()["detail"]
    finally:  # by model_name, as A1111 also accepts
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-shapes"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["tiny-shapes"]["title"]


# ---------------------------------------------------------------- OpenAI Images API


def test_openai_images_generations(client) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "size": "32x32", "model": "dall-e-3",
                                                     "response_format": "b64_json", "steps": 2, "seed": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 120
    assert body["size"] == "32x32" and body["output_format"] == "png" and len(body["data"]) == 2
    seeds = [parse_infotext(decode(d["b64_json"]).info["parameters"])["Seed"] for d in body["data"]]
    assert seeds == ["4", "5"]
    r = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format" and "b64_json" in err["message"] and err["type"] == "invalid_request_error"


# ---------------------------------------------------------------- limits and bad input

GOOD = b64png(Image.new("RGB", (32, 32), (10, 200, 10)))
CASES = [
    ("txt2img", {"steps": -3}, 422, "steps must be from 1 to 150"),
    ("txt2img", {"steps": 100000}, 422, "steps must be from 1 to 150"),
    ("txt2img", {"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"prompt": ["not", "text"]}, 422, "prompt: Input should be a valid string"),
    ("txt2img", {"width": 1 << 20, "height": 1 << 20}, 422, "width must be from 1 to 2048"),
    ("txt2img", {"width": 30}, 422, "width must be a multiple of 8"),
    ("txt2img", {"batch_size": 1000}, 422, "batch_size must be from 1 to 8"),
    ("txt2img", {"n_iter": 1000}, 422, "n_iter must be from 1 to 16"),
    ("txt2img", {"batch_size": 8, "n_iter": 16}, 422, r"batch_size \* n_iter must be at most 64"),
    ("txt2img", {"cfg_scale": 1e9}, 422, "cfg_scale must be a number from 0 to 100"),
    ("txt2img", {"seed": -7}, 422, "seed must be from 0"),
    ("txt2img", {"sampler_name": "warp drive"}, 404, "Sampler not found"),
    ("txt2img", {"scheduler": "Polyexponential"}, 422, "unknown scheduler"),
    ("txt2img", {"script_name": "x/y/z plot"}, 422, "Script not found"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "missing-model"}}, 404, "model 'missing-model' not found"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 99}}, 422, "CLIP_stop_at_last_layers must be"),
    ("img2img", {}, 422, "init_images must hold one base64 image"),
    ("img2img", {"init_images": ["%%% not base64 %%%"]}, 400, r"init_images\[0\] is not valid base64"),
    ("img2img", {"init_images": [base64.b64encode(b"hello, not an image").decode()]}, 400, "is not a readable image"),
    ("img2img", {"init_images": ["https://example.com/a.png"]}, 400, "does not fetch URLs"),
    ("img2img", {"init_images": [GOOD], "mask": b64png(Image.new("L", (48, 32)))}, 422, "the mask is 48x32 but the init image is 32x32"),
    ("img2img", {"init_images": [GOOD], "denoising_strength": 3}, 422, r"strength must be in \[0, 1\]"),
    ("img2img", {"init_images": [GOOD, GOOD]}, 422, "send one per request"),
    ("png-info", {"image": "%%%"}, 400, "image is not valid base64"),
    ("png-info", {}, 422, "image: Field required"),
    ("options", {"sd_model_checkpoint": "missing-model"}, 404, "not found"),
    ("options", {"opensd_models_dir": "/etc"}, 422, "read-only"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size must be 'WIDTHxHEIGHT'"),
    ("/v1/images/generations", {"prompt": "x", "n": 50}, 400, "n must be from 1 to 8"),
    ("/v1/images/generations", {"prompt": "x", "size": "4096x4096"}, 400, "width must be from 1 to 2048"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt: Field required"),
    # the prompt budget: bytes before any parsing, then tokens; the negative prompt too
    ("txt2img", {"prompt": "a " * 20000}, 422, "prompt is 40000 bytes; at most 32768 are allowed"),
    ("txt2img", {"negative_prompt": "a red circle " * 600}, 422, "negative_prompt holds more than 1500 tokens, the most allowed"),
    ("img2img", {"init_images": [GOOD], "prompt": "a " * 20000}, 422, "prompt is 40000 bytes"),
    ("/v1/images/generations", {"prompt": "x" * 40000}, 400, "prompt is 40000 bytes"),
    ("/opensd/v1/explain", {"prompt": "a red circle " * 600}, 422, "prompt holds more than 1500 tokens"),
    # the work budget, in images of the model's native size (32 px here) x steps x images
    ("txt2img", {"width": 512, "height": 512, "steps": 20}, 422,
     r"512x512 is 256 images of this model's native 32x32, x 20 steps x 1 image\(s\) = 5120 native image-steps; "
     r"the budget per request is 2000"),
    ("txt2img", {"width": 64, "height": 64, "steps": 100, "batch_size": 2, "n_iter": 3}, 422, "= 2400 native image-steps"),
    ("img2img", {"init_images": [GOOD], "width": 512, "height": 512, "steps": 40, "denoising_strength": 0.5}, 422,
     r"20 effective steps \(40 x strength 0.5\) x 1 image\(s\) = 5120"),
    ("/v1/images/generations", {"prompt": "x", "size": "512x512"}, 400, "= 5120 native image-steps"),
]


@pytest.mark.parametrize("endpoint, payload, status, message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(client, endpoint, payload, status, message) -> None:
    import re

    url = endpoint if endpoint.startswith("/") else f"/sdapi/v1/{endpoint}"
    body = {"prompt": "a red circle", "steps": 1, **payload} if endpoint in ("txt2img", "img2img") else payload
    t0 = time.monotonic()
    r = client.post(url, json=body)
    assert time.monotonic() - t0 < 10  # refused at once, not after the work
    assert r.status_code == status, r.text
    got = r.json()
    assert set(got) >= {"error", "detail"} and re.search(message, got["detail"]), got
    still_serving(client)


def test_work_budget_scales_with_the_models_native_size() -> None:
    limits = Limits()
    # SD 1.x (512 px native) keeps ordinary requests: batch 8 of 50 steps, or 1024 px batch 4 of 30 steps
    assert limits.check_work(native=512, width=512, height=512, steps=50, batch_size=8) == 400
    assert limits.check_work(native=512, width=1024, height=1024, steps=30, batch_size=4) == 480
    assert limits.check_work(native=512, width=512, height=512, steps=20, batch_size=4, n_iter=16) == 1280
    # the 32 px model: its own size is cheap, webuiapi's default 512 px x 20 steps is not
    assert limits.check_work(native=32, width=64, height=64, steps=50, batch_size=8) == 1600
    with pytest.raises(ValueError, match="native 32x32.*5120 native image-steps"):
        limits.check_work(native=32, width=512, height=512, steps=20, batch_size=1)
    # img2img counts the steps it runs; at least one
    assert limits.check_work(native=32, width=32, height=32, steps=50, batch_size=1, strength=0.1) == 5
    assert limits.check_work(native=32, width=32, height=32, steps=5, batch_size=1, strength=0.01) == 1
    assert Limits(max_work=6000).check_work(native=32, width=512, height=512, steps=20, batch_size=1) == 5120


def test_webuiapis_default_request_is_refused_at_once_on_a_32px_model(pipe) -> None:
    import webuiapi

    with serve_in_thread(create_app(pipe)) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))  # its defaults: 512x512, 20 steps, batch 1
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="a red circle")
        assert time.monotonic() - t0 < 5
    status, text = e.value.args
    detail = json.loads(text)["detail"]
    assert status == 422 and json.loads(text)["error"] == "WorkBudgetExceeded"
    assert "native 32x32" in detail and "5120 native image-steps" in detail and "budget per request is 2000" in detail


def test_a_huge_prompt_is_refused_at_once_while_a_generation_runs(models_dir: Path) -> None:
    slow = SlowPipeline(load_model(models_dir / "tiny-shapes"), pause=0.1)
    app = create_app(slow, limits=Limits(workers=1, max_queue=4))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        worker = threading.Thread(target=lambda: http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 100}))
        worker.start()
        deadline = time.monotonic() + 30
        while slow.steps_done < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for path in ("/sdapi/v1/txt2img", "/v1/images/generations", "/opensd/v1/explain"):
            t0 = time.monotonic()
            r = http.post(path, json={"prompt": "a red circle, " * 150_000})  # 2.1 MB: the bytes cap, before parsing
            assert r.status_code in (400, 422) and "2100000 bytes; at most 32768" in r.json()["detail"], r.text
            assert time.monotonic() - t0 < 5  # checked before queueing: not after the running job
        assert app.state.opensd.queue.pending() == 0
        http.post("/sdapi/v1/interrupt")
        worker.join(TIMEOUT)
        assert not worker.is_alive()


def test_malformed_json_and_wrong_body_type(client) -> None:
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "ValidationError" and "JSON" in r.json()["detail"]
    r = client.post("/sdapi/v1/options", json=["a", "list"])
    assert r.status_code == 422 and "valid dictionary" in r.json()["detail"]
    r = client.get("/sdapi/v1/no-such-route")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    still_serving(client)


def test_body_size_limit_declared_and_streamed(pipe) -> None:
    with TestClient(create_app(pipe, limits=Limits(max_body_bytes=4096))) as c:
        big = {"prompt": "x" * 10000}
        r = c.post("/sdapi/v1/txt2img", json=big)
        assert r.status_code == 413 and r.json() == {"error": "PayloadTooLarge", "detail": "the request body is larger than 4096 bytes"}

        def chunks():  # no Content-Length: the limit counts the bytes as they arrive
            for _ in range(10):
                yield b" " * 1000

        r = c.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200


def test_basic_auth(pipe) -> None:
    with TestClient(create_app(pipe, auth="alice:s3cret,bob:hunter2")) as c:
        for path in ("/sdapi/v1/options", "/", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
            assert r.json()["error"] == "Unauthorized"
        assert c.get("/sdapi/v1/options", auth=("alice", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/options", headers={"Authorization": "Basic !!!"}).status_code == 401
        assert c.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
        assert c.get("/sdapi/v1/options", auth=("bob", "hunter2")).status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(ValueError, match="user:password"):
        create_app(pipe, auth="no-colon")


def test_openapi_docs_and_web_page(client) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options", "/v1/images/generations"):
        assert path in schema["paths"]
    assert "Txt2ImgRequest" in schema["components"]["schemas"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('<label for="prompt">', 'id="sampler_name"', 'type="file"', 'id="gallery"', "/static/app.js"):
        assert needle in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/sdapi/v1/progress" in js.text


# ---------------------------------------------------------------- interrupt, queue and concurrency


def test_progress_preview_queue_full_skip_and_interrupt_within_one_step(models_dir: Path) -> None:
    slow = SlowPipeline(load_model(models_dir / "tiny-shapes"), pause=0.1)
    app = create_app(slow, limits=Limits(workers=1, max_queue=1))

    def wait_for(calls: int, steps: int) -> None:
        deadline = time.monotonic() + 30
        while slow.calls < calls or slow.steps_done < steps:
            assert time.monotonic() < deadline, "the generation did not get there"
            time.sleep(0.02)

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(r=http.post("/sdapi/v1/txt2img", json={
            "prompt": "a red circle", "steps": 100, "n_iter": 2, "seed": 3, "sampler_name": "Euler"})))
        worker.start()
        wait_for(calls=1, steps=3)
        p = http.get("/sdapi/v1/progress").json()
        assert 0 < p["progress"] < 0.5 and p["eta_relative"] > 0 and p["state"]["sampling_steps"] == 100
        assert p["state"]["job"].startswith("txt2img") and p["state"]["job_count"] == 2 and p["state"]["job_no"] == 0
        assert 3 <= p["state"]["sampling_step"] < 100 and p["textinfo"].startswith("Batch 1/2")
        preview = decode(p["current_image"])  # decoded from the current x0 prediction
        assert preview.size == (32, 32)
        # the queue holds one request: another one is refused, not queued without bound
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 429 and r.json()["error"] == "QueueFull"
        # the running job's eta (at least 1 s): what /progress said a moment ago, give or take a step
        assert max(1.0, 0.5 * p["eta_relative"]) <= int(r.headers["retry-after"]) <= 1.5 * p["eta_relative"] + 2
        # the queue is checked first: a prompt over budget is not parsed while there is no room
        for path in ("/sdapi/v1/txt2img", "/opensd/v1/explain", "/v1/images/generations"):
            r = http.post(path, json={"prompt": "a red circle " * 600, "steps": 1})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text

        assert http.post("/sdapi/v1/skip").json() == {}  # ends batch 1; batch 2 starts
        wait_for(calls=2, steps=2)
        p = http.get("/sdapi/v1/progress").json()
        assert p["state"]["job_no"] == 1 and p["progress"] >= 0.5 and p["textinfo"].startswith("Batch 2/2")

        r = http.post("/sdapi/v1/interrupt")
        at_interrupt = slow.steps_done
        assert r.status_code == 200 and r.json() == {}
        worker.join(TIMEOUT)
        assert not worker.is_alive()
        r = result["r"]
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["interrupted"] is True and info["all_seeds"] == [3, 4] and len(r.json()["images"]) == 2
        assert slow.calls == 2 and slow.steps_done <= at_interrupt + 1 < 100  # stopped within one step
        assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        # and the server goes on serving
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 200 and json.loads(r.json()["info"])["interrupted"] is False


def test_concurrent_requests_equal_the_same_requests_run_alone(models_dir: Path) -> None:
    counting = SlowPipeline(load_model(models_dir / "tiny-shapes"), pause=0.0)
    workers = 3
    app = create_app(counting, limits=Limits(workers=workers, max_queue=32))
    prompts = ["a red circle", "a small blue square above a green triangle", "there is a large cyan triangle"]
    samplers = ["Euler a", "DPM++ 2M", "Euler", "DPM++ SDE"]  # stochastic ones need per-request generators
    requests = [
        {"prompt": prompts[i % 3], "negative_prompt": "blurry" if i % 2 else "", "seed": 1000 + 17 * i,
         "sampler_name": samplers[i % 4], "steps": 2, "batch_size": 1 + i % 2, "cfg_scale": 4 + i % 3}
        for i in range(16)
    ]
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            alone = [http.post("/sdapi/v1/txt2img", json=req) for req in requests]
        assert all(r.status_code == 200 for r in alone)
        counting.max_active = 0

        def post(req: dict) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as h:
                return h.post("/sdapi/v1/txt2img", json=req)

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(post, requests))
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    for a, b in zip(alone, together, strict=True):
        ia, ib = json.loads(a.json()["info"]), json.loads(b.json()["info"])
        assert ia["all_seeds"] == ib["all_seeds"] and ia["infotexts"] == ib["infotexts"]
        assert len(a.json()["images"]) == len(b.json()["images"])
        for x, y in zip(a.json()["images"], b.json()["images"], strict=True):
            assert np.array_equal(pixels(x), pixels(y))
    assert 2 <= counting.max_active <= workers  # ran concurrently, and never more than the workers


# ---------------------------------------------------------------- the command


def test_serve_command_binds_loopback_by_default(models_dir: Path, monkeypatch) -> None:
    import uvicorn

    from opensd.cli.serve import register

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    cli = typer.Typer()
    register(cli)
    cli.command("noop", hidden=True)(lambda: None)  # a one-command Typer app would take no command name
    runner = CliRunner()
    res = runner.invoke(cli, ["serve", "--model", str(models_dir / "tiny-shapes"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    app, kw = calls[-1]
    assert kw["host"] == "127.0.0.1" and kw["port"] == 7860
    assert app.state.opensd.registry.current_checkpoint.model_name == "tiny-shapes"
    res = runner.invoke(cli, ["serve", "--models-dir", str(models_dir), "--host", "0.0.0.0", "--port", "8123",
                              "--max-steps", "10", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    app, kw = calls[-1]
    assert kw["host"] == "0.0.0.0" and kw["port"] == 8123 and app.state.opensd.limits.max_steps == 10
    assert "without --api-auth" in res.output
    res = runner.invoke(cli, ["serve", "--model", str(models_dir / "tiny-shapes"), "--api-auth", "nocolon"])
    assert res.exit_code == 2 and "user:password" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["serve", "--model", "/nonexistent/model"])
    assert res.exit_code == 2 and "model not found" in res.output


def test_serve_command_sets_the_prompt_work_and_time_limits(models_dir: Path, monkeypatch) -> None:
    import uvicorn

    from opensd.cli.serve import register

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    cli = typer.Typer()
    register(cli)
    cli.command("noop", hidden=True)(lambda: None)
    runner = CliRunner()
    res = runner.invoke(cli, ["serve", "--model", str(models_dir / "tiny-shapes"), "--device", "cpu", "--max-work", "100",
                              "--max-seconds", "30", "--max-prompt-bytes", "1000", "--max-prompt-tokens", "75"])
    assert res.exit_code == 0, res.output
    limits = calls[-1].state.opensd.limits
    assert (limits.max_work, limits.max_seconds, limits.max_prompt_bytes, limits.max_prompt_tokens) == (100, 30, 1000, 75)
    res = runner.invoke(cli, ["serve", "--model", str(models_dir / "tiny-shapes"), "--device", "cpu"])
    assert res.exit_code == 0 and calls[-1].state.opensd.limits == Limits()  # the options' defaults are Limits'
    res = runner.invoke(cli, ["serve", "--model", str(models_dir / "tiny-shapes"), "--max-work", "0"])
    assert res.exit_code == 2 and "max_work must be a positive integer" in res.output and "Traceback" not in res.output
