"""Sub-pixel upsampling (opensd.upsample_kernels): the same convolution of the doubled map, chosen by measurement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_loaded, tiny_word_bundle

from opensd import kernels as K
from opensd import upsample_kernels as U
from opensd.models.adapters import AdapterSet, Conv2d, LowRank, use_adapters
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _plain(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture
def model():
    m, _ = tiny_word_bundle()
    yield m.requires_grad_(False)
    U.route(m, False)


@pytest.fixture
def subpixel_calls(monkeypatch):
    calls = []
    real = U.subpixel_upsample_conv
    monkeypatch.setattr(U, "subpixel_upsample_conv", lambda c, x: calls.append(c) or real(c, x))
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ci, co, h, w, bias", [(8, 8, 5, 7, True), (4, 6, 1, 1, False), (16, 16, 8, 8, True)])
def test_the_sub_pixel_form_is_the_convolution_of_the_doubled_map(ci, co, h, w, bias, channels_last) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(ci, co, 3, padding=1, bias=bias)
    x = torch.randn(2, ci, h, w)
    if channels_last:  # the layout oneDNN answers bf16 convolutions in: the output keeps it
        x = x.to(memory_format=torch.channels_last)
        assert U.subpixel_upsample_conv(conv, x).is_contiguous(memory_format=torch.channels_last) or h == w == 1
    with torch.no_grad():
        ref = _plain(conv, x)
        got = U.subpixel_upsample_conv(conv, x)
        assert got.shape == ref.shape == (2, co, 2 * h, 2 * w) and _rel(got, ref) < 1e-5
        conv16, x16 = conv.to(torch.bfloat16), x.bfloat16()
        assert _rel(U.subpixel_upsample_conv(conv16, x16), ref) < U.AGREEMENT[torch.bfloat16]


def test_the_phase_kernels_follow_the_weight() -> None:
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        U.subpixel_upsample_conv(conv, x)
        conv.weight.mul_(-2.0)  # an in-place change: the cached phases must be made again
        assert _rel(U.subpixel_upsample_conv(conv, x), _plain(conv, x)) < 1e-5


def test_routed_upsamplers_make_the_same_images(subpixel_calls) -> None:
    plain = StableDiffusionPipeline(tiny_loaded(), kernels="default")
    sub = StableDiffusionPipeline(tiny_loaded(), kernels="default")
    sub.kernels.selection()  # the pipeline's own choice (plain) first, then the route under test
    n = U.route(sub.model, True)
    args = dict(steps=3, seed=5, width=16, height=16)
    try:
        a = np.asarray(sub.txt2img("a red circle", **args)[0], np.int16)
    finally:
        U.route(sub.model, False)
    b = np.asarray(plain.txt2img("a red circle", **args)[0], np.int16)
    assert n >= 2 and len(subpixel_calls) >= n and np.abs(a - b).max() <= 1


def test_odd_sizes_adapters_and_training_keep_the_plain_form(model, subpixel_calls) -> None:
    U.route(model, True)
    conv = U.upsamplers(model.unet)[0]
    assert isinstance(conv, Conv2d)
    x = torch.randn(1, conv.in_channels, 4, 4)
    with torch.no_grad():
        U.upsample_conv(conv, x)
        assert len(subpixel_calls) == 1
        U.upsample_conv(conv, x, (7, 9))  # the U-Net's skip sizes of an odd latent: not a doubling
        lora = LowRank(torch.zeros(2, conv.in_channels, 3, 3).normal_(), torch.zeros(conv.out_channels, 2, 1, 1).normal_(), 1.0)
        with use_adapters(AdapterSet({conv: (lora,)})):
            got = U.upsample_conv(conv, x)
        assert len(subpixel_calls) == 1
        assert _rel(got, _plain(conv, x)) > 1e-3  # the delta applied
    x.requires_grad_(True)
    U.upsample_conv(conv, x).sum().backward()
    assert len(subpixel_calls) == 1 and x.grad is not None


def _timer(plain_s: float, subpixel_s: float):
    return lambda form, conv: plain_s if form == "plain" else subpixel_s


@pytest.mark.parametrize("plain_s, subpixel_s, expect", [(1e-3, 0.4e-3, True), (1e-3, 0.95e-3, False)])
def test_auto_follows_the_measurement(model, monkeypatch, plain_s, subpixel_s, expect) -> None:
    real = U.measure
    monkeypatch.setattr(U, "measure", lambda m: real(m, timer=_timer(plain_s, subpixel_s)))
    sel = K.select_kernels(model, "auto")
    pairs = {(c.in_channels, c.out_channels) for c in U.upsamplers(model)}
    assert sel.subpixel_upsampling == (pairs if expect else frozenset())
    assert all(U.routed(c) is expect for c in U.upsamplers(model))
    assert f"{subpixel_s / plain_s:.2f}x" in sel.describe()
    assert sel.upsample_timing is not None and all(p.max_rel_diff < 1e-4 for p in sel.upsample_timing.pairs)  # real outputs
    assert not K.select_kernels(model, "default").subpixel_upsampling


def test_the_choice_is_made_per_upsampler_shape(model) -> None:
    """A model whose upsamplers have two channel pairs: each pair follows its own timing."""
    convs = U.upsamplers(model)
    pairs = sorted({(c.in_channels, c.out_channels) for c in convs})
    assert len(pairs) >= 2, pairs
    fast = pairs[0]
    timer = lambda form, conv: 1e-3 if form == "plain" else (0.3e-3 if (conv.in_channels, conv.out_channels) == fast else 2e-3)  # noqa: E731
    chosen, reason = U.choose(U.measure(model, timer=timer))
    assert chosen == {fast} and "0.30x" in reason and "2.00x" in reason
    assert U.route(model, chosen) == sum(1 for c in convs if (c.in_channels, c.out_channels) == fast)
    assert [U.routed(c) for c in convs] == [(c.in_channels, c.out_channels) == fast for c in convs]


def test_a_disagreeing_form_is_refused(model, monkeypatch) -> None:
    real = U.measure
    monkeypatch.setattr(U, "measure", lambda m: real(m, timer=_timer(1e-3, 1e-4)))
    monkeypatch.setitem(U.AGREEMENT, torch.float32, 0.0)
    sel = K.select_kernels(model, "auto")
    assert not sel.subpixel_upsampling and "(differs)" in sel.upsample_reason
