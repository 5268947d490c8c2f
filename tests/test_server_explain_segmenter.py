"""``POST /opensd/v1/explain`` with the model folder's segmenter, on a tiny random model (32 px).

The answer's ``segmentation`` is checked against the library
(:func:`opensd.explain.compare_with_attention` on the same generation): the same maps, pixel
for pixel, and the same numbers. The segmenter is loaded once per model file, read-only; a
request names no file (``auto`` or ``none`` only); a model without a usable segmenter answers
``segmentation: null`` with the reason. The page's Explain section shows the maps too (the
browser test skips without Chromium).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import browser_page, tiny_loaded
from helpers import decode_png as decode
from helpers import png_pixels as pixels

from opensd.checkpoints.segmenter import FILE_NAME, save_segmenter
from opensd.explain import attention_maps, compare_with_attention
from opensd.explain.render import heatmap_overlay
from opensd.explain.segmentation import CLASS_COLOURS, load_for_explain
from opensd.models.segmenter import Segmenter, SegmenterConfig
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import create_app
from opensd.serving.background import serve_in_thread
from opensd.serving.segmenters import SegmenterCache

URL = "/opensd/v1/explain"
CLASSES = ("background", "circle", "square", "triangle")
PROMPT = "a red circle above two squares"  # two shape words: circle, and squares (plural)
BODY = {"prompt": PROMPT, "seed": 7, "steps": 3, "sampler_name": "Euler", "cfg_scale": 5.0}


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


def _pipe_in(folder: Path) -> StableDiffusionPipeline:
    """The tiny model as if loaded from ``folder`` (so its segmenter is ``folder/segmenter.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    return StableDiffusionPipeline(dataclasses.replace(tiny_loaded(seed=3), path=folder, name=folder.name))


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("shapes-model")
    return save_segmenter(Segmenter(SegmenterConfig.tiny()).eval(), CLASSES, folder / FILE_NAME)


@pytest.fixture(scope="module")
def pipe(seg_file) -> StableDiffusionPipeline:
    return _pipe_in(seg_file.parent)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe)) as c:
        yield c


def test_auto_uses_the_model_folders_segmenter_as_the_library_does(client, pipe, seg_file) -> None:
    r = client.post(URL, json={**BODY, "raw": True})
    assert r.status_code == 200, r.text
    got = r.json()
    seg = got["segmentation"]
    assert got["segmentation_reason"] is None and seg is not None
    assert seg["classes"] == list(CLASSES) and seg["threshold"] == 0.5 and len(seg["maps"]) == 3
    assert all(decode(m).size == (32, 32) for m in [*seg["maps"], seg["class_map"]])
    probs = np.array(seg["probabilities"])  # (n_classes, H, W)
    assert probs.shape == (4, 32, 32) and probs.min() >= 0
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert [(a["word"], a["shape"]) for a in seg["agreements"]] == [("circle", "circle"), ("squares", "square")]
    for a in seg["agreements"]:
        assert all(0.0 <= a[k] <= 1.0 for k in ("inside", "area", "iou")), a

    ref = attention_maps(pipe, PROMPT, seed=7, steps=3, sampler="euler", cfg_scale=5.0)
    assert np.array_equal(pixels(got["image"]), np.asarray(ref.image))
    view = compare_with_attention(ref, *load_for_explain(seg_file))
    for b64, p in zip(seg["maps"], view.probabilities[1:], strict=True):  # each probability as is, not normalized
        assert np.array_equal(pixels(b64), np.asarray(heatmap_overlay(ref.image, p, normalize=False)))
    assert np.array_equal(pixels(seg["class_map"]), CLASS_COLOURS[view.probabilities.argmax(0).numpy()])
    np.testing.assert_allclose(probs, view.probabilities.numpy(), atol=1e-6)
    for a, b in zip(seg["agreements"], view.agreements, strict=True):
        assert a == pytest.approx(b.as_dict())
    plain = client.post(URL, json=BODY).json()["segmentation"]  # raw false: maps only
    assert plain["probabilities"] is None and plain["maps"] == seg["maps"]


def test_the_segmenter_is_loaded_once_per_file_and_never_changed(pipe, seg_file) -> None:
    loads: list[Path] = []

    def loader(path: Path):
        loads.append(path)
        return load_for_explain(path)

    app = create_app(pipe)
    cache = app.state.opensd.segmenters = SegmenterCache(loader)
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post(URL, json={**BODY, "steps": 1}).json()["segmentation"] is not None
        assert loads == [seg_file.resolve()]
        seg = cache.for_model(seg_file.parent, "m").segmenter
        assert seg is not None
        before = {k: v.clone() for k, v in seg[0].state_dict().items()}
        assert c.post(URL, json={**BODY, "steps": 1}).status_code == 200
        assert not seg[0].training and all(torch.equal(v, before[k]) for k, v in seg[0].state_dict().items())
        st = seg_file.stat()
        os.utime(seg_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: read again
        assert c.post(URL, json={**BODY, "steps": 1}).json()["segmentation"] is not None
        assert loads == [seg_file.resolve()] * 2


def test_none_leaves_it_out_and_says_so(client) -> None:
    for value in ("none", "None"):
        got = client.post(URL, json={**BODY, "steps": 1, "segmenter": value}).json()
        assert got["segmentation"] is None and got["segmentation_reason"] == 'the request\'s segmenter is "none"'
    assert client.post(URL, json={**BODY, "steps": 1, "segmenter": None}).json()["segmentation"] is not None  # null: auto


@pytest.mark.parametrize("value", ["/etc/passwd", "segmenter.safetensors", "", "yes", "FILE"])
def test_a_bad_segmenter_is_a_422_naming_the_allowed_values(client, value) -> None:
    r = client.post(URL, json={**BODY, "segmenter": value})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith('segmenter must be "auto" (the model folder\'s segmenter.safetensors, if it has one) or "none"')
    assert repr(value) in detail and "reads no segmenter file that a request names" in detail


def test_a_path_to_a_real_segmenter_is_refused_too(client, seg_file) -> None:
    r = client.post(URL, json={**BODY, "segmenter": str(seg_file)})
    assert r.status_code == 422 and r.json()["detail"].startswith('segmenter must be "auto"'), r.text
    r = client.post(URL, json={**BODY, "segmenter": 3})
    assert r.status_code == 422 and r.json()["detail"].startswith("segmenter: Input should be a valid string"), r.text


def test_a_model_without_a_usable_segmenter_answers_null_with_the_reason(tmp_path: Path) -> None:
    pipe = _pipe_in(tmp_path / "plain-model")
    app = create_app(pipe)
    with TestClient(app) as c:
        got = c.post(URL, json={**BODY, "steps": 1}).json()
        assert got["segmentation"] is None and len(got["overlays"]) == 6
        assert got["segmentation_reason"] == "the model plain-model has no segmenter: its folder holds no segmenter.safetensors"
        (tmp_path / "plain-model" / FILE_NAME).write_bytes(b"junk")
        r = c.post(URL, json={**BODY, "steps": 1})
        assert r.status_code == 200 and r.json()["segmentation"] is None
        assert r.json()["segmentation_reason"].startswith(
            "the model plain-model's segmenter.safetensors cannot be used: ") and "not a safetensors file" in r.text
        gray = Segmenter(SegmenterConfig(in_channels=1, model_channels=16, channel_mult=(1, 1), norm_groups=4))
        save_segmenter(gray, CLASSES, tmp_path / "plain-model" / FILE_NAME)
        r = c.post(URL, json={**BODY, "steps": 1})
        assert r.status_code == 200 and "reads 1-channel images" in r.json()["segmentation_reason"]
    assert app.state.opensd.segmenters.for_model(Path(__file__), "a-file").reason == (
        "the model a-file has no segmenter: it is a single file, not a folder that could hold a segmenter.safetensors")


def test_page_shows_the_segmenters_maps_beside_the_words(pipe, tmp_path: Path) -> None:
    with serve_in_thread(create_app(pipe)) as url, browser_page(url) as (page, _):
        page.goto(url + "/")
        page.wait_for_selector("#sampler_name option[value='Euler a']", state="attached")
        page.fill("#explain-prompt", "a large triangle")
        page.fill("#explain-steps", "2")
        page.click("#explain-run")
        page.wait_for_function("() => document.querySelectorAll('#explain-shapes figure').length === 4")
        titles = page.eval_on_selector_all("#explain-shapes figcaption", "cs => cs.map(c => c.firstChild.textContent)")
        notes = page.eval_on_selector_all("#explain-shapes figcaption .hint", "ns => ns.map(n => n.textContent)")
        assert titles == ["classes", "circle", "square", "triangle"]
        assert notes[1:3] == ["no word of the prompt names it"] * 2 and notes[3].startswith('"triangle": ')
        sizes = page.eval_on_selector_all("#explain-shapes img", "ims => ims.map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes == [[32, 32]] * 4 and page.text_content("#explain-segmentation-reason") == ""
        page.select_option("#explain-segmenter", "none")
        page.click("#explain-run")
        page.wait_for_function("() => document.querySelectorAll('#explain-shapes figure').length === 0")
        assert page.text_content("#explain-segmentation-reason") == 'No segmenter: the request\'s segmenter is "none"'
