"""GEMM kernel routing (opensd.kernels): the choice follows the measurement, both routes agree, LoRA still applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_loaded, tiny_word_bundle

from opensd import kernels as K
from opensd.models.adapters import AdapterSet, Linear, LowRank, use_adapters
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

pytestmark = pytest.mark.skipif(not K.onednn_available(), reason="this torch has no oneDNN")

# oneDNN and MKL both multiply float32 with float32 accumulation and differ only in the order
# of the sums: on single layers about 1e-6 of the output's magnitude (benchmarks/gemm.py).
LAYER_RTOL = 1e-5


def _timer(default_s: float, onednn_s: float):
    """A clock that says each default call takes ``default_s`` and each oneDNN call ``onednn_s``."""
    calls = []

    def timer(backend: K.Kernels, shape: K.GemmShape) -> float:
        calls.append((backend, shape))
        return default_s if backend is K.Kernels.DEFAULT else onednn_s

    timer.calls = calls
    return timer


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture
def model():
    m, _ = tiny_word_bundle()
    yield m.requires_grad_(False)
    K.route(m, K.Kernels.DEFAULT)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls that really went to oneDNN."""
    calls = []
    real = K.onednn_linear
    monkeypatch.setattr(K, "onednn_linear", lambda x, w, b: calls.append(tuple(w.shape)) or real(x, w, b))
    return calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("default_s, onednn_s, expect", [
    (1e-3, 0.5e-3, K.Kernels.ONEDNN),   # oneDNN twice as fast: chosen
    (1e-3, 2e-3, K.Kernels.DEFAULT),    # slower: not
    (1e-3, 0.95e-3, K.Kernels.DEFAULT),  # within the margin: the default, the reference, stays
])
def test_auto_follows_the_measurement(model, default_s, onednn_s, expect) -> None:
    timer = _timer(default_s, onednn_s)
    sel = K.select_kernels(model, "auto", measure_on=model.unet, rows=32, timer=timer)
    assert sel.backend is expect and sel.requested is K.Kernels.AUTO
    shapes = K.linear_shapes(model.unet, 32)
    assert {s for _, s in timer.calls} == set(shapes)  # every shape of the U-Net, both backends
    assert {b for b, _ in timer.calls} == {K.Kernels.DEFAULT, K.Kernels.ONEDNN}
    assert sel.timing.ratio == pytest.approx(onednn_s / default_s)
    assert sel.timing.default_s == pytest.approx(default_s * sum(s.weight for s in shapes))
    assert f"{onednn_s / default_s:.2f}x" in sel.describe()
    routed = [K.routed_to_onednn(m) for m in _linears(model)]  # the text encoder's layers too
    assert routed == [expect is K.Kernels.ONEDNN] * len(routed)


def test_disagreeing_kernels_are_refused() -> None:
    timing = K.GemmTiming((K.GemmShape(8, 4, 4, True),), 1, 1.0, 0.1, max_rel_diff=1e-2)
    backend, reason = K.choose(timing)
    assert backend is K.Kernels.DEFAULT and "differs" in reason
    assert K.choose(K.GemmTiming(timing.shapes, 1, 1.0, 0.1, max_rel_diff=1e-6))[0] is K.Kernels.ONEDNN


def test_measurement_is_real_and_cached(model, monkeypatch) -> None:
    """Without a timer both paths are timed on the clock, once per shape set and thread count."""
    shapes = K.linear_shapes(model.unet, 16)
    timing = K.measure(shapes, repeats=1)
    assert timing.default_s > 0 and timing.onednn_s > 0 and timing.max_rel_diff < LAYER_RTOL
    calls = []
    monkeypatch.setattr(K, "measure", lambda s, **kw: calls.append(s) or timing)
    monkeypatch.setattr(K, "_timings", {})
    first = K.measure_cached(shapes)
    assert K.measure_cached(shapes) is first and len(calls) == 1


def test_linear_shapes_cut_work_but_keep_its_weight(model) -> None:
    rows = 4096
    shapes = K.linear_shapes(model.unet, rows)
    layers = _linears(model.unet)
    true_flops = sum(2 * rows * m.in_features * m.out_features for m in layers)
    assert sum(s.flops * s.weight for s in shapes) == pytest.approx(true_flops)
    assert all(s.rows == K.TIMED_ROWS for s in shapes)
    assert all(s.flops <= K.FLOP_CAP or s.out_features == min(K.MIN_COLUMNS, s.out_features) for s in shapes)
    assert len(shapes) == len({(m.in_features, m.out_features, m.bias is not None) for m in layers})
    with pytest.raises(K.KernelError, match="rows must be"):
        K.linear_shapes(model.unet, 0)


def test_both_routes_agree_on_the_networks(model, onednn_calls) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 10.0])
    ctx = torch.randn(2, 16, model.cfg.unet.context_dim, generator=g)
    ids = torch.randint(0, model.cfg.text.vocab_size, (2, 16), generator=g)
    outs = {}
    for backend in (K.Kernels.DEFAULT, K.Kernels.ONEDNN):
        K.select_kernels(model, backend)
        with torch.inference_mode():
            outs[backend] = (model.unet(x, t, ctx), model.text_encoder(ids))
        if backend is K.Kernels.DEFAULT:
            assert not onednn_calls
    assert len(onednn_calls) >= len(_linears(model.unet)) + len(_linears(model.text_encoder))  # every layer, once or more
    (u0, c0), (u1, c1) = outs[K.Kernels.DEFAULT], outs[K.Kernels.ONEDNN]
    assert _rel(u1, u0) < LAYER_RTOL and _rel(c1, c0) < LAYER_RTOL
    assert not torch.equal(outs[K.Kernels.DEFAULT][0], torch.zeros_like(u0))


def test_lora_applies_through_the_routed_path(model, onednn_calls) -> None:
    layer = next(m for m in _linears(model.unet) if isinstance(m, Linear) and m.in_features >= 32)
    g = torch.Generator().manual_seed(1)
    down = torch.randn(4, layer.in_features, generator=g)
    up = torch.randn(layer.out_features, 4, generator=g)
    delta = LowRank(down, up, scale=0.5)
    x = torch.randn(3, 5, layer.in_features, generator=g)
    merged = F.linear(x, layer.weight + delta.weight(), layer.bias)
    K.select_kernels(model, "onednn")
    assert K.routed_to_onednn(layer)
    with torch.inference_mode():
        base = layer(x)
        with use_adapters(AdapterSet({layer: (delta,)})):
            adapted = layer(x)
    assert onednn_calls == [tuple(layer.weight.shape)] * 2
    assert _rel(adapted, merged) < LAYER_RTOL
    assert _rel(base, merged) > 1e-2  # the delta is large: without it the output is far off


def test_training_keeps_torch_s_path(model, onednn_calls) -> None:
    """oneDNN's op has no backward: a call that needs a gradient goes to F.linear, and gradients flow."""
    layer = _linears(model.unet)[0]
    K.select_kernels(model, "onednn")
    layer.weight.requires_grad_(True)
    try:
        x = torch.randn(2, layer.in_features, requires_grad=True)
        layer(x).square().sum().backward()
        assert x.grad is not None and layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert not onednn_calls
        with torch.no_grad():
            layer(x)
        assert len(onednn_calls) == 1  # without a gradient to keep, the same layer runs on oneDNN
    finally:
        layer.weight.requires_grad_(False)


def test_bad_choices_are_one_line_errors(model) -> None:
    with pytest.raises(K.KernelError, match="unknown kernels 'mkl'; allowed: auto, default, onednn"):
        K.Kernels.parse("mkl")
    half = model.to(torch.bfloat16)
    with pytest.raises(K.KernelError, match="float32 models on the CPU only"):
        K.select_kernels(half, "onednn")
    sel = K.select_kernels(half, "auto")  # no choice to make: nothing measured, nothing routed
    assert sel.backend is K.Kernels.DEFAULT and sel.timing is None
    assert not any(K.routed_to_onednn(m) for m in _linears(half))


def test_default_policy_by_model_size() -> None:
    assert K.default_kernels(11_000_000) is K.Kernels.DEFAULT  # the bundled model: exact outputs everywhere
    assert K.default_kernels(K.AUTO_MIN_PARAMS) is K.Kernels.AUTO


def test_pipeline_measures_on_first_generation(monkeypatch) -> None:
    timer = _timer(1e-3, 0.4e-3)
    real = K.measure_cached
    monkeypatch.setattr(K, "measure_cached", lambda shapes, timer=None: real(shapes, timer=timers.pop()))
    timers = [timer]
    pipe = StableDiffusionPipeline(tiny_loaded(), kernels="auto")
    exact = StableDiffusionPipeline(tiny_loaded())  # the same weights
    assert exact.kernels.kernels is K.Kernels.DEFAULT  # a tiny model's default
    assert not timer.calls  # nothing measured at load time
    try:
        args = dict(steps=3, seed=5, width=16, height=16)
        a = np.asarray(pipe.txt2img("a red circle", **args)[0], np.int16)
        assert pipe.kernels.selection().backend is K.Kernels.ONEDNN and timer.calls
        assert all(K.routed_to_onednn(m) for m in _linears(pipe.model))
        b = np.asarray(exact.txt2img("a red circle", **args)[0], np.int16)
        assert np.abs(a - b).max() <= 1  # one step of 255 at most: float rounding through 3 steps and the decoder
    finally:
        K.route(pipe.model, K.Kernels.DEFAULT)


def test_a_new_thread_count_is_measured_again(model, monkeypatch) -> None:
    """The choice is per thread count: measured once for each, and routed again when the count changes back."""
    measured = []
    answers = {1: (1e-3, 0.4e-3), 2: (1e-3, 2e-3)}  # oneDNN faster on one thread, slower on two
    real = K.measure_cached

    def fake(shapes, timer=None):
        measured.append(torch.get_num_threads())
        return real(shapes, timer=_timer(*answers[torch.get_num_threads()]))

    monkeypatch.setattr(K, "measure_cached", fake)
    mk = K.ModelKernels(model, "auto", measure_on=model.unet, rows=32)
    layer = _linears(model)[0]
    before = torch.get_num_threads()
    try:
        for threads, onednn in ((1, True), (2, False), (1, True)):
            torch.set_num_threads(threads)
            assert (mk.selection().backend is K.Kernels.ONEDNN) is onednn and K.routed_to_onednn(layer) is onednn
    finally:
        torch.set_num_threads(before)
    assert measured == [1, 2]


def test_pipeline_refuses_onednn_for_a_half_model() -> None:
    with pytest.raises(K.KernelError, match="float32 models on the CPU only"):
        StableDiffusionPipeline(tiny_loaded(), dtype=torch.bfloat16, kernels="onednn")


def test_concurrent_first_requests_measure_once(model, monkeypatch) -> None:
    """Two requests that reach a fresh pipeline together: one measures (the routes switch meanwhile),
    the other waits for its choice instead of measuring again."""
    import threading
    import time

    calls = []

    def slow_select(*a, **kw):
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return K.KernelSelection(K.Kernels.AUTO, K.Kernels.DEFAULT, "fake")

    monkeypatch.setattr(K, "select_kernels", slow_select)
    mk = K.ModelKernels(model, "auto", measure_on=model.unet, rows=32)
    got = []
    threads = [threading.Thread(target=lambda: got.append(mk.selection())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] is got[1]
