"""``opensd train controlnet``: a ControlNet trained to steer a frozen model.

The ControlNet starts as the original does (the U-Net's encoder copied, zero convolutions
at zero: step 0 is the frozen model); its folder data follow the fine-tuning folders'
conventions; a run killed and resumed ends with the same weights as one that never
stopped; the export is an original ControlNet file that opensd's loader reads back to the
trained network and that diffusers' own converter and ``ControlNetModel`` run to the same
residuals.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize, tiny_family_model
from PIL import Image
from test_training import ENV, assert_states_equal, sigkill_resume_script
from typer.testing import CliRunner

from opensd.checkpoints.controlnet import load_controlnet, save_controlnet_diffusers
from opensd.checkpoints.io import read_weights
from opensd.checkpoints.opensd_format import save_opensd
from opensd.config import ConfigError
from opensd.models.stable_diffusion import ModelFamily, StableDiffusion
from opensd.models.vae import VAEConfig
from opensd.pipelines.preprocessors import MapKind
from opensd.training.config import stage_config_from_dict
from opensd.training.control_data import read_control_folder
from opensd.training.controlnet import ControlNetStage, ControlNetStageConfig, init_controlnet, scaled_outputs, strip_words
from opensd.training.data import TrainingDataError
from opensd.training.loop import list_checkpoints, run_stage
from opensd.training.unet import DiffusionLoss

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16  # pixels; the tiny VAE halves it


def save_tiny(folder: Path, vae: VAEConfig | None = None, size: int = SIZE) -> Path:
    model, tok = tiny_family_model(ModelFamily.SD1)
    model.cfg = model.cfg.replace(image_size=size)
    if vae is not None:  # another VAE: a fresh model of that config, randomised
        cfg = model.cfg.replace(vae=vae)
        torch.manual_seed(0)
        model = randomize(StableDiffusion(cfg), 0).eval()
    return save_opensd(model, tok, folder)


def _image(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def write_triples(folder: Path, n: int = 4, layout: str = "beside", seed: int = 0) -> Path:
    """``n`` random images with captions (``.txt``) and control images, beside (``x.control.png``) or under ``control/``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _image(rng).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red circle {i}")
        control = folder / (f"img{i}.control.png" if layout == "beside" else f"control/img{i}.png")
        control.parent.mkdir(exist_ok=True)
        _image(rng).save(control)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("cn-model") / "sd1")


@pytest.fixture(scope="module")
def triples(tmp_path_factory) -> Path:
    return write_triples(tmp_path_factory.mktemp("cn-data") / "data", n=6)


def cn_cfg(model: Path, data: Path, out: Path, steps: int = 3, size: int = SIZE, **extra) -> dict:
    train = {"out_dir": str(out), "steps": steps, "batch_size": 3, "lr": 1e-2, "warmup_steps": 0, "log_every": 1,
             "sample_every": 0, "checkpoint_every": 0, "progress": False, **extra.pop("train", {})}
    return {"model": str(model), "data": {"source": "folder", "path": str(data), "image_size": size}, "train": train,
            "eval_per_category": 0, "sample_images": 0, "sample_steps": 2, **extra}


def stage_of(cfg: dict, **kw) -> ControlNetStage:
    return ControlNetStage(stage_config_from_dict(ControlNetStageConfig, cfg), **kw)


def built(model: Path, data: Path, out: Path, **extra) -> tuple[ControlNetStage, torch.nn.Module]:
    from opensd.training.loop import _Trainer

    stage = stage_of(cn_cfg(model, data, out, **extra))
    trainer = _Trainer(stage, False, [], 0, 1, 0)
    trainer._setup()
    return stage, stage.ctx.modules["controlnet"]


# ----------------------------------------------------------------------------- the start


def test_the_controlnet_starts_as_the_unets_encoder_with_zero_convs(model, triples, tmp_path: Path) -> None:
    stage, loss = built(model, triples, tmp_path / "run")
    net, unet = loss.controlnet, stage.loaded.model.unet
    ref = unet.state_dict()
    copied = [k for k in net.state_dict() if not k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))]
    assert copied and all(torch.equal(net.state_dict()[k], ref[k]) for k in copied)
    assert {k.split(".")[0] for k in copied} == {"time_embed", "input_blocks", "middle_block"}
    zeros = [p for n, p in net.named_parameters() if n.startswith(("zero_convs.", "middle_block_out."))]
    assert len(zeros) == 2 * net.cfg.outputs and all(not p.any() for p in zeros)
    last = len(net.input_hint_block) - 1
    assert not net.input_hint_block[last].weight.any() and net.input_hint_block[0].weight.abs().sum() > 0
    # step 0 is the frozen model: the loss with the ControlNet equals the plain diffusion loss
    b = 2
    g = torch.Generator().manual_seed(0)
    x0, noise = stage.latents[:b], torch.randn(stage.latents[:b].shape, generator=g)
    t = torch.tensor([10, 900])
    cond = stage._unet_cond({k: v[:b] for k, v in stage.cond.items()})
    hint = stage.controls[:b].float() / 255
    with torch.no_grad():
        ours = loss(x0, cond, hint, t, noise)
        plain, _ = DiffusionLoss(unet, stage.loaded.model.cfg.schedule)(x0, cond, t, noise)
    assert torch.equal(ours, plain)
    assert set(stage.trainable()["controlnet"].parameters) == {f"controlnet.{n}" for n, _ in net.named_parameters()}
    # the hint block is drawn from train.seed
    other = init_controlnet(stage.loaded.model, seed=1)
    assert not torch.equal(other.input_hint_block[0].weight, net.input_hint_block[0].weight)
    assert torch.equal(init_controlnet(stage.loaded.model, seed=0).input_hint_block[0].weight, net.input_hint_block[0].weight)


def test_the_cubic_timesteps_favour_high_noise(model, triples, tmp_path: Path) -> None:
    stage, _ = built(model, triples, tmp_path / "run", timesteps="cubic")
    t = stage._timesteps(4000, torch.Generator().manual_seed(0))
    assert 0 <= int(t.min()) and int(t.max()) <= 999
    assert abs(float((t >= 500).float().mean()) - 0.5 ** (1 / 3)) < 0.03  # P(t >= T/2) = P(u^3 <= 1/2) = 0.79
    stage.cfg = dataclasses.replace(stage.cfg, timesteps=type(stage.cfg.timesteps)("uniform"))
    assert abs(float((stage._timesteps(4000, torch.Generator().manual_seed(0)) >= 500).float().mean()) - 0.5) < 0.03


def test_strip_words_removes_whole_words_in_any_case() -> None:
    assert strip_words("a Red circle above a blue square", ["red", "blue"]) == "a circle above a square"
    assert strip_words("a reddish circle", ["red"]) == "a reddish circle"
    assert strip_words("a red circle", []) == "a red circle"


def test_word_dropout_trains_on_the_captions_without_the_words(model, triples, tmp_path: Path) -> None:
    """The stripped captions are encoded as the whole ones are, and a step with word_dropout
    1 - caption_dropout feeds only stripped or empty captions to the U-Net."""
    from opensd.training.unet import caption_encoder

    stage, _ = built(model, triples, tmp_path / "run", caption_dropout=0.0, word_dropout=1.0, drop_words=["red"])
    encode = caption_encoder(stage.conditioner, stage.loaded.tokenizer)
    with torch.no_grad():
        want = encode([strip_words(c, ["red"]) for c in stage.pairs.images.texts])["context"]
        whole = encode(list(stage.pairs.images.texts))["context"]
    assert torch.allclose(stage.stripped["context"], want) and not torch.allclose(want, whole)
    seen = []
    stage._unet_cond = lambda text: seen.append(text["context"]) or {"context": text["context"]}  # type: ignore[method-assign]
    batch = stage.batch(0)
    list(stage.updates(batch, 0))
    assert torch.equal(seen[0], batch["stripped"]["context"])


def test_output_scale_multiplies_the_exported_residuals(model, triples, tmp_path: Path) -> None:
    stage, loss = built(model, triples, tmp_path / "run", output_scale=2.5)
    net = loss.controlnet
    with torch.no_grad():
        for p in [*net.zero_convs.parameters(), *net.middle_block_out.parameters()]:
            p.normal_(0, 0.1)
    before = net.zero_convs[0][0].weight.clone()
    scaled = scaled_outputs(net, 2.5)
    x, hint = stage.latents[:2], stage.controls[:2].float() / 255
    t, ctx = torch.tensor([10.0, 900.0]), stage.cond["context"][:2]
    with torch.no_grad():
        a, b = net(x, hint, t, ctx), scaled(x, hint, t, ctx)
    for ra, rb in zip([*a.skips, a.middle], [*b.skips, b.middle], strict=True):
        assert ra.abs().max() > 0
        torch.testing.assert_close(rb, 2.5 * ra, rtol=1e-5, atol=1e-6)
    assert torch.equal(net.zero_convs[0][0].weight, before)  # the trained network is untouched
    assert not torch.equal(scaled.zero_convs[0][0].weight, net.zero_convs[0][0].weight)
    with pytest.raises(ConfigError, match="output_scale"):
        stage_config_from_dict(ControlNetStageConfig, {"output_scale": 0.0})


def test_a_checkpoint_predating_an_option_resumes_with_it_at_its_default() -> None:
    from opensd.training.config import config_differences, to_dict
    from opensd.training.loop import _with_new_defaults

    cfg = ControlNetStageConfig()
    old = {k: v for k, v in to_dict(cfg).items() if k not in ("word_dropout", "drop_words")}  # written before them
    assert config_differences(old, to_dict(cfg)) == ["drop_words", "word_dropout"]
    assert config_differences(_with_new_defaults(old, ControlNetStageConfig), to_dict(cfg)) == []
    changed = dataclasses.replace(cfg, word_dropout=0.3, drop_words=("red",))
    assert config_differences(_with_new_defaults(old, ControlNetStageConfig), to_dict(changed)) == ["drop_words", "word_dropout"]


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("layout", ["beside", "under"])
def test_a_folder_gives_triples_in_either_layout(tmp_path: Path, layout: str) -> None:
    folder = write_triples(tmp_path / "d", n=3, layout=layout, seed=4)
    pairs = read_control_folder(folder, SIZE, MapKind.FLAT)
    assert len(pairs) == 3 and pairs.images.texts == ["a red circle 0", "a red circle 1", "a red circle 2"]
    assert pairs.controls.shape == (3, 3, SIZE, SIZE) and pairs.controls.dtype == torch.uint8
    rng = np.random.default_rng(4)
    _image(rng)
    want = np.asarray(_image(rng))  # the first control image, drawn after its image
    assert np.array_equal(pairs.controls[0].permute(1, 2, 0).numpy(), want)


def test_control_images_are_fitted_as_inference_fits_them(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(folder / "a.png")
    (folder / "a.txt").write_text("x")
    flat = np.zeros((20, 40, 3), np.uint8)
    flat[:, 20:] = (0, 0, 255)
    Image.fromarray(flat).save(folder / "a.control.png")
    pairs = read_control_folder(folder, SIZE, MapKind.FLAT)
    got = pairs.controls[0].permute(1, 2, 0).numpy()
    assert {tuple(c) for c in got.reshape(-1, 3)} <= {(0, 0, 0), (0, 0, 255)}  # nearest only: no new colour
    assert (got[:, : SIZE // 2] == 0).all() and (got[:, SIZE // 2:] == (0, 0, 255)).all()  # the centre crop


def test_bad_folders_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(folder / "a.png")
    (folder / "a.txt").write_text("x")
    with pytest.raises(TrainingDataError, match=r"a.png has no control image: expected a.control.png beside it or control/a.png"):
        read_control_folder(folder, SIZE, MapKind.IMAGE)
    with pytest.raises(TrainingDataError, match="does not exist"):
        read_control_folder(tmp_path / "nothing", SIZE, MapKind.IMAGE)
    only = tmp_path / "only"
    (only / "control").mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE)).save(only / "control" / "a.png")
    with pytest.raises(Exception, match="holds no images"):
        read_control_folder(only, SIZE, MapKind.IMAGE)


def test_config_errors(model) -> None:
    for bad, match in (({"control_map": "depth"}, "control_map"), ({"timesteps": "cosine"}, "timesteps"),
                       ({"caption_dropout": 1.0}, "caption_dropout"), ({"hint_block_channels": [16, 0]}, "hint_block"),
                       ({"output_name": "a/b"}, "output_name"), ({"word_dropout": 0.5}, "drop_words"),
                       ({"word_dropout": 0.6, "caption_dropout": 0.5, "drop_words": ["red"]}, "at most 1"),
                       ({"word_dropout": 0.5, "drop_words": ["two words"]}, "single words")):
        with pytest.raises(ConfigError, match=match):
            stage_config_from_dict(ControlNetStageConfig, bad)


def test_an_sdxl_model_is_refused(tmp_path: Path, triples) -> None:
    sdxl, tok = tiny_family_model(ModelFamily.SDXL)
    sdxl.cfg = sdxl.cfg.replace(image_size=SIZE)
    path = save_opensd(sdxl, tok, tmp_path / "sdxl")
    with pytest.raises(ConfigError, match="not supported yet"):
        run_stage(stage_of(cn_cfg(path, triples, tmp_path / "run")))


# ----------------------------------------------------------------------------- a run


RESUME_SCRIPT = sigkill_resume_script("controlnet", "ControlNetStage")


def test_exact_resume_after_sigkill_and_the_export(model, triples, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)

    def cfg(out: Path) -> dict:
        return cn_cfg(model, triples, out, steps=6, timesteps="cubic", caption_dropout=0.3,
                      train={"checkpoint_every": 2, "ema_decay": 0.9})

    def run(out: Path, kill_at: int = 0) -> int:
        p = subprocess.run([sys.executable, str(script), json.dumps(cfg(out)), str(kill_at)], env=ENV,
                           capture_output=True, text=True, timeout=300)
        if p.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(p.stderr[-3000:])
        return p.returncode

    a, b = tmp_path / "a", tmp_path / "b"
    ref = stage_of(cfg(a))
    result = run_stage(ref, resume=True)  # never stopped
    assert run(b, 2) == -signal.SIGKILL  # right after the step-2 checkpoint
    assert run(b, 3) == -signal.SIGKILL  # mid-interval: step 3 is lost
    assert [s for s, _ in list_checkpoints(b)] == [2]
    assert run(b) == 0
    ca = torch.load(a / "checkpoints/step_00000006.pt", weights_only=True)
    cb = torch.load(b / "checkpoints/step_00000006.pt", weights_only=True)
    assert {"modules", "optimizers", "ema", "rng", "step"} <= set(ca)
    for key in ("modules", "optimizers", "ema", "rng", "data", "step"):
        if key in ca:
            assert_states_equal(ca[key], cb[key], key)
    held = set(ca["modules"]["controlnet"])
    assert held == {f"controlnet.{k}" for k in ref.ctx.modules["controlnet"].controlnet.state_dict()}  # no U-Net
    assert_states_equal(read_weights(a / "a.safetensors"), read_weights(b / "b.safetensors"))
    # the export: the EMA ControlNet in float16 under control_model., read back by the loader
    state = read_weights(result.export)
    assert all(k.startswith("control_model.") for k in state) and all(v.dtype == torch.float16 for v in state.values())
    trained = ref.ctx.averaged("controlnet").controlnet
    assert any(p.abs().max() > 0 for n, p in trained.named_parameters() if n.startswith("zero_convs."))  # it trained
    loaded = load_controlnet(result.export, ref.loaded.model.cfg)
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v.half().float()), k
    from safetensors import safe_open

    with safe_open(str(result.export), "pt") as f:
        meta = f.metadata()
    assert meta["opensd_controlnet_steps"] == "6" and meta["opensd_controlnet_base_hash"] == ref.loaded.hash


def _residuals_match_diffusers(ours, theirs, cfg) -> None:
    g = torch.Generator().manual_seed(0)
    f = ours.cfg.downsample_factor
    x = torch.randn(2, cfg.unet.in_channels, 4, 4, generator=g)
    hint, t = torch.rand(2, 3, 4 * f, 4 * f, generator=g), torch.tensor([13.0, 777.0])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        mine = ours(x, hint, t, ctx)
        down, mid = theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    for a, b in zip([*mine.skips, mine.middle], [*down, mid], strict=True):
        assert a.shape == b.shape and a.abs().max() > 1e-4
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_export_runs_in_diffusers_as_trained(tmp_path: Path) -> None:
    """On a model with SD's 8x VAE (the hint block's four widths), diffusers' own single-file
    converter reads the exported file; ``ControlNetModel`` then gives the residuals opensd's
    loader does."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from opensd.checkpoints.keymap_controlnet import to_diffusers_controlnet_config

    size = 32  # 4x4 latents
    model = save_tiny(tmp_path / "sd1-x8", vae=VAEConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4),
                      size=size)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        _image(rng, size).save(data / f"x{i}.png")
        _image(rng, size).save(data / f"x{i}.control.png")
        (data / f"x{i}.txt").write_text(f"a blue square {i}")
    stage = stage_of(cn_cfg(model, data, tmp_path / "run", steps=3, size=size))
    result = run_stage(stage)
    loaded = load_controlnet(result.export, stage.loaded.model.cfg)
    cfg = loaded.model.cfg
    assert cfg.hint_block_channels == (16, 32, 96, 256)
    config = {k: v for k, v in to_diffusers_controlnet_config(cfg).items() if not k.startswith("_")}
    state = {k: v.float() for k, v in read_weights(result.export).items()}
    theirs = ControlNetModel(**config)
    theirs.load_state_dict(convert_controlnet_checkpoint(state, config), strict=True)
    _residuals_match_diffusers(loaded.model, theirs.eval(), cfg)


def test_a_three_width_hint_block_runs_in_diffusers(model, triples, tmp_path: Path) -> None:
    """The default model's ControlNet halves the map twice (three widths), which diffusers'
    single-file converter cannot place (it expects SD's conv_out at input_hint_block.14);
    as a ``ControlNetModel`` folder it runs to the same residuals."""
    from diffusers import ControlNetModel

    stage = stage_of(cn_cfg(model, triples, tmp_path / "run", steps=2))
    loaded = load_controlnet(run_stage(stage).export, stage.loaded.model.cfg)
    save_controlnet_diffusers(loaded.model, tmp_path / "folder")
    theirs = ControlNetModel.from_pretrained(tmp_path / "folder", local_files_only=True).eval()
    _residuals_match_diffusers(loaded.model, theirs, loaded.model.cfg)


def test_the_cli_trains_and_generate_uses_the_file(model, triples, tmp_path: Path) -> None:
    from opensd.cli.main import app

    out = tmp_path / "run"
    args = ["train", "controlnet", "-m", str(model), "--data", str(triples), "--image-size", str(SIZE), "--out", str(out),
            "--steps", "2", "-b", "2", "--control-map", "flat", "--output-name", "cn", "-q",
            "--set", "eval_per_category=0", "--set", "sample_images=2", "--set", "sample_steps=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "cn.safetensors").is_file() and "exported" in res.output
    assert (out / "samples" / "step_00000002.png").is_file()
    assert json.loads((out / "config.json").read_text())["control_map"] == "flat"
    res = CliRunner().invoke(app, ["generate", "a red circle", "-m", str(model), "--controlnet", str(out / "cn.safetensors"),
                                   "--control-image", str(triples / "img0.control.png"), "--steps", "2", "--seed", "1",
                                   "-o", str(tmp_path / "x.png"), "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["train", "controlnet", "-m", str(model), "--data", str(tmp_path / "none"), "-q"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_a_users_evaluator_draws_with_and_without_control(model, triples, tmp_path: Path) -> None:
    seen: list = []

    def judge(draw, samples):
        maps = [Image.new("RGB", (SIZE, SIZE), (255, 0, 0)), None]
        drawn = draw(["a red circle", "a red circle"], maps)
        seen.append((len(drawn), drawn[0].size, samples.name, drawn[0].tobytes() != drawn[1].tobytes()))
        return {"mine": 0.5}

    run_stage(stage_of(cn_cfg(model, triples, tmp_path / "run", steps=2, eval_per_category=1), evaluator=judge))
    assert seen == [(2, (SIZE, SIZE), "step_00000002_eval.png", True)]  # the trained ControlNet changes the image
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["mine"] == 0.5
