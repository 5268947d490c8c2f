"""SD 2.x and SDXL networks proven equal to transformers, diffusers and open_clip on identical
random weights (fp32, <= 1e-4): the OpenCLIP text tower in both transformers layouts, and
the U-Nets of SD 2.x (Linear projections, 64-channel heads), SDXL base (per-level depth,
"text_time" addition embedding) and the refiner."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel
from helpers import randomize

from opensd.checkpoints.keymap_open_clip import (
    LOGIT_SCALE,
    from_transformers,
    from_transformers_open_clip_config,
    to_transformers,
    to_transformers_open_clip_config,
    transformers_key_names,
)
from opensd.checkpoints.keymap_unet import (
    convert_diffusers_unet_state_dict,
    diffusers_size_embed_dim,
    from_diffusers_unet_config,
    to_diffusers_unet_config,
    unet_key_map,
)
from opensd.models.clip import Activation, CLIPTextConfig
from opensd.models.open_clip import OpenCLIPTextModel
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.models.unet import UNetConfig, UNetModel
from opensd.pipelines.conditioning import Conditioner
from opensd.pipelines.request import GenerationRequest

TOL = 1e-4
# a tiny OpenCLIP tower; ids: bos 62, eos 63 (the highest, as CLIP's 49407), pad 0 (OpenCLIP's "!")
OC = CLIPTextConfig(vocab_size=64, max_length=16, width=32, layers=3, heads=4, mlp_width=64,
                    activation=Activation.GELU, projection_dim=24)
BOS, EOS, PAD = 62, 63, 0


def _ids(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """(B, 16) rows [bos, words..., eos, 0...] with ``lengths`` words."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(1, 60, (n,), generator=g).tolist()
        row = [BOS, *words, EOS]
        rows.append(row + [PAD] * (OC.max_length - len(row)))
    return torch.tensor(rows)


def _hf(cfg: CLIPTextConfig, state: dict, *, layers: int | None = None, projection: bool = False):
    """The transformers model of our OpenCLIP state dict (``layers`` blocks kept)."""
    d = to_transformers_open_clip_config(cfg, layers=layers, projection=projection,
                                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    hf_cfg = transformers.CLIPTextConfig.from_dict(d)
    hf = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(hf_cfg).eval()
    converted = to_transformers(state, cfg, layers=layers, projection=projection)
    own = hf.state_dict()
    if not any(k.startswith("text_model.") for k in own):  # transformers >= 5 keeps CLIPTextModel unprefixed
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert sorted(converted) == sorted(own)
    hf.load_state_dict(converted, strict=True)
    return hf


@pytest.fixture(scope="module")
def open_clip_model() -> OpenCLIPTextModel:
    torch.manual_seed(0)
    return randomize(OpenCLIPTextModel(OC), seed=1).eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- OpenCLIP text tower


def test_open_clip_matches_transformers_clip_text_model(open_clip_model) -> None:
    ids = _ids([3, 9, 0])
    hf = _hf(OC, open_clip_model.state_dict())
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        _close(open_clip_model(ids, skip_layers=1, final_norm=False), out.hidden_states[-2])  # SDXL's layer
        _close(open_clip_model(ids), out.last_hidden_state)
        _close(open_clip_model(ids, skip_layers=1, final_norm=False), open_clip_model(ids, 1, False))
    assert not torch.allclose(out.hidden_states[-2], out.hidden_states[-1], atol=1e-2)  # the layers differ


def test_sd2_text_encoder_is_23_of_24_blocks(open_clip_model) -> None:
    """diffusers' SD 2 text_encoder drops OpenCLIP's last block; its output (through the
    final norm) is ours at skip_layers=1, SD 2's layer. Read back, the block is zeros."""
    ids = _ids([5, 12])
    state = open_clip_model.state_dict()
    hf = _hf(OC, state, layers=OC.layers - 1)
    assert hf.config.num_hidden_layers == OC.layers - 1
    with torch.no_grad():
        _close(open_clip_model(ids, skip_layers=1), hf(ids).last_hidden_state)
    back, notes = from_transformers(hf.state_dict(), OC)
    assert "block(s) [2]" in notes[0]
    fresh = OpenCLIPTextModel(OC)
    fresh.load_state_dict(back, strict=True)
    for k, v in fresh.state_dict().items():
        if k.startswith("transformer.resblocks.2."):
            assert not v.any(), k
        elif k == "logit_scale":
            assert v.item() == pytest.approx(LOGIT_SCALE)
        elif k == "text_projection":  # a CLIPTextModel has none: zeros
            assert not v.any()
        else:
            assert torch.equal(v, state[k]), k
    with torch.no_grad():
        _close(fresh(ids, skip_layers=1), open_clip_model(ids, skip_layers=1))


def test_open_clip_matches_clip_text_model_with_projection(open_clip_model) -> None:
    ids = _ids([4, 13, 1])
    state = open_clip_model.state_dict()
    hf = _hf(OC, state, projection=True)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        hidden, pooled = open_clip_model.hidden_and_pooled(ids)
    _close(hidden, out.hidden_states[-2])
    _close(pooled, out.text_embeds)
    assert torch.equal(hf.text_projection.weight, state["text_projection"].T)
    back, notes = from_transformers(hf.state_dict(), OC)
    assert notes == []
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state if k != "logit_scale")


def test_transformers_key_names_and_configs() -> None:
    d = to_transformers_open_clip_config(OC, layers=2, projection=True)
    assert (d["num_hidden_layers"], d["projection_dim"], d["hidden_act"]) == (2, 24, "gelu")
    assert d["architectures"] == ["CLIPTextModelWithProjection"]
    assert from_transformers_open_clip_config(d, extra_layers=1) == OC
    with torch.device("meta"):
        hf = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(d))
    assert sorted(transformers_key_names(OC, 2, True)) == sorted(hf.state_dict())
    # unknown keys survive, prefixed, so a strict load reports them
    back, _ = from_transformers({"text_model.frob.weight": torch.zeros(1)}, OC)
    assert "<transformers>.text_model.frob.weight" in back


OPEN_CLIP_CHILD = textwrap.dedent("""
    # open_clip's package __init__ needs torchvision (absent here); its text tower does not:
    # import open_clip.transformer alone, with a stand-in for the one torchvision name it imports.
    import importlib.util, json, sys, types
    from pathlib import Path
    import torch
    spec = importlib.util.find_spec("open_clip")
    pkg = types.ModuleType("open_clip"); pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = pkg
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = torch.nn.Module
    from open_clip.transformer import TextTransformer
    work = Path(sys.argv[1]); c = json.loads((work / "cfg.json").read_text())
    tower = TextTransformer(context_length=c["max_length"], vocab_size=c["vocab_size"], width=c["width"],
                            heads=c["heads"], layers=c["layers"], mlp_ratio=c["mlp_width"] / c["width"],
                            output_dim=c["projection_dim"]).eval()
    state = torch.load(work / "state.pt", weights_only=True)
    tower.load_state_dict(state, strict=True)
    ids = torch.load(work / "ids.pt", weights_only=True)
    with torch.no_grad():
        pooled = tower(ids)
        blocks = tower.forward_intermediates(ids, intermediates_only=True, output_fmt="NLC")["text_intermediates"]
    torch.save({"pooled": pooled, "penultimate": blocks[-2], "last": tower.ln_final(blocks[-1])}, work / "out.pt")
""")


def test_open_clip_matches_open_clips_own_text_tower(open_clip_model, tmp_path: Path) -> None:
    """open_clip's TextTransformer, run in a child process (it needs a torchvision stand-in)."""
    ids = _ids([2, 10, 7])
    state = {k: v for k, v in open_clip_model.state_dict().items() if k != "logit_scale"}  # CLIP holds it, not the tower
    torch.save(state, tmp_path / "state.pt")
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "cfg.json").write_text(json.dumps({k: v for k, v in dataclasses.asdict(OC).items() if k != "activation"}))
    (tmp_path / "child.py").write_text(OPEN_CLIP_CHILD)
    run = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    ref = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        hidden, pooled = open_clip_model.hidden_and_pooled(ids)
        _close(hidden, ref["penultimate"])
        _close(pooled, ref["pooled"])
        _close(open_clip_model(ids), ref["last"])


# ----------------------------------------------------------------------------- U-Nets

SD2_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                      head_channels=8, context_dim=32, norm_groups=8, use_linear_in_transformer=True)
XL_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(1, 2),
                     head_channels=8, transformer_depth=(0, 1, 2), context_dim=80, norm_groups=8,
                     use_linear_in_transformer=True, adm_in_channels=24 + 6 * 8)
REFINER_UNET = UNetConfig(model_channels=24, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                          head_channels=8, transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2,
                          context_dim=48, norm_groups=8, use_linear_in_transformer=True, adm_in_channels=24 + 5 * 8)
SIZE_DIM = 8


def _pair(cfg: UNetConfig, seed: int) -> tuple[UNetModel, UNet2DConditionModel]:
    torch.manual_seed(seed)
    ours = randomize(UNetModel(cfg), seed=seed).eval()
    ref = UNet2DConditionModel(**to_diffusers_unet_config(cfg, size_embed_dim=SIZE_DIM)).eval()
    ref_state = ref.state_dict()
    converted = {unet_key_map(cfg)[k]: v for k, v in ours.state_dict().items()}
    assert sorted(converted) == sorted(ref_state)
    ref.load_state_dict(converted, strict=True)
    return ours, ref


def test_sd2_unet_matches_diffusers() -> None:
    ours, ref = _pair(SD2_UNET, 2)
    d = to_diffusers_unet_config(SD2_UNET)
    assert d["attention_head_dim"] == [4, 8] and d["use_linear_projection"] is True  # heads per level
    assert ref.down_blocks[0].attentions[0].proj_in.__class__ is torch.nn.Linear
    x, t, ctx = torch.randn(2, 4, 12, 12), torch.tensor([5.0, 800.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        _close(ours(x, t, ctx), ref(x, t, ctx).sample)
    assert from_diffusers_unet_config(d) == SD2_UNET


def _size_y(family: ModelFamily, pooled: torch.Tensor, req: GenerationRequest, negative: bool = False) -> torch.Tensor:
    """y as opensd's Conditioner builds it: pooled text, then the Fourier-embedded size numbers."""
    model = StableDiffusion(SDConfig.tiny(family))
    assert model.cfg.size_embed_dim == SIZE_DIM
    size = Conditioner(model, None).size_vector(req, negative=negative)
    return torch.cat([pooled, size.expand(pooled.shape[0], -1)], dim=1)


def test_sdxl_unet_with_addition_embedding_matches_diffusers() -> None:
    ours, ref = _pair(XL_UNET, 3)
    d = to_diffusers_unet_config(XL_UNET, size_embed_dim=SIZE_DIM)
    assert (d["addition_embed_type"], d["addition_time_embed_dim"], d["projection_class_embeddings_input_dim"]) == (
        "text_time", SIZE_DIM, 72)
    assert d["transformer_layers_per_block"] == [1, 1, 2] and d["attention_head_dim"] == [2, 4, 8]
    assert from_diffusers_unet_config(d) == XL_UNET and diffusers_size_embed_dim(d) == SIZE_DIM
    x, t, ctx = torch.randn(2, 4, 16, 12), torch.tensor([10.0, 999.0]), torch.randn(2, 9, 80)
    pooled = torch.randn(2, 24)
    req = GenerationRequest("p", width=96, height=128, original_size=(300, 200), crop_top_left=(16, 8))
    y = _size_y(ModelFamily.SDXL, pooled, req)
    time_ids = torch.tensor([[300.0, 200.0, 16.0, 8.0, 128.0, 96.0]] * 2)  # diffusers: original, crop, target
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        _close(ours(x, t, ctx, y=y), want)
        other = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids + 64}).sample
    assert (other - want).abs().max().item() > 1e-3  # the sizes do condition it


def test_refiner_unet_matches_diffusers() -> None:
    ours, ref = _pair(REFINER_UNET, 4)
    d = to_diffusers_unet_config(REFINER_UNET, size_embed_dim=SIZE_DIM)
    assert d["transformer_layers_per_block"] == 2 and d["down_block_types"][0] == "DownBlock2D"
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([321.0]), torch.randn(1, 5, 48)
    pooled = torch.randn(1, 24)
    req = GenerationRequest("p", width=128, height=128, aesthetic_score=6.0, negative_aesthetic_score=2.5)
    for negative, score in ((False, 6.0), (True, 2.5)):
        y = _size_y(ModelFamily.SDXL_REFINER, pooled, req, negative)
        time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, score]])  # original, crop, aesthetic score
        with torch.no_grad():
            _close(ours(x, t, ctx, y=y), ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample)
    back = from_diffusers_unet_config(d)
    with torch.device("meta"):
        assert {k: v.shape for k, v in UNetModel(back).state_dict().items()} == {
            k: v.shape for k, v in ours.state_dict().items()}
    assert convert_diffusers_unet_state_dict(ref.state_dict(), back).keys() == ours.state_dict().keys()


# the real models' diffusers configs (stabilityai/stable-diffusion-xl-base-1.0, -refiner-1.0,
# stable-diffusion-2-1: unet/config.json), the entries that shape the network
REAL = {
    "sdxl_base": (UNetConfig.sdxl_base, 256, {
        "block_out_channels": [320, 640, 1280], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
        "addition_embed_type_num_heads": 64, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 128}),
    "sdxl_refiner": (UNetConfig.sdxl_refiner, 256, {
        "block_out_channels": [384, 768, 1536, 1536],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560, "layers_per_block": 2, "sample_size": 128}),
    "sd21": (UNetConfig.sd21, None, {
        "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
        "use_linear_projection": True, "layers_per_block": 2, "sample_size": 96}),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_read_as_our_presets(name: str) -> None:
    preset, size_dim, real = REAL[name]
    cfg = from_diffusers_unet_config(real)
    assert diffusers_size_embed_dim(real) == size_dim
    with torch.device("meta"):
        ours = UNetModel(cfg).state_dict()
        want = UNetModel(preset()).state_dict()
        ref = UNet2DConditionModel(**real).state_dict()
        ref_ours = UNet2DConditionModel(**to_diffusers_unet_config(preset(), size_embed_dim=size_dim)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in want.items()}
    kmap = unet_key_map(preset())
    assert sorted(kmap.values()) == sorted(ref) == sorted(ref_ours)
    assert all(want[k].shape == ref[v].shape for k, v in kmap.items())
    if name == "sdxl_base":
        assert cfg == preset()  # (0, 2, 10), SGM's own spelling


def test_unrepresentable_unet_configs_raise_clear_errors() -> None:
    from opensd.checkpoints.keymap_unet import DiffusersConfigError

    base = to_diffusers_unet_config(XL_UNET, size_embed_dim=SIZE_DIM)
    with pytest.raises(DiffusersConfigError, match="addition_embed_type='image'"):
        from_diffusers_unet_config(dict(base, addition_embed_type="image"))
    with pytest.raises(DiffusersConfigError, match="addition_time_embed_dim"):
        from_diffusers_unet_config(dict(base, addition_time_embed_dim=None))
    with pytest.raises(DiffusersConfigError, match="need addition_embed_type"):
        from_diffusers_unet_config(dict(base, addition_embed_type=None))
    with pytest.raises(DiffusersConfigError, match="transformer_layers_per_block"):
        from_diffusers_unet_config(dict(base, transformer_layers_per_block=[1, 0, 2]))
    with pytest.raises(DiffusersConfigError, match="size_embed_dim"):
        to_diffusers_unet_config(XL_UNET)
    with pytest.raises(DiffusersConfigError, match="middle block"):
        to_diffusers_unet_config(dataclasses.replace(XL_UNET, transformer_depth_middle=5), size_embed_dim=8)
