"""Real clients against a real server on 127.0.0.1: the `webuiapi` package (A1111's API) and the
official `openai` package (Images API). Every request has a timeout; nothing leaves loopback."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import tiny_word_bundle
from PIL import Image

from opensd.checkpoints.opensd_format import save_opensd
from opensd.pipelines.infotext import parse_infotext
from opensd.serving import create_app
from opensd.serving.background import serve_in_thread

webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_word_bundle()
    path = save_opensd(model, tok, tmp_path_factory.mktemp("m") / "tiny-shapes")
    with pytest.MonkeyPatch.context() as mp:  # loopback traffic never goes through a proxy
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            mp.delenv(var, raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        with serve_in_thread(create_app(path, auth="user:pass")) as url:
            yield url
    torch.set_num_threads(before)


def bounded(api: webuiapi.WebUIApi) -> webuiapi.WebUIApi:
    """webuiapi sends requests without a timeout; give every one of them ours."""
    api.session.request = functools.partial(api.session.request, timeout=TIMEOUT)
    return api


@pytest.fixture(scope="module")
def webui(server: str):
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)
    bounded(api).set_auth("user", "pass")
    return api


def test_webuiapi_txt2img_img2img_and_png_info(webui) -> None:
    res = webui.txt2img(prompt="a red circle", negative_prompt="a blue square", seed=11, width=32, height=32,
                        cfg_scale=6, batch_size=2, scheduler="Karras")
    assert len(res.images) == 2 and res.image.size == (32, 32)
    assert res.info["all_seeds"] == [11, 12] and res.info["sampler_name"] == "Euler a" and res.info["steps"] == 3
    fields = parse_infotext(res.image.info["parameters"])
    assert fields["Seed"] == "11" and fields["Sampler"] == "Euler a" and fields["Schedule type"] == "Karras"
    assert fields["Negative prompt"] == "a blue square" and fields["CFG scale"] == "6.0"

    source = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.fromarray(np.where(np.arange(32)[:, None] < 16, 255, 0).astype(np.uint8).repeat(32, 1))
    res2 = webui.img2img(images=[source], mask_image=mask, mask_blur=0, prompt="a blue circle", denoising_strength=0.6,
                         seed=5, width=32, height=32)
    assert res2.image.size == (32, 32) and res2.info["denoising_strength"] == 0.6
    assert "Denoising strength: 0.6" in res2.image.info["parameters"]
    assert (np.asarray(res2.image)[16:] == (200, 30, 30)).all()  # outside the mask: untouched

    info = webui.png_info(res.image)
    assert info.info == res.image.info["parameters"]
    assert info.parameters["Seed"] == "11" and info.parameters["Size-1"] == "32"


def test_webuiapi_listings_and_options(webui) -> None:
    assert "DPM++ 2M" in webui.util_get_sampler_names()
    current = webui.util_get_current_model()
    assert current.startswith("tiny-shapes [") and webui.util_get_model_names() == [current]
    assert webui.util_get_scheduler_names() == ["automatic", "exponential", "karras", "sgm_uniform"]
    webui.util_set_model("tiny-shapes")  # finds the closest title and sets it
    assert webui.get_options()["sd_model_checkpoint"] == current
    assert webui.get_progress()["state"]["job_count"] == 0


def test_webuiapi_without_credentials_gets_401(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    api = bounded(webuiapi.WebUIApi(host=host, port=int(port)))
    with pytest.raises(RuntimeError, match="401"):
        api.txt2img(prompt="x", steps=1, width=32, height=32)


def test_openai_client_images_generate(server: str) -> None:
    import base64
    import io

    import httpx

    http = httpx.Client(auth=("user", "pass"), timeout=TIMEOUT)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="dummy", max_retries=0, timeout=TIMEOUT, http_client=http)
    res = client.images.generate(prompt="a red circle", n=2, size="32x32", response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 21})
    assert isinstance(res.created, int) and len(res.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
    assert all(im.size == (32, 32) for im in images)
    assert [parse_infotext(im.info["parameters"])["Seed"] for im in images] == ["21", "22"]
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="a red circle", response_format="url")
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="dummy", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a red circle", size="32x32")
    http.close()
