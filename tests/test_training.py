"""The training stages and their shared loop: configs, data, overfitting, exact resume, NaN stop, export, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from opensd.config import ConfigError
from opensd.diffusion.schedules import DiscreteSchedule, NoiseScheduleConfig, Prediction
from opensd.training.clip import CLIPStage, CLIPStageConfig
from opensd.training.config import (
    LRSchedule,
    TrainConfig,
    load_stage_config,
    stage_config_from_dict,
)
from opensd.training.data import batch_indices, load_text_encoder, load_vae
from opensd.training.ema import EMA
from opensd.training.loop import (
    NonFiniteLossError,
    ResumeError,
    list_checkpoints,
    read_log,
    run_stage,
)
from opensd.training.unet import (
    UNetStage,
    UNetStageConfig,
    min_snr_weight,
    noisy_latents_and_target,
)
from opensd.training.vae import VAEStage, VAEStageConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


pytestmark = pytest.mark.usefixtures("one_thread")


def vae_cfg(out: Path, **train) -> dict:
    t = {"out_dir": str(out), "steps": 4, "batch_size": 4, "lr": 2e-3, "warmup_steps": 0, "bf16": False,
         "log_every": 2, "sample_every": 0, "checkpoint_every": 0, "progress": False, **train}
    return {"model_preset": "tiny", "train": t, "data": {"image_size": 16}, "eval_per_category": 1,
            "grid_images": 2, "scale_images": 8}


def unet_cfg(out: Path, vae_dir: Path, clip_dir: Path, **train) -> dict:
    t = {"out_dir": str(out), "steps": 4, "batch_size": 4, "lr": 2e-3, "warmup_steps": 0, "ema_decay": 0.0,
         "log_every": 2, "sample_every": 0, "checkpoint_every": 0, "progress": False, **train}
    return {"model_preset": "tiny", "vae_dir": str(vae_dir), "clip_dir": str(clip_dir), "cache_size": 8,
            "cache_batch": 8, "train": t, "data": {"image_size": 16}, "eval_per_category": 1, "sample_steps": 2}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    torch.set_num_threads(1)
    run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, vae_cfg(out, steps=2))))
    return out


def clip_cfg(out: Path, **train) -> dict:
    t = {"out_dir": str(out), "steps": 2, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "log_every": 5,
         "sample_every": 0, "checkpoint_every": 0, "progress": False, **train}
    return {"model_preset": "tiny", "tokenizer_corpus": 300, "vocab_size": 96, "hard_negatives": 2,
            "eval_per_category": 1, "train": t, "data": {"image_size": 16}}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A (2-step) CLIP stage run: the U-Net tests use its exported text encoder and tokenizer."""
    out = tmp_path_factory.mktemp("clip")
    torch.set_num_threads(1)
    run_stage(CLIPStage(stage_config_from_dict(CLIPStageConfig, clip_cfg(out))))
    return out


# ----------------------------------------------------------------------------- configs


def test_toml_presets_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "vae.toml"
    toml.write_text(textwrap.dedent("""
        model_preset = "tiny"
        kl_weight = 1e-5
        [model]
        ch = 24
        [train]
        steps = 7
        [data]
        image_size = 16
    """))
    cfg = load_stage_config(VAEStageConfig, toml, ["train.lr=3e-4", "disc.enabled=true", "train.out_dir=runs/x"])
    assert cfg.model.ch == 24 and cfg.model.ch_mult == (1, 2) and cfg.model.norm_groups == 8  # tiny, then [model]
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.train.out_dir == "runs/x"
    assert cfg.train.warmup_steps == 100  # the stage's own default (TrainConfig's is 0) survives a partial table
    assert cfg.kl_weight == 1e-5 and cfg.disc.enabled is True and cfg.data.image_size == 16
    ucfg = load_stage_config(UNetStageConfig, None, ["schedule.prediction=v", "min_snr_gamma=5"])
    assert ucfg.schedule.prediction is Prediction.V and ucfg.min_snr_gamma == 5.0
    assert ucfg.model == UNetStageConfig().model and ucfg.train.ema_decay == 0.999


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) stpes; allowed keys are out_dir, steps"):
        load_stage_config(VAEStageConfig, None, ["train.stpes=5"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match="unknown key.*width"):
        load_stage_config(VAEStageConfig, bad)
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of tiny, small, sd15"):
        load_stage_config(VAEStageConfig, None, ["model_preset=huge"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_stage_config(VAEStageConfig, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_stage_config(VAEStageConfig, None, ["train.lr"])
    with pytest.raises(ConfigError, match="data.path"):
        load_stage_config(VAEStageConfig, None, ["data.source=folder"])


@pytest.mark.parametrize("cls", [VAEStageConfig, CLIPStageConfig, UNetStageConfig])
def test_defaults_round_trip_through_dicts(cls) -> None:
    from opensd.config import to_dict

    cfg = cls()
    assert stage_config_from_dict(cls, {}) == cfg  # the default model is the default preset's
    assert stage_config_from_dict(cls, to_dict(cfg)) == cfg


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=110, warmup_steps=10, lr_schedule=LRSchedule.COSINE, min_lr_ratio=0.1)
    assert [cfg.lr_factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert cfg.lr_factor(10) == 1.0
    assert math.isclose(cfg.lr_factor(60), 0.1 + 0.9 * 0.5)
    assert math.isclose(cfg.lr_factor(110), 0.1)


# ----------------------------------------------------------------------------- data, EMA, objective


def test_batches_are_sharded_and_pools_permuted() -> None:
    whole = batch_indices(3, 5, 0, 1, 8, None)
    assert whole == list(range(40, 48))
    assert batch_indices(3, 5, 0, 2, 4, None) + batch_indices(3, 5, 1, 2, 4, None) == whole
    pooled = [batch_indices(3, s, 0, 1, 4, 10) for s in range(5)]  # 20 positions = two epochs of 10
    flat = [i for b in pooled for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert batch_indices(3, 2, 0, 2, 2, 10) + batch_indices(3, 2, 1, 2, 2, 10) == pooled[2]


def test_folder_source_reads_crops_and_resizes(tmp_path: Path) -> None:
    from PIL import Image

    from opensd.training.config import DataConfig, DataSource
    from opensd.training.sources import open_source

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, 8:] = 255
    Image.fromarray(arr).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("half white")
    src = open_source(DataConfig(source=DataSource.FOLDER, path=str(tmp_path), image_size=16))
    assert src.pool == 2 and src.captions(5) == ["a red thing", "half white"]
    a, b = src[0], src[1]
    assert a.image.shape == (3, 16, 16) and torch.allclose(a.image[0], torch.ones(16, 16))
    assert torch.equal(b.image[:, :, :8], -torch.ones(3, 16, 8))
    assert torch.equal(b.image[:, :, 8:], torch.ones(3, 16, 8))
    with pytest.raises(ValueError, match="does not exist"):
        open_source(DataConfig(source=DataSource.FOLDER, path=str(tmp_path / "nope")))


def test_ema_follows_the_warmup_rule() -> None:
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, 0.99)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)  # decay min(0.99, 1/10) = 0.1: 0.1 * 1 + 0.9 * 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 2.8))
    ema.update(m)  # decay 2/11
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 3 - 0.2 * 2 / 11))
    out = ema.copy_to(torch.nn.Linear(2, 1, bias=False))
    assert torch.equal(out.weight, ema.shadow["weight"])


def test_noising_and_v_target_match_diffusers() -> None:
    from diffusers import DDPMScheduler

    sched_cfg = NoiseScheduleConfig(prediction=Prediction.V)
    ref = DDPMScheduler.from_config(sched_cfg.to_diffusers())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    a = DiscreteSchedule(sched_cfg).alphas_cumprod[t]
    xt, v = noisy_latents_and_target(x0, noise, a, Prediction.V)
    torch.testing.assert_close(xt, ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)
    assert torch.equal(noisy_latents_and_target(x0, noise, a, Prediction.EPS)[1], noise)


def test_min_snr_weights() -> None:
    a = torch.tensor([0.9, 0.5, 0.1])  # snr 9, 1, 1/9
    torch.testing.assert_close(min_snr_weight(a, 5.0, Prediction.EPS), torch.tensor([5 / 9, 1.0, 1.0]))
    torch.testing.assert_close(min_snr_weight(a, 5.0, Prediction.V), torch.tensor([5 / 10, 1 / 2, (1 / 9) / (10 / 9)]))
    assert torch.equal(min_snr_weight(a, 0.0, Prediction.EPS), torch.ones(3))


# ----------------------------------------------------------------------------- stages end to end


def test_vae_stage_overfits_a_fixed_batch_and_exports(tmp_path: Path) -> None:
    cfg = vae_cfg(tmp_path / "run", steps=30, log_every=5, sample_every=30, ema_decay=0.5)
    cfg["data"]["pool_size"] = 4  # the same 4 scenes every step
    result = run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg)))
    losses = [r["loss"] for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    evals = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["step"] == 30 and evals[-1]["original_overall"] == 1.0 and evals[-1]["psnr"] > 5
    assert 0 <= evals[-1]["roundtrip_overall"] <= 1
    for name in ("loss.png", "samples/step_00000030.png", "config.json", "checkpoints/step_00000030.pt"):
        assert (result.run_dir / name).is_file(), name
    from opensd.shapes.dataset import ShapesDataset
    from opensd.training.data import pil_to_tensor

    vae = load_vae(result.run_dir)
    x = torch.stack([pil_to_tensor(s.image) for s in ShapesDataset(0, 16).take(4)])
    with torch.no_grad():
        z = vae.to_latent(vae.encode(x).mode())
    assert math.isclose(float(z.std()), 1.0, rel_tol=1e-4)  # scale_factor calibrated on the training images


def test_clip_stage_learns_and_exports_the_text_encoder(tmp_path: Path) -> None:
    cfg = clip_cfg(tmp_path / "run", steps=30, sample_every=30)
    cfg["data"]["pool_size"] = 8  # one fixed batch
    stage = CLIPStage(stage_config_from_dict(CLIPStageConfig, cfg))
    result = run_stage(stage)
    train = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"], [r["loss"] for r in train]
    assert "hard_negative_acc" in train[-1] and train[-1]["logit_scale"] <= 100
    evals = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["count"] == 6 and 0 <= evals[-1]["i2t_top1"] <= 1
    text, tok = load_text_encoder(result.run_dir)
    assert tok.vocab_size == stage.tokenizer.vocab_size and tok("a red circle").tolist() == \
        stage.tokenizer("a red circle").tolist()
    assert tok.unk_id not in tok("two blue squares above a green triangle").tolist()[0]  # vocabulary past the pool
    trained = stage.ctx.modules["clip"].model.text.state_dict()
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in trained.items())


def test_unet_stage_learns_exports_and_generates(tmp_path: Path, vae_dir: Path, clip_dir: Path) -> None:
    import opensd

    cfg = unet_cfg(tmp_path / "run", vae_dir, clip_dir, steps=40, sample_every=40, lr=3e-3)
    cfg["cache_size"] = 4
    cfg["caption_dropout"] = 0.0
    probes: dict[int, float] = {}
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 4, 8, 8, generator=g)

    stage = UNetStage(stage_config_from_dict(UNetStageConfig, cfg))

    def probe(step: int, ctx) -> None:  # the loss at fixed t and noise on the 4 cached latents
        if step in (1, 40):
            with torch.no_grad():
                probes[step] = float(ctx.modules["unet"](stage.latents[:4], stage.context[:4].float(), t, noise)[0].mean())

    result = run_stage(stage, hooks=[probe])
    assert probes[40] < 0.5 * probes[1], probes
    assert list(result.run_dir.glob("cache/latents-vae*-text*-data*.safetensors"))
    assert (result.run_dir / "samples/step_00000040.png").is_file()
    assert "overall" in [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "eval"][-1]
    pipe = opensd.load(result.export)
    assert pipe.cfg.image_size == 16 and pipe.cfg.unet.context_dim == 64  # the tiny CLIP's width
    images = pipe.txt2img("a red circle", steps=3, seed=1, cfg_scale=3.0)
    assert images[0].size == (16, 16)
    # the exported U-Net is the trained one
    trained = stage.ctx.modules["unet"].unet.state_dict()
    exported = pipe.model.unet.state_dict()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)


def test_unet_resume_after_a_crash_is_exact(tmp_path: Path, vae_dir: Path, clip_dir: Path) -> None:
    """In-process: a run that dies (an exception) at step 3 and resumes ends where an unbroken run does."""
    def make(out: Path) -> UNetStage:
        cfg = unet_cfg(out, vae_dir, clip_dir, steps=6, checkpoint_every=2, ema_decay=0.9)
        cfg.update(caption_dropout=0.5, schedule={"prediction": "v"}, min_snr_gamma=5.0)
        cfg["eval_per_category"] = 0
        return UNetStage(stage_config_from_dict(UNetStageConfig, cfg))

    ref = make(tmp_path / "a")
    run_stage(ref)

    def crash(step: int, ctx) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(make(tmp_path / "b"), hooks=[crash])
    with pytest.raises(ResumeError, match="already holds checkpoints"):
        run_stage(make(tmp_path / "b"))
    resumed = make(tmp_path / "b")
    run_stage(resumed, resume=True)
    assert_states_equal(ref.ctx.modules["unet"].state_dict(), resumed.ctx.modules["unet"].state_dict())
    assert_states_equal(ref.ctx.emas["unet"].shadow, resumed.ctx.emas["unet"].shadow)


def assert_states_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- exact resume after SIGKILL


def sigkill_resume_script(module: str, stage: str) -> str:
    """A training script for ``python SCRIPT CONFIG_JSON KILL_AT``: stage ``stage`` of
    ``opensd.training.<module>`` (its config class ``<stage>Config``) run with resume, killed
    by SIGKILL right after step KILL_AT (0: never)."""
    return f"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from opensd.training import loop
from opensd.training.config import stage_config_from_dict
from opensd.training.{module} import {stage}, {stage}Config

cfg = stage_config_from_dict({stage}Config, json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
hooks = [lambda step, ctx: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None] if kill_at else []
loop.run_stage({stage}(cfg), resume=True, hooks=hooks)
"""

RESUME_SCRIPT = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from opensd.training import loop
from opensd.training.config import stage_config_from_dict
from opensd.training.vae import VAEStage, VAEStageConfig

cfg = stage_config_from_dict(VAEStageConfig, json.loads(sys.argv[1]))
kill_at, mode = int(sys.argv[2]), sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

hooks = []
if mode == "after_step":
    hooks.append(lambda step, ctx: die() if step == kill_at else None)
loop.run_stage(VAEStage(cfg), resume=True, hooks=hooks)
"""


def test_exact_resume_after_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)

    def cfg(out: Path) -> str:
        c = vae_cfg(out, steps=10, checkpoint_every=4, log_every=1, ema_decay=0.9)
        c.update(posterior_noise=0.5, posterior_noise_start=1, disc={"enabled": True, "start_step": 2, "layers": 2,
                                                                     "channels": 16})
        c["eval_per_category"] = 0
        return json.dumps(c)

    def run(out: Path, kill_at: int = 0, mode: str = "none") -> int:
        p = subprocess.run([sys.executable, str(script), cfg(out), str(kill_at), mode], env=ENV,
                           capture_output=True, text=True, timeout=120)
        if p.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(p.stderr[-3000:])
        return p.returncode

    a, b = tmp_path / "a", tmp_path / "b"
    run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, json.loads(cfg(a)))), resume=True)  # never stopped
    assert run(b, 4, "after_step") == -signal.SIGKILL  # right after the step-4 checkpoint
    assert [s for s, _ in list_checkpoints(b)] == [4]
    assert run(b, 6, "after_step") == -signal.SIGKILL  # mid-interval: steps 5 and 6 are lost
    assert [s for s, _ in list_checkpoints(b)] == [4]
    assert run(b) == 0
    ca = torch.load(a / "checkpoints/step_00000010.pt", weights_only=True)
    cb = torch.load(b / "checkpoints/step_00000010.pt", weights_only=True)
    for key in ("modules", "optimizers", "ema", "rng", "data", "step"):
        assert_states_equal(ca[key], cb[key], key)
    assert (a / "vae/model.safetensors").read_bytes() == (b / "vae/model.safetensors").read_bytes()
    steps = [r["step"] for r in read_log(b / "log.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 11))  # the killed runs' extra lines were dropped on resume


def test_a_checkpoint_cut_off_while_written_is_never_seen(tmp_path: Path, monkeypatch) -> None:
    import opensd.training.checkpoint_store as loop_mod

    real = loop_mod._publish

    def dies_at_step_4(tmp: Path, path: Path) -> None:
        if path.name == "step_00000004.pt":
            raise KeyboardInterrupt  # the process ends after the temporary file, before the rename
        real(tmp, path)

    cfg = vae_cfg(tmp_path / "run", steps=4, checkpoint_every=2)
    monkeypatch.setattr(loop_mod, "_publish", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg)))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert [p.name for p in (tmp_path / "run/checkpoints").glob(".*.tmp")] == [".step_00000004.pt.tmp"]
    monkeypatch.setattr(loop_mod, "_publish", real)
    result = run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg)), resume=True)
    assert result.step == 4 and [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    assert not list((tmp_path / "run/checkpoints").glob(".*.tmp"))


# ----------------------------------------------------------------------------- NaN stop


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import opensd.training.vae as vae_mod

    calls = {"n": 0}
    real = vae_mod.kl_per_pixel

    def kl_with_nan(mean, logvar, pixels):
        calls["n"] += 1
        out = real(mean, logvar, pixels)
        return out * float("nan") if calls["n"] == 6 else out

    monkeypatch.setattr(vae_mod, "kl_per_pixel", kl_with_nan)
    cfg = vae_cfg(tmp_path / "run", steps=10, checkpoint_every=2, keep_checkpoints=5)
    before: dict[str, bytes] = {}

    def remember(step: int, ctx) -> None:
        if step == 4:
            before["ckpt"] = (tmp_path / "run/checkpoints/step_00000004.pt").read_bytes()

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(NaN\) in group 'vae' at step 6.*"
                                                  r"step_00000004\.pt \(step 4\)"):
        run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg)), hooks=[remember])
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    assert (tmp_path / "run/checkpoints/step_00000004.pt").read_bytes() == before["ckpt"]
    assert not (tmp_path / "run/vae").exists()


# ----------------------------------------------------------------------------- the command line


def cli_app() -> typer.Typer:
    from opensd.cli.train import register

    app = typer.Typer()

    @app.command()
    def noop() -> None:  # a second command so that `train` stays a sub-command
        pass

    register(app)
    return app


def test_cli_trains_refuses_to_overwrite_and_resumes(tmp_path: Path) -> None:
    runner, app = CliRunner(), cli_app()
    out = tmp_path / "run"
    toml = tmp_path / "vae.toml"
    toml.write_text('model_preset = "tiny"\neval_per_category = 0\ngrid_images = 2\nscale_images = 8\n'
                    '[train]\ncheckpoint_every = 0\nsample_every = 0\nwarmup_steps = 0\n')
    args = ["train", "vae", "--config", str(toml), "--out", str(out), "--batch-size", "2", "--image-size", "16",
            "--no-bf16", "-q", "--steps"]
    res = runner.invoke(app, [*args, "2"])
    assert res.exit_code == 0, res.output
    assert "vae: 2 steps" in res.output and (out / "vae/model.safetensors").is_file()
    res = runner.invoke(app, [*args, "2"])
    assert res.exit_code == 2 and "already holds checkpoints" in res.output and "--resume" in res.output
    res = runner.invoke(app, [*args, "3", "--resume"])
    assert res.exit_code == 0, res.output
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    runner, app = CliRunner(), cli_app()
    cases = [
        (["train", "vae", "--config", str(tmp_path / "nope.toml")], "config file not found"),
        (["train", "vae", "--set", "train.bogus=1"], "unknown key(s) bogus"),
        (["train", "vae", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "does not exist"),
        (["train", "unet", "--out", str(tmp_path / "u")], "no VAE given: pass --vae RUN_DIR"),
        (["train", "unet", "--vae", str(tmp_path), "--out", str(tmp_path / "u")], "holds no exported VAE"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and res.output.count("\n") == 1 and res.output.startswith("error: "), res.output


# ----------------------------------------------------------------------------- time limit and parallel rendering


def test_time_limit_ends_the_run_early_with_checkpoint_and_export(tmp_path: Path, monkeypatch) -> None:
    import opensd.training.loop as loop_mod

    clock = {"t": 0.0}

    def fake_clock() -> float:  # every call advances one second: the limit of 5 s ends a run after a few steps
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(loop_mod.time, "perf_counter", fake_clock)
    cfg = vae_cfg(tmp_path / "run", steps=1000, time_limit=5.0)
    result = run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg)))
    assert 1 <= result.step < 10
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [result.step]
    assert (tmp_path / "run/vae/model.safetensors").is_file()
    train_rows = [r for r in read_log(tmp_path / "run/log.jsonl") if r["kind"] == "train"]
    assert train_rows[-1]["step"] == result.step
    # the run can go on from where the limit stopped it
    cfg = vae_cfg(tmp_path / "run", steps=result.step + 2)
    assert run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg)), resume=True).step == result.step + 2


def test_time_limit_must_be_a_number_at_least_zero() -> None:
    with pytest.raises(ConfigError, match="train.time_limit"):
        TrainConfig(time_limit=-1.0)
    with pytest.raises(ConfigError, match="data.workers"):
        stage_config_from_dict(VAEStageConfig, {"data": {"workers": -2}})


def test_parallel_prefill_draws_exactly_what_the_stream_draws() -> None:
    from opensd.shapes.source import ShapesSource
    from opensd.training.config import DataConfig
    from opensd.training.data import cache_path
    from opensd.training.sources import open_source

    serial = ShapesSource(DataConfig(image_size=16, pool_size=600))
    parallel = open_source(DataConfig(image_size=16, pool_size=600, workers=2))
    assert len(parallel._memo) == 600
    for i in (0, 1, 255, 256, 599):
        a, b = serial[i], parallel[i]
        assert torch.equal(a.image, b.image) and a.caption == b.caption and a.spec == b.spec
    # the worker count changes speed, not data: the latent cache's name ignores it
    one = cache_path(Path("c"), "v", "t", DataConfig(workers=0), 10, "float16")
    many = cache_path(Path("c"), "v", "t", DataConfig(workers=8), 10, "float16")
    assert one == many
