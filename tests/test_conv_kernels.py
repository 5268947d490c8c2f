"""Packed oneDNN convolutions (opensd.conv_kernels): the same outputs, chosen by measurement, never for training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_loaded, tiny_word_bundle

from opensd import conv_kernels as CK
from opensd import kernels as K
from opensd import upsample_kernels as UK
from opensd.models.adapters import AdapterSet, Conv2d, LowRank, use_adapters
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline, unet_probe

pytestmark = pytest.mark.skipif(not CK.packed_available(), reason="this torch has no oneDNN packed convolutions")

RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# bfloat16 packing needs oneDNN's bf16 support on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CK.packed_available(torch.bfloat16), reason="oneDNN runs no bfloat16 convolutions on this CPU"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture
def model():
    m, _ = tiny_word_bundle()
    yield m.requires_grad_(False)
    K.select_kernels(m, "default")


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the calls that really went to the packed route."""
    calls = []
    real = CK.packed_conv2d
    monkeypatch.setattr(CK, "packed_conv2d", lambda layer, x: calls.append(layer) or real(layer, x))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=0),
                                dict(kernel_size=1), dict(kernel_size=3, padding=1, groups=2, bias=False)])
def test_a_packed_layer_computes_the_convolution(dtype, kw, packed_calls) -> None:
    g = torch.Generator().manual_seed(0)
    layer = Conv2d(8, 16, **kw).to(dtype).requires_grad_(False)
    x = torch.randn(2, 8, 12, 12, generator=g).to(dtype)
    ref = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    CK.route(layer, True)
    with torch.inference_mode():
        got = layer(x)
    assert packed_calls == [layer] and got.shape == ref.shape and got.dtype == dtype
    assert _rel(got, ref) < RTOL[dtype]


def test_the_packed_copy_follows_the_weight_and_the_input_shape(packed_calls) -> None:
    layer = Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    CK.route(layer, True)
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        first = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2.0)  # in place: the same tensor, a new version
        doubled = layer(x)
        bigger = layer(torch.randn(1, 4, 16, 16))
    assert _rel(doubled - layer.bias.view(1, -1, 1, 1), 2 * (first - layer.bias.view(1, -1, 1, 1))) < 1e-5
    assert bigger.shape == (1, 4, 16, 16) and len(packed_calls) == 3 and CK.packed_copies(layer) == 1
    CK.route(layer, False)
    assert CK.release(layer) == 1 and CK.packed_copies(layer) == 0


def test_training_half_precision_and_merged_weights_keep_torch_s_route(packed_calls) -> None:
    layer = Conv2d(4, 4, 3, padding=1)
    CK.route(layer, True)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    layer(x).sum().backward()  # a gradient is needed: the packed op has none
    assert layer.weight.grad is not None and not packed_calls
    with torch.inference_mode():
        layer.half()(x.detach().half())
        assert not packed_calls  # float16 is not packed
        layer.float()
        merged = torch.zeros_like(layer.weight)
        out = CK.conv2d(layer, x.detach(), merged)  # a merged LoRA weight is the call's own, not the layer's
    assert not packed_calls and torch.allclose(out, layer.bias.view(1, -1, 1, 1).expand_as(out))


def test_lora_applies_through_the_packed_route(model, packed_calls) -> None:
    layer = next(m for m in model.unet.modules() if isinstance(m, Conv2d) and m.kernel_size == (3, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, layer.in_channels, 8, 8, generator=g)
    delta = LowRank(torch.randn(2, layer.in_channels, 3, 3, generator=g), torch.randn(layer.out_channels, 2, 1, 1, generator=g), 0.5)
    outs = []
    for packed in (False, True):
        CK.route(model, packed)
        with torch.inference_mode(), use_adapters(AdapterSet({layer: (delta,)})):
            outs.append(layer(x))
    assert packed_calls and _rel(outs[1], outs[0]) < RTOL[torch.float32]
    with torch.inference_mode():
        assert _rel(layer(x), outs[0]) > 1e-3  # the delta did something


@pytest.mark.parametrize("default_s, packed_s, expect", [(1.0, 0.5, True), (1.0, 0.95, False), (1.0, 2.0, False)])
def test_auto_follows_the_measurement_of_the_model(model, default_s, packed_s, expect) -> None:
    probe = unet_probe(model.unet, 8)
    clock = {False: default_s, True: packed_s}
    sel = K.select_kernels(model, "auto", measure_on=model.unet, rows=32, probe=probe, conv_clock=clock.__getitem__)
    assert sel.packed_convs is expect and sel.conv_timing is not None
    assert sel.conv_timing.ratio == pytest.approx(packed_s / default_s)
    assert sel.conv_timing.max_rel_diff < RTOL[torch.float32]  # the two routes ran for real and agree
    assert f"{packed_s / default_s:.2f}x" in sel.describe() and "8x8 latent" in sel.describe()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [CK.routed_packed(m) for m in convs] == [expect] * len(convs)  # the VAE's too
    # packed: the U-Net's layers (its probe) and the other upsamplers the upsampling choice timed
    # (one per channel pair, opensd.upsample_kernels); a refused route frees what the measurement packed
    timed = {(c.in_channels, c.out_channels): c for c in reversed(UK.upsamplers(model))}.values()
    unet_convs = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    extra = sum(1 for c in timed if not any(c is m for m in unet_convs))
    assert CK.packed_copies(model) == (len(unet_convs) + extra if expect else 0)


def test_disagreeing_routes_are_refused() -> None:
    timing = CK.ConvTiming(1.0, 0.1, 0.5, torch.float32, 1, "a probe")
    packed, reason = CK.choose(timing)
    assert not packed and "differ" in reason


def test_default_and_half_models_keep_torch_s_convolutions(model) -> None:
    probe = unet_probe(model.unet, 8)
    assert not K.select_kernels(model, "default", probe=probe).packed_convs
    assert K.select_kernels(model, "onednn").packed_convs  # oneDNN asked: the convolutions too
    half = model.half()
    sel = K.select_kernels(half, "auto", probe=unet_probe(half.unet, 8))
    assert not sel.packed_convs and "no choice" in sel.conv_reason


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_a_pipeline_on_packed_convolutions_makes_the_same_image(dtype, packed_calls) -> None:
    """float32: the same image to one step of 255. bfloat16: as close to the float32 image as torch's own route."""
    args = dict(steps=3, seed=5, width=16, height=16)

    def image(pipe) -> np.ndarray:
        return np.asarray(pipe.txt2img("a red circle", **args)[0], np.int16)

    packed = StableDiffusionPipeline(tiny_loaded(), dtype=dtype, kernels="default")
    packed.kernels.selection()  # the pipeline's own choice (default), made once per thread count
    CK.route(packed.model, True)
    try:
        a = image(packed)
    finally:
        CK.route(packed.model, False)
    assert packed_calls  # U-Net and VAE decoder
    b = image(StableDiffusionPipeline(tiny_loaded(), dtype=dtype, kernels="default"))
    if dtype == torch.float32:
        assert np.abs(a - b).max() <= 1  # float rounding through 3 steps and the decoder
    else:
        ref = image(StableDiffusionPipeline(tiny_loaded(), kernels="default"))
        assert np.abs(a - ref).mean() <= 1.25 * np.abs(b - ref).mean() + 0.5
        assert np.abs(a - ref).max() <= 1.5 * np.abs(b - ref).max() + 2


def test_auto_does_not_pack_what_memory_cannot_hold(model, monkeypatch, tmp_path) -> None:
    need = CK.packed_bytes(model)
    assert need == sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    monkeypatch.setattr(K, "available_memory", lambda: int(need / CK.MEMORY_SHARE) - 1)
    sel = K.select_kernels(model, "auto", probe=unet_probe(model.unet, 8), conv_clock={False: 1.0, True: 0.1}.__getitem__)
    assert not sel.packed_convs and sel.conv_timing is None and "GB available" in sel.conv_reason
    monkeypatch.setattr(K, "available_memory", lambda: int(need / CK.MEMORY_SHARE) + 1)
    sel = K.select_kernels(model, "auto", probe=unet_probe(model.unet, 8), conv_clock={False: 1.0, True: 0.1}.__getitem__)
    assert sel.packed_convs
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert CK.available_memory(str(meminfo)) == 1000 * 1024
    assert CK.available_memory(str(tmp_path / "missing")) is None


def test_a_probe_that_fails_keeps_torch_s_route_and_says_why(model) -> None:
    def broken() -> torch.Tensor:
        raise RuntimeError("shapes do not fit")

    sel = K.select_kernels(model, "auto", probe=CK.Probe(broken, "a broken probe"))
    assert not sel.packed_convs and "probe failed" in sel.conv_reason and "shapes do not fit" in sel.conv_reason
    assert not any(CK.routed_packed(m) for m in model.modules())


def test_bf16_packing_is_offered_exactly_where_onednn_runs_it() -> None:
    layer = torch.nn.Conv2d(4, 8, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    if CK.packed_available(torch.bfloat16):
        assert _rel(CK.packed_conv2d(layer, x), layer(x)) <= RTOL[torch.bfloat16]
    else:  # an AVX2-only CPU: oneDNN refuses, so auto must never offer the route
        with pytest.raises(RuntimeError):
            CK.packed_conv2d(layer, x)
    assert not CK.packed_available(torch.float16)


def test_auto_measures_none_of_its_kernels_in_a_type_slow_on_this_cpu(model, monkeypatch) -> None:
    """fp16 on a CPU (and bf16 without native support) keeps torch's kernels unmeasured: timing
    them there took minutes, and an AVX2 CPU cannot pack bf16 weights at all."""
    def no_timing(*args, **kwargs):
        raise AssertionError("measured a slow type")

    for name in ("measure_cached", "measure"):
        monkeypatch.setattr(K.attention_kernels, name, no_timing)
    monkeypatch.setattr(K.upsample_kernels, "measure", no_timing)
    monkeypatch.setattr(CK, "measure_model", no_timing)
    half = model.half()
    sel = K.select_kernels(half, "auto", probe=unet_probe(half.unet, 8))
    assert not (sel.packed_convs or sel.blocked_attention or sel.subpixel_upsampling)
    for reason in (sel.conv_reason, sel.attention_reason, sel.upsample_reason):
        assert reason.startswith("no choice") and "fp16" in reason, reason
    monkeypatch.setattr(K, "slow_on_cpu", lambda dtype: "bf16 on this CPU is emulated; use fp32" if dtype == torch.bfloat16 else None)
    bf16 = model.to(torch.bfloat16)
    sel = K.select_kernels(bf16, "auto", probe=unet_probe(bf16.unet, 8))
    assert not sel.packed_convs and "emulated" in sel.conv_reason and "emulated" in sel.attention_reason
