"""Every model family through the server: the A1111 API, the OpenAI endpoint, explain and the page.

A models folder holds a tiny random model of each family, saved as opensd folders with
the real CLIP vocabulary, each at its own native size so that a default size shows which
model drew: SD 1.x 32 px, SD 2.x 48 px, SDXL and its refiner 64 px (the two SDXL ones
with SDXL's VAE scale, 0.13025, so that they share a latent space the SD ones do not).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import browser_page, clip_tokenizer, decode_png, randomize
from PIL import Image
from safetensors.torch import save_file

from opensd.checkpoints.opensd_format import save_opensd
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.pipelines.infotext import parse_infotext
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread
from opensd.serving.codec import encode_png
from opensd.serving.limits import split_steps
from opensd.serving.model_kind import probe
from opensd.serving.refiner import refiner_api_available

NATIVE = {ModelFamily.SD1: 32, ModelFamily.SD2: 48, ModelFamily.SDXL: 64, ModelFamily.SDXL_REFINER: 64}
NAME = {f: f"tiny-{f.value}" for f in ModelFamily}
TIMEOUT = 60.0


def tiny_family(family: ModelFamily) -> StableDiffusion:
    """SDConfig.tiny(family) with the real CLIP vocabulary, at NATIVE[family] px (SDXL's VAE scale for SDXL)."""
    tok = clip_tokenizer()
    cfg = SDConfig.tiny(family)
    text = {"text": dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, max_length=77)}
    if cfg.text_2 is not None:
        text["text_2"] = dataclasses.replace(cfg.text_2, vocab_size=tok.vocab_size, max_length=77)
    cfg = cfg.replace(image_size=NATIVE[family], **text)
    if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        cfg = cfg.replace(vae=dataclasses.replace(cfg.vae, scale_factor=0.13025))
    torch.manual_seed(0)
    return randomize(StableDiffusion(cfg)).eval()


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for family in ModelFamily:
        save_opensd(tiny_family(family), clip_tokenizer(), root / NAME[family])
    return root


@pytest.fixture(scope="module")
def client(models_dir: Path):
    app = create_app(models_dir / NAME[ModelFamily.SD1], models_dir=models_dir, max_loaded=4)
    with TestClient(app) as c:
        yield c


def txt2img(client, family: ModelFamily, **fields):
    body = {"prompt": "a red circle", "steps": 2, "seed": 3, "override_settings": {"sd_model_checkpoint": NAME[family]}}
    body["override_settings"].update(fields.pop("override_settings", {}))
    return client.post("/sdapi/v1/txt2img", json={**body, **fields})


# ---------------------------------------------------------------- listing and default sizes


def test_sd_models_lists_each_family_and_native_size_without_loading_them(models_dir: Path) -> None:
    app = create_app(models_dir / NAME[ModelFamily.SD1], models_dir=models_dir)
    with TestClient(app) as client:
        listed = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert set(listed) == set(NAME.values())
    for family, name in NAME.items():
        item = listed[name]
        assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(item)  # what A1111 clients read
        assert item["title"] == f"{name} [{item['hash']}]" and len(item["hash"]) == 10
        assert item["family"] == family.value and item["image_size"] == NATIVE[family]
    # only the served model is loaded: the others were probed from their config files
    assert len(app.state.opensd.registry._cache) == 1


def test_a_single_file_is_probed_from_its_tensor_names(tmp_path: Path) -> None:
    heads = {
        "sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "sd2": "cond_stage_model.model.ln_final.weight",
        "sdxl": "conditioner.embedders.1.model.ln_final.weight",
        "sdxl_refiner": "conditioner.embedders.0.model.ln_final.weight",
    }
    sizes = {"sd1": 512, "sd2": None, "sdxl": 1024, "sdxl_refiner": 1024}  # SD 2.x: 768-v or 512-base, told on load
    for family, key in heads.items():
        f = tmp_path / f"{family}.safetensors"
        keys = [key, "model.diffusion_model.input_blocks.0.0.weight"]
        if family == "sdxl":
            keys.append("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight")
        save_file({k: torch.zeros(1) for k in keys}, str(f))
        kind = probe(f, "original")
        assert (kind.family, kind.image_size) == (family, sizes[family])
    (tmp_path / "junk.safetensors").write_bytes(b"\x05not a header")
    assert probe(tmp_path / "junk.safetensors", "original").family is None  # unknown, not an error


@pytest.mark.parametrize("family", list(ModelFamily), ids=lambda f: f.value)
def test_txt2img_defaults_to_the_family_native_size(client, family: ModelFamily) -> None:
    r = txt2img(client, family)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    side = NATIVE[family]
    assert (info["width"], info["height"]) == (side, side) and decode_png(r.json()["images"][0]).size == (side, side)
    assert info["sd_model_name"] == NAME[family]
    # img2img defaults to the init image's size (rounded down to a multiple of 8)
    r = client.post("/sdapi/v1/img2img", json={
        "prompt": "a blue square", "steps": 2, "seed": 1, "denoising_strength": 0.5,
        "init_images": [encode_png(Image.new("RGB", (59, 40), (200, 20, 20)))],
        "override_settings": {"sd_model_checkpoint": NAME[family]},
    })
    assert r.status_code == 200 and decode_png(r.json()["images"][0]).size == (56, 40), r.text


# ---------------------------------------------------------------- clip skip


@pytest.mark.parametrize("family", [ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.SDXL_REFINER], ids=lambda f: f.value)
def test_clip_skip_where_the_text_layer_is_fixed_is_a_warning(client, family: ModelFamily) -> None:
    for skip in (2, 12):  # 12: A1111's largest, beyond the tiny encoders' layers
        r = txt2img(client, family, override_settings={"CLIP_stop_at_last_layers": skip})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["warnings"] == [f"clip skip has no effect on {family.value} models (their text layer is fixed)"]
        assert info["clip_skip"] == skip
    r = txt2img(client, family, override_settings={"CLIP_stop_at_last_layers": 13})
    assert r.status_code == 422 and "from 1 to 12" in r.json()["detail"], r.text


def test_clip_skip_on_sd1_applies_and_is_bounded_by_its_layers(client) -> None:
    layers = SDConfig.tiny().text.layers
    r = txt2img(client, ModelFamily.SD1, override_settings={"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 200 and json.loads(r.json()["info"])["warnings"] == [], r.text
    r = txt2img(client, ModelFamily.SD1, override_settings={"CLIP_stop_at_last_layers": layers + 1})
    assert r.status_code == 422 and f"from 1 to {layers}" in r.json()["detail"], r.text


# ---------------------------------------------------------------- OpenAI


def test_openai_sizes_follow_the_model(client) -> None:
    url = "/v1/images/generations"
    for family in ModelFamily:
        side = NATIVE[family]
        for size in (None, "auto") if family is ModelFamily.SDXL else (None,):
            r = client.post(url, json={"prompt": "a red circle", "model": NAME[family], "size": size, "steps": 2, "seed": 1})
            assert r.status_code == 200 and r.json()["size"] == f"{side}x{side}", r.text
            assert decode_png(r.json()["data"][0]["b64_json"]).size == (side, side)
    r = client.post(url, json={"prompt": "a red circle", "model": NAME[ModelFamily.SDXL], "size": "48x32", "steps": 2})
    assert r.status_code == 200 and r.json()["size"] == "48x32" and "warnings" not in r.json(), r.text
    r = client.post(url, json={"prompt": "a red circle", "model": "dall-e-3", "steps": 2})  # OpenAI's name: the current model
    assert r.status_code == 200 and r.json()["size"] == "32x32", r.text
    r = client.post(url, json={"prompt": "a red circle", "model": NAME[ModelFamily.SDXL], "size": "big"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "size" and "native size is '64x64'" in err["message"], r.text
    r = client.post(url, json={"prompt": "a red circle", "model": "tiny-sd9"})
    err = r.json()["error"]
    assert r.status_code == 404 and err["param"] == "model" and "'tiny-sd9' not found" in err["message"], r.text
    assert NAME[ModelFamily.SDXL] in err["message"]  # the available ones are named


# ---------------------------------------------------------------- the refiner


def test_refiner_fields_are_checked_before_any_work(client) -> None:
    sdxl, refiner = NAME[ModelFamily.SDXL], NAME[ModelFamily.SDXL_REFINER]
    r = txt2img(client, ModelFamily.SDXL, refiner_checkpoint="no-such-refiner")
    assert r.status_code == 404 and r.json()["detail"].startswith("refiner_checkpoint: model 'no-such-refiner' not found"), r.text
    assert refiner in r.json()["detail"]
    r = txt2img(client, ModelFamily.SD1, refiner_checkpoint=refiner)  # SD latents into the SDXL refiner
    detail = r.json()["detail"]
    assert r.status_code == 422 and f"refiner '{refiner}' works in another latent space" in detail, r.text
    assert "scale 0.13025" in detail and "scale 0.18215" in detail and "\n" not in detail
    for bad in (1.5, -0.1, "soon"):
        r = txt2img(client, ModelFamily.SDXL, refiner_checkpoint=refiner, refiner_switch_at=bad)
        assert r.status_code == 422 and "refiner_switch_at" in r.text, (bad, r.text)
    for none in ("", "None", None):  # A1111's "no refiner"
        r = txt2img(client, ModelFamily.SDXL, refiner_checkpoint=none, refiner_switch_at=0.5)
        assert r.status_code == 200 and "Refiner" not in json.loads(r.json()["info"])["extra_generation_params"], r.text
    r = txt2img(client, ModelFamily.SDXL, refiner_checkpoint=sdxl)  # the model refining itself: no switch, as A1111
    assert r.status_code == 200, r.text


def test_a_refiner_may_not_need_more_models_in_memory_than_the_server_keeps(models_dir: Path) -> None:
    app = create_app(models_dir / NAME[ModelFamily.SD1], models_dir=models_dir, max_loaded=2)
    with TestClient(app) as c:  # current SD 1.x + SDXL drawing + the refiner = 3
        r = txt2img(c, ModelFamily.SDXL, refiner_checkpoint=NAME[ModelFamily.SDXL_REFINER])
        detail = r.json()["detail"]
    assert r.status_code == 422 and "needs 3 models in memory at once" in detail and "at most 2" in detail, r.text
    assert len(app.state.opensd.registry._cache) <= 2


def test_the_refiners_steps_count_in_the_work_budget_at_its_native_size() -> None:
    assert split_steps(10, 0.7) == (7, 3) and split_steps(20, 0.8) == (16, 4) and split_steps(3, 0.5) == (2, 1)
    assert split_steps(5, 0.0) == (0, 5) and split_steps(5, 1.0) == (5, 0)
    limits = Limits(max_work=100)
    # 64x64 is 4 images of a 32 px model and 1 of a 64 px refiner: 8 steps x 4 + 2 steps x 1
    work = limits.check_work(native=32, width=64, height=64, steps=10, batch_size=1, refiner=(64, 0.8))
    assert work == 8 * 4 + 2 * 1
    assert limits.check_work(native=32, width=64, height=64, steps=10, batch_size=1) == 40
    with pytest.raises(Exception, match="8 with the model, 2 with the refiner"):
        Limits(max_work=30).check_work(native=32, width=64, height=64, steps=10, batch_size=1, refiner=(64, 0.8))


@pytest.mark.skipif(refiner_api_available(), reason="the refiner API is merged: the end-to-end test runs instead")
def test_a_refiner_request_says_when_the_pipeline_has_no_refiner_yet(client) -> None:
    r = txt2img(client, ModelFamily.SDXL, refiner_checkpoint=NAME[ModelFamily.SDXL_REFINER])
    assert r.status_code == 422 and r.json()["error"] == "RefinerUnsupported", r.text
    assert "leave refiner_checkpoint empty" in r.json()["detail"]


@pytest.mark.skipif(not refiner_api_available(), reason="refiner API not merged")
def test_txt2img_with_the_sdxl_refiner_end_to_end(client) -> None:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    sdxl, refiner = NAME[ModelFamily.SDXL], NAME[ModelFamily.SDXL_REFINER]
    refined = txt2img(client, ModelFamily.SDXL, steps=4, refiner_checkpoint=refiner, refiner_switch_at=0.5)
    assert refined.status_code == 200, refined.text
    info = json.loads(refined.json()["info"])
    assert info["extra_generation_params"]["Refiner"].startswith(refiner) and info["extra_generation_params"]["Refiner switch at"] == 0.5
    plain = txt2img(client, ModelFamily.SDXL, steps=4)
    assert refined.json()["images"][0] != plain.json()["images"][0]  # the refiner drew the last two steps
    # the same as the pipeline's own answer
    registry = client.app.state.opensd.registry
    base, ref = registry.get(registry.find(sdxl)), registry.get(registry.find(refiner))
    req = dataclasses.replace(base.request("a red circle", steps=4, seed=3, sampler="euler", cfg_scale=7.0), refiner_switch_at=0.5)
    direct = base.generate(req, refiner=ref).images[0]
    assert isinstance(base, StableDiffusionPipeline)
    assert list(decode_png(refined.json()["images"][0]).convert("RGB").getdata()) == list(direct.convert("RGB").getdata())


# ---------------------------------------------------------------- explain


def test_explain_maps_an_sdxl_prompt(client) -> None:
    r = client.post("/opensd/v1/explain", json={
        "prompt": "a red circle", "steps": 2, "seed": 5, "raw": True, "path_steps": [1, 2],
        "override_settings": {"sd_model_checkpoint": NAME[ModelFamily.SDXL], "CLIP_stop_at_last_layers": 2},
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (64, 64) and body["words"] == ["a", "red", "circle"]
    assert len(body["overlays"]) == 3 and all(decode_png(o).size == (64, 64) for o in body["overlays"])
    maps = torch.tensor(body["raw"]["token_maps"])  # (L, h, w): a distribution over the context at every pixel
    assert maps.shape[1:] == (32, 32) and torch.allclose(maps.sum(0), torch.ones(32, 32), atol=1e-4)
    assert body["raw"]["tokens"][:4] == ["<bos>", "a", "red", "circle"]
    assert body["warnings"] == ["clip skip has no effect on sdxl models (their text layer is fixed)"]
    assert parse_infotext(body["info"])["Size"] == "64x64"


# ---------------------------------------------------------------- real clients: webuiapi and the page


@pytest.fixture(scope="module")
def server(models_dir: Path):
    with serve_in_thread(create_app(models_dir / NAME[ModelFamily.SD1], models_dir=models_dir, max_loaded=4)) as url:
        yield url


def test_webuiapi_lists_and_switches_between_families(server: str) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
    api.session.request = functools.partial(api.session.request, timeout=TIMEOUT)
    titles = api.util_get_model_names()
    assert sorted(t.split(" [")[0] for t in titles) == sorted(NAME.values())
    title = {f: next(t for t in titles if t.startswith(NAME[f] + " [")) for f in ModelFamily}
    api.util_set_model(title[ModelFamily.SDXL])  # by title: webuiapi matches a bare name to titles by similarity
    assert api.util_get_current_model() == title[ModelFamily.SDXL]
    res = api.txt2img(prompt="a red circle", seed=2, width=64, height=64, override_settings={"CLIP_stop_at_last_layers": 2})
    assert res.image.size == (64, 64) and res.info["sd_model_name"] == NAME[ModelFamily.SDXL]
    assert res.info["warnings"] == ["clip skip has no effect on sdxl models (their text layer is fixed)"]
    assert parse_infotext(res.image.info["parameters"])["Model"] == NAME[ModelFamily.SDXL]
    api.util_set_model(title[ModelFamily.SD1])
    assert api.util_get_current_model() == title[ModelFamily.SD1]


def test_the_page_shows_each_family_and_draws_at_its_native_size(server: str) -> None:
    with browser_page(server) as (page, outside):
        page.goto(server + "/")
        page.wait_for_selector("#model option", state="attached")
        labels = page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)")
        assert any(lbl.startswith(NAME[ModelFamily.SDXL] + " [") and lbl.endswith("(SDXL, 64x64)") for lbl in labels)
        assert any(lbl.endswith("(SD 2.x, 48x48)") for lbl in labels) and any(lbl.endswith("(SDXL refiner, 64x64)") for lbl in labels)
        assert page.text_content("#model-kind") == "SD 1.x, 32x32"  # the current model is chosen
        sdxl = next(v for v in page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") if v.startswith("tiny-sdxl ["))
        page.select_option("#model", sdxl)
        assert page.text_content("#model-kind") == "SDXL, 64x64" and page.get_attribute("#width", "placeholder") == "64 (model's size)"
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1")
        fields = parse_infotext(page.text_content("#gallery pre"))
        assert fields["Size"] == "64x64" and fields["Model"] == NAME[ModelFamily.SDXL]
        page.select_option("#refiner_checkpoint", label=next(lbl.split(" (")[0] for lbl in labels if lbl.startswith("tiny-sd1 [")))
        page.click("#generate")
        page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
        assert "works in another latent space" in page.inner_text("#error")
    assert outside == [], f"the page tried to reach {outside}"
