"""LoRA file formats: every kind's delta equals LyCORIS' own module on random tensors, the
PEFT and older diffusers spellings land where diffusers' converters put them, PEFT alphas
follow peft's own scaling, several files bind at once, and every bad file is one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_family_model

from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.lora import LoRAError, LoRAFile, LoRAUse, bind_loras, layer_delta
from opensd.checkpoints.lora_formats import FormatError, read_layers
from opensd.checkpoints.lora_names import Target, kohya_names, lora_targets
from opensd.models.adapters import AdapterSet, Conv2d, Linear, use_adapters
from opensd.models.stable_diffusion import ModelFamily

R = 2


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(shape, generator=_g(seed + 7 * len(shape) + sum(shape))) * scale


# ----------------------------------------------------------------------------- every kind against LyCORIS


def _lin():
    return Linear(64, 32)


def _conv():
    return Conv2d(64, 64, 3, stride=2, padding=1)


# name -> (layer module factory, LyCORIS keys -> tensor); shapes follow LyCORIS' own factorizations
CASES = {
    "locon_linear": (_lin, {"lora_down.weight": (R, 64), "lora_up.weight": (32, R), "alpha": 1.0}),
    "locon_linear_no_alpha": (_lin, {"lora_down.weight": (R, 64), "lora_up.weight": (32, R)}),
    "locon_conv": (_conv, {"lora_down.weight": (R, 64, 3, 3), "lora_up.weight": (64, R, 1, 1), "alpha": 3.0}),
    "locon_tucker": (_conv, {"lora_down.weight": (R, 64, 1, 1), "lora_mid.weight": (R, R, 3, 3),
                             "lora_up.weight": (64, R, 1, 1), "alpha": 1.0}),
    "loha_linear": (_lin, {"hada_w1_a": (32, R), "hada_w1_b": (R, 64), "hada_w2_a": (32, R), "hada_w2_b": (R, 64),
                           "alpha": 1.0}),
    "loha_conv": (_conv, {"hada_w1_a": (64, R), "hada_w1_b": (R, 64 * 9), "hada_w2_a": (64, R),
                          "hada_w2_b": (R, 64 * 9), "alpha": 4.0}),
    "loha_tucker": (_conv, {"hada_w1_a": (R, 64), "hada_w1_b": (R, 64), "hada_t1": (R, R, 3, 3), "hada_w2_a": (R, 64),
                            "hada_w2_b": (R, 64), "hada_t2": (R, R, 3, 3), "alpha": 1.0}),
    "lokr_linear": (_lin, {"lokr_w1": (4, 8), "lokr_w2_a": (8, R), "lokr_w2_b": (R, 8), "alpha": 1.0}),
    "lokr_linear_both_decomposed": (_lin, {"lokr_w1_a": (4, R), "lokr_w1_b": (R, 8), "lokr_w2_a": (8, R),
                                           "lokr_w2_b": (R, 8), "alpha": 3.0}),
    "lokr_linear_full": (_lin, {"lokr_w1": (4, 8), "lokr_w2": (8, 8), "alpha": 5.0}),  # alpha ignored
    "lokr_conv": (_conv, {"lokr_w1": (8, 8), "lokr_w2_a": (8, R), "lokr_w2_b": (R, 8 * 9), "alpha": 1.0}),
    "lokr_conv_full": (_conv, {"lokr_w1": (8, 8), "lokr_w2": (8, 8, 3, 3), "alpha": 7.0}),  # alpha ignored
    "lokr_conv_tucker": (_conv, {"lokr_w1_a": (8, R), "lokr_w1_b": (R, 8), "lokr_t2": (R, R, 3, 3),
                                 "lokr_w2_a": (R, 8), "lokr_w2_b": (R, 8), "alpha": 1.0}),
    "full_linear": (_lin, {"diff": (32, 64), "diff_b": (32,)}),
    "full_conv": (_conv, {"diff": (64, 64, 3, 3), "diff_b": (64,)}),
}


def _state(spec: dict, name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for i, (k, v) in enumerate(spec.items()):
        out[f"{name}.{k}"] = torch.tensor(v) if isinstance(v, float) else _rand(*v, seed=seed + i)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_every_kind_equals_lycoris(case):
    from lycoris.modules import get_module, make_module

    factory, spec = CASES[case]
    torch.manual_seed(0)
    module = factory()
    name = "lora_unet_layer"
    state = _state(spec, name)
    if f"{name}.alpha" not in state:  # LyCORIS' loader needs one; its modules take alpha = rank then
        kind, params = get_module(state | {f"{name}.alpha": torch.tensor(float(R))}, name)
    else:
        kind, params = get_module(state, name)
    assert kind is not None, case
    reference = make_module(kind, params, name, module)
    reference.multiplier = 0.7
    x = torch.randn(2, 64, 9, 9) if isinstance(module, Conv2d) else torch.randn(3, 64)
    with torch.no_grad():
        want = reference(x)
        layer = read_layers(state, {})[name]
        target = Target(module, "layer", "unet")
        delta = layer_delta(layer, target, 0.7, f"f: {name}")
        base = module(x)
        with use_adapters(AdapterSet({module: (delta,)})):
            got = module(x)
    assert (want - base).abs().max() > 1e-3  # the adapter does change the layer
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_lycoris_scalar_keys_are_skipped_as_lycoris_does():
    state = _state(CASES["locon_linear"][1], "lora_unet_layer")
    plain = read_layers(state, {})
    state["lora_unet_layer.scalar"] = torch.tensor(0.0)
    layers = read_layers(state, {})
    assert set(layers) == set(plain) and set(layers["lora_unet_layer"].tensors) == {"down", "up"}


# ----------------------------------------------------------------------------- diffusers spellings


def _some_targets(model):
    """(PEFT name, Target) of a few U-Net and text-encoder layers of each shape class."""
    table = lora_targets(model)
    picks = {}
    for name, t in table.items():
        if not name.startswith(("unet.", "text_encoder.")):
            continue
        for end in ("attn1.to_q", "attn2.to_out.0", "resnets.0.conv1", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"):
            if name.endswith(end) and end not in picks:
                picks[end] = (name, t)
    assert len(picks) == 6
    return dict(picks.values())


def _down_up(t: Target, seed: int):
    out_f, *rest = t.weight_shape
    down = _rand(R, *rest, seed=seed)
    up = _rand(out_f, R, *((1, 1) if len(rest) == 3 else ()), seed=seed + 1)
    return down, up


def _old_name(name: str) -> tuple[str, str]:
    """An older diffusers spelling of a PEFT layer name: (down key, up key)."""
    if name.startswith("unet.") and ".attn1.to_q" in name:  # attention-processor format, no unet. prefix
        base = name.removeprefix("unet.").replace(".attn1.to_q", ".attn1.processor.to_q_lora")
        return f"{base}.down.weight", f"{base}.up.weight"
    if name.startswith("unet."):
        return f"{name}.lora.down.weight", f"{name}.lora.up.weight"
    if name.endswith("self_attn.out_proj"):
        base = name.replace("self_attn.out_proj", "self_attn.to_out_lora")
        return f"{base}.down.weight", f"{base}.up.weight"
    return f"{name}.lora_linear_layer.down.weight", f"{name}.lora_linear_layer.up.weight"


def _to_peft_with_diffusers(state: dict) -> dict:
    """diffusers' own conversion of an older file to PEFT keys (what load_lora_weights does)."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    te = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    unet = {k.removeprefix("unet."): v for k, v in state.items() if not k.startswith("text_encoder.")}
    te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))
    return {**{f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()},
            **{f"text_encoder.{k}": v for k, v in te.items()}}


def test_older_diffusers_spellings_land_where_diffusers_puts_them():
    model, _ = tiny_family_model(ModelFamily.SD1)
    old = {}
    for i, (name, t) in enumerate(_some_targets(model).items()):
        down, up = _down_up(t, 10 * i)
        kd, ku = _old_name(name)
        old[kd], old[ku] = down, up
    assert any(".processor.to_q_lora." in k and not k.startswith("unet.") for k in old)
    peft = _to_peft_with_diffusers(old)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in peft)
    ours_old, ours_peft = read_layers(old, {}), read_layers(peft, {})
    assert set(ours_old) == set(ours_peft) and len(ours_old) == 6
    table = lora_targets(model)
    for name, layer in ours_old.items():
        assert name in table, name
        for part in ("down", "up"):
            assert torch.equal(layer.tensors[part], ours_peft[name].tensors[part])


def test_transformers5_text_encoder_names_without_text_model():
    model, _ = tiny_family_model(ModelFamily.SD1)
    name, t = next((n, t) for n, t in _some_targets(model).items() if n.startswith("text_encoder."))
    down, up = _down_up(t, 3)
    flat = name.replace("text_encoder.text_model.", "text_encoder.")
    layers = read_layers({f"{flat}.lora_A.weight": down, f"{flat}.lora_B.weight": up}, {})
    assert list(layers) == [name]


def _peft_reference_scaling(config: dict, modules: list[str], rank: int) -> dict[str, float]:
    """peft's own scaling for ``modules`` (dotted paths) under a LoraConfig built from ``config``."""
    from peft import LoraConfig, inject_adapter_in_model

    root = torch.nn.Module()
    for path in modules:
        parent = root
        *dirs, leaf = path.split(".")
        for d in dirs:
            if not hasattr(parent, d):
                parent.add_module(d, torch.nn.Module())
            parent = getattr(parent, d)
        parent.add_module(leaf, torch.nn.Linear(8, 8))
    inject_adapter_in_model(LoraConfig(**config, r=rank, target_modules=modules), root)
    return {p: root.get_submodule(p).scaling["default"] for p in modules}


def test_peft_alphas_from_metadata_follow_peft():
    unet_mods = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    te_mods = ["text_model.encoder.layers.0.self_attn.q_proj"]
    unet_cfg = {"lora_alpha": 2, "alpha_pattern": {"attn2.to_k": 8}}
    te_cfg = {"lora_alpha": 3, "use_rslora": True}
    rank = 4
    meta = {f"unet.{k}": v for k, v in dict(unet_cfg, r=rank).items()} | {f"text_encoder.{k}": v for k, v in te_cfg.items()}
    state = {}
    for prefix, mods in (("unet", unet_mods), ("text_encoder", te_mods)):
        for m in mods:
            state[f"{prefix}.{m}.lora_A.weight"] = _rand(rank, 8)
            state[f"{prefix}.{m}.lora_B.weight"] = _rand(8, rank)
    layers = read_layers(state, {"lora_adapter_metadata": json.dumps(meta)})
    want = {f"unet.{k}": v for k, v in _peft_reference_scaling(unet_cfg, unet_mods, rank).items()}
    want |= {f"text_encoder.{k}": v for k, v in _peft_reference_scaling(te_cfg, te_mods, rank).items()}
    assert len(set(want.values())) == 3
    for name, scaling in want.items():
        assert layers[name].alpha / rank == pytest.approx(scaling)
    plain = read_layers(state, {})
    assert all(layer.alpha is None for layer in plain.values())  # no metadata: alpha = rank, scale 1


# ----------------------------------------------------------------------------- binding files


def _kohya_file(model, path: Path, seed: int, every: int = 4, offset: int = 0) -> Path:
    tensors = {}
    for i, (name, t) in enumerate(sorted(kohya_names(model).items())):
        if (i + offset) % every:
            continue
        down, up = _down_up(t, seed + i)
        tensors |= {f"{name}.lora_down.weight": down * 0.3, f"{name}.lora_up.weight": up * 0.3,
                    f"{name}.alpha": torch.tensor(1.0)}
    write_safetensors(tensors, path)
    return path


def _peft_file(model, path: Path, seed: int, every: int = 4) -> Path:
    tensors = {}
    names = sorted(n for n in lora_targets(model) if n.startswith(("unet.", "text_encoder")))
    for i, name in enumerate(names[::every]):
        down, up = _down_up(lora_targets(model)[name], seed + i)
        tensors |= {f"{name}.lora_A.weight": down * 0.3, f"{name}.lora_B.weight": up * 0.3}
    write_safetensors(tensors, path)
    return path


def _unet_and_text(model, aset):
    cfg = model.cfg
    x = torch.randn(1, cfg.unet.in_channels, 8, 8, generator=_g(1))
    ctx = torch.randn(1, 7, cfg.unet.context_dim, generator=_g(2))
    ids = torch.randint(0, 1000, (1, 6), generator=_g(3))
    with torch.no_grad(), use_adapters(aset):
        return model.unet(x, torch.tensor([500.0]), ctx), model.text_encoders[0](ids)


def test_two_files_at_once_add_their_deltas(tmp_path):
    model, _ = tiny_family_model(ModelFamily.SD1)
    a = LoRAFile.load(_kohya_file(model, tmp_path / "a.safetensors", seed=0, every=2))
    b = LoRAFile.load(_peft_file(model, tmp_path / "b.safetensors", seed=50, every=2))
    both = bind_loras(model, [LoRAUse(a, unet=0.8, te=0.5), LoRAUse(b, unet=1.2, te=0.9)])
    sets = [bind_loras(model, [LoRAUse(a, unet=0.8, te=0.5)]), bind_loras(model, [LoRAUse(b, unet=1.2, te=0.9)])]
    shared = [m for m in both.deltas if m in sets[0].deltas and m in sets[1].deltas]
    assert shared and len(both) == len(set(sets[0].deltas) | set(sets[1].deltas))
    for m in shared:  # each layer gets both files' deltas, each with its own weights and multiplier
        assert len(both.get(m)) == 2
        w = sum(d.weight() for d in both.get(m))
        torch.testing.assert_close(w, sets[0].get(m)[0].weight() + sets[1].get(m)[0].weight())
    got = _unet_and_text(model, both)
    alone = [_unet_and_text(model, s) for s in sets]
    base = _unet_and_text(model, None)
    for i in range(2):
        assert (got[i] - alone[0][i]).abs().max() > 1e-4 and (got[i] - alone[1][i]).abs().max() > 1e-4
        assert (alone[0][i] - base[i]).abs().max() > 1e-4


def test_pt_files_read_like_safetensors(tmp_path):
    model, _ = tiny_family_model(ModelFamily.SD1)
    st = LoRAFile.load(_kohya_file(model, tmp_path / "a.safetensors", seed=0))
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "a.safetensors"), tmp_path / "a.pt")
    pt = LoRAFile.load(tmp_path / "a.pt")
    assert set(pt.layers) == set(st.layers) and len(pt.hash) == 12
    for k in st.layers:
        assert torch.equal(pt.layers[k].tensors["down"], st.layers[k].tensors["down"])


def test_reading_a_big_file_is_fast():
    """An SDXL LoRA has ~2,400 layers (7,000 keys); reading 40,000 keys stays well under a second."""
    t = torch.zeros(1, 1)
    state = {}
    for i in range(10_000):
        layer = f"lora_unet_output_blocks_{i}_1_transformer_blocks_0_attn1_to_q"
        state |= {f"{layer}.lora_down.weight": t, f"{layer}.lora_up.weight": t, f"{layer}.alpha": torch.tensor(1.0)}
        peft = f"unet.up_blocks.{i}.attentions.0.transformer_blocks.0.attn1.to_q"
        state[f"{peft}.lora_A.weight"] = t
    kohya = {k: v for k, v in state.items() if k.startswith("lora_")}
    start = time.perf_counter()
    assert len(read_layers(kohya, {})) == 10_000
    assert time.perf_counter() - start < 1.5


# ----------------------------------------------------------------------------- errors


def _error(tmp_path: Path, tensors: dict, model=None, match: str = "", name: str = "bad.safetensors",
           metadata: dict | None = None) -> str:
    path = tmp_path / name
    write_safetensors({k: v.clone() for k, v in tensors.items()}, path, metadata)
    with pytest.raises(LoRAError, match=match) as e:
        lora = LoRAFile.load(path)
        if model is not None:
            bind_loras(model, [LoRAUse(lora)])
    text = str(e.value)
    assert "\n" not in text and name in text.split(":")[0], text  # the file is named first
    return text


@pytest.fixture(scope="module")
def sd1():
    return tiny_family_model(ModelFamily.SD1)[0]


def _layer_of(model, end: str) -> tuple[str, Target]:
    return next((n, t) for n, t in sorted(kohya_names(model).items()) if n.endswith(end))


def test_unknown_refused_and_misplaced_keys(tmp_path):
    z = torch.zeros(2, 4)
    _error(tmp_path, {"model.diffusion_model.x.weight": z}, match="'model.diffusion_model.x.weight' is not a LoRA weight")
    _error(tmp_path, {"lora_unet_a.lora_down.weight": z, "lora_unet_a.lora_up.weight": z, "lora_unet_a.dora_scale": z},
           match="lora_unet_a.dora_scale.*DoRA")
    _error(tmp_path, {"unet.a.lora_A.weight": z, "unet.a.lora_magnitude_vector": z}, match="DoRA")
    _error(tmp_path, {"lora_unet_a.weight": z, "lora_unet_a.on_input": torch.tensor(1.0)}, match=r"\(IA\)\^3")
    _error(tmp_path, {"unet.a.lora_down.weight": z}, match="kohya/LyCORIS suffix on a diffusers-named layer")
    _error(tmp_path, {"lora_unet_a.lora_A.weight": z}, match="peft suffix on a kohya-named layer")


def test_mixed_formats_and_kinds(tmp_path):
    z = torch.zeros(2, 4)
    _error(tmp_path, {"lora_unet_a.lora_down.weight": z, "lora_unet_a.lora_up.weight": z,
                      "unet.b.lora_A.weight": z, "unet.b.lora_B.weight": z},
           match="mixes formats: 'lora_unet_a.lora_down.weight' is kohya, 'unet.b.lora_A.weight' is PEFT")
    _error(tmp_path, {"unet.a.lora_A.weight": z, "unet.a.lora_B.weight": z, "unet.b.lora.down.weight": z,
                      "unet.b.lora.up.weight": z}, match="mixes formats.*PEFT.*diffusers \\(pre-PEFT\\)")
    _error(tmp_path, {"lora_unet_a.lora_down.weight": z, "lora_unet_a.hada_w1_a": z},
           match="layer 'lora_unet_a' mixes (lora and loha|loha and lora) tensors")


def test_incomplete_layers_and_empty_files(tmp_path):
    z = torch.zeros(2, 4)
    _error(tmp_path, {"lora_unet_a.lora_down.weight": z}, match="'lora_unet_a' \\(lora\\) lacks its up tensor")
    _error(tmp_path, {"lora_unet_a.alpha": torch.tensor(1.0)}, match="has an alpha but no weights")
    _error(tmp_path, {"lora_unet_a.lokr_w1_a": z, "lora_unet_a.lokr_w2": z}, match="lokr_w1_a but no lokr_w1_b")
    _error(tmp_path, {"lora_unet_a.lora_down.weight": z, "lora_unet_a.lora_up.weight": z,
                      "lora_unet_a.alpha": torch.ones(2)}, match="alpha must be one number")
    _error(tmp_path, {"lora_unet_a.lora_down.weight": z.int(), "lora_unet_a.lora_up.weight": z},
           match="down tensor is int32, not float")
    _error(tmp_path, {"lora_unet_a.scalar": torch.tensor(1.0)}, match="holds no LoRA layers")
    _error(tmp_path, {}, match="holds no tensors")
    (tmp_path / "zero.safetensors").write_bytes(b"")
    with pytest.raises(LoRAError, match="zero.safetensors is not a readable safetensors file"):
        LoRAFile.load(tmp_path / "zero.safetensors")


class _Code:
    pass


def test_torch_files_with_junk_or_code_are_refused(tmp_path):
    z = torch.zeros(2, 4)
    torch.save({"lora_unet_a.lora_down.weight": z, "lora_unet_a.lora_up.weight": z, "lora_unet_a.alpha": 1.0},
               tmp_path / "junk.pt")
    with pytest.raises(LoRAError, match="junk.pt: entry 'lora_unet_a.alpha' is a float, not a tensor") as e:
        LoRAFile.load(tmp_path / "junk.pt")
    assert "\n" not in str(e.value)
    torch.save({"lora_unet_a.lora_down.weight": z, "x": _Code()}, tmp_path / "code.pt")
    with pytest.raises(LoRAError, match="code.pt refused: it is a pickle that needs code to load") as e:
        LoRAFile.load(tmp_path / "code.pt")
    assert "\n" not in str(e.value)


def test_a_layer_the_model_lacks_names_the_family(tmp_path, sd1):
    z2, z4 = torch.zeros(2, 4), torch.zeros(4, 2)
    xl_te = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    _error(tmp_path, {f"{xl_te}.lora_down.weight": z2, f"{xl_te}.lora_up.weight": z4}, sd1,
           match=f"{xl_te}: no such layer in this sd1 model; the file looks made for SDXL \\(lora_te2_\\* keys\\)")
    xl_unet = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"
    _error(tmp_path, {f"{xl_unet}.lora_down.weight": z2, f"{xl_unet}.lora_up.weight": z4}, sd1,
           match="looks made for SDXL \\(two transformer blocks at 64x64\\)")
    sd2_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    _error(tmp_path, {"lora_unet_nowhere.lora_down.weight": z2, "lora_unet_nowhere.lora_up.weight": z4,
                      f"{sd2_k}.lora_down.weight": torch.zeros(2, 1024), f"{sd2_k}.lora_up.weight": z4}, sd1,
           match="no such layer in this sd1 model; the file looks made for SD 2.x \\(1024-wide cross-attention\\)")
    _error(tmp_path, {"lora_unet_nowhere.lora_down.weight": z2, "lora_unet_nowhere.lora_up.weight": z4}, sd1,
           match="nowhere: no such layer in this sd1 model; is the LoRA for another model family")


def test_rank_and_shape_mismatches_for_every_kind(tmp_path, sd1):
    name, t = _layer_of(sd1, "attn1_to_q")
    out_f, in_f = t.weight_shape
    bad_rank = {
        "lora": {"lora_down.weight": torch.zeros(2, in_f), "lora_up.weight": torch.zeros(out_f, 3)},
        "loha": {"hada_w1_a": torch.zeros(out_f, 2), "hada_w1_b": torch.zeros(2, in_f),
                 "hada_w2_a": torch.zeros(out_f, 3), "hada_w2_b": torch.zeros(2, in_f)},
        "lokr": {"lokr_w1_a": torch.zeros(2, 3), "lokr_w1_b": torch.zeros(2, 2), "lokr_w2": torch.zeros(out_f // 2, in_f // 2)},
    }
    for kind, spec in bad_rank.items():
        text = _error(tmp_path, {f"{name}.{k}": v for k, v in spec.items()}, sd1, match=f"{name}: rank mismatch")
        assert "(" in text, kind
    bad_shape = {
        "lora": {"lora_down.weight": torch.zeros(2, in_f + 1), "lora_up.weight": torch.zeros(out_f, 2)},
        "loha": {"hada_w1_a": torch.zeros(out_f, 2), "hada_w1_b": torch.zeros(2, in_f + 2),
                 "hada_w2_a": torch.zeros(out_f, 2), "hada_w2_b": torch.zeros(2, in_f + 2)},
        "lokr": {"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(out_f, in_f)},
        "full": {"diff": torch.zeros(out_f, in_f + 1)},
    }
    for spec in bad_shape.values():
        _error(tmp_path, {f"{name}.{k}": v for k, v in spec.items()}, sd1, match=f"{name}: gives a .* update to a")
    _error(tmp_path, {f"{name}.diff": torch.zeros(out_f, in_f), f"{name}.diff_b": torch.zeros(out_f + 1)}, sd1,
           match="diff_b has shape")


def test_a_bad_layer_binds_nothing(tmp_path, sd1):
    good, t = _layer_of(sd1, "attn1_to_q")
    down, up = _down_up(t, 0)
    path = tmp_path / "half.safetensors"
    write_safetensors({f"{good}.lora_down.weight": down, f"{good}.lora_up.weight": up,
                       "lora_unet_nowhere.lora_down.weight": down.clone(), "lora_unet_nowhere.lora_up.weight": up.clone()}, path)
    lora = LoRAFile.load(path)
    with pytest.raises(LoRAError):
        bind_loras(sd1, [LoRAUse(lora)])
    x = torch.randn(1, t.weight_shape[1])
    assert torch.equal(t.module(x), F.linear(x, t.module.weight, t.module.bias))  # nothing was left active


def test_bad_metadata_is_one_line(tmp_path):
    z = torch.zeros(2, 4)
    state = {"unet.a.lora_A.weight": z, "unet.a.lora_B.weight": torch.zeros(4, 2)}
    _error(tmp_path, state, metadata={"lora_adapter_metadata": "{not json"}, match="not valid JSON")
    _error(tmp_path, state, metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 1, "unet.alpha_pattern": {"(": 2}})},
           match="alpha_pattern '\\(' is no regular expression")
    with pytest.raises(FormatError):
        read_layers(state, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "x"})})
