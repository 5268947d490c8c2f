"""``opensd train taesd``: distilling a tiny autoencoder from a model's VAE; config checks,
learning, evaluation, exact resume after a crash, the export the pipeline then finds, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_word_bundle
from typer.testing import CliRunner

import opensd
from opensd.checkpoints.opensd_format import save_opensd
from opensd.checkpoints.taesd import load_tiny_autoencoder
from opensd.cli.main import app
from opensd.config import ConfigError, to_dict
from opensd.training.config import stage_config_from_dict
from opensd.training.loop import read_log, run_stage
from opensd.training.taesd import TAESDStage, TAESDStageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny model (a x2 VAE, 4 latent channels) as the teacher."""
    model, tok = tiny_word_bundle(seed=7)
    return save_opensd(model, tok, tmp_path_factory.mktemp("teacher") / "tiny")


def assert_states_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def cfg(out: Path, teacher: Path, evals: int = 1, **train) -> TAESDStageConfig:
    t = {"out_dir": str(out), "steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "ema_decay": 0.9,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False, **train}
    return stage_config_from_dict(TAESDStageConfig, {
        "teacher": str(teacher), "model_preset": "tiny", "train": t, "data": {"image_size": 16, "pool_size": 16},
        "cache_batch": 8, "eval_per_category": evals, "grid_images": 2})


def test_config_checks(teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pool_size must be > 0"):
        stage_config_from_dict(TAESDStageConfig, {"data": {"pool_size": 0}})
    with pytest.raises(ConfigError, match="scaling_factor must be 1"):
        stage_config_from_dict(TAESDStageConfig, {"model": {"scaling_factor": 0.5}})
    with pytest.raises(ConfigError, match="trains a decoder"):
        stage_config_from_dict(TAESDStageConfig, {"model": {"decoder": False}})
    with pytest.raises(ConfigError, match="target must be one of|not allowed"):
        stage_config_from_dict(TAESDStageConfig, {"target": "noise"})
    default = TAESDStageConfig()
    assert default.model.stages == 2 and default.model.latent_channels == 4  # the default model's x4 VAE
    wrong = stage_config_from_dict(TAESDStageConfig, {"teacher": str(teacher), "train": {"out_dir": str(tmp_path)},
                                                      "data": {"pool_size": 4}})  # x4 against a x2 teacher
    with pytest.raises(ConfigError, match="downsamples x2.*model_preset"):
        run_stage(TAESDStage(wrong))


def test_stage_learns_evaluates_exports_and_the_pipeline_finds_the_export(teacher: Path, tmp_path: Path) -> None:
    result = run_stage(TAESDStage(cfg(tmp_path / "run", teacher, steps=12, sample_every=12)))
    log = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "train"]
    assert log[-1]["l1"] < log[0]["l1"] and log[-1]["enc_mse"] < log[0]["enc_mse"]
    ev = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "eval"][-1]
    assert {"kept", "tiny_kept", "vae_kept", "psnr", "psnr_vs_vae"} <= set(ev)
    assert (tmp_path / "run" / "samples" / "step_00000012.png").is_file()
    files = sorted(p.name for p in result.export.iterdir())
    assert files == ["taesd_decoder.safetensors", "taesd_encoder.safetensors"]
    tiny = load_tiny_autoencoder(result.export)
    assert tiny.cfg.stages == 1 and tiny.cfg.encoder and tiny.cfg.decoder
    model_dir = tmp_path / "model"
    shutil.copytree(teacher, model_dir)
    for name in files:
        shutil.copy(result.export / name, model_dir / name)
    pipe = opensd.load(model_dir)
    assert pipe.tiny_vae is not None
    assert "VAE Decoder: TAESD" in pipe.txt2img("a red circle", steps=1, seed=0, decoder="tiny")[0].info["parameters"]


def test_resume_after_a_crash_is_exact(teacher: Path, tmp_path: Path) -> None:
    ref = TAESDStage(cfg(tmp_path / "a", teacher, evals=0, checkpoint_every=2))
    run_stage(ref)

    def crash(step: int, ctx) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(TAESDStage(cfg(tmp_path / "b", teacher, evals=0, checkpoint_every=2)), hooks=[crash])
    resumed = TAESDStage(cfg(tmp_path / "b", teacher, evals=0, checkpoint_every=2))
    run_stage(resumed, resume=True)
    assert_states_equal(ref.ctx.modules["taesd"].state_dict(), resumed.ctx.modules["taesd"].state_dict())
    assert_states_equal(ref.ctx.emas["taesd"].shadow, resumed.ctx.emas["taesd"].shadow)


def test_cli_trains_from_a_teacher(teacher: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["train", "taesd", "--teacher", str(teacher), "--out", str(tmp_path / "c"),
                                   "--steps", "2", "-b", "2", "--image-size", "16", "-q",
                                   "--set", "model_preset=tiny", "--set", "data.pool_size=4", "--set", "eval_per_category=0"])
    assert res.exit_code == 0, res.output
    assert "exported" in res.output and (tmp_path / "c" / "taesd" / "taesd_decoder.safetensors").is_file()
    res = CliRunner().invoke(app, ["train", "taesd", "--teacher", str(tmp_path / "nothing"), "--out", str(tmp_path / "d"), "-q"])
    assert res.exit_code == 2 and "model" in res.output and len(res.output.strip().splitlines()) == 1


def test_an_image_folder_is_the_pool(teacher: Path, tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (20, 24), colour).save(data / f"{i}.png")  # centre-cropped and resized to 16 px
        (data / f"{i}.txt").write_text(f"a {colour} picture")
    c = cfg(tmp_path / "run", teacher, evals=0, steps=2)
    c = stage_config_from_dict(TAESDStageConfig, {**to_dict(c), "data": {"source": "folder", "path": str(data), "image_size": 16}})
    stage = TAESDStage(c)
    run_stage(stage)
    assert stage.cache["latents"].shape == (3, 4, 8, 8) and stage.cache["images"].shape == (3, 3, 16, 16)


def test_a_users_evaluator_gets_the_three_round_trips(teacher: Path, tmp_path: Path) -> None:
    from opensd.training.taesd import teacher_outputs

    seen: list = []
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def judge(round_trips):
        out = round_trips(x)
        seen.append(out)
        return {"mine": float(all(v.abs().max() <= 1 for v in out.values()))}

    stage = TAESDStage(cfg(tmp_path / "run", teacher, steps=2), evaluator=judge)
    run_stage(stage)
    assert len(seen) == 1 and list(seen[0]) == ["vae", "tiny_decoder", "tiny"]
    assert all(v.shape == x.shape and v.device.type == "cpu" for v in seen[0].values())
    _, vae = teacher_outputs(stage.vae, x, decode=True)
    torch.testing.assert_close(seen[0]["vae"], vae.float())  # the teacher's own round trip
    ev = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "eval"][-1]
    assert ev["mine"] == 1.0 and "kept" not in ev  # the user's metrics, not the shapes judge's
