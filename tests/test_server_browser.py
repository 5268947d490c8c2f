"""The web page in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium).

The page's every request is checked to stay on the test server (127.0.0.1); anything else
is aborted. Skipped, with the reason, when Chromium or Playwright is not installed
(``apt-get install -y chromium``; the ``playwright`` Python package from the test extra).
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize, tiny_word_bundle
from PIL import Image

from opensd.checkpoints import load_model
from opensd.checkpoints.controlnet import controlnet_config_for, save_controlnet
from opensd.checkpoints.opensd_format import save_opensd
from opensd.models.controlnet import ControlNet
from opensd.pipelines.infotext import parse_infotext
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import create_app
from opensd.serving.background import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found: install it with `apt-get install -y chromium`", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed (test extra)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000


class SlowPipeline(StableDiffusionPipeline):
    """The tiny pipeline with a short pause after each step, so that a poll sees sampling under way.
    ``masks`` records the mask of every request it ran (None for none)."""

    def __init__(self, loaded, pause: float):
        super().__init__(loaded)
        self.pause = pause
        self.masks: list = []

    def generate(self, req, *, callback=None, **kw):
        self.masks.append(kw.get("mask"))

        def slow(info):
            time.sleep(self.pause)
            return callback(info) if callback is not None else None

        return super().generate(req, callback=slow, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_word_bundle()
    root = tmp_path_factory.mktemp("m")
    path = save_opensd(model, tok, root / "tiny-shapes")
    (root / "ControlNet").mkdir()
    torch.manual_seed(0)
    save_controlnet(randomize(ControlNet(controlnet_config_for(model.cfg, (16, 32))), 3, 0.1), root / "ControlNet" / "edges.safetensors")
    pipe = SlowPipeline(load_model(path), pause=0.02)
    with serve_in_thread(create_app(pipe, controlnet_dir=root / "ControlNet")) as url:
        url_with_pipe = type("ServerUrl", (str,), {})(url)
        url_with_pipe.pipe = pipe
        yield url_with_pipe
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser():
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True, timeout=TIMEOUT_MS)
    except Exception as e:  # a Chromium that Playwright cannot drive: say so rather than fail obscurely
        pw.stop()
        pytest.skip(f"Playwright could not start {CHROMIUM}: {e}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def page(browser, server: str):
    context = browser.new_context()
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    outside: list[str] = []

    def only_loopback(route) -> None:
        if route.request.url.startswith(server + "/"):
            route.continue_()
        else:  # e.g. a /docs asset from a CDN: never leave this machine
            outside.append(route.request.url)
            route.abort()

    p.route("**/*", only_loopback)
    p.goto(server + "/")
    p.wait_for_selector("#sampler_name option[value='Euler a']", state="attached")
    yield p
    context.close()
    assert outside == [], f"the page tried to reach {outside}"


def gallery_images(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#gallery figure",
        "figs => figs.map(f => ({src: f.querySelector('img').src, alt: f.querySelector('img').alt,"
        " text: f.querySelector('pre').textContent, href: f.querySelector('a').href, download: f.querySelector('a').download}))",
    )


def png_from_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    im.load()
    return im


def test_form_generates_with_live_progress_and_a_downloadable_gallery(page) -> None:
    page.fill("#prompt", "a red circle")
    page.fill("#negative_prompt", "a blue square")
    page.select_option("#sampler_name", "Euler")
    page.select_option("#scheduler", "Karras")
    page.fill("#steps", "16")
    page.fill("#cfg_scale", "5")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.fill("#seed", "7")
    page.fill("#batch_size", "2")
    page.click("#generate")
    # while sampling: the bar moves, the preview shows the current x0 prediction, Interrupt is live
    page.wait_for_function(
        "() => { const p = document.getElementById('progress'); return p.value > 0 && p.value < 1"
        " && !document.getElementById('preview').hidden; }"
    )
    assert page.is_enabled("#interrupt") and page.is_disabled("#generate")
    assert png_from_data_url(page.get_attribute("#preview", "src")).size == (32, 32)
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 2")
    assert page.text_content("#progress-text") == "Done" and page.inner_text("#error") == ""
    shown = gallery_images(page)
    seeds = sorted(parse_infotext(s["text"])["Seed"] for s in shown)
    assert seeds == ["7", "8"]
    for item in shown:
        fields = parse_infotext(item["text"])
        assert fields["Steps"] == "16" and fields["Sampler"] == "Euler" and fields["Schedule type"] == "Karras"
        assert fields["Negative prompt"] == "a blue square" and fields["CFG scale"] == "5.0"
        assert item["download"] == f"opensd-{fields['Seed']}.png" and item["href"] == item["src"]
        png = png_from_data_url(item["href"])  # the download carries its parameters
        assert png.info["parameters"] == item["text"] and png.size == (32, 32)
        assert "a red circle" in item["alt"]


def test_keyboard_only_tab_order_and_submit(page) -> None:
    assert page.evaluate("document.activeElement.id") == "prompt"  # focus starts in the prompt
    page.keyboard.type("a green triangle")
    page.keyboard.press("Control+Enter")  # from the prompt textarea
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1")
    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["negative_prompt", "sampler_name", "scheduler", "steps"]
    page.keyboard.press("Control+A")
    page.keyboard.type("3")
    page.keyboard.press("Enter")  # Enter in a one-line field submits the form
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 2")
    newest = parse_infotext(gallery_images(page)[0]["text"])
    assert newest["Steps"] == "3" and newest["Prompt"] == "a green triangle"


def test_img2img_from_an_uploaded_file(page, tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "start.png")
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "4")
    page.set_input_files("#init_image", str(tmp_path / "start.png"))
    page.fill("#denoising_strength", "0.5")
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1")
    fields = parse_infotext(gallery_images(page)[0]["text"])
    assert fields["Denoising strength"] == "0.5" and fields["Steps"] == "4" and fields["Size"] == "32x32"


def test_errors_are_shown_and_the_page_recovers(page) -> None:
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "100000")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    assert "steps must be from 1 to 150" in page.inner_text("#error")
    assert page.is_enabled("#generate")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1")
    assert page.inner_text("#error") == ""


def test_interrupt_button_stops_sampling(page) -> None:
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "150")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('progress').value > 0")
    page.click("#interrupt")
    page.wait_for_function("() => document.getElementById('progress-text').textContent === 'Interrupted'", timeout=TIMEOUT_MS)
    assert page.eval_on_selector_all("#gallery figure", "f => f.length") == 1


def test_no_broken_image_on_load(page) -> None:
    """Every image the page shows on load has loaded (an <img> with no src shows a broken-image box)."""
    shown = page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => i.getClientRects().length > 0)"
        ".map(i => ({id: i.id, ok: i.complete && i.naturalWidth > 0}))",
    )
    assert [s["id"] for s in shown if not s["ok"]] == []
    assert page.is_hidden("#mask-editor")  # no editor before there is an image to paint on


def _drag(page, points: list[tuple[float, float]], side: int) -> None:
    """A mouse stroke through ``points``, given in pixels of a ``side`` x ``side`` image, over the mask canvas."""
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()  # its 1 px border included
    at = [(box["x"] + 1 + x / side * (box["width"] - 2), box["y"] + 1 + y / side * (box["height"] - 2)) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for p in at[1:]:
        page.mouse.move(*p, steps=8)
    page.mouse.up()


def test_inpainting_with_a_mask_painted_on_the_page(page, server, tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "start.png")
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "3")
    page.set_input_files("#init_image", str(tmp_path / "start.png"))
    page.wait_for_selector("#mask-editor", state="visible")
    page.fill("#brush_size", "4")
    _drag(page, [(4, 8), (28, 8)], 32)  # a horizontal stroke across the top
    assert page.evaluate("window.MaskEditor.hasMask()")
    page.click("#mask-invert")
    page.click("#mask-invert")  # twice: the stroke again
    page.check("#mask_erase")
    _drag(page, [(26, 8), (28, 8)], 32)  # rub out its right end
    page.uncheck("#mask_erase")
    page.fill("#mask_blur", "1")
    page.select_option("#inpainting_fill", "2")
    assert page.is_checked("#inpaint_full_res")  # only masked by default, as the CLI
    page.fill("#inpaint_full_res_padding", "6")
    if os.environ.get("OPENSD_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["OPENSD_SCREENSHOTS"], "mask-editor.png"), full_page=True)
    server.pipe.masks.clear()
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1")
    assert page.inner_text("#error") == ""
    sent = server.pipe.masks[0]  # (only masked calls generate again, on the cut-out region)
    assert sent.blur == 1 and sent.content.value == "latent-noise"
    assert sent.only_masked and sent.padding == 6
    m = np.asarray(sent.image.convert("L")) >= 128
    assert m.shape == (32, 32)
    assert m[8, 5:22].all() and m[6:10, 10].all() and not m[11:, 10].any()  # the stroke, 4 px wide around y = 8
    assert not m[8, 28:].any()  # the erased end
    assert not m[14:].any() and not m[:4].any()  # nowhere else
    page.uncheck("#inpaint_full_res")  # the whole picture
    server.pipe.masks.clear()
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 2")
    (sent,) = server.pipe.masks
    assert not sent.only_masked
    # cleared, the mask is gone: plain img2img again
    page.click("#mask-clear")
    assert not page.evaluate("window.MaskEditor.hasMask()")
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 3")
    assert server.pipe.masks[-1] is None


def test_hires_fix_and_a_controlnet_from_the_page(page, tmp_path: Path) -> None:
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = 255
    Image.fromarray(square).save(tmp_path / "control.png")
    page.wait_for_selector("#cn_module option[value='canny']", state="attached")  # the listings load after the samplers
    assert page.eval_on_selector_all("#hr_upscaler option", "os => os.map(o => o.value)")[:2] == ["Latent", "Latent (antialiased)"]
    assert "canny" in page.eval_on_selector_all("#cn_module option", "os => os.map(o => o.value)")
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "3")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.check("#enable_hr")
    page.fill("#hr_second_pass_steps", "2")
    page.select_option("#cn_model", index=1)
    page.select_option("#cn_module", "canny")
    page.set_input_files("#cn_image", str(tmp_path / "control.png"))
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1")
    item = gallery_images(page)[0]
    fields = parse_infotext(item["text"])
    assert fields["Hires upscale"] == "2" and fields["Hires steps"] == "2" and fields["Hires upscaler"] == "Latent"
    assert fields["ControlNet 0"].startswith("Module: canny, Model: edges [") and fields["Size"] == "32x32"
    assert png_from_data_url(item["href"]).size == (64, 64)
