"""ControlNet proven equal to diffusers on identical tiny random weights: the model, whole
StableDiffusionControlNetPipeline runs (one ControlNet, two with weights, start/end, guess
mode, img2img), the loader's layouts and errors, and bit-identity without control."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import randomize, tiny_clip_bundle
from PIL import Image

import opensd
from opensd.checkpoints.controlnet import (
    ControlNetError,
    controlnet_config_for,
    load_controlnet,
    save_controlnet,
    save_controlnet_diffusers,
)
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.io import CheckpointError, write_safetensors
from opensd.checkpoints.keymap_controlnet import original_to_diffusers
from opensd.models.controlnet import ControlNet
from opensd.models.unet import ControlResiduals
from opensd.pipelines.control import ControlMode, ControlRun, ControlUnit, controlnet_for
from opensd.pipelines.request import RequestError

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
SIZE = 32
HINT = (16, 32)  # one halving: the tiny VAE's factor 2


def _net(cfg, seed: int) -> ControlNet:
    torch.manual_seed(seed)
    return randomize(ControlNet(controlnet_config_for(cfg, HINT)), seed, scale=0.1).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    model, tok = tiny_clip_bundle(seed=3)
    root = tmp_path_factory.mktemp("controlnet")
    save_diffusers(model, tok, root / "sd")
    for i, seed in enumerate((11, 12)):
        net = _net(model.cfg, seed)
        save_controlnet(net, root / f"cn{i}.safetensors")
        save_controlnet_diffusers(net, root / f"cn{i}")
    return root


@pytest.fixture(scope="module")
def ours(root):
    return opensd.load(root / "sd")


@pytest.fixture(scope="module")
def nets(ours, root):
    return [controlnet_for(ours, root / f"cn{i}.safetensors") for i in range(2)]


@pytest.fixture(scope="module")
def reference(root):
    from diffusers import ControlNetModel, StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(root / "sd", local_files_only=True)
    cns = [ControlNetModel.from_pretrained(root / f"cn{i}", local_files_only=True).eval() for i in range(2)]
    return sd, cns


def _pipe(reference, controlnet, sampler: str, cls_name: str = "StableDiffusionControlNetPipeline"):
    import diffusers as d

    sd, _ = reference
    pipe = getattr(d, cls_name)(**{**sd.components, "controlnet": controlnet})
    pipe.set_progress_bar_config(disable=True)
    schedulers = {
        "euler": (d.EulerDiscreteScheduler, {}),
        "dpmpp_2m": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "ddim": (d.DDIMScheduler, {}),
    }
    cls, extra = schedulers[sampler]
    pipe.scheduler = cls.from_config(sd.scheduler.config, **extra)
    return pipe


def _hint(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _latents(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


def _np(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


TOL = 1e-3 + 0.5 / 255  # ours are 8-bit PNGs, diffusers' floats: 1e-3 beyond the rounding


def _txt2img(ours, units, sampler="euler", steps=10, seed=1):
    return _np(ours.txt2img(PROMPT, NEGATIVE, steps=steps, sampler=sampler, cfg_scale=7.5, width=SIZE, height=SIZE,
                            latents=_latents(seed), control=units))


def _reference_txt2img(pipe, image, sampler_steps=10, seed=1, **kw):
    return pipe(PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=sampler_steps, guidance_scale=7.5,
                height=SIZE, width=SIZE, latents=_latents(seed), output_type="np", **kw).images


# ----------------------------------------------------------------------------- the network


def test_controlnet_model_matches_diffusers(nets, reference) -> None:
    _, cns = reference
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    t, ctx = torch.tensor([13.0, 777.0]), torch.randn(2, 77, nets[0].model.cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        mine = nets[0].model(x, hint, t, ctx)
        down, mid = cns[0](x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    assert len(mine.skips) == len(down) == nets[0].model.cfg.outputs - 1
    for a, b in zip([*mine.skips, mine.middle], [*down, mid], strict=True):
        assert a.shape == b.shape and a.abs().max() > 1e-3  # residuals that matter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_layout_loads_the_same_weights(ours, root, tmp_path) -> None:
    want = load_controlnet(root / "cn0.safetensors", ours.cfg).model.state_dict()
    save_controlnet(load_controlnet(root / "cn0", ours.cfg).model, tmp_path / "bare.safetensors", prefix=False)
    torch.save({"state_dict": {f"control_model.{k}": v for k, v in want.items()}}, tmp_path / "cn.pth")
    cfg = load_controlnet(root / "cn0", ours.cfg).model.cfg
    write_safetensors(original_to_diffusers(want, cfg), tmp_path / "diffusers-layout.safetensors")
    for path in (root / "cn0", tmp_path / "bare.safetensors", tmp_path / "cn.pth", tmp_path / "diffusers-layout.safetensors"):
        got = load_controlnet(path, ours.cfg)
        assert got.model.state_dict().keys() == want.keys()
        assert all(torch.equal(got.model.state_dict()[k], want[k]) for k in want), path
    assert load_controlnet(root / "cn0", ours.cfg).format == "diffusers"
    assert load_controlnet(root / "cn0.safetensors", ours.cfg).title.startswith("cn0 [")


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_txt2img_matches_diffusers(ours, nets, reference, sampler) -> None:
    image = _hint(0)
    ref = _reference_txt2img(_pipe(reference, reference[1][0], sampler), image, controlnet_conditioning_scale=0.8)
    mine = _txt2img(ours, [ControlUnit(nets[0], image, weight=0.8)], sampler)
    assert np.abs(mine - ref).max() <= TOL
    plain = _txt2img(ours, None, sampler)
    assert np.abs(mine - plain).max() > 0.05  # the control changes the image: the comparison can fail


def test_two_controlnets_with_weights_match_multicontrolnet(ours, nets, reference) -> None:
    images = [_hint(1), _hint(2)]
    ref = _reference_txt2img(_pipe(reference, list(reference[1]), "euler"), images, controlnet_conditioning_scale=[0.6, 1.4])
    mine = _txt2img(ours, [ControlUnit(nets[0], images[0], weight=0.6), ControlUnit(nets[1], images[1], weight=1.4)])
    assert np.abs(mine - ref).max() <= TOL
    one = _txt2img(ours, [ControlUnit(nets[0], images[0], weight=0.6)])
    assert np.abs(mine - one).max() > 0.05


def test_guidance_start_and_end_step_as_diffusers(ours, nets, reference) -> None:
    # A1111's end e keeps step i while i / n <= e; diffusers' while (i + 1) / n <= e: its e is ours + 1/n.
    image = _hint(3)
    ref = _reference_txt2img(_pipe(reference, reference[1][0], "euler"), image, control_guidance_start=0.2,
                             control_guidance_end=0.55)
    mine = _txt2img(ours, [ControlUnit(nets[0], image, start=0.2, end=0.45)])
    assert np.abs(mine - ref).max() <= TOL
    assert np.abs(mine - _txt2img(ours, [ControlUnit(nets[0], image)])).max() > 0.02
    assert np.abs(mine - _txt2img(ours, None)).max() > 0.02


def test_steps_counted_as_a1111(ours, nets) -> None:
    unit = ControlUnit(nets[0], _hint(0), start=0.2, end=0.45)
    run = ControlRun.prepare(ours, ours.request(PROMPT, steps=10, width=SIZE, height=SIZE), [unit], None)
    active = []
    for step in range(10):
        run.step = step
        active.append(run.active(unit))
    assert active == [False, False, True, True, True] + [False] * 5


def test_guess_mode_matches_diffusers(ours, nets, reference) -> None:
    image = _hint(4)
    ref = _reference_txt2img(_pipe(reference, reference[1][0], "dpmpp_2m"), image, guess_mode=True)
    mine = _txt2img(ours, [ControlUnit(nets[0], image, mode=ControlMode.GUESS)], "dpmpp_2m")
    assert np.abs(mine - ref).max() <= TOL
    assert np.abs(mine - _txt2img(ours, [ControlUnit(nets[0], image)], "dpmpp_2m")).max() > 0.02


def test_img2img_matches_diffusers(ours, nets, reference) -> None:
    init, image = _hint(5), _hint(6)
    pipe = _pipe(reference, reference[1][0], "ddim", "StableDiffusionControlNetImg2ImgPipeline")
    ref = pipe(PROMPT, image=init, control_image=image, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
               negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(42), output_type="np",
               controlnet_conditioning_scale=1.0).images  # its default is 0.8
    mine = _np(ours.img2img(init, PROMPT, NEGATIVE, strength=0.6, steps=10, sampler="ddim", seed=42,
                            control=[ControlUnit(nets[0], image)]))
    assert np.abs(mine - ref).max() <= TOL
    plain = _np(ours.img2img(init, PROMPT, NEGATIVE, strength=0.6, steps=10, sampler="ddim", seed=42))
    assert np.abs(mine - plain).max() > 0.05


# ----------------------------------------------------------------------------- without control


def test_without_control_the_unet_and_the_pipeline_are_bit_identical(ours, nets) -> None:
    unet = ours.model.unet
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5.0, 500.0]), torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    with torch.no_grad():
        base = unet(x, t, ctx)
        res = nets[0].model(x, torch.rand(2, 3, 32, 32, generator=g), t, ctx)
        zeros = ControlResiduals(tuple(torch.zeros_like(r) for r in res.skips), torch.zeros_like(res.middle))
        assert torch.equal(unet(x, t, ctx, control=None), base)
        assert torch.equal(unet(x, t, ctx, control=zeros), base)
        assert not torch.allclose(unet(x, t, ctx, control=res), base)
    plain = ours.txt2img(PROMPT, NEGATIVE, steps=4, sampler="euler", width=SIZE, height=SIZE, seed=3)
    for control in ([], [ControlUnit(nets[0], _hint(0), start=1.0, end=1.0)]):  # none, or one that never acts
        got = ours.txt2img(PROMPT, NEGATIVE, steps=4, sampler="euler", width=SIZE, height=SIZE, seed=3, control=control)
        assert np.array_equal(np.asarray(got[0]), np.asarray(plain[0]))
        assert got[0].info["parameters"].split("ControlNet 0")[0].rstrip(", ") == plain[0].info["parameters"]


def test_with_a_refiner_the_control_stays_with_the_base(ours, nets, root) -> None:
    refiner = opensd.load(root / "sd")
    unit = ControlUnit(nets[0], _hint(0))
    kw = dict(steps=6, sampler="euler", width=SIZE, height=SIZE, seed=2, refiner=refiner, refiner_switch_at=0.5)
    both = _np(ours.txt2img(PROMPT, NEGATIVE, control=[unit], **kw))
    # the same run with the control's window ending before the switch: the refiner's steps never see it
    early = _np(ours.txt2img(PROMPT, NEGATIVE, control=[dataclasses.replace(unit, end=0.49)], **kw))
    assert np.abs(both - _np(ours.txt2img(PROMPT, NEGATIVE, **kw))).max() > 0.02
    assert np.abs(both - early).max() <= TOL


def test_infotext_names_each_unit(ours, nets) -> None:
    units = [ControlUnit(nets[0], _hint(0), weight=0.5, preprocessor="canny", mode=1),
             ControlUnit(nets[1], _hint(1), start=0.1, end=0.9, resize="fill")]
    text = ours.txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, seed=1, control=units)[0].info["parameters"]
    assert ('ControlNet 0: "Module: canny, Model: cn0 [' in text and "Weight: 0.5" in text
            and "Control Mode: My prompt is more important" in text)
    assert 'ControlNet 1: "Module: none, Model: cn1 [' in text and "Guidance Start: 0.1, Guidance End: 0.9" in text
    assert "Resize Mode: Resize and Fill" in text


# ----------------------------------------------------------------------------- control modes


def _residuals(ours, net, mode, rows):
    unit = ControlUnit(net, _hint(0), weight=0.7, mode=mode)
    run = ControlRun.prepare(ours, ours.request(PROMPT, steps=4, width=SIZE, height=SIZE), [unit], None)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(4, 4, 16, 16, generator=g), torch.full((4,), 300.0), torch.randn(4, 77, net.model.cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        raw = net.model(x, run.hints[0].expand(4, -1, -1, -1), t, ctx)
        return raw, run.residuals(x, t, ctx, None, rows)


def test_control_modes_scale_and_route_as_a1111(ours, nets) -> None:
    rows = torch.tensor([0.0, 0.0, 1.0, 1.0])  # [uncond; cond], as the guidance batches them
    raw, res = _residuals(ours, nets[0], "balanced", rows)
    assert all(torch.allclose(r, 0.7 * a) for r, a in zip(res.skips, raw.skips, strict=True))
    raw, res = _residuals(ours, nets[0], "My prompt is more important", rows)
    m = len(raw.skips) + 1
    for i, (r, a) in enumerate(zip([*res.skips, res.middle], [*raw.skips, raw.middle], strict=True)):
        assert torch.allclose(r, 0.7 * 0.825 ** (m - 1 - i) * a)
    raw, res = _residuals(ours, nets[0], 2, rows)  # ControlNet is more important: the conditional rows only
    for i, (r, a) in enumerate(zip([*res.skips, res.middle], [*raw.skips, raw.middle], strict=True)):
        assert torch.equal(r[:2], torch.zeros_like(r[:2])) and r[2:].abs().max() > 0
        # the ControlNet ran on the two conditional rows alone: equal up to the kernels' batch-dependent rounding
        torch.testing.assert_close(r[2:], 0.7 * 0.825 ** (m - 1 - i) * a[2:], rtol=1e-4, atol=1e-5)


def test_unit_settings_are_checked(nets) -> None:
    for kwargs, message in [
        ({"weight": 2.5}, "control weight must be a number from 0 to 2"),
        ({"start": 0.8, "end": 0.2}, "must not be after its end"),
        ({"end": 1.5}, "guidance end must be a fraction from 0 to 1"),
        ({"mode": "loud"}, "unknown control mode 'loud'; allowed: 'Balanced'"),
        ({"resize": "stretch"}, "unknown control resize mode 'stretch'; allowed: 'Just Resize'"),
        ({"preprocessor": "depth_midas"}, "unknown control preprocessor 'depth_midas'; known: none, canny"),
    ]:
        with pytest.raises(opensd.errors.OpenSDError, match=message):
            ControlUnit(nets[0], _hint(0), **kwargs)
    assert ControlMode.parse(0) is ControlMode.BALANCED and ControlMode.parse("guess") is ControlMode.GUESS


def test_unit_without_image_needs_an_init_image(ours, nets) -> None:
    with pytest.raises(RequestError, match="without an image needs an img2img or inpaint image"):
        ours.txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, control=[ControlUnit(nets[0])])
    ours.img2img(_hint(7), PROMPT, steps=2, seed=1, control=[ControlUnit(nets[0], preprocessor="canny")])


def test_a_controlnet_for_another_model_is_refused_at_request_time(ours, nets) -> None:
    other = ControlNet(dataclasses.replace(nets[0].model.cfg, unet=dataclasses.replace(nets[0].model.cfg.unet, context_dim=48)))
    with pytest.raises(RequestError, match="made for another U-Net"):
        ours.txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, control=[ControlUnit(other, _hint(0))])
    coarse = ControlNet(dataclasses.replace(nets[0].model.cfg, hint_block_channels=(16, 32, 96)))  # x4, not the VAE's x2
    with pytest.raises(RequestError, match="made for another U-Net or VAE"):
        ours.txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, control=[ControlUnit(coarse, _hint(0))])
    half = load_controlnet(nets[0].path, ours.cfg, dtype=torch.bfloat16)
    with pytest.raises(RequestError, match="torch.bfloat16.*controlnet_for"):
        ours.txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, control=[ControlUnit(half, _hint(0))])


# ----------------------------------------------------------------------------- loader errors


def _save_net(cfg, path, **unet_changes):
    net = ControlNet(dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, **unet_changes)) if unet_changes else cfg)
    return save_controlnet(net, path)


def test_controlnets_for_another_family_or_width_are_one_line(ours, nets, tmp_path) -> None:
    cfg = nets[0].model.cfg
    cases = [
        (_save_net(cfg, tmp_path / "sd2.safetensors", context_dim=1024),
         r"sd2\.safetensors is a ControlNet for SD 2\.x \(input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight: "
         r"\(64, 1024\), context width 1024\); the model is sd1 \(context width 32\)"),
        (_save_net(cfg, tmp_path / "wide.safetensors", model_channels=64, norm_groups=8),
         r"wide\.safetensors: input_blocks\.0\.0\.weight is \(64, 4, 3, 3\).*another width"),
        (_save_net(cfg, tmp_path / "linear.safetensors", use_linear_in_transformer=True),
         r"ControlNet .*linear\.safetensors does not fit the model: .*wrong shape.*proj_in\.weight: \(64, 64\) vs \(64, 64, 1, 1\)"),
        (save_controlnet(ControlNet(dataclasses.replace(cfg, hint_block_channels=(16, 32, 96, 256))), tmp_path / "f8.safetensors"),
         r"f8\.safetensors: its hint block halves the control image 3 time\(s\) \(x8\) but the model's VAE downsamples x2"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as e:
            load_controlnet(path, ours.cfg)
        assert "\n" not in str(e.value)


def test_files_that_are_no_controlnet_are_one_line(ours, root, tmp_path) -> None:
    write_safetensors({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    write_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "sd.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    for path, message in [
        (tmp_path / "lora.safetensors", "is not a ControlNet: it has no input_hint_block"),
        (tmp_path / "sd.safetensors", "is a Stable Diffusion model, not a ControlNet"),
        (tmp_path / "notes.txt", "not a ControlNet file; give a .safetensors"),
        (tmp_path / "folder", "is a folder but no diffusers ControlNet"),
        (tmp_path / "missing.safetensors", "ControlNet not found"),
    ]:
        with pytest.raises(ControlNetError, match=message):
            load_controlnet(path, ours.cfg)
    from opensd.models.stable_diffusion import ModelFamily, SDConfig

    with pytest.raises(ControlNetError, match="ControlNets for sdxl models are not supported yet"):
        load_controlnet(root / "cn0", SDConfig.tiny(ModelFamily.SDXL))


def test_a_diffusers_folder_for_another_model_names_the_difference(ours, nets, tmp_path) -> None:
    cfg = nets[0].model.cfg
    save_controlnet_diffusers(ControlNet(dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, context_dim=1024))), tmp_path / "sd2")
    with pytest.raises(ControlNetError, match=r"describes a ControlNet for SD 2\.x, not this sd1 model: context_dim 1024 \(file\) vs 32"):
        load_controlnet(tmp_path / "sd2", ours.cfg)


@pytest.mark.parametrize("change, message", [
    ({"controlnet_conditioning_channel_order": "bgr"}, "controlnet_conditioning_channel_order='bgr' is not supported"),
    ({"global_pool_conditions": True}, "global_pool_conditions=true .* is not supported"),
    ({"block_out_channels": None}, "unsupported configuration"),
    ({"down_block_types": 5}, "unsupported configuration"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
])
def test_a_diffusers_config_opensd_cannot_run_is_one_line(ours, root, tmp_path, change, message) -> None:
    import json
    import shutil

    folder = shutil.copytree(root / "cn0", tmp_path / "cn")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as e:
        load_controlnet(folder, ours.cfg)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
