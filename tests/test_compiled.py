"""The pipeline's compile option: compiled where a graph can hold the call, eager where it cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_loaded

from opensd.models.adapters import AdapterSet, Linear, LowRank, use_adapters
from opensd.models.capture import AttentionSink, capture_attention, cross_attention_layers
from opensd.pipelines.compiled import CompiledUNet
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline


class FakeCompiler:
    """Stands in for torch.compile: the module itself, counting the calls that took the compiled path."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module):
        def run(*args):
            self.calls += 1
            return module(*args)

        return run


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 16, unet.cfg.context_dim, generator=g)


def test_calls_take_the_compiled_path_unless_a_graph_cannot_hold_them() -> None:
    unet = tiny_loaded().model.unet
    fake = FakeCompiler()
    cu = CompiledUNet(unet, compiler=fake)
    x, t, ctx = _inputs(unet)
    layer = next(m for m in unet.modules() if isinstance(m, Linear))
    delta = LowRank(torch.ones(2, layer.in_features), torch.ones(layer.out_features, 2), 0.1)
    with torch.inference_mode():
        plain = cu(x, t, ctx)
        assert fake.calls == 1
        with use_adapters(AdapterSet({layer: (delta,)})):  # LoRA: the context variable a graph cannot read
            lora = cu(x, t, ctx)
        assert fake.calls == 1 and not torch.equal(lora, plain)
        seen: list[str] = []
        sink = AttentionSink(cross_attention_layers(unet), lambda name, probs: seen.append(name))
        with capture_attention(sink):  # attention inspection (opensd explain)
            cu(x, t, ctx)
        assert fake.calls == 1 and seen
        assert torch.equal(cu(x, t, ctx), plain) and fake.calls == 2


def test_pipeline_compile_option_runs_the_unet_compiled(monkeypatch) -> None:
    fake = FakeCompiler()
    monkeypatch.setattr(torch, "compile", lambda module, **kw: fake(module))
    pipe = StableDiffusionPipeline(tiny_loaded(), compile=True)
    args = dict(steps=3, seed=2, width=16, height=16)
    image = np.asarray(pipe.txt2img("a red circle", **args)[0])
    assert fake.calls == 3  # one guided U-Net call per DPM++ 2M step
    assert np.array_equal(image, np.asarray(StableDiffusionPipeline(tiny_loaded()).txt2img("a red circle", **args)[0]))


def test_the_unet_traces_as_one_graph() -> None:
    """TorchDynamo alone (no Inductor: seconds, not minutes) captures the U-Net's whole forward with
    ``fullgraph=True``, as ``compile=True`` asks: nothing in it (the attention capture's or the adapters'
    context variable, a kernel route) breaks the graph."""
    unet = tiny_loaded().model.unet
    x, t, ctx = _inputs(unet)
    torch._dynamo.reset()
    traced = torch.compile(unet, fullgraph=True, dynamic=False, backend="eager")
    with torch.inference_mode():
        assert torch.equal(traced(x, t, ctx), unet(x, t, ctx))


@pytest.mark.slow
def test_real_compilation_matches_eager_and_leaves_lora_eager() -> None:
    """torch.compile with Inductor (minutes on a CPU): outputs within float rounding of eager ones."""
    eager = StableDiffusionPipeline(tiny_loaded())
    pipe = StableDiffusionPipeline(tiny_loaded(), compile=True)
    unet = pipe.model.unet
    x, t, ctx = _inputs(unet)
    with torch.inference_mode():
        ref = unet(x, t, ctx)
        got = pipe._unet(x, t, ctx)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    args = dict(steps=3, seed=2, width=16, height=16)
    a = np.asarray(pipe.txt2img("a red circle", **args)[0], np.int16)
    b = np.asarray(eager.txt2img("a red circle", **args)[0], np.int16)
    assert np.abs(a - b).max() <= 2
    layer = next(m for m in unet.modules() if isinstance(m, Linear))
    delta = LowRank(torch.ones(2, layer.in_features), torch.ones(layer.out_features, 2), 0.1)
    with torch.inference_mode(), use_adapters(AdapterSet({layer: (delta,)})):
        lora = pipe._unet(x, t, ctx)
        assert torch.equal(lora, unet(x, t, ctx)) and not torch.equal(lora, ref)  # eager, with the delta
