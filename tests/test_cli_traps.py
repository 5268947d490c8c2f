"""The traps a newcomer following the README fell into, each through the real command.

Ports and devices that do not exist, an image too large to decode, a GPU that could not
be asked for, threads, seeds and file names, output formats, arguments that are not
UTF-8, and help that named the wrong default size.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from helpers import tiny_word_bundle
from PIL import Image
from typer.testing import CliRunner

import opensd
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.common import SMALL_MODEL_PARAMS, default_threads
from opensd.cli.main import app
from opensd.errors import OpenSDError
from opensd.pipelines.infotext import parse_infotext, read_parameters

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model, tok = tiny_word_bundle()
    return save_opensd(model, tok, tmp_path_factory.mktemp("m") / "tiny-shapes")


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(res, exit_code: int = 2) -> str:
    """The output of a command that failed cleanly: exit code 2, no traceback, an ``error:`` line."""
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.output
    return lines[0]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path: Path, side: int = 14000, parameters: str | None = None) -> Path:
    """A 200-byte PNG whose header claims side x side pixels (PIL refuses to open it)."""
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    if parameters is not None:
        data += _chunk(b"tEXt", b"parameters\0" + parameters.encode("latin-1"))
    data += _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- serve: port and device


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "0"])
def test_serve_port_out_of_range_is_one_line(port: str) -> None:
    line = one_error_line(invoke("serve", "--port", port))
    assert f"--port must be from 1 to 65535, got {port}" in line


def test_serve_device_that_is_missing_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_error_line(invoke("serve", "--device", "cuda"))
    assert "CUDA is not available" in line and "available: cpu" in line


# ----------------------------------------------------------------------------- --device everywhere


COMMANDS = {
    "generate": ["generate", "x"],
    "img2img": ["img2img", "{image}", "x"],
    "inpaint": ["inpaint", "{image}", "{image}", "x"],
    "explain": ["explain", "x"],
    "interpolate": ["interpolate", "x"],
    "eval": ["eval"],
}


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_model_command_takes_device_through_to_the_pipeline(command, model_dir, tmp_path, monkeypatch) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    seen = {}

    def spy_load(path, **kw):
        seen.update(kw)
        raise OpenSDError("stopped after the load call")

    monkeypatch.setattr(opensd, "load", spy_load)
    args = [str(tmp_path / "in.png") if a == "{image}" else a for a in COMMANDS[command]]
    out = ["-o", str(tmp_path / ("out.png" if command in ("generate", "img2img", "inpaint") else "out"))]
    res = invoke(*args, "-m", model_dir, "--device", "cpu", *out)
    assert "stopped after the load call" in one_error_line(res)
    assert seen["device"] == torch.device("cpu") and seen["precision"] == "auto"  # the default
    res = invoke(*args, "-m", model_dir, "--device", "cpu", "--precision", "BF16", *out)
    assert "stopped after the load call" in one_error_line(res) and seen["precision"] == "bf16"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_error_line(invoke(*args, "-m", model_dir, "--device", "cuda:1", *out))
    assert "CUDA is not available" in line


def test_generate_runs_on_the_device_asked_for(model_dir, tmp_path) -> None:
    res = invoke("generate", "a red circle", "-m", model_dir, "--steps", 1, "--seed", 1, "--device", "cpu", "-o", tmp_path / "a.png", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.png").is_file()


# ----------------------------------------------------------------------------- --threads


def test_default_threads_rule() -> None:
    assert default_threads(11_000_000) == 1  # the bundled model's U-Net
    assert default_threads(SMALL_MODEL_PARAMS - 1) == 1
    assert default_threads(860_000_000) is None  # SD 1.x: torch's default


@pytest.mark.parametrize("threads, expected", [(None, 1), ("2", 2)])
def test_generate_sets_threads(threads, expected, model_dir, tmp_path) -> None:
    torch.set_num_threads(3)
    extra = [] if threads is None else ["--threads", threads]
    res = invoke("generate", "x", "-m", model_dir, "--steps", 1, "--seed", 1, "-o", tmp_path / "t.png", "-q", *extra)
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == expected


def test_threads_below_one_is_refused(model_dir) -> None:
    res = invoke("generate", "x", "-m", model_dir, "--threads", "0", "-q")
    assert res.exit_code == 2 and "Traceback" not in res.output and "--threads" in res.output


# ----------------------------------------------------------------------------- images too large


@pytest.mark.parametrize("command", ["img2img", "inpaint-image", "inpaint-mask"])
def test_image_too_large_is_a_clear_error(command, model_dir, tmp_path) -> None:
    big = huge_png(tmp_path / "big.png")
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32)).save(small)
    args = {
        "img2img": ["img2img", big, "x"],
        "inpaint-image": ["inpaint", big, small, "x"],
        "inpaint-mask": ["inpaint", small, big, "x"],
    }[command]
    line = one_error_line(invoke(*args, "-m", model_dir, "-q"))
    assert str(big) in line and "14000x14000" in line and "at most 67108864 pixels" in line


def test_png_info_reads_a_png_too_large_to_decode(tmp_path) -> None:
    text = "a red circle\nNegative prompt: blur\nSteps: 3, Sampler: Euler, Seed: 7, Size: 14000x14000"
    big = huge_png(tmp_path / "big.png", parameters=text)
    res = invoke("png-info", big, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == parse_infotext(text)


def test_png_info_refuses_a_corrupt_chunk(tmp_path) -> None:
    big = huge_png(tmp_path / "big.png", parameters="a\nSteps: 3, Sampler: Euler, Seed: 7")
    data = bytearray(big.read_bytes())
    data[data.index(b"Seed: 7") + 6] = ord("8")  # the CRC no longer matches
    big.write_bytes(bytes(data))
    assert "CRC mismatch" in one_error_line(invoke("png-info", big))


# ----------------------------------------------------------------------------- seeds and file names


def test_no_seed_draws_prints_and_names_the_file(model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = invoke("generate", "x", "-m", model_dir, "--steps", 1, "-q")
    assert res.exit_code == 0, res.output
    seed_lines = [line for line in res.output.splitlines() if line.startswith("seed: ")]
    assert len(seed_lines) == 1
    seed = int(seed_lines[0].split()[1])
    (path,) = list((tmp_path / "outputs").iterdir())
    assert path.name.endswith(f"-{seed}.png")
    assert parse_infotext(read_parameters(path))["Seed"] == str(seed)


def test_seed_zero_names_its_file_with_zero(model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = invoke("generate", "x", "-m", model_dir, "--steps", 1, "--seed", 0, "-q")
    assert res.exit_code == 0, res.output
    assert "seed: " not in res.output  # given, not drawn
    (path,) = list((tmp_path / "outputs").iterdir())
    assert path.name.endswith("-0.png") and "random" not in path.name
    assert parse_infotext(read_parameters(path))["Seed"] == "0"


# ----------------------------------------------------------------------------- output formats


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_out_suffix_names_the_format_and_parameters_round_trip(suffix, fmt, model_dir, tmp_path) -> None:
    out = tmp_path / f"out{suffix}"
    res = invoke("generate", "a red circle", "-n", "ünïcode ☃", "-m", model_dir, "--steps", 1, "--seed", 3, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert out.is_file() and not list(tmp_path.glob("*.png.png")) and str(out) in res.output
    with Image.open(out) as im:
        assert im.format == fmt
        from_image = read_parameters(im)  # what the server's png-info route reads
    fields = parse_infotext(read_parameters(out))
    assert fields["Prompt"] == "a red circle" and fields["Negative prompt"] == "ünïcode ☃" and fields["Seed"] == "3"
    assert parse_infotext(from_image) == fields
    res = invoke("png-info", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == fields


@pytest.mark.parametrize("out", ["out.gif", "out.png.txt"])
def test_unknown_out_suffix_lists_the_allowed(out, model_dir, tmp_path) -> None:
    line = one_error_line(invoke("generate", "x", "-m", model_dir, "-o", tmp_path / out, "-q"))
    assert ".png, .jpg, .jpeg, .webp" in line
    assert not any(tmp_path.iterdir())


def test_out_without_a_suffix_writes_a_png(model_dir, tmp_path) -> None:
    res = invoke("generate", "x", "-m", model_dir, "--steps", 1, "--seed", 1, "-o", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.png").is_file() and read_parameters(tmp_path / "out.png") is not None


def test_jpeg_exif_written_as_a1111_does(tmp_path) -> None:
    # A1111: piexif UserComment.dump(text, encoding="unicode") -> b"UNICODE\0" + UTF-16-BE
    from opensd.pipelines.infotext import save_image

    save_image(Image.new("RGB", (8, 8)), tmp_path / "a.jpg", "a ☃\nSteps: 1, Sampler: Euler, Seed: 1")
    with Image.open(tmp_path / "a.jpg") as im:
        raw = im.getexif().get_ifd(0x8769)[0x9286]
    assert raw == b"UNICODE\0" + "a ☃\nSteps: 1, Sampler: Euler, Seed: 1".encode("utf-16-be")


# ----------------------------------------------------------------------------- arguments that are not UTF-8


@pytest.mark.parametrize(
    "args, position",
    [
        ([b"generate", b"\xff"], 2),
        ([b"img2img", b"\xff.png", b"x"], 2),
        ([b"generate", b"x", b"--sampler", b"\xff"], 4),
        ([b"generate", b"x", b"-o", b"\xff.png"], 4),
        ([b"png-info", b"caf\xe9.png"], 2),
    ],
)
def test_non_utf8_argument_is_one_line(args, position, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable.encode(), b"-m", b"opensd.cli.main", *args], capture_output=True, cwd=tmp_path, env=env, timeout=120)
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: argument {position} (") and "not valid UTF-8" in err
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- img2img's default size


def test_img2img_default_size_is_the_image_size_as_its_help_says(model_dir, tmp_path) -> None:
    import typer.main

    for command in ("img2img", "inpaint"):
        params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
        assert "default: IMAGE's width, rounded down to a multiple of 8" in params["width"].help
        assert "default: IMAGE's height, rounded down to a multiple of 8" in params["height"].help
    Image.new("RGB", (45, 27), (200, 30, 30)).save(tmp_path / "in.png")
    res = invoke("img2img", tmp_path / "in.png", "x", "-m", model_dir, "--steps", 2, "--strength", 0.5, "--seed", 1, "-o", tmp_path / "o.png", "-q")
    assert res.exit_code == 0, res.output
    assert parse_infotext(read_parameters(tmp_path / "o.png"))["Size"] == "40x24"
    assert Image.open(tmp_path / "o.png").size == (40, 24)


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_server_png_info_reads_jpeg_and_webp(suffix, model_dir, tmp_path) -> None:
    import base64

    from fastapi.testclient import TestClient

    from opensd.pipelines.infotext import save_image
    from opensd.serving import create_app

    text = "a red circle\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 5, Size: 32x48"
    save_image(Image.new("RGB", (8, 8)), tmp_path / f"a{suffix}", text)
    with TestClient(create_app(opensd.load(model_dir))) as client:
        r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode((tmp_path / f"a{suffix}").read_bytes()).decode()})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == text and r.json()["parameters"]["Seed"] == "5"


# ----------------------------------------------------------------------------- serve --precision and --dtype


@pytest.mark.parametrize("args, expected", [
    ([], "auto"), (["--precision", "bf16"], "bf16"), (["--dtype", "float16"], "fp16"), (["--dtype", "float32"], "fp32"),
    (["--dtype", "bfloat16", "--precision", "bf16"], "bf16"),
])
def test_serve_takes_precision_and_its_older_name_dtype(args, expected, model_dir, monkeypatch) -> None:
    import opensd.serving

    seen = {}

    def spy_create_app(model, **kw):
        seen.update(kw)
        raise OpenSDError("stopped before serving")

    monkeypatch.setattr(opensd.serving, "create_app", spy_create_app)
    assert "stopped before serving" in one_error_line(invoke("serve", "-m", model_dir, *args))
    assert seen["precision"] == expected


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "--dtype must be one of float32, float16, bfloat16, got 'fp8'"),
    (["--dtype", "float16", "--precision", "bf16"], "--dtype float16 and --precision bf16 disagree"),
])
def test_serve_bad_dtype_is_one_line(args, message, model_dir) -> None:
    assert message in one_error_line(invoke("serve", "-m", model_dir, *args))
