"""End to end through the `opensd` command: generate, img2img, inpaint, png-info, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_word_bundle
from PIL import Image
from typer.testing import CliRunner

from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.pipelines.infotext import parse_infotext, read_png_parameters

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model, tok = tiny_word_bundle()
    return save_opensd(model, tok, tmp_path_factory.mktemp("m") / "tiny-shapes")


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_writes_png_whose_parameters_round_trip(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "red.png"
    res = invoke("generate", "a red circle", "-n", "a blue square", "-m", model_dir, "--steps", 3,
                 "--sampler", "DPM++ 2M Karras", "--seed", 1234, "--cfg-scale", 5, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert out.is_file() and str(out) in res.output
    text = read_png_parameters(out)
    fields = parse_infotext(text)
    assert fields["Prompt"] == "a red circle"
    assert fields["Negative prompt"] == "a blue square"
    assert fields["Steps"] == "3" and fields["Seed"] == "1234" and fields["CFG scale"] == "5.0"
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras"
    assert fields["Size"] == "32x32" and fields["Model"] == "tiny-shapes" and len(fields["Model hash"]) == 10
    # png-info reads the same fields back
    res = invoke("png-info", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == fields
    res = invoke("png-info", out)
    assert "Sampler: DPM++ 2M" in res.output and "Negative prompt: a blue square" in res.output


def test_generate_batch_and_same_seed_same_image(model_dir: Path, tmp_path: Path) -> None:
    res = invoke("generate", "two green triangles", "-m", model_dir, "--steps", 2, "--seed", 5, "-b", 2, "-o", tmp_path / "b.png", "-q")
    assert res.exit_code == 0, res.output
    a0, a1 = tmp_path / "b-0.png", tmp_path / "b-1.png"
    assert a0.is_file() and a1.is_file()
    assert "Seed: 6" in read_png_parameters(a1)
    res = invoke("generate", "two green triangles", "-m", model_dir, "--steps", 2, "--seed", 5, "-o", tmp_path / "c.png", "-q")
    assert np.array_equal(np.asarray(Image.open(a0)), np.asarray(Image.open(tmp_path / "c.png")))


def test_img2img_and_inpaint(model_dir: Path, tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    res = invoke("img2img", tmp_path / "in.png", "a blue circle", "-m", model_dir, "--steps", 4, "--strength", 0.5,
                 "--seed", 1, "-o", tmp_path / "i2i.png", "-q")
    assert res.exit_code == 0, res.output
    assert "Denoising strength: 0.5" in read_png_parameters(tmp_path / "i2i.png")
    res = invoke("inpaint", tmp_path / "in.png", tmp_path / "mask.png", "a blue circle", "-m", model_dir,
                 "--steps", 3, "--seed", 1, "-o", tmp_path / "inp.png", "-q")
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open(tmp_path / "inp.png"))
    assert (out[16:] == (200, 30, 30)).all()  # outside the mask: the original, exactly


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "x", "--width", "30"], "width must be a multiple of 8"),
        (["generate", "x", "--height", "4"], "height must be a multiple of 8"),
        (["generate", "x", "--steps", "0"], "steps must be"),
        (["generate", "x", "--sampler", "warp"], "unknown sampler 'warp'; known:"),
        (["generate", "x", "-o", ""], "--out is empty"),
        (["img2img", "/nonexistent.png", "x"], "image file not found"),
        (["img2img", "{bad}", "x", "--strength", "0.5"], "cannot read image"),
        (["img2img", "{good}", "x", "--strength", "2"], r"strength must be in \[0, 1\]"),
        (["inpaint", "{good}", "{bigmask}", "x"], "same size"),
        (["png-info", "{good}"], "carries no generation parameters"),
        (["generate", "x", "-m", "/nonexistent/model"], "model not found"),
    ],
)
def test_bad_input_is_one_clear_line(model_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "good.png")
    Image.new("L", (48, 32)).save(tmp_path / "bigmask.png")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    files = {"{good}": tmp_path / "good.png", "{bad}": tmp_path / "bad.png", "{bigmask}": tmp_path / "bigmask.png"}
    args = [str(files.get(a, a)) for a in args]
    if "-m" not in args and args[0] != "png-info":
        args += ["-m", str(model_dir)]
    res = invoke(*args, *(["-q"] if args[0] != "png-info" else []))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    import re

    assert re.search(message, res.output), res.output


def test_no_model_and_no_default_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    import opensd.defaults as d

    monkeypatch.delenv(d.ENV_VAR, raising=False)
    monkeypatch.setattr(d, "REPO_MODELS", tmp_path)
    res = invoke("generate", "x", "-q")
    assert res.exit_code == 2 and "no model given" in res.output


def test_precision_option(model_dir: Path, tmp_path: Path) -> None:
    from opensd.cli.common import PrecisionChoice
    from opensd.precision import Precision

    assert [c.value for c in PrecisionChoice] == [p.value for p in Precision]  # the CLI's copy of the names
    res = invoke("generate", "a red circle", "-m", model_dir, "--steps", 2, "--seed", 3, "--precision", "bf16",
                 "-o", tmp_path / "bf16.png", "-q")
    assert res.exit_code == 0 and (tmp_path / "bf16.png").is_file(), res.output
    res = invoke("generate", "a red circle", "-m", model_dir, "--steps", 2, "--seed", 3, "--precision", "fp16",
                 "-o", tmp_path / "fp16.png", "-q")
    assert res.exit_code == 0 and (tmp_path / "fp16.png").is_file(), res.output
    assert "warning: fp16 on a CPU is slow" in res.output and "PrecisionWarning" not in res.output  # one line, no source
    res = invoke("generate", "x", "-m", model_dir, "--precision", "fp8", "-q")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "fp8" in res.output and all(v in res.output for v in ("auto", "fp32", "bf16", "fp16")), res.output
