"""`opensd generate|img2img|inpaint --controlnet ...` end to end on a tiny model, and its bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize, tiny_word_bundle
from PIL import Image
from typer.testing import CliRunner

from opensd.checkpoints.controlnet import controlnet_config_for, save_controlnet, save_controlnet_diffusers
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.models.controlnet import ControlNet
from opensd.pipelines.infotext import read_png_parameters

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-controlnet")
    model, tok = tiny_word_bundle()
    torch.manual_seed(0)
    net = randomize(ControlNet(controlnet_config_for(model.cfg, (16, 32))), 3, 0.1)
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = 255
    Image.fromarray(square).save(root / "square.png")
    return {
        "model": save_opensd(model, tok, root / "tiny"), "cn": save_controlnet(net, root / "edges.safetensors"),
        "cn_folder": save_controlnet_diffusers(net, root / "edges-diffusers"), "square": root / "square.png",
    }


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_with_a_controlnet_writes_its_infotext(files, tmp_path) -> None:
    common = ["generate", "a red circle", "-m", files["model"], "--steps", 3, "--seed", 7, "-q"]
    res = invoke(*common, "--controlnet", f"{files['cn']}:0.8", "--control-image", files["square"],
                 "--control-preprocessor", "canny", "--control-mode", "prompt", "-o", tmp_path / "c.png")
    assert res.exit_code == 0, res.output
    text = read_png_parameters(tmp_path / "c.png")
    assert re.search(r'ControlNet 0: "Module: canny, Model: edges \[\w{8}\], Weight: 0\.8, Resize Mode: Crop and Resize, '
                     r'Guidance Start: 0, Guidance End: 1, Control Mode: My prompt is more important"', text), text
    assert invoke(*common, "-o", tmp_path / "plain.png").exit_code == 0
    assert np.abs(_pixels(tmp_path / "c.png") - _pixels(tmp_path / "plain.png")).max() > 10  # the control acted


def test_two_controlnets_and_per_unit_options(files, tmp_path) -> None:
    res = invoke("generate", "a red circle", "-m", files["model"], "--steps", 4, "--seed", 1, "-q", "-o", tmp_path / "two.png",
                 "--controlnet", files["cn"], "--controlnet", f"{files['cn_folder']}:0.5", "--control-image", files["square"],
                 "--control-start", 0, "--control-start", 0.5, "--control-resize", "fill")
    assert res.exit_code == 0, res.output
    text = read_png_parameters(tmp_path / "two.png")
    assert "ControlNet 0: " in text and "ControlNet 1: " in text and "Guidance Start: 0.5" in text
    assert "Model: edges-diffusers [" in text and text.count("Resize Mode: Resize and Fill") == 2


def test_img2img_and_inpaint_take_their_image_as_the_control_image(files, tmp_path) -> None:
    res = invoke("img2img", files["square"], "a blue square", "-m", files["model"], "--steps", 4, "--strength", 0.5,
                 "--seed", 1, "-q", "-o", tmp_path / "i.png", "--controlnet", files["cn"], "--control-preprocessor", "scribble")
    assert res.exit_code == 0, res.output
    assert 'ControlNet 0: "Module: scribble' in read_png_parameters(tmp_path / "i.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    res = invoke("inpaint", files["square"], tmp_path / "mask.png", "a blue square", "-m", files["model"], "--steps", 3,
                 "--seed", 1, "-q", "-o", tmp_path / "p.png", "--controlnet", files["cn"], "--control-image", files["square"])
    assert res.exit_code == 0, res.output
    assert (_pixels(tmp_path / "p.png")[16:] == _pixels(files["square"])[16:]).all()  # outside the mask: the original


@pytest.mark.parametrize("args, message", [
    (["--controlnet", "{cn}", "--control-image", "{square}", "--control-preprocessor", "openpose"], "unknown control preprocessor 'openpose'; known: none, canny"),
    (["--controlnet", "/nowhere/cn.safetensors"], r"--controlnet /nowhere/cn\.safetensors: no such file or folder; give PATH\[:WEIGHT\]"),
    (["--controlnet", "{cn}:3", "--control-image", "{square}"], "control weight must be a number from 0 to 2, got 3.0"),
    (["--controlnet", "{cn}", "--controlnet", "{cn}", "--control-image", "{square}", "--control-end", 1, "--control-end", 1, "--control-end", 1],
     "--control-end is given 3 times for 2 --controlnet; give it once"),
    (["--control-image", "{square}"], "--control-image needs --controlnet PATH"),
    (["--controlnet", "{cn}", "--control-image", "{square}", "--control-mode", "loud"], "unknown control mode 'loud'"),
    (["--controlnet", "{cn}", "--control-image", "/nowhere.png"], "control image file not found"),
    (["--controlnet", "{cn}"], "--controlnet needs --control-image IMG here"),
    (["--controlnet", "{square}", "--control-image", "{square}"], "square.png: not a ControlNet file; give a .safetensors"),
])
def test_bad_control_input_is_one_clear_line(files, tmp_path, args, message) -> None:
    args = [a.format(**files) if isinstance(a, str) else a for a in args]
    res = invoke("generate", "a red circle", "-m", files["model"], "--steps", 1, "--seed", 1, "-q", "-o", tmp_path / "x.png", *args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert re.search(message, res.output), res.output
