"""The family benchmark cases (benchmarks/families.py) compare like with like.

Tiny U-Nets of the SD 2.1 and SDXL shapes go through the same path as the full-size
cases: diffusers' config from ``create_unet_diffusers_config_from_ldm``, weights through
``convert_ldm_unet_checkpoint`` into one shared copy; both sides must then agree to
1e-4 in fp32, and the pre-timing check must stop a case whose sides disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import families  # noqa: E402
from harness import Row, Settings  # noqa: E402

from opensd.models.unet import UNetConfig, UNetModel  # noqa: E402


def settings(**kw) -> Settings:
    base = dict(device=torch.device("cpu"), dtype=torch.float32, dtype_name="fp32", compile=False, compile_mode="default",
                quick=True, repeats=1, threads=1, memory_size=64, memory_steps=1, unet_size=64)
    return Settings(**{**base, **kw})


def tiny_sdxl() -> UNetConfig:
    # context 1280 makes diffusers' converter pick SDXL's text_time embedding; y = pooled (32) + 6 x 256
    return UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=16,
                      transformer_depth=(0, 2), context_dim=1280, use_linear_in_transformer=True,
                      adm_in_channels=32 + 6 * 256, norm_groups=8)


def tiny_sd21() -> UNetConfig:
    return UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), head_channels=16,
                      context_dim=64, use_linear_in_transformer=True, norm_groups=8)


def both(cfg: UNetConfig):
    s = settings()
    ours = families.build(lambda: UNetModel(cfg), s, native=True)
    with torch.no_grad():  # random biases and zero-initialized output layers made non-trivial
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = families.diffusers_unet_from_ldm(ours, cfg, image_size=64)
    inputs = families.unet_inputs(cfg, 8, s)
    with torch.no_grad():
        a = ours(inputs["x"], inputs["t"], inputs["context"], inputs["y"])
        b = ref(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], added_cond_kwargs=inputs["added"]).sample
    return ours, ref, a, b


@pytest.mark.parametrize("make", [tiny_sdxl, tiny_sd21], ids=["sdxl", "sd21"])
def test_converted_diffusers_unet_agrees_and_shares_weights(make):
    cfg = make()
    ours, ref, a, b = both(cfg)
    assert families.shares_storage(ours, ref)
    assert a.abs().max() > 1e-2  # a real output, not zeros
    assert (a - b).abs().max().item() <= 1e-4
    if cfg.adm_in_channels is not None:
        assert ref.config.addition_embed_type == "text_time"


def test_y_matters_on_both_sides():
    """A different size vector changes both outputs alike: y reaches diffusers' add_embedding too."""
    cfg = tiny_sdxl()
    ours, ref, a, b = both(cfg)
    s = settings()
    inputs = families.unet_inputs(cfg, 8, s)
    inputs["added"]["time_ids"][:, 0] = 1024.0  # a different original height
    y = torch.cat([inputs["added"]["text_embeds"],
                   families_size(inputs["added"]["time_ids"])], dim=1)
    with torch.no_grad():
        a2 = ours(inputs["x"], inputs["t"], inputs["context"], y)
        b2 = ref(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], added_cond_kwargs=inputs["added"]).sample
    assert (a2 - a).abs().max() > 1e-3
    assert (a2 - b2).abs().max().item() <= 1e-4


def families_size(time_ids: torch.Tensor) -> torch.Tensor:
    from opensd.models.layers import timestep_embedding

    return timestep_embedding(time_ids.flatten(), families.TIME_EMBED).reshape(time_ids.shape[0], -1)


def test_agreement_check_stops_a_broken_comparison():
    s = settings()
    row = Row("sdxl_unet", "x", "it/s", 1.0)
    check = families.agreement(row, s)
    a = torch.randn(2, 4, 8, 8)
    check(a, a + 1e-4)  # within fp32's 1e-3 relative
    assert row.max_abs_diff == pytest.approx(1e-4, rel=0.05) and row.extra["finite"]
    with pytest.raises(RuntimeError, match="disagree"):
        check(a, a + 0.5)
    with pytest.raises(RuntimeError, match="disagree"):
        check(torch.full_like(a, float("nan")), a)


def test_ldm_params_refuse_what_diffusers_cannot_express():
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), head_channels=16, transformer_depth=(0, 2),
                     transformer_depth_middle=1, context_dim=64, use_linear_in_transformer=True, norm_groups=8)
    with pytest.raises(ValueError, match="middle depth"):
        families.ldm_unet_params(cfg)


def test_whole_case_runs_on_a_tiny_config():
    row, = families.run_unet_case(families._cases()["sdxl_unet"], settings(), cfg=tiny_sdxl())
    assert row.max_abs_diff is not None and row.max_abs_diff <= 1e-4
    assert row.extra["shared_storage"] and row.extra["unet_flops_per_call"] > 0
    assert len(row.opensd_s) == len(row.diffusers_s) == 1
    assert "guided step 64² (batch 2, y)" in row.what
