"""Attention routing (opensd.attention_kernels): the blocked kernel computes attention, the choice follows the measurement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_loaded, tiny_word_bundle

from opensd import attention_kernels as A
from opensd import kernels as K
from opensd.models.attention import multihead_attention
from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _qkv(b: int, n: int, m: int, c: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, c, generator=g)
    k, v = (torch.randn(b, m, c, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def model():
    m, _ = tiny_word_bundle()
    yield m.requires_grad_(False)
    A.route(m, False)


@pytest.fixture
def blocked_calls(monkeypatch):
    """Counts the calls that really went to the blocked kernel."""
    calls = []
    real = A.blocked_attention
    monkeypatch.setattr(A, "blocked_attention", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("b, n, m, c, heads, block_bytes", [
    (2, 64, 64, 32, 4, A.BLOCK_BYTES),  # whole heads per block
    (1, 50, 77, 24, 3, A.BLOCK_BYTES),  # cross-attention, odd sizes
    (2, 64, 40, 16, 1, 1000),           # row blocks inside each head (1000 bytes: 6 rows of 40 keys)
    (2, 33, 33, 16, 2, 33 * 33 * 4 * 3),  # three heads per block, the last block short
])
@pytest.mark.parametrize("softmax", list(A.Softmax))
def test_blocked_attention_is_softmax_attention(b, n, m, c, heads, block_bytes, softmax, monkeypatch) -> None:
    monkeypatch.setattr(A, "BLOCK_BYTES", block_bytes)
    q, k, v = _qkv(b, n, m, c)
    ref = multihead_attention(q, k, v, heads)
    got = A.blocked_attention(q, k, v, heads, softmax)
    assert got.shape == ref.shape and _rel(got, ref) < 1e-5
    if softmax is A.Softmax.ONEDNN and not A.onednn_softmax_available(torch.bfloat16):
        return  # an AVX2-only CPU: no bfloat16 softmax in oneDNN (auto's measurement leaves it out)
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    got16 = A.blocked_attention(q16, k16, v16, heads, softmax)
    assert got16.dtype == torch.bfloat16 and _rel(got16, ref) < A.AGREEMENT[torch.bfloat16]


def test_strided_inputs_are_read_as_they_are() -> None:
    """Token views of a (B, C, H*W) map, as the VAE's attention passes them."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 36, 36, 16))
    assert not q.is_contiguous()
    assert _rel(A.blocked_attention(q, k, v, 4), multihead_attention(q.contiguous(), k.contiguous(), v.contiguous(), 4)) < 1e-5


@pytest.mark.parametrize("softmax", list(A.Softmax))
def test_large_scores_do_not_overflow(softmax) -> None:
    """The row maximum is subtracted before exp: logits in the hundreds still give the softmax."""
    q, k, v = _qkv(1, 16, 16, 8)
    q = q * 60
    ref = multihead_attention(q, k, v, 1)
    got = A.blocked_attention(q, k, v, 1, softmax)
    assert torch.isfinite(got).all() and _rel(got, ref) < 1e-4


def _attentions(module: torch.nn.Module) -> list[torch.nn.Module]:
    return A.routable(module)


def test_the_networks_attention_modules_are_routable(model) -> None:
    names = {type(m).__name__ for m in _attentions(model)}
    assert names == {"CrossAttention", "AttnBlock"}
    shapes = A.attention_shapes(model)
    assert shapes and sum(s.weight for s in shapes) == len(_attentions(model))
    cross = [s for s in shapes if s.keys == A.CONTEXT_TOKENS]
    assert cross and all(s.heads * s.head_dim < 320 for s in shapes)
    assert {s.queries for s in shapes} == {A.MAX_TOKENS}  # narrow: not 10,240 tokens at 32 channels


def test_sd15_is_timed_at_its_256px_levels() -> None:
    with torch.device("meta"):  # shapes only: no memory for the weights
        sd15 = StableDiffusion(SDConfig.sd15())
    got = {(s.heads * s.head_dim, s.queries, s.keys) for s in A.attention_shapes(sd15)}
    assert got == {(320, 1024, 77), (320, 1024, 1024), (640, 512, 77), (640, 512, 512),
                   (1280, 256, 77), (1280, 256, 256), (512, 640, 640)}  # the U-Net's three levels, the VAE's 512


def _timer(sdpa_s: float, blocked_s: float):
    calls = []

    def timer(kernel: str, shape: A.AttentionShape) -> float:
        calls.append(kernel)
        return sdpa_s if kernel == "sdpa" else blocked_s

    timer.calls = calls
    return timer


@pytest.mark.parametrize("sdpa_s, blocked_s, expect", [(1e-3, 0.5e-3, True), (1e-3, 0.95e-3, False), (1e-3, 2e-3, False)])
def test_auto_follows_the_measurement(model, monkeypatch, sdpa_s, blocked_s, expect) -> None:
    timer = _timer(sdpa_s, blocked_s)
    monkeypatch.setattr(A, "measure_cached", lambda shapes, dtype: A.measure(shapes, dtype, timer=timer))
    sel = K.select_kernels(model, "auto")
    assert sel.blocked_attention is expect and timer.calls
    assert all(A.routed(m) is expect for m in _attentions(model))
    assert f"{blocked_s / sdpa_s:.2f}x SDPA's time" in sel.describe()
    assert sel.attention_timing is not None and sel.attention_timing.blocked_err < 1e-5  # float32: real outputs compared


def _timer3(seconds: dict[str, float]):
    return lambda kernel, shape: seconds[kernel]


def test_the_faster_softmax_is_chosen_and_routed(model, monkeypatch) -> None:
    seconds = {"sdpa": 1e-3, "blocked": 0.6e-3, "blocked-onednn": 0.4e-3}
    monkeypatch.setattr(A, "measure_cached", lambda shapes, dtype: A.measure(shapes, dtype, timer=_timer3(seconds)))
    sel = K.select_kernels(model, "auto")
    assert sel.blocked_attention and sel.attention_softmax is A.Softmax.ONEDNN
    assert "0.40x SDPA's time" in sel.describe() and "oneDNN softmax" in sel.describe()
    assert all(A.routed_softmax(m) is A.Softmax.ONEDNN for m in _attentions(model))
    seconds["blocked-onednn"] = 0.7e-3  # now ATen's softmax is the faster
    A._timings.clear()
    sel = K.select_kernels(model, "auto")
    assert sel.blocked_attention and sel.attention_softmax is A.Softmax.ATEN
    assert all(A.routed_softmax(m) is A.Softmax.ATEN for m in _attentions(model))


def test_a_softmax_that_cannot_run_is_left_out(model, monkeypatch) -> None:
    """Where oneDNN has no softmax for the dtype (float16 on most CPUs) it raises: measured as unavailable."""
    def no_primitive(*args):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(A, "_block_onednn", no_primitive)
    seconds = {"sdpa": 1e-3, "blocked": 0.6e-3, "blocked-onednn": 1e-6}
    timing = A.measure(A.attention_shapes(model), torch.float32, timer=_timer3(seconds))
    assert timing.onednn_s == float("inf") and timing.blocked_s > 0
    assert A.choose(timing)[:2] == (True, A.Softmax.ATEN)


def test_attend_uses_the_routed_softmax(model, monkeypatch) -> None:
    seen = []
    real = A.blocked_attention
    monkeypatch.setattr(A, "blocked_attention", lambda *a: seen.append(a[4]) or real(*a))
    attn = next(m for m in _attentions(model) if type(m).__name__ == "CrossAttention")
    q, k, v = _qkv(1, 8, 8, attn.heads * attn.head_dim)
    A.route(model, True, A.Softmax.ONEDNN)
    with torch.no_grad():
        got = A.attend(attn, q, k, v, attn.heads)
    assert seen == [A.Softmax.ONEDNN] and _rel(got, multihead_attention(q, k, v, attn.heads)) < 1e-5


def test_default_keeps_sdpa_and_a_disagreeing_kernel_is_refused(model, monkeypatch) -> None:
    monkeypatch.setattr(A, "measure_cached", lambda shapes, dtype: A.measure(shapes, dtype, timer=_timer(1e-3, 1e-4)))
    assert not K.select_kernels(model, "default").blocked_attention
    assert not any(A.routed(m) for m in _attentions(model))
    monkeypatch.setitem(A.AGREEMENT, torch.float32, 0.0)  # nothing agrees to 0
    sel = K.select_kernels(model, "auto")
    assert not sel.blocked_attention and "above 0" in sel.attention_reason


def test_the_measurement_is_real_and_cached(model) -> None:
    shapes = A.attention_shapes(model)
    a = A.measure_cached(shapes, torch.float32)
    assert a.sdpa_s > 0 and a.blocked_s > 0 and a.blocked_err < 1e-5 and a.sdpa_err == 0
    assert A.measure_cached(shapes, torch.float32) is a


def test_routed_modules_compute_the_same_images(blocked_calls) -> None:
    """A pipeline whose attention is routed to the blocked kernel makes the image SDPA makes (float32)."""
    sdpa = StableDiffusionPipeline(tiny_loaded(), kernels="default")
    blocked = StableDiffusionPipeline(tiny_loaded(), kernels="default")
    blocked.kernels.selection()  # the pipeline's own choice (SDPA) first, then the route under test
    A.route(blocked.model, True)
    args = dict(steps=3, seed=5, width=16, height=16)
    try:
        a = np.asarray(blocked.txt2img("a red circle", **args)[0], np.int16)
    finally:
        A.route(blocked.model, False)
    b = np.asarray(sdpa.txt2img("a red circle", **args)[0], np.int16)
    assert blocked_calls and np.abs(a - b).max() <= 1


def test_training_keeps_sdpa(model, blocked_calls) -> None:
    A.route(model, True)
    attn = next(m for m in _attentions(model) if type(m).__name__ == "CrossAttention")
    q, k, v = _qkv(1, 8, 8, attn.heads * attn.head_dim)
    with torch.no_grad():
        A.attend(attn, q, k, v, attn.heads)
    assert blocked_calls == [1]
    q.requires_grad_(True)
    out = A.attend(attn, q, k, v, attn.heads)  # a gradient is wanted: SDPA, which has a backward
    out.sum().backward()
    assert blocked_calls == [1] and q.grad is not None


def test_a_new_thread_count_routes_the_attention_again(model, monkeypatch) -> None:
    answers = {1: (1e-3, 0.4e-3), 2: (1e-3, 2e-3)}  # blocked faster on one thread, slower on two
    monkeypatch.setattr(A, "measure_cached", lambda shapes, dtype: A.measure(
        shapes, dtype, timer=_timer(*answers[torch.get_num_threads()])))
    mk = K.ModelKernels(model, "auto", measure_on=model.unet, rows=32)
    attn = _attentions(model)[0]
    for threads, blocked in ((1, True), (2, False), (1, True)):
        torch.set_num_threads(threads)
        assert mk.selection().blocked_attention is blocked and A.routed(attn) is blocked


def test_the_onednn_softmax_check_says_what_the_kernel_does() -> None:
    q, k, v = _qkv(1, 8, 8, 8)
    assert A.onednn_softmax_available(torch.float32)
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    if A.onednn_softmax_available(torch.bfloat16):
        assert _rel(A.blocked_attention(q16, k16, v16, 2, A.Softmax.ONEDNN), multihead_attention(q, k, v, 2)) < 3e-2
    else:
        with pytest.raises(RuntimeError):
            A.blocked_attention(q16, k16, v16, 2, A.Softmax.ONEDNN)
