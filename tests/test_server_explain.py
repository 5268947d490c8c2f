"""``POST /opensd/v1/explain`` and the page's Explain section, on a tiny random model (32 px).

The answer is checked against the library (:mod:`opensd.explain`) run with the same
seed: the same image, the same overlays and the same path strip, pixel for pixel. The
request goes through the generation queue (progress, queue limit, interrupt), the auth
and the limits of the rest of the server. The browser test skips without Chromium.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import SlowPipeline, browser_page, tiny_loaded
from helpers import decode_png as decode
from helpers import png_pixels as pixels

from opensd.checkpoints import LoadedModel
from opensd.explain import PathRecorder, attention_maps, path_from_recorder
from opensd.explain.render import heatmap_overlay
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread
from opensd.serving.explain_api import default_path_steps

URL = "/opensd/v1/explain"
PROMPT = "a small blue square above a green triangle"  # eight words the tiny tokenizer knows ("a" twice)
TIMEOUT = 60.0


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded(seed=3)


@pytest.fixture(scope="module")
def pipe(loaded) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(loaded)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe)) as c:
        yield c


# ---------------------------------------------------------------- the answer


def test_explain_equals_the_library_one_overlay_per_word(client, pipe) -> None:
    body = {"prompt": PROMPT, "negative_prompt": "red", "seed": 5, "steps": 6, "cfg_scale": 6.0,
            "sampler_name": "Euler", "path_steps": [6, 1, 3, 3]}
    r = client.post(URL, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["words"] == PROMPT.split() and len(got["overlays"]) == 8
    assert (got["seed"], got["width"], got["height"], got["interrupted"], got["raw"]) == (5, 32, 32, False, None)
    assert got["path_steps"] == [1, 3, 6]  # sorted, each once

    rec = PathRecorder([1, 3, 6])
    ref = attention_maps(pipe, PROMPT, negative_prompt="red", seed=5, steps=6, sampler="euler", cfg_scale=6.0, callback=rec)
    path = path_from_recorder(pipe, rec, ref.image)
    image = decode(got["image"])
    assert image.size == (32, 32) and image.info["parameters"] == got["info"] == ref.image.info["parameters"]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref.image))
    for b64, heat in zip(got["overlays"], ref.maps, strict=True):
        assert decode(b64).size == (32, 32)
        assert np.array_equal(pixels(b64), np.asarray(heatmap_overlay(ref.image, heat)))
    assert got["path_sigmas"] == pytest.approx(path.sigmas, rel=1e-6)
    strip = path.strip(96)
    assert decode(got["path"]).size == strip.size == (3 * 96 + 2 * 2, 2 * (96 + 14) + 2)  # 3 steps x 2 rows, labelled
    assert np.array_equal(pixels(got["path"]), np.asarray(strip))


def test_raw_maps_and_the_default_path(client, pipe) -> None:
    r = client.post(URL, json={"prompt": "a red circle", "seed": 2, "steps": 12, "raw": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["path_steps"] == default_path_steps(12) == [2, 3, 5, 6, 8, 9, 11, 12]
    raw = got["raw"]
    token_maps = np.array(raw["token_maps"])  # (L, h, w)
    word_maps = np.array(raw["word_maps"])  # (n_words, h, w)
    L, h = len(raw["tokens"]), 32 // pipe.cfg.vae.downsample_factor
    assert token_maps.shape == (L, h, h) and word_maps.shape == (3, h, h) and len(raw["token_words"]) == L
    assert raw["tokens"][:5] == ["<bos>", "a", "red", "circle", "<eos>"] and raw["token_words"][:5] == [-1, 0, 1, 2, -1]
    np.testing.assert_allclose(token_maps.sum(0), 1.0, atol=L * 5e-7)  # a softmax over the context, per pixel
    np.testing.assert_allclose(word_maps, token_maps[1:4], atol=1e-6)  # one token per word here

    ref = attention_maps(pipe, "a red circle", seed=2, steps=12, sampler="dpmpp_2m", cfg_scale=7.0)
    np.testing.assert_allclose(token_maps, ref.per_token_maps.numpy(), atol=5e-7)


# ---------------------------------------------------------------- bad input

CASES = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"steps": 1000}, "steps must be from 1 to 150 on this server, got 1000"),
    ({"width": 4096}, "width must be from 1 to 2048 on this server, got 4096"),
    ({"height": 30}, "height must be a multiple of 8"),
    ({"path_steps": [0, 2]}, r"path_steps must be step numbers from 1 to 4 \(the request's steps\), got \[0\]"),
    ({"path_steps": [5]}, r"path_steps must be step numbers from 1 to 4"),
    ({"path_steps": []}, "path_steps is empty"),
    ({"steps": 40, "path_steps": list(range(1, 18))}, "path_steps lists 17 steps; at most 16"),
    ({"path_steps": [True]}, "path_steps.0: Input should be a valid integer"),
    ({"path_steps": "1,2"}, "path_steps: Input should be a valid list"),
    ({"sampler": "Nope"}, "Sampler not found: unknown sampler 'Nope'"),
    ({"scheduler": "Linear"}, "unknown scheduler 'Linear'"),
    ({"seed": 2**40}, "seed must be from 0 to"),
    ({"steps": "many"}, "steps: Input should be a valid integer"),
    ({"prompt": " ".join(["red"] * 76)}, "prompt has 76 words; explain maps at most 75"),
    ({"override_settings": {"sd_model_checkpoint": "missing"}}, "not found"),
]


@pytest.mark.parametrize("payload, message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_is_a_clear_422(client, payload, message) -> None:
    r = client.post(URL, json={"prompt": "a red circle", "steps": 4, **payload})
    assert r.status_code == 422, r.text
    got = r.json()
    assert got["error"] in ("ValidationError", "NotFound") and re.search(message, got["detail"]), got


def test_auth_and_body_limit_apply(pipe) -> None:
    with TestClient(create_app(pipe, auth="alice:s3cret", limits=Limits(max_body_bytes=2000))) as c:
        r = c.post(URL, json={"prompt": "a red circle", "steps": 1})
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
        assert c.post(URL, json={"prompt": "a red circle", "steps": 1}, auth=("alice", "wrong")).status_code == 401
        r = c.post(URL, json={"prompt": "red " * 600, "steps": 1}, auth=("alice", "s3cret"))
        assert r.status_code == 413
        r = c.post(URL, json={"prompt": "a red circle", "steps": 1}, auth=("alice", "s3cret"))
        assert r.status_code == 200 and len(r.json()["overlays"]) == 3
        assert URL in c.get("/openapi.json", auth=("alice", "s3cret")).json()["paths"]


# ---------------------------------------------------------------- the queue


def test_runs_on_the_generation_queue_and_stops_on_interrupt(loaded) -> None:
    slow = SlowPipeline(loaded, pause=0.05)
    app = create_app(slow, limits=Limits(workers=1, max_queue=1))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(r=http.post(URL, json={
            "prompt": "a red circle", "steps": 100, "seed": 1, "path_steps": [1, 2, 99]})))
        worker.start()
        deadline = time.monotonic() + 30
        while slow.steps_done < 3:
            assert time.monotonic() < deadline, "the explain job did not start"
            time.sleep(0.02)
        p = http.get("/sdapi/v1/progress").json()
        assert p["state"]["job"].startswith("explain-") and p["state"]["sampling_steps"] == 100
        assert decode(p["current_image"]).size == (32, 32)  # the live preview works for explain too
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})  # one queue for all generations
        assert r.status_code == 429 and r.json()["error"] == "QueueFull"
        assert http.post("/sdapi/v1/interrupt").status_code == 200
        worker.join(TIMEOUT)
        got = result["r"]
        assert got.status_code == 200, got.text
        got = got.json()
        assert got["interrupted"] is True and got["path_steps"] == [1, 2] and len(got["overlays"]) == 3
        assert slow.steps_done < 99
        assert http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200


def test_a_generation_beside_it_does_not_leak_into_the_maps(loaded) -> None:
    slow = SlowPipeline(loaded, pause=0.01)
    body = {"prompt": "a red circle", "steps": 8, "seed": 4, "raw": True}
    with serve_in_thread(create_app(slow, limits=Limits(workers=2))) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        alone = http.post(URL, json=body).json()["raw"]["token_maps"]
        side = threading.Thread(target=lambda: http.post("/sdapi/v1/txt2img", json={
            "prompt": "there is a large cyan triangle", "steps": 20, "seed": 9}))
        side.start()
        time.sleep(0.05)  # the other generation is sampling
        beside = http.post(URL, json=body)
        side.join(TIMEOUT)
    assert beside.status_code == 200 and beside.json()["raw"]["token_maps"] == alone


# ---------------------------------------------------------------- the page


def test_page_explain_shows_a_panel_per_word_and_the_path(loaded) -> None:
    with serve_in_thread(create_app(StableDiffusionPipeline(loaded))) as url, browser_page(url) as (page, outside):
        page.goto(url + "/")
        page.wait_for_selector("#sampler_name option[value='Euler a']", state="attached")
        page.fill("#explain-prompt", "")
        page.click("#explain-run")
        page.wait_for_function("() => document.getElementById('explain-error').textContent.length > 0")
        assert "prompt is empty" in page.inner_text("#explain-error")
        page.fill("#explain-prompt", "a red circle")
        page.fill("#explain-steps", "4")
        page.fill("#explain-path-steps", "1, 4")
        page.click("#explain-run")
        page.wait_for_function("() => document.querySelectorAll('#explain-words figure').length === 3")
        assert page.inner_text("#explain-error") == "" and page.text_content("#explain-status") == "Done"
        captions = page.eval_on_selector_all("#explain-words figcaption", "cs => cs.map(c => c.textContent)")
        assert captions == ["a", "red", "circle"]
        sizes = page.eval_on_selector_all(
            "#explain-words img, #explain-image, #explain-path", "ims => ims.map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes[:4] == [[32, 32]] * 4 and sizes[4] == [2 * 96 + 2, 2 * (96 + 14) + 2]
        assert page.is_visible("#explain-path")
    assert outside == [], f"the page tried to reach {outside}"
