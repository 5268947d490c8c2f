"""The U-Net equals diffusers' UNet2DConditionModel, and its keys equal the SD 1.5 checkpoint's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opensd.checkpoints.keymap_unet import (
    convert_diffusers_unet_state_dict,
    from_diffusers_unet_config,
    to_diffusers_unet_config,
    unet_key_map,
)
from opensd.models.unet import UNetConfig, UNetModel

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

SD15_DIFFUSERS = dict(
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    cross_attention_dim=768,
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    sample_size=64,
)

# 2 res blocks, 3 levels, attention everywhere, SD2-style head width, linear projections, depth 2
WIDE = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(0, 1, 2),
    head_channels=16,
    transformer_depth=2,
    context_dim=24,
    norm_groups=8,
    use_linear_in_transformer=True,
)
# attention only at the coarse levels, downsampling from level 0 without attention
MIXED = dataclasses.replace(WIDE, attention_levels=(1,), head_channels=None, num_heads=2,
                            use_linear_in_transformer=False, transformer_depth=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is as fast, and steady when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference_and_ours(cfg: UNetConfig) -> tuple[UNet2DConditionModel, UNetModel]:
    """A diffusers U-Net with every parameter (norms, biases included) randomized,
    and our model holding the same weights through the key map (strict load)."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**to_diffusers_unet_config(cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))  # default init + noise: no zero or unit tensor left
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(convert_diffusers_unet_state_dict(ref.state_dict(), cfg), strict=True)
    return ref, ours


@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), WIDE, MIXED], ids=["tiny", "wide", "mixed"])
def test_parity_with_diffusers(cfg: UNetConfig) -> None:
    ref, ours = _reference_and_ours(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=g)
    context = torch.randn(3, 7, cfg.context_dim, generator=g)
    cases = [
        torch.tensor([10.0, 500.5, 999.0]),  # distinct, one non-integer
        torch.tensor([1, 250, 981]),  # int timesteps
        torch.tensor(321.25),  # scalar broadcast to the batch
    ]
    with torch.no_grad():
        for t in cases:
            want = ref(x, t, context).sample
            got = ours(x, t, context)
            assert got.shape == want.shape == (3, cfg.out_channels, 16, 16)
            assert want.abs().max() > 0.1  # a meaningful output, not ~0
            assert (got - want).abs().max().item() <= 1e-4
        # the timestep and the text context both change the output
        base = ours(x, cases[0], context)
        assert (ours(x, cases[0] + 1.0, context) - base).abs().max() > 1e-4
        assert (ours(x, cases[0], context.flip(0)) - base).abs().max() > 1e-3


def test_parity_odd_latent_size() -> None:
    """Sizes not divisible by 4: downsampling rounds up, upsampling meets the skip's size."""
    ref, ours = _reference_and_ours(WIDE)
    torch.manual_seed(2)
    x = torch.randn(2, 4, 13, 11)
    t = torch.tensor([3.0, 700.0])
    context = torch.randn(2, 5, WIDE.context_dim)
    with torch.no_grad():
        want = ref(x, t, context).sample
        got = ours(x, t, context)
    assert got.shape == (2, 4, 13, 11)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), UNetConfig.small(), WIDE, MIXED, UNetConfig.sd15()])
def test_key_map_matches_both_models(cfg: UNetConfig) -> None:
    with torch.device("meta"):
        ours = UNetModel(cfg).state_dict()
        ref = UNet2DConditionModel(**to_diffusers_unet_config(cfg)).state_dict()
    key_map = unet_key_map(cfg)
    assert set(key_map) == set(ours)
    assert sorted(key_map.values()) == sorted(ref)  # a bijection onto diffusers' keys
    for k, v in key_map.items():
        assert ours[k].shape == ref[v].shape, k


def test_config_round_trips_through_diffusers() -> None:
    for cfg in (UNetConfig.sd15(), UNetConfig.tiny(), UNetConfig.small(), WIDE, MIXED):
        d = to_diffusers_unet_config(cfg)
        assert from_diffusers_unet_config(d) == cfg
        with torch.device("meta"):
            full = dict(UNet2DConditionModel(**d).config)  # every diffusers entry, defaults included
        assert from_diffusers_unet_config(full) == cfg
    assert from_diffusers_unet_config(SD15_DIFFUSERS) == UNetConfig.sd15()
    sd2 = dict(SD15_DIFFUSERS, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
               use_linear_projection=True)
    assert from_diffusers_unet_config(sd2) == UNetConfig(head_channels=64, context_dim=1024,
                                                         use_linear_in_transformer=True)
    assert to_diffusers_unet_config(UNetConfig(head_channels=64))["attention_head_dim"] == [5, 10, 20, 20]


def test_config_dict_round_trip() -> None:
    from opensd.config import ConfigError, from_dict, to_dict

    for cfg in (UNetConfig.sd15(), UNetConfig.small(), WIDE):
        assert from_dict(UNetConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="norm_groups"):
        from_dict(UNetConfig, dict(to_dict(UNetConfig.tiny()), norm_groups=5))


def test_sd15_layout_equals_diffusers_single_file_conversion() -> None:
    cfg = UNetConfig.sd15()
    with torch.device("meta"):
        ours = UNetModel(cfg)
        ref = UNet2DConditionModel(**SD15_DIFFUSERS)
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    sd = ours.state_dict()
    assert len(sd) == 686
    ours_d = to_diffusers_unet_config(cfg)
    for k, v in SD15_DIFFUSERS.items():
        assert ours_d[k] == (list(v) if isinstance(v, tuple) else v), k

    # diffusers' own converter, fed our state dict as an original single file
    original = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    converted = convert_ldm_unet_checkpoint(original, dict(SD15_DIFFUSERS))
    want = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == want
    # no input tensor was left unused: the converted values are exactly our 686 tensors
    used = {id(v) for v in converted.values()}
    assert {k for k, v in sd.items() if id(v) not in used} == set()
    assert len(used) == len(sd)

    # our key map renames exactly as diffusers' converter does
    by_id = {id(v): k for k, v in converted.items()}
    assert {k: by_id[id(v)] for k, v in sd.items()} == unet_key_map(cfg)


def test_bad_config_and_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(model_channels=30)
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(num_heads=7)
    with pytest.raises(ValueError, match="head_channels"):
        UNetConfig(head_channels=48)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(0, 4))
    with pytest.raises(ValueError, match="channel_mult"):
        UNetConfig(channel_mult=())
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetConfig(num_res_blocks=0)
    with pytest.raises(ValueError, match="addition_embed_type"):
        from_diffusers_unet_config(dict(SD15_DIFFUSERS, addition_embed_type="text_time"))
    with pytest.raises(ValueError, match="down_block_types"):
        from_diffusers_unet_config(dict(SD15_DIFFUSERS, down_block_types=["SimpleCrossAttnDownBlock2D"] * 4))
    with pytest.raises(ValueError, match="unsupported entries"):
        from_diffusers_unet_config(dict(SD15_DIFFUSERS, frobnicate=1))

    model = UNetModel(UNetConfig.tiny())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 8, 8), t, c)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), c)
    with pytest.raises(ValueError, match="context"):
        model(x, t, torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="missing"):
        convert_diffusers_unet_state_dict({}, UNetConfig.tiny())
