"""Upscalers: ESRGAN (RRDBNet) and Real-ESRGAN Compact (SRVGGNetCompact) files made here with
tiny random weights, loaded through spandrel from their keys; the Compact network checked
against its forward pass written out below; tiling; names; and the files that are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opensd.checkpoints.io import write_safetensors
from opensd.pipelines.upscale_models import UpscalerError, load_upscaler_model, run_tiled
from opensd.pipelines.upscalers import LATENT_MODES, UpscalerKind, UpscalerLibrary, upscale_latent


def tiny_esrgan_state(seed: int = 0, nf: int = 8, gc: int = 32, blocks: int = 1) -> dict[str, torch.Tensor]:
    """A 4x RRDBNet (ESRGAN, xinntao's new key layout) with ``blocks`` RRDBs of three dense blocks (growth 32, as every ESRGAN file has)."""
    g = torch.Generator().manual_seed(seed)

    def conv(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(out, inp, 3, 3, generator=g) * 0.05, torch.randn(out, generator=g) * 0.01

    state: dict[str, torch.Tensor] = {}

    def put(name: str, out: int, inp: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = conv(out, inp)

    put("conv_first", nf, 3)
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 5):
                put(f"body.{b}.rdb{r}.conv{k}", gc, nf + (k - 1) * gc)
            put(f"body.{b}.rdb{r}.conv5", nf, nf + 4 * gc)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        put(name, nf, nf)
    put("conv_last", 3, nf)
    return state


def tiny_compact_state(seed: int = 0, nf: int = 8, convs: int = 2, scale: int = 2) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's SRVGGNetCompact: conv, PReLU, ``convs`` x (conv, PReLU), conv to 3 * scale**2, pixel shuffle."""
    g = torch.Generator().manual_seed(seed)
    state = {"body.0.weight": torch.randn(nf, 3, 3, 3, generator=g) * 0.2, "body.0.bias": torch.randn(nf, generator=g) * 0.05,
             "body.1.weight": torch.rand(nf, generator=g) * 0.3}
    for i in range(convs):
        state[f"body.{2 + 2 * i}.weight"] = torch.randn(nf, nf, 3, 3, generator=g) * 0.2
        state[f"body.{2 + 2 * i}.bias"] = torch.randn(nf, generator=g) * 0.05
        state[f"body.{3 + 2 * i}.weight"] = torch.rand(nf, generator=g) * 0.3
    last = 2 + 2 * convs
    state[f"body.{last}.weight"] = torch.randn(3 * scale * scale, nf, 3, 3, generator=g) * 0.2
    state[f"body.{last}.bias"] = torch.randn(3 * scale * scale, generator=g) * 0.05
    return state


def compact_forward(state: dict[str, torch.Tensor], x: torch.Tensor, scale: int) -> torch.Tensor:
    """SRVGGNetCompact's forward (Wang et al. 2021) written out: the reference for the loaded network."""
    n = max(int(k.split(".")[1]) for k in state) // 2 * 2
    h = x
    for i in range(0, n, 2):
        h = F.prelu(F.conv2d(h, state[f"body.{i}.weight"], state[f"body.{i}.bias"], padding=1), state[f"body.{i + 1}.weight"])
    h = F.pixel_shuffle(F.conv2d(h, state[f"body.{n}.weight"], state[f"body.{n}.bias"], padding=1), scale)
    return (h + F.interpolate(x, scale_factor=scale, mode="nearest")).clamp(0, 1)


def _image(seed: int, w: int = 24, h: int = 20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ESRGAN")
    write_safetensors(tiny_esrgan_state(1), root / "4x-tiny_esrgan.safetensors")
    torch.save({"params_ema": tiny_esrgan_state(1)}, root / "wrapped.pth")  # Real-ESRGAN's release layout
    write_safetensors(tiny_compact_state(2), root / "compact_x2.safetensors")
    return root


def test_esrgan_loads_from_its_keys_in_either_file_format(files) -> None:
    a = load_upscaler_model(files / "4x-tiny_esrgan.safetensors")
    b = load_upscaler_model(files / "wrapped.pth")
    assert (a.architecture, a.scale, a.name) == ("ESRGAN", 4, "4x-tiny_esrgan")
    assert len(a.hash) == 10 and (b.architecture, b.scale) == ("ESRGAN", 4)
    image = _image(0)
    out_a, out_b = run_tiled(a, image), run_tiled(b, image)
    assert out_a.size == (96, 80)
    assert np.array_equal(np.asarray(out_a), np.asarray(out_b))  # the same weights either way


def test_compact_equals_its_forward_pass_written_out(files) -> None:
    model = load_upscaler_model(files / "compact_x2.safetensors")
    assert (model.architecture, model.scale) == ("RealESRGAN Compact", 2)
    image = _image(3)
    want = compact_forward(tiny_compact_state(2), _tensor(image), 2)
    got = _tensor(run_tiled(model, image))
    assert (got - want).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding of the output only


def test_tiles_meet_without_seams(files) -> None:
    model = load_upscaler_model(files / "compact_x2.safetensors")
    image = _image(4, 40, 36)
    whole = np.asarray(run_tiled(model, image, tile=64), dtype=np.int16)
    tiled = np.asarray(run_tiled(model, image, tile=16, context=8), dtype=np.int16)
    assert np.abs(whole - tiled).max() <= 1  # the receptive field (4 px) is inside the context: float rounding only
    ignored = np.asarray(run_tiled(model, image, tile=16, context=0), dtype=np.int16)
    assert np.abs(whole - ignored).max() > 1  # without context the tile borders show: the test can fail


def test_library_names_resolution_and_target_sizes(files) -> None:
    lib = UpscalerLibrary(files)
    assert lib.names()[: len(LATENT_MODES)] == list(LATENT_MODES)
    assert {"None", "Lanczos", "Nearest", "4x-tiny_esrgan", "wrapped", "compact_x2"} <= set(lib.names())
    listing = {i["name"]: i for i in lib.listing()}
    assert listing["compact_x2"]["scale"] == 2 and listing["4x-tiny_esrgan"]["scale"] == 4
    assert listing["Lanczos"] == {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    up = lib.resolve("COMPACT_X2")  # case does not matter
    assert up.kind is UpscalerKind.MODEL and up.name == "compact_x2"
    image = _image(5)
    big = up.upscale_image(image, 60, 50)  # 2x twice (48x40 -> 96x80), then Lanczos down to the target
    assert big.size == (60, 50)
    twice = run_tiled(up.model, run_tiled(up.model, image))
    assert np.array_equal(np.asarray(big), np.asarray(twice.resize((60, 50), Image.Resampling.LANCZOS)))
    assert lib.resolve("latent (bicubic)").latent
    nearest = lib.resolve("Nearest").upscale_image(image, 48, 40)
    assert np.array_equal(np.asarray(nearest), np.asarray(image.resize((48, 40), Image.Resampling.NEAREST)))
    assert lib.resolve("compact_x2") is not lib.resolve("4x-tiny_esrgan")
    assert lib.resolve("compact_x2").model is up.model  # loaded once


@pytest.mark.parametrize("name, message", [
    ("ESRGAN_4x", r"unknown upscaler 'ESRGAN_4x' \(folder .*\); known: Latent, .*Lanczos, Nearest, 4x-tiny_esrgan"),
    ("", "must be an upscaler name"),
])
def test_unknown_upscalers_are_one_line(files, name, message) -> None:
    with pytest.raises(UpscalerError, match=message):
        UpscalerLibrary(files).resolve(name)


def test_latent_modes_refused_for_images_and_paths_only_where_allowed(files) -> None:
    with pytest.raises(UpscalerError, match="upscales latents"):
        UpscalerLibrary(files).resolve("Latent", latent=False)
    path = str(files / "compact_x2.safetensors")
    with pytest.raises(UpscalerError, match="unknown upscaler"):
        UpscalerLibrary(None).resolve(path)  # the server's library: names only
    assert UpscalerLibrary(None, allow_paths=True).resolve(path).model.scale == 2


def test_latent_modes_interpolate_as_a1111(files) -> None:
    lat = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    for name, (mode, antialias) in LATENT_MODES.items():
        assert torch.equal(upscale_latent(lat, 10, 12, name), F.interpolate(lat, size=(10, 12), mode=mode, antialias=antialias))
    assert not torch.equal(upscale_latent(lat, 10, 12, "Latent"), upscale_latent(lat, 10, 12, "Latent (nearest)"))


class _Code:
    def __reduce__(self):
        return (print, ("never",))


@pytest.mark.parametrize("suffix, make, message", [
    (".safetensors", lambda p: write_safetensors({"lora_unet_down.lora_up.weight": torch.zeros(4, 2)}, p), "no upscaler architecture"),
    (".safetensors", lambda p: write_safetensors(tiny_compact_state(0, scale=1), p), "for Restoration .*not an upscaler"),
    (".safetensors", lambda p: write_safetensors({k: v for k, v in tiny_esrgan_state(0).items() if "conv_hr" not in k}, p),
     "looks like a ESRGAN file but does not load"),
    (".pth", lambda p: torch.save({"model": _Code()}, p), "needs code"),
    (".pth", lambda p: p.write_bytes(b"not a model at all"), "not a checkpoint"),
    (".onnx", lambda p: p.write_bytes(b"x"), "an upscaler model is a .safetensors, .pth"),
])
def test_files_that_are_no_upscaler_are_one_line(tmp_path, suffix, make, message) -> None:
    path = tmp_path / f"m{suffix}"
    make(path)
    with pytest.raises(UpscalerError, match=message) as e:
        load_upscaler_model(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
