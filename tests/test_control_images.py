"""Control images: the weight-free preprocessors, A1111's resize modes, and the "only masked" crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize, tiny_loaded
from PIL import Image, ImageDraw

from opensd.checkpoints.controlnet import controlnet_config_for
from opensd.models.controlnet import ControlNet
from opensd.pipelines.control import ControlUnit
from opensd.pipelines.control_resize import ResizeMode, fit_map, scale_map
from opensd.pipelines.preprocessors import MapKind, PreprocessorError, preprocess, preprocessor
from opensd.pipelines.request import RequestError
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline


def _square(size: int = 64, lo: int = 16, hi: int = 48) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[lo:hi, lo:hi] = 255
    return Image.fromarray(a)


def _line_drawing() -> Image.Image:
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).line((8, 32, 56, 32), fill="black", width=2)
    return im


def test_canny_finds_the_border_of_a_square_and_nothing_else() -> None:
    edges = np.asarray(preprocess("canny", _square()))[..., 0]
    assert set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    dist = np.minimum(np.minimum(np.abs(ys - 16), np.abs(ys - 47)), np.minimum(np.abs(xs - 16), np.abs(xs - 47)))
    assert dist.max() <= 1  # every edge pixel on the square's outline
    for side in (edges[15:18, 20:44], edges[46:49, 20:44], edges[20:44, 15:18], edges[20:44, 46:49]):
        assert (side == 255).any(axis=None)  # every side found
    assert (edges[20:44, 20:44] == 0).all()  # thin: nothing inside
    assert not np.asarray(preprocess("canny", _square(), threshold_a=5000, threshold_b=6000)).any()
    with pytest.raises(PreprocessorError, match="0 <= low <= high"):
        preprocess("canny", _square(), threshold_a=200, threshold_b=100)


def test_canny_follows_weak_edges_connected_to_strong_ones() -> None:
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, 32:] = 40  # a weak step (Sobel 160: between 100 and 200)
    a[:, 32:, 0] = np.where(np.arange(32)[:, None] < 8, 255, 40)  # strong only in its top quarter
    edges = np.asarray(preprocess("canny", Image.fromarray(a)))[..., 0]
    assert (edges[:, 31:33] == 255).any(axis=1)[1:-1].all()  # the whole step, grown from the strong part
    b = a.copy()
    b[:8, 32:, 0] = 40  # no strong part: nothing
    assert not np.asarray(preprocess("canny", Image.fromarray(b))).any()


def test_scribble_and_lineart_mark_a_drawings_dark_lines() -> None:
    scribble = np.asarray(preprocess("scribble", _line_drawing()))[..., 0]
    assert (scribble[32:34, 12:52] == 255).all() and (scribble[:20] == 0).all() and (scribble[44:] == 0).all()
    lineart = np.asarray(preprocess("lineart_standard", _line_drawing()))[..., 0]
    assert lineart[32:34, 12:52].min() >= 100 and lineart[:16].max() == 0
    drawing = np.asarray(_line_drawing())
    assert np.array_equal(np.asarray(preprocess("invert", _line_drawing())), 255 - drawing)
    assert np.array_equal(np.asarray(preprocess("none", _line_drawing())), drawing)


def test_preprocessor_names_and_resolution() -> None:
    assert preprocessor("Scribble_XDoG").name == "scribble" and preprocessor("layout").kind is MapKind.FLAT
    with pytest.raises(PreprocessorError, match=r"unknown control preprocessor 'openpose'; known: none, canny, scribble, lineart"):
        preprocessor("openpose")
    assert preprocess("none", Image.new("RGB", (80, 40)), resolution=64).size == (128, 64)
    with pytest.raises(PreprocessorError, match="resolution must be an integer from 64 to 4096"):
        preprocess("none", Image.new("RGB", (8, 8)), resolution=8)


def test_resize_modes_fit_as_a1111() -> None:
    a = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high: a left (red), middle (green) and right (blue) third
    a[:, :21], a[:, 21:43], a[:, 43:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    im = Image.fromarray(a)
    crop = np.asarray(fit_map(im, 32, 32, ResizeMode.CROP))
    assert crop.shape == (32, 32, 3) and (crop[:, 8:24] == (0, 255, 0)).all()  # the middle, cut to a square
    stretch = np.asarray(fit_map(im, 32, 32, ResizeMode.RESIZE))
    assert (stretch[:, 0] == (255, 0, 0)).all() and (stretch[:, -1] == (0, 0, 255)).all()
    fill = np.asarray(fit_map(im, 32, 32, ResizeMode.FILL))
    assert fill.shape == (32, 32, 3) and (fill[8:24, 0] == (255, 0, 0)).all() and (fill[8:24, -1] == (0, 0, 255)).all()
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    assert (fill[:8] == np.median(border, axis=0).astype(np.uint8)).all()  # filled with the border's median colour
    assert [ResizeMode.parse(i) for i in range(3)] == [ResizeMode.RESIZE, ResizeMode.CROP, ResizeMode.FILL]
    assert ResizeMode.parse("Crop and Resize") is ResizeMode.CROP and ResizeMode.parse("fill") is ResizeMode.FILL
    with pytest.raises(RequestError, match="unknown control resize mode 3"):
        ResizeMode.parse(3)


def test_maps_keep_their_colours_and_edges_stay_binary() -> None:
    rng = np.random.default_rng(0)
    palette = np.array([(10, 200, 30), (200, 10, 30), (30, 30, 200), (0, 0, 0)], np.uint8)
    seg = Image.fromarray(palette[rng.integers(0, 4, (16, 16))])
    for size in ((37, 23), (8, 8)):
        out = np.asarray(scale_map(seg, size, MapKind.FLAT)).reshape(-1, 3)
        assert {tuple(c) for c in out} <= {tuple(c) for c in palette}
    edges = preprocess("canny", _square())
    for size in ((100, 100), (40, 40)):
        assert set(np.unique(np.asarray(scale_map(edges, size, MapKind.EDGES)))) <= {0, 255}
    smooth = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert len(np.unique(np.asarray(scale_map(smooth, (40, 40))))) > 200  # a photo is interpolated


def test_only_masked_crops_the_control_image_as_the_image() -> None:
    pipe = StableDiffusionPipeline(tiny_loaded())
    torch.manual_seed(0)
    net = randomize(ControlNet(controlnet_config_for(pipe.cfg, (16, 32))), 1, 0.1)
    marker = np.zeros((32, 32, 3), np.uint8)
    marker[8:16, 8:16] = 255  # a white square where the crop will be
    unit = ControlUnit(net, Image.fromarray(marker))
    region = np.asarray(unit.cropped(None, (32, 32), (8, 8, 16, 16)).image)
    assert region.shape == (32, 32, 3) and (region == 255).all()
    base = Image.new("RGB", (32, 32), (20, 30, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 16, 16))
    out = pipe.inpaint(base, mask, "a red circle", steps=2, seed=1, only_masked=True, only_masked_padding=0, control=[unit])[0]
    a = np.asarray(out)
    assert (a[:8] == (20, 30, 40)).all() and (a[20:] == (20, 30, 40)).all()  # outside the mask: the original
    assert 'ControlNet 0: "Module: none' in out.info["parameters"]
