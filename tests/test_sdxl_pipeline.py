"""SDXL in the pipeline and the CLI: float16 VAE upcast, Turbo's schedule, native-size tiling, the options."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_family_model
from typer.testing import CliRunner

from opensd.checkpoints import LoadedModel
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.diffusion import DiscreteSchedule
from opensd.diffusion.registry import resolve_sampler
from opensd.diffusion.schedules import EULER_RULE, SigmaSpacing
from opensd.models.stable_diffusion import ModelFamily
from opensd.pipelines.infotext import parse_infotext, read_parameters
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.pipelines.vae_tiling import auto_tile_above, should_tile

runner = CliRunner()


def _pipe(family: ModelFamily, seed: int = 0, **kw) -> StableDiffusionPipeline:
    model, tok = tiny_family_model(family, seed)
    return StableDiffusionPipeline(LoadedModel(model, tok, family.value, Path("."), "opensd", "0" * 10), **kw)


# ----------------------------------------------------------------------------- float16 VAE


def _overflowing_fp16_sdxl() -> StableDiffusionPipeline:
    """A tiny SDXL pipeline in float16 whose VAE's first convolutions exceed 65504 (as SDXL's VAE does)."""
    model, tok = tiny_family_model(ModelFamily.SDXL)
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(1e5)
        model.vae.encoder.conv_in.weight.mul_(1e5)
    return StableDiffusionPipeline(LoadedModel(model, tok, "xl", Path("."), "opensd", "0" * 10), dtype=torch.float16)


def test_float16_sdxl_vae_decodes_in_float32() -> None:
    pipe = _overflowing_fp16_sdxl()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    plain = StableDiffusionPipeline(pipe.loaded, vae_upcast=False)
    assert not plain.codec.upcasts() and not torch.isfinite(plain.decode_latents(latents)).all()  # the overflow is real
    assert pipe.codec.upcasts()
    out = pipe.decode_latents(latents)
    ref_vae = copy.deepcopy(pipe.model.vae).float()  # the float16 weights, run in float32
    ref = ref_vae.decode(ref_vae.from_latent(latents.float()))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, ref)
    assert next(pipe.model.vae.parameters()).dtype == torch.float16  # the shared model keeps its dtype
    assert pipe.codec.vae() is pipe.codec.vae()  # one copy, kept


def test_float16_sdxl_vae_encodes_in_float32_and_generates_finite_images() -> None:
    pipe = _overflowing_fp16_sdxl()
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    posterior = pipe.encode_pixels(pixels.half())
    ref_vae = copy.deepcopy(pipe.model.vae).float()
    assert posterior.moments.dtype == torch.float16 and torch.isfinite(posterior.moments).all()
    assert torch.equal(posterior.moments, ref_vae.encode(pixels.half().float()).moments.half())
    assert not torch.isfinite(StableDiffusionPipeline(pipe.loaded, vae_upcast=False).encode_pixels(pixels.half()).moments).all()
    image = pipe.txt2img("a red circle", steps=1, seed=1, cfg_scale=1.0)[0]
    assert np.asarray(image).std() > 0  # not the black image of a NaN decode


def test_every_float16_vae_is_upcast_unless_refused() -> None:
    sd1 = _pipe(ModelFamily.SD1, dtype=torch.float16)  # SD 1.x's VAE overflows float16 too (diffusers' force_upcast)
    assert sd1.codec.upcasts() and sd1.codec.vae() is not sd1.model.vae
    refused = StableDiffusionPipeline(sd1.loaded, vae_upcast=False)
    assert not refused.codec.upcasts() and refused.codec.vae() is refused.model.vae
    assert not _pipe(ModelFamily.SDXL).codec.upcasts()  # float32: nothing to do
    assert not _pipe(ModelFamily.SD1, dtype=torch.bfloat16).codec.upcasts()  # bfloat16 has float32's range


# ----------------------------------------------------------------------------- Turbo


def test_sgm_uniform_starts_at_the_last_training_timestep() -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    s = DiscreteSchedule()
    for steps in (1, 2, 4, 8):
        sig = s.sigmas_for(steps, SigmaSpacing.SGM_UNIFORM, rule=EULER_RULE)
        expected_t = torch.linspace(999, 0, steps + 1)[:-1]  # A1111's sgm_uniform
        torch.testing.assert_close(s.sigma_to_t(sig[:-1]), expected_t, atol=2e-3, rtol=0)
        assert sig[-1] == 0 and len(sig) == steps + 1
    trailing = EulerAncestralDiscreteScheduler.from_config({**s.config.to_diffusers(), "timestep_spacing": "trailing"})
    trailing.set_timesteps(1)  # SDXL-Turbo's scheduler at one step: t = 999, as here
    torch.testing.assert_close(s.sigmas_for(1, SigmaSpacing.SGM_UNIFORM), trailing.sigmas.float(), atol=1e-5, rtol=0)
    assert resolve_sampler("Euler a SGM Uniform")[1] is SigmaSpacing.SGM_UNIFORM
    assert resolve_sampler("euler_a_sgm_uniform")[1] is SigmaSpacing.SGM_UNIFORM


def test_turbo_one_step_calls_the_network_once_at_t_999() -> None:
    pipe = _pipe(ModelFamily.SDXL)
    calls = []
    handle = pipe.model.unet.register_forward_pre_hook(lambda m, args: calls.append((args[1].tolist(), args[0].shape[0])))
    try:
        image = pipe.txt2img("a red circle", steps=1, sampler="Euler a SGM Uniform", cfg_scale=1.0, seed=1)[0]
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0][1] == 1  # cfg 1: no unconditional branch
    assert calls[0][0] == pytest.approx([999.0], abs=1e-3)
    fields = parse_infotext(image.info["parameters"])
    assert fields["Schedule type"] == "SGM Uniform" and fields["Sampler"] == "Euler a" and fields["CFG scale"] == "1.0"


# ----------------------------------------------------------------------------- tiling


def test_auto_tiling_scales_with_the_native_size() -> None:
    assert auto_tile_above() == 96 and auto_tile_above(64) == 96  # SD 1.x: above 768 px, as before
    assert auto_tile_above(128) == 192 and auto_tile_above(96) == 144  # SDXL's 1024 px never tiles by default
    assert auto_tile_above(4) == 96  # small models keep SD 1.x's rule
    assert not should_tile(128, 128, None, native=128) and should_tile(193, 8, None, native=128)
    assert should_tile(97, 8, None) and should_tile(97, 8, None, native=64)
    assert should_tile(8, 8, True, native=128) and not should_tile(400, 400, False, native=128)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, family in enumerate((ModelFamily.SDXL, ModelFamily.SDXL_REFINER, ModelFamily.SD1)):
        model, tok = tiny_family_model(family, seed)
        out[family.value] = save_opensd(model, tok, root / f"tiny-{family.value}")
    return out


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_cli_refiner_writes_a1111_fields(folders, tmp_path: Path) -> None:
    out = tmp_path / "r.png"
    res = invoke("generate", "a red circle", "-m", folders["sdxl"], "--refiner", folders["sdxl_refiner"], "--refiner-switch-at", 0.5,
                 "--steps", 4, "--seed", 1, "--aesthetic-score", 7, "--original-size", "64x48", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    fields = parse_infotext(read_parameters(out))
    assert fields["Size"] == "32x32"  # the family's native size (the tiny models': 32)
    assert fields["Refiner"].startswith("tiny-sdxl_refiner [") and fields["Refiner switch at"] == "0.5"


def test_cli_turbo_sets_what_was_not_given(folders, tmp_path: Path) -> None:
    res = invoke("generate", "a red circle", "-m", folders["sdxl"], "--turbo", "--seed", 1, "-o", tmp_path / "t.png", "-q")
    assert res.exit_code == 0, res.output
    fields = parse_infotext(read_parameters(tmp_path / "t.png"))
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"]) == ("1", "Euler a", "SGM Uniform", "1.0")
    res = invoke("generate", "a red circle", "-m", folders["sdxl"], "--turbo", "--steps", 2, "--sampler", "Euler", "--cfg-scale", 2,
                 "--seed", 1, "-o", tmp_path / "u.png", "-q")
    assert res.exit_code == 0, res.output
    fields = parse_infotext(read_parameters(tmp_path / "u.png"))
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"]) == ("2", "Euler", "SGM Uniform", "2.0")


@pytest.mark.parametrize("args, message", [
    (["--original-size", "64"], "--original-size must be HEIGHTxWIDTH"),
    (["--refiner-switch-at", "0.5"], "--refiner-switch-at needs --refiner"),
    (["--refiner", "{sdxl}"], "swap them"),
    (["--refiner", "{sd1}"], "a sd1 refiner cannot continue a sdxl_refiner model"),
])
def test_cli_errors_are_one_line(folders, tmp_path: Path, args, message) -> None:
    args = [a.format(sdxl=folders["sdxl"], sd1=folders["sd1"]) for a in args]
    res = invoke("generate", "a red circle", "-m", folders["sdxl_refiner"], *args, "--steps", 2, "--seed", 1, "-o", tmp_path / "e.png", "-q")
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.output
