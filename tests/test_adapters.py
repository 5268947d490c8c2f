"""Adapters: deltas equal their merged weights, live only inside ``use_adapters`` and only
in their own thread, and never touch the base weights; kohya files bind on every family."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_family_model

from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.lora import LoRAError, LoRAFile, LoRAUse, bind_loras
from opensd.checkpoints.lora_names import kohya_names, lora_targets
from opensd.models.adapters import (
    AdapterSet,
    Conv2d,
    Full,
    Hadamard,
    Kronecker,
    Linear,
    LowRank,
    RowSlice,
    active_adapters,
    use_adapters,
)
from opensd.models.stable_diffusion import ModelFamily

torch.manual_seed(0)


def _merged_output(module, x, delta):
    w = module.weight + delta.weight()
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, w, module.bias, module.stride, module.padding, module.dilation)
    return F.linear(x, w, module.bias)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_tucker", "loha", "lokr", "full"])
def test_delta_equals_merged_weight(kind):
    if kind == "linear":
        m, x = Linear(12, 10), torch.randn(2, 5, 12)
    else:
        m, x = Conv2d(6, 8, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)
    r = 3
    if kind == "linear":
        d = LowRank(torch.randn(r, 12), torch.randn(10, r), 0.7)
    elif kind == "conv":
        d = LowRank(torch.randn(r, 6, 3, 3), torch.randn(8, r, 1, 1), 0.5)
    elif kind == "conv_tucker":
        d = LowRank(torch.randn(r, 6, 1, 1), torch.randn(8, r, 1, 1), 0.5, mid=torch.randn(r, r, 3, 3))
    elif kind == "loha":
        d = Hadamard(torch.randn(8, r), torch.randn(r, 54), torch.randn(8, r), torch.randn(r, 54), 0.3, (8, 6, 3, 3))
    elif kind == "lokr":
        d = Kronecker(torch.randn(2, 2), torch.randn(4, 3, 3, 3), 0.3, (8, 6, 3, 3))
    else:
        d = Full(torch.randn(8, 6, 3, 3), 0.2, bias=torch.randn(8))
    base = m(x)
    with use_adapters(AdapterSet({m: (d,)})):
        out = m(x)
    want = _merged_output(m, x, d) + (0 if kind != "full" else d.bias.view(1, -1, 1, 1) * 0.2)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, base)
    torch.testing.assert_close(m(x), base)  # gone after the block


def test_row_slice_pads_to_its_rows():
    d = RowSlice(LowRank(torch.randn(2, 4), torch.randn(4, 2), 1.0), 4, 12)
    w = d.weight()
    assert w.shape == (12, 4) and w[:4].abs().sum() == 0 and w[8:].abs().sum() == 0
    m = Linear(4, 12)
    x = torch.randn(3, 4)
    torch.testing.assert_close(d.forward(m, x), F.linear(x, w))


def test_scope_is_per_thread_and_nests():
    m = Linear(4, 4)
    x = torch.randn(1, 4)
    a = AdapterSet({m: (LowRank(torch.randn(1, 4), torch.randn(4, 1), 1.0),)})
    b = AdapterSet({m: (LowRank(torch.randn(1, 4), torch.randn(4, 1), 1.0),)})
    results: dict[str, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def run(name, s):
        with use_adapters(s):
            barrier.wait()  # both scopes open at once
            results[name] = m(x)
            barrier.wait()

    ts = [threading.Thread(target=run, args=("a", a)), threading.Thread(target=run, args=("b", b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with use_adapters(a):
        torch.testing.assert_close(results["a"], m(x))
        with use_adapters(None):
            assert active_adapters() is None
            torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
        assert active_adapters() is a
    with use_adapters(b):
        torch.testing.assert_close(results["b"], m(x))
    assert active_adapters() is None


def _random_kohya_file(model, path: Path, rank: int = 2, seed: int = 0, every: int = 3) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (name, t) in enumerate(sorted(kohya_names(model).items())):
        if i % every:
            continue
        out_f, *rest = t.weight_shape
        in_shape = tuple(rest)
        tensors[f"{name}.lora_down.weight"] = torch.randn((rank, *in_shape), generator=g) * 0.1
        tail = (1, 1) if len(in_shape) == 3 else ()
        tensors[f"{name}.lora_up.weight"] = torch.randn((out_f, rank, *tail), generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    write_safetensors(tensors, path)
    return path


def _merge_into(model, aset):
    """Merge every delta into a copy's weights (the reference the unmerged path must equal)."""
    import copy

    ref = copy.deepcopy(model)
    mods = {id(m): n for n, m in model.named_modules()}
    ref_mods = dict(ref.named_modules())
    with torch.no_grad():
        for m, ds in aset.deltas.items():
            target = ref_mods[mods[id(m)]]
            w = target.in_proj_weight if hasattr(target, "in_proj_weight") else target.weight
            for d in ds:
                w.add_(d.weight().reshape(w.shape))
    return ref


@pytest.mark.parametrize("family", list(ModelFamily))
def test_kohya_file_binds_and_equals_merged(family, tmp_path):
    model, _ = tiny_family_model(family)
    path = _random_kohya_file(model, tmp_path / "style.safetensors")
    lora = LoRAFile.load(path)
    assert len(lora.hash) == 12 and lora.name == "style"
    aset = bind_loras(model, [LoRAUse(lora, unet=0.8, te=0.6)])
    assert aset is not None and len(aset) > 10
    ref = _merge_into(model, aset)
    cfg = model.cfg
    x = torch.randn(1, cfg.unet.in_channels, 8, 8)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 7, cfg.unet.context_dim)
    y = None if cfg.unet.adm_in_channels is None else torch.randn(1, cfg.unet.adm_in_channels)
    ids = torch.randint(0, cfg.text.vocab_size - 1, (1, 6))
    with torch.no_grad():
        with use_adapters(aset):
            got = model.unet(x, t, ctx, y), [e(ids) for e in model.text_encoders]
        want = ref.unet(x, t, ctx, y), [e(ids) for e in ref.text_encoders]
        base = model.unet(x, t, ctx, y)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (got[0] - base).abs().max() > 1e-4


def test_a_merging_set_equals_the_unmerged_one_and_keeps_its_weights_to_itself(tmp_path):
    """merge_weights=True: the same outputs as the unmerged deltas (to float rounding), the
    merged weights made once per layer and held by the set, the model's weights untouched."""
    model, _ = tiny_family_model(ModelFamily.SD1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRAFile.load(_random_kohya_file(model, tmp_path / "a.safetensors", every=1))
    plain = bind_loras(model, [LoRAUse(lora, unet=0.8, te=0.6)])
    merging = AdapterSet(plain.deltas, merge_weights=True)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10.0])
    ctx = torch.randn(1, 5, model.cfg.unet.context_dim)
    ids = torch.randint(0, model.cfg.text.vocab_size - 1, (1, 6))
    with torch.no_grad():
        with use_adapters(plain):
            want = model.unet(x, t, ctx), model.text_encoders[0](ids)
        with use_adapters(merging):
            got = model.unet(x, t, ctx), model.text_encoders[0](ids)
            cached = dict(merging._merged)
            again = model.unet(x, t, ctx)
        base = model.unet(x, t, ctx)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert (got[0] - base).abs().max() > 1e-4
    assert torch.equal(again, got[0]) and len(cached) > 10
    assert all(merging._merged[m] is w for m, w in cached.items())  # made once, reused
    assert not plain._merged  # the unmerged set keeps nothing
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert AdapterSet.merge([merging, None]).merge_weights and not AdapterSet.merge([plain]).merge_weights


def test_every_layer_has_one_target_per_spelling():
    model, _ = tiny_family_model(ModelFamily.SDXL)
    table = lora_targets(model)
    kohya = kohya_names(model)
    assert set(kohya) <= set(table)
    # every adaptable module (and each q/k/v block of the fused projections) is written once
    assert len({(id(t.module), t.rows) for t in kohya.values()}) == len(kohya)
    assert "lora_unet_input_blocks_1_0_in_layers_2" in table  # LDM spelling (SDXL's kohya)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in table  # diffusers spelling
    assert "unet.down_blocks.0.resnets.0.conv1" in table  # PEFT
    assert table["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"].rows is not None


def test_apply_remove_cycles_leave_weights_bit_identical(tmp_path):
    model, _ = tiny_family_model(ModelFamily.SD1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRAFile.load(_random_kohya_file(model, tmp_path / "a.safetensors", every=1))
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 5, model.cfg.unet.context_dim)
    with torch.no_grad():
        base = model.unet(x, torch.tensor([10.0]), ctx)
        for _ in range(100):
            with use_adapters(bind_loras(model, [LoRAUse(lora)])):
                model.unet(x, torch.tensor([10.0]), ctx)
        after = model.unet(x, torch.tensor([10.0]), ctx)
    assert torch.equal(base, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_files_are_one_line_errors(tmp_path):
    model, _ = tiny_family_model(ModelFamily.SD1)
    path = tmp_path / "bad.safetensors"
    write_safetensors({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4),
                       "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(LoRAError, match=r"bad.safetensors: lora_unet_nowhere: no such layer.*another model family"):
        bind_loras(model, [LoRAUse(LoRAFile.load(path))])
    name = next(iter(kohya_names(model)))
    t = kohya_names(model)[name]
    write_safetensors({f"{name}.lora_down.weight": torch.zeros(2, *t.weight_shape[1:]),
                       f"{name}.lora_up.weight": torch.zeros(t.weight_shape[0], 3)}, path)
    with pytest.raises(LoRAError, match="rank mismatch"):
        bind_loras(model, [LoRAUse(LoRAFile.load(path))])
    write_safetensors({f"{name}.lora_down.weight": torch.zeros(2, 999),
                       f"{name}.lora_up.weight": torch.zeros(t.weight_shape[0], 2)}, path)
    with pytest.raises(LoRAError, match="update to a"):
        bind_loras(model, [LoRAUse(LoRAFile.load(path))])
    write_safetensors({"something.else": torch.zeros(2)}, path)
    with pytest.raises(LoRAError, match="'something.else' is not a LoRA weight"):
        LoRAFile.load(path)
