"""`opensd generate --hires-*` and `opensd upscale` end to end on a tiny model, and their bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize, tiny_word_bundle
from PIL import Image
from test_upscalers import tiny_compact_state
from typer.testing import CliRunner

import opensd
from opensd.checkpoints.controlnet import controlnet_config_for, save_controlnet
from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.models.controlnet import ControlNet
from opensd.pipelines.hires import HiresFix, hires_fix
from opensd.pipelines.infotext import parse_infotext, read_png_parameters, save_image

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-hires")
    model, tok = tiny_word_bundle()
    torch.manual_seed(0)
    net = randomize(ControlNet(controlnet_config_for(model.cfg, (16, 32))), 3, 0.1)
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = 255
    Image.fromarray(square).save(root / "square.png")
    (root / "ESRGAN").mkdir()
    write_safetensors(tiny_compact_state(2), root / "ESRGAN" / "compact_x2.safetensors")
    return {"model": save_opensd(model, tok, root / "tiny"), "cn": save_controlnet(net, root / "edges.safetensors"),
            "square": root / "square.png", "esrgan": root / "ESRGAN"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_hires_equals_the_library_and_writes_a1111s_fields(files, tmp_path) -> None:
    res = invoke("generate", "a red circle", "-m", files["model"], "--steps", 3, "--seed", 7, "-q", "--sampler", "euler",
                 "--hires-scale", 2, "--hires-steps", 2, "--hires-upscaler", "Latent (bicubic)", "--hires-denoise", 0.6,
                 "-o", tmp_path / "h.png")
    assert res.exit_code == 0, res.output
    fields = parse_infotext(read_png_parameters(tmp_path / "h.png"))
    assert fields["Size"] == "32x32" and fields["Hires upscale"] == "2" and fields["Hires steps"] == "2"
    assert fields["Hires upscaler"] == "Latent (bicubic)" and fields["Denoising strength"] == "0.6"
    pipe = opensd.load(files["model"])
    req = pipe.request("a red circle", steps=3, sampler="euler", seed=7)
    want = hires_fix(pipe, req, HiresFix(scale=2, upscaler="Latent (bicubic)", steps=2, denoising_strength=0.6)).images[0]
    assert want.size == (64, 64)
    assert np.array_equal(_pixels(tmp_path / "h.png"), np.asarray(want, dtype=np.int16))


def test_hires_to_a_size_with_a_controlnet_and_an_upscaler_model(files, tmp_path) -> None:
    res = invoke("generate", "a red circle", "-m", files["model"], "--steps", 2, "--seed", 1, "-q", "--hires-width", 48,
                 "--hires-height", 40, "--hires-upscaler", "compact_x2", "--upscaler-dir", files["esrgan"],
                 "--controlnet", files["cn"], "--control-image", files["square"], "-o", tmp_path / "c.png")
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "c.png").size == (48, 40)
    params = read_png_parameters(tmp_path / "c.png").splitlines()[-1]
    assert "Hires resize: 48x40" in params and "Hires upscaler: compact_x2" in params and "Hires upscale:" not in params
    assert params.index("ControlNet 0: ") < params.index("Hires resize")
    res = invoke("generate", "a red circle", "-m", files["model"], "--steps", 2, "--seed", 1, "-q", "--hires-scale", 1.5,
                 "--hires-upscaler", files["esrgan"] / "compact_x2.safetensors", "-o", tmp_path / "p.png")  # a path works too
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "p.png").size == (48, 48)


@pytest.mark.parametrize("args, message", [
    (["--hires-steps", 3], "--hires-steps needs --hires-scale or --hires-width/--hires-height"),
    (["--hires-scale", 0.5], "hires scale must be a number from 1 to 8, got 0.5"),
    (["--hires-scale", 2, "--hires-width", 64], "give --hires-scale or --hires-width/--hires-height, not both"),
    (["--hires-scale", 2, "--hires-upscaler", "4x-UltraSharp"], r"unknown --hires-upscaler '4x-UltraSharp' .*known: Latent"),
    (["--hires-scale", 2, "--hires-denoise", 2], "hires denoising strength must be a number from 0 to 1"),
    (["--hires-scale", 2, "--refiner", "{model}"], "--hires-\\* and --refiner do not go together"),
    (["--hires-scale", 2, "--upscaler-dir", "/nowhere"], "--upscaler-dir /nowhere is not a folder"),
    (["--width", 1024, "--height", 1024, "--hires-scale", 8], "hires fix to 8192x8192: width must be a multiple of 8 between 8 and 4096"),
])
def test_bad_hires_input_is_one_clear_line(files, tmp_path, args, message) -> None:
    args = [a.format(**files) if isinstance(a, str) else a for a in args]
    res = invoke("generate", "a red circle", "-m", files["model"], "--steps", 1, "--seed", 1, "-q", "-o", tmp_path / "x.png", *args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert re.search(message, res.output), res.output
    assert not (tmp_path / "x.png").exists()


def test_upscale_command(files, tmp_path) -> None:
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    save_image(source, tmp_path / "in.png", "a red circle\nSteps: 3, Sampler: Euler, Seed: 1")
    res = invoke("upscale", tmp_path / "in.png", "--scale", 2, "-o", tmp_path / "lanczos.png")
    assert res.exit_code == 0, res.output
    got = Image.open(tmp_path / "lanczos.png")
    assert np.array_equal(np.asarray(got), np.asarray(source.resize((48, 40), Image.Resampling.LANCZOS)))
    assert read_png_parameters(tmp_path / "lanczos.png").startswith("a red circle")  # the parameters are kept
    for name in ("compact_x2", str(files["esrgan"] / "compact_x2.safetensors")):
        res = invoke("upscale", tmp_path / "in.png", "--upscaler", name, "--scale", 2, "--upscaler-dir", files["esrgan"],
                     "--tile", 16, "-o", tmp_path / "m.png")
        assert res.exit_code == 0, res.output
        model = np.asarray(Image.open(tmp_path / "m.png"), dtype=np.int16)
        assert model.shape == (40, 48, 3) and np.abs(model - np.asarray(got, dtype=np.int16)).max() > 10


@pytest.mark.parametrize("args, message", [
    (["--upscaler", "Latent"], "--upscaler 'Latent' upscales latents"),
    (["--upscaler", "R-ESRGAN 4x+"], r"unknown --upscaler 'R-ESRGAN 4x\+'.*known: None, Lanczos, Nearest"),
    (["--scale", 9], "--scale must be more than 1 and at most 8, got 9"),
    (["-o", "{tmp}/out.gif"], "--out .*out.gif has suffix '.gif'"),
])
def test_bad_upscale_input_is_one_clear_line(files, tmp_path, args, message) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    args = [a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args]
    out = [] if "-o" in args else ["-o", tmp_path / "o.png"]
    res = invoke("upscale", tmp_path / "in.png", *out, *args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert re.search(message, res.output), res.output
