"""Scoped attention capture (:mod:`opensd.models.capture`): only the calls made inside a
``capture_attention`` block, by that thread or asyncio task, record; everything else runs
the fused kernel, bit for bit. Checked on a tiny U-Net, on one shared pipeline (an explain
beside a plain generation, in lockstep) and through the server (two asyncio clients)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_loaded

import opensd.models.attention
from opensd.checkpoints import LoadedModel
from opensd.explain import attention_maps
from opensd.models.capture import (
    AttentionSink,
    CaptureError,
    active_sink,
    capture_attention,
    cross_attention_layers,
    feature_grid,
)
from opensd.models.transformer import BasicTransformerBlock, CrossAttention
from opensd.models.unet import UNetConfig, UNetModel
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread

SIZE = 32
BARRIER_S = 30.0  # a lockstep partner that never arrives fails the test instead of hanging it


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def unet() -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(UNetConfig.tiny()).eval()


def _inputs(unet: UNetModel, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.cfg.in_channels, 8, 8, generator=g)
    return x, torch.tensor([10.0, 700.0]), torch.randn(2, 6, unet.cfg.context_dim, generator=g)


class Recorder:
    """A sink over ``unet``'s cross-attention layers that keeps (layer, probs) in call order."""

    def __init__(self, unet: torch.nn.Module, select=None) -> None:
        self.records: list[tuple[str, torch.Tensor]] = []
        layers = cross_attention_layers(unet) if select is None else cross_attention_layers(unet, select)
        self.sink = AttentionSink(layers, lambda layer, probs: self.records.append((layer, probs)))


def _same(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> bool:
    return [n for n, _ in a] == [n for n, _ in b] and all(torch.equal(p, q) for (_, p), (_, q) in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- one U-Net


def test_outside_a_capture_the_fused_kernel_runs_and_nothing_records(unet, monkeypatch) -> None:
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(opensd.models.attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    n_attention = sum(isinstance(m, CrossAttention) for m in unet.modules())
    n_cross = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    x, t, ctx = _inputs(unet, 1)
    rec = Recorder(unet)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        assert len(calls) == n_attention and rec.records == []  # the sink exists, but no block is entered
        with capture_attention(rec.sink):
            captured = unet(x, t, ctx)
        assert len(calls) == 2 * n_attention - n_cross  # inside: only the self-attention layers kept SDPA
        with capture_attention(Recorder(UNetModel(UNetConfig.tiny())).sink):  # a sink for another network
            other = unet(x, t, ctx)
        after = unet(x, t, ctx)
    assert active_sink() is None
    assert torch.equal(other, plain) and torch.equal(after, plain)  # layers a sink does not name: the same kernel, bit for bit
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    assert len(rec.records) == n_cross
    names = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    assert [n for n, _ in rec.records] == [f"{n}.attn2" for n in names]  # each record names its layer
    for _, p in rec.records:
        assert p.dtype == torch.float32 and p.shape[:2] == (2, 4) and p.shape[-1] == 6
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))


def test_a_sink_records_only_the_layers_it_chose(unet) -> None:
    x, t, ctx = _inputs(unet, 2)
    every, down = Recorder(unet), Recorder(unet, lambda name: name.startswith("input_blocks.") and name.endswith(".attn2"))
    assert 0 < len(down.sink.layers) < len(every.sink.layers)
    with torch.no_grad():
        with capture_attention(every.sink):
            unet(x, t, ctx)
        with capture_attention(down.sink):
            unet(x, t, ctx)
    assert [n for n, _ in down.records] == list(down.sink.layers.values())
    assert _same(down.records, [r for r in every.records if r[0] in set(down.sink.layers.values())])


def test_nested_captures_get_only_their_own_calls(unet) -> None:
    inputs = [_inputs(unet, s) for s in (3, 4, 5, 6)]
    solo = []
    with torch.no_grad():
        for x, t, ctx in inputs:
            r = Recorder(unet)
            with capture_attention(r.sink):
                unet(x, t, ctx)
            solo.append(r.records)
        outer, inner = Recorder(unet), Recorder(unet)
        with capture_attention(outer.sink):
            unet(*inputs[0])
            with capture_attention(inner.sink):
                assert active_sink() is inner.sink
                unet(*inputs[1])
                with capture_attention(None):  # switched off inside: no one records
                    unet(*inputs[2])
            assert active_sink() is outer.sink
            unet(*inputs[3])
    assert active_sink() is None
    assert _same(outer.records, solo[0] + solo[3]) and _same(inner.records, solo[1])


def test_two_threads_in_lockstep_each_get_only_their_own_calls(unet) -> None:
    inputs = {k: [_inputs(unet, 10 * k + i) for i in range(3)] for k in (1, 2)}

    def run(k: int, barrier: threading.Barrier | None) -> list:
        r = Recorder(unet)
        with torch.no_grad(), capture_attention(r.sink):
            for args in inputs[k]:
                if barrier is not None:
                    barrier.wait(BARRIER_S)  # both threads are inside their capture, calling the one U-Net
                unet(*args)
        return r.records

    solo = {k: run(k, None) for k in (1, 2)}
    barrier, got, errors = threading.Barrier(2), {}, []

    def worker(k: int) -> None:
        try:
            got[k] = run(k, barrier)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    n_cross = len(cross_attention_layers(unet))
    assert len(got[1]) == len(got[2]) == 3 * n_cross
    assert _same(got[1], solo[1]) and _same(got[2], solo[2])


def test_asyncio_tasks_on_one_thread_each_get_only_their_own_calls(unet) -> None:
    args = {k: _inputs(unet, s) for k, s in (("a1", 21), ("a2", 22), ("b0", 23), ("b1", 24))}
    solo = {}
    with torch.no_grad():
        for k, a in args.items():
            r = Recorder(unet)
            with capture_attention(r.sink):
                unet(*a)
            solo[k] = r.records
        plain_b0 = unet(*args["b0"])

    async def main() -> tuple[list, list, torch.Tensor]:
        a, b = Recorder(unet), Recorder(unet)
        a_open, b_open, a_called, b_called = (asyncio.Event() for _ in range(4))

        async def task_a() -> None:
            with capture_attention(a.sink), torch.no_grad():
                a_open.set()
                await b_open.wait()  # task b has called the U-Net without a capture, then opened its own
                unet(*args["a1"])
                a_called.set()
                await b_called.wait()  # task b has called the U-Net inside its capture and left it
                unet(*args["a2"])

        async def task_b() -> torch.Tensor:
            await a_open.wait()
            with torch.no_grad():
                out = unet(*args["b0"])  # task a's capture is open, in task a
                with capture_attention(b.sink):
                    b_open.set()
                    await a_called.wait()
                    unet(*args["b1"])
            b_called.set()
            return out

        _, out = await asyncio.gather(task_a(), task_b())
        return a.records, b.records, out

    a_records, b_records, out_b0 = asyncio.run(main())
    assert _same(a_records, solo["a1"] + solo["a2"]) and _same(b_records, solo["b1"])
    assert torch.equal(out_b0, plain_b0)  # task b ran the fused kernel while task a was capturing
    assert active_sink() is None


def test_feature_grid_places_each_level_and_refuses_what_does_not_fit() -> None:
    assert feature_grid(64, 8, 8) == (8, 8)
    assert feature_grid(16, 8, 8) == (4, 4)
    assert feature_grid(12, 5, 7) == (3, 4) and feature_grid(4, 5, 7) == (2, 2)  # halved, rounding up
    with pytest.raises(CaptureError, match="cannot place 10 attention positions on a grid derived from the 8x8 latent"):
        feature_grid(10, 8, 8)


# ----------------------------------------------------------------------------- one pipeline


class LockstepPipeline(StableDiffusionPipeline):
    """A pipeline whose generations, while ``barrier`` is set, wait for each other after every step."""

    barrier: threading.Barrier | None = None

    def generate(self, req, *, callback=None, **kw):
        def step(info):
            if self.barrier is not None:
                self.barrier.wait(BARRIER_S)
            return callback(info) if callback is not None else None

        return super().generate(req, callback=step, **kw)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded(seed=3)


def _run_both(fns: dict) -> dict:
    """Run each of ``fns`` on its own thread, started together; their results by key."""
    got, errors = {}, []

    def worker(key) -> None:
        try:
            got[key] = fns[key]()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in fns]
    for th in threads:
        th.start()
    for th in threads:
        th.join(4 * BARRIER_S)
    assert not errors, errors
    return got


def test_explain_beside_a_plain_generation_on_one_pipeline(loaded) -> None:
    pipe = LockstepPipeline(loaded)
    kw = dict(steps=4, sampler="euler", width=SIZE, height=SIZE)
    fns = {
        "plain": lambda: pipe.txt2img("there is a large cyan triangle", seed=9, cfg_scale=5.0, **kw)[0],
        "explain": lambda: attention_maps(pipe, "a red circle above a blue square", seed=4, cfg_scale=7.0, **kw),
    }
    solo = {k: f() for k, f in fns.items()}
    pipe.barrier = threading.Barrier(2)  # every sampling step of the two runs overlaps
    both = _run_both(fns)
    assert not pipe.barrier.broken
    assert solo["plain"].tobytes() == both["plain"].tobytes()  # the plain image, byte for byte
    a, b = solo["explain"], both["explain"]
    assert torch.equal(a.per_token_maps, b.per_token_maps) and torch.equal(a.maps, b.maps)
    assert a.layer_calls == b.layer_calls == 4 * len(cross_attention_layers(pipe.model.unet))
    assert a.image.tobytes() == b.image.tobytes()


# ----------------------------------------------------------------------------- the server


def test_server_explain_and_txt2img_from_two_asyncio_tasks(loaded) -> None:
    pipe = LockstepPipeline(loaded)
    explain_body = {"prompt": "a red circle", "steps": 6, "seed": 4, "raw": True, "path_steps": [3, 6]}
    txt2img_body = {"prompt": "there is a large cyan triangle", "steps": 6, "seed": 9}

    async def post(http: httpx.AsyncClient, url: str, body: dict) -> dict:
        r = await http.post(url, json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async def main(url: str, together: bool) -> tuple[dict, dict]:
        async with httpx.AsyncClient(base_url=url, timeout=4 * BARRIER_S) as http:
            calls = (post(http, "/opensd/v1/explain", explain_body), post(http, "/sdapi/v1/txt2img", txt2img_body))
            if together:
                return tuple(await asyncio.gather(*calls))
            return await calls[0], await calls[1]

    with serve_in_thread(create_app(pipe, limits=Limits(workers=2))) as url:
        alone = asyncio.run(main(url, together=False))
        pipe.barrier = threading.Barrier(2)
        both = asyncio.run(main(url, together=True))
    assert not pipe.barrier.broken
    assert both[1]["images"] == alone[1]["images"]  # the generation's PNG, byte for byte
    assert both[0]["raw"] == alone[0]["raw"] and both[0]["overlays"] == alone[0]["overlays"]
    assert both[0]["image"] == alone[0]["image"] and both[0]["path"] == alone[0]["path"]
