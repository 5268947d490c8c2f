"""LoRAs over the A1111 API: /sdapi/v1/loras, refresh-loras, <lora:...> tags in txt2img, img2img
and OpenAI prompts, their errors, and 16 concurrent requests that each get their own LoRAs."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import png_pixels, tiny_word_bundle
from PIL import Image
from test_lora_use import _addnet_hash, _write_lora

import opensd
from opensd.checkpoints.opensd_format import save_opensd
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread

TIMEOUT = 60.0


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    model, tok = tiny_word_bundle()
    return opensd.load(save_opensd(model, tok, tmp_path_factory.mktemp("models") / "tiny-shapes"))


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("Lora")
    _write_lora(pipe.model, root / "style.safetensors", 1)
    _write_lora(pipe.model, root / "people" / "hero.safetensors", 2, {"ss_output_name": "hero_v2", "ss_network_dim": "2"})
    return root


@pytest.fixture(scope="module")
def client(pipe, lora_dir):
    with TestClient(create_app(pipe, lora_dir=lora_dir, limits=Limits(max_loras=3))) as c:
        yield c


def _txt2img(http, prompt: str, **kw) -> httpx.Response:
    body = {"prompt": prompt, "steps": 2, "seed": 11, "width": 32, "height": 32, "sampler_name": "Euler a", **kw}
    return http.post("/sdapi/v1/txt2img", json=body)


def test_loras_lists_a1111_fields(client, lora_dir):
    r = client.get("/sdapi/v1/loras")
    assert r.status_code == 200
    items = sorted(r.json(), key=lambda i: i["name"])
    assert items == [
        {"name": "hero", "alias": "hero_v2", "path": str(lora_dir / "people" / "hero.safetensors"),
         "metadata": {"ss_output_name": "hero_v2", "ss_network_dim": "2"}},
        {"name": "style", "alias": "style", "path": str(lora_dir / "style.safetensors"), "metadata": {}},
    ]


def test_refresh_loras_rescans(pipe, tmp_path):
    with TestClient(create_app(pipe, lora_dir=tmp_path)) as c:
        assert c.get("/sdapi/v1/loras").json() == []
        _write_lora(pipe.model, tmp_path / "late.safetensors", 3)
        assert c.get("/sdapi/v1/loras").json() == []  # listed from the last scan, as A1111
        r = c.post("/sdapi/v1/refresh-loras")
        assert r.status_code == 200 and r.json() is None
        assert [i["name"] for i in c.get("/sdapi/v1/loras").json()] == ["late"]


def test_txt2img_tag_changes_the_image_and_its_infotext(client, lora_dir):
    base, styled = _txt2img(client, "a red circle"), _txt2img(client, "a red circle <lora:style:0.9> <lora:hero_v2:1:0.5>")
    assert base.status_code == styled.status_code == 200, styled.text
    assert np.abs(png_pixels(styled.json()["images"][0]).astype(int) - png_pixels(base.json()["images"][0])).max() > 0
    info = json.loads(styled.json()["info"])
    want = f"style: {_addnet_hash(lora_dir / 'style.safetensors')}, hero_v2: {_addnet_hash(lora_dir / 'people' / 'hero.safetensors')}"
    assert f'Lora hashes: "{want}"' in info["infotexts"][0]
    assert info["prompt"] == "a red circle <lora:style:0.9> <lora:hero_v2:1:0.5>"  # as the user wrote it
    parsed = client.post("/sdapi/v1/png-info", json={"image": styled.json()["images"][0]}).json()["parameters"]
    assert parsed["Lora hashes"] == want and parsed["Prompt"] == info["prompt"]
    assert "Lora hashes" not in json.loads(base.json()["info"])["infotexts"][0]


def test_img2img_and_openai_prompts_take_tags(client):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    pixels = {}
    for prompt in ("a red circle", "a red circle <lora:style:1>"):
        r = client.post("/sdapi/v1/img2img", json={"prompt": prompt, "init_images": [init], "steps": 2, "seed": 4,
                                                     "denoising_strength": 0.8})
        assert r.status_code == 200, r.text
        pixels[prompt] = png_pixels(r.json()["images"][0])
        r = client.post("/v1/images/generations", json={"prompt": prompt, "size": "32x32", "steps": 2, "seed": 4})
        assert r.status_code == 200, r.text
        pixels["openai " + prompt] = png_pixels(r.json()["data"][0]["b64_json"])
    assert not np.array_equal(pixels["a red circle"], pixels["a red circle <lora:style:1>"])
    assert not np.array_equal(pixels["openai a red circle"], pixels["openai a red circle <lora:style:1>"])


@pytest.mark.parametrize("prompt, message", [
    ("<lora:stlye:1>", "no LoRA named 'stlye' in .*; nearest: style"),
    ("<hypernet:h:1>", "hypernetworks are not supported"),
    ("<lora:style:lots>", "must be a number"),
    ("<lora:style> <lora:style> <lora:hero> <lora:hero>", "names 4 LoRAs; at most 3"),
])
def test_bad_tags_are_422_with_the_message(client, prompt, message):
    import re

    r = _txt2img(client, f"a red circle {prompt}")
    assert r.status_code == 422 and re.search(message, r.json()["detail"]), r.text
    r = client.post("/v1/images/generations", json={"prompt": f"a red circle {prompt}", "size": "32x32", "steps": 1})
    assert r.status_code == 400 and re.search(message, r.json()["error"]["message"]), r.text


def test_no_lora_folder_answers_tags_with_422(pipe):
    with TestClient(create_app(pipe)) as c:
        assert c.get("/sdapi/v1/loras").json() == []
        r = _txt2img(c, "a red circle <lora:style:1>")
        assert r.status_code == 422 and "no LoRA folder is set" in r.json()["detail"]


def test_16_concurrent_requests_each_equal_their_sequential_result(pipe, lora_dir):
    app = create_app(pipe, lora_dir=lora_dir, limits=Limits(workers=4, max_queue=32))
    prompts = ["a red circle", "a red circle <lora:style:1>", "a blue square <lora:hero:0.8>",
               "a red circle <lora:style:0.4> <lora:hero_v2:0.6:1>"]
    bodies = [{"prompt": prompts[i % 4], "seed": 20 + i // 8} for i in range(16)]
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            alone = [_txt2img(http, **b) for b in bodies]

        def post(body):
            with httpx.Client(base_url=url, timeout=TIMEOUT) as h:
                return _txt2img(h, **body)

        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(post, bodies))
    assert all(r.status_code == 200 for r in alone + together), [r.text for r in alone + together if r.status_code != 200]
    for a, b in zip(alone, together, strict=True):
        assert a.json()["images"] == b.json()["images"]  # identical PNG bytes, infotext included
    assert len({a.json()["images"][0] for a in alone}) == 8  # every prompt and seed drew its own image


def test_explain_applies_the_prompts_loras_as_txt2img(client):
    body = {"prompt": "a red circle <lora:style:1>", "steps": 2, "seed": 11, "width": 32, "height": 32,
            "sampler_name": "Euler a"}
    explained = client.post("/opensd/v1/explain", json=body)
    assert explained.status_code == 200, explained.text
    made = _txt2img(client, body["prompt"])
    plain = client.post("/opensd/v1/explain", json={**body, "prompt": "a red circle"})
    got = png_pixels(explained.json()["image"]).astype(int)
    # explain computes attention explicitly (not by SDPA): the same image up to float rounding
    assert np.abs(got - png_pixels(made.json()["images"][0])).max() <= 2
    assert np.abs(got - png_pixels(plain.json()["image"])).max() > 20
    assert "Lora hashes" in explained.json()["info"]
