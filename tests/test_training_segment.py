"""``opensd train segment``: config checks, learning, the held-out judge, exact resume after a crash,
the export, what a checkpoint holds, the CLI, and an image folder refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opensd.checkpoints.segmenter import load_segmenter
from opensd.cli.main import app
from opensd.config import ConfigError
from opensd.shapes.segmentation import CLASSES
from opensd.training.config import stage_config_from_dict
from opensd.training.data import TrainingDataError
from opensd.training.loop import load_checkpoint, read_log, run_stage
from opensd.training.segment import SegmentStage, SegmentStageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(out: Path, evals: int = 8, **train) -> SegmentStageConfig:
    t = {"out_dir": str(out), "steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "ema_decay": 0.9,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False, **train}
    return stage_config_from_dict(SegmentStageConfig, {
        "model_preset": "tiny", "train": t, "data": {"image_size": 16}, "eval_scenes": evals, "grid_images": 2})


def assert_states_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="eval_scenes must be an integer >= 0"):
        stage_config_from_dict(SegmentStageConfig, {"eval_scenes": -1})
    with pytest.raises(ConfigError, match="in_channels must be 3"):
        stage_config_from_dict(SegmentStageConfig, {"model": {"in_channels": 1}})
    with pytest.raises(ConfigError, match="model_preset"):
        stage_config_from_dict(SegmentStageConfig, {"model_preset": "huge"})
    default = SegmentStageConfig()
    assert default.model.n_classes == len(CLASSES) and default.data.image_size == 32


def test_the_stage_learns_is_judged_on_held_out_scenes_and_exports(tmp_path: Path) -> None:
    result = run_stage(SegmentStage(cfg(tmp_path / "run", steps=12, sample_every=12)))
    log = read_log(tmp_path / "run" / "log.jsonl")
    train = [r for r in log if r["kind"] == "train"]
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    ev = [r for r in log if r["kind"] == "eval"][-1]
    assert {"iou_background", "iou_circle", "iou_square", "iou_triangle", "miou", "miou_all", "pixel_acc"} <= set(ev)
    assert all(0 <= ev[k] <= 1 for k in ("miou_all", "pixel_acc", "iou_background"))
    assert (tmp_path / "run" / "samples" / "step_00000012.png").is_file()
    assert result.export.name == "segmenter.safetensors"
    model, classes = load_segmenter(result.export)
    assert classes == CLASSES and model.cfg.model_channels == 16
    from safetensors import safe_open

    with safe_open(str(result.export), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())  # export_half


def test_resume_after_a_crash_is_exact_and_checkpoints_hold_the_segmenter(tmp_path: Path) -> None:
    ref = SegmentStage(cfg(tmp_path / "a", evals=0, checkpoint_every=2))
    run_stage(ref)

    def crash(step: int, ctx) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(SegmentStage(cfg(tmp_path / "b", evals=0, checkpoint_every=2)), hooks=[crash])
    resumed = SegmentStage(cfg(tmp_path / "b", evals=0, checkpoint_every=2))
    run_stage(resumed, resume=True)
    assert_states_equal(ref.ctx.modules["segment"].state_dict(), resumed.ctx.modules["segment"].state_dict())
    assert_states_equal(ref.ctx.emas["segment"].shadow, resumed.ctx.emas["segment"].shadow)
    ckpt = load_checkpoint(sorted((tmp_path / "a" / "checkpoints").glob("step_*.pt"))[-1])
    held = set(ckpt["modules"]["segment"])
    assert held == set(ref.ctx.modules["segment"].state_dict())
    assert all(k.startswith("segmenter.") for k in held)


def test_cli_trains_and_refuses_an_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    res = CliRunner().invoke(app, ["train", "segment", "--out", str(tmp_path / "c"), "--steps", "2", "-b", "2",
                                   "--image-size", "16", "-q", "--set", "model_preset=tiny", "--set", "eval_scenes=0"])
    assert res.exit_code == 0, res.output
    assert "exported" in res.output and (tmp_path / "c" / "segmenter.safetensors").is_file()
    data = tmp_path / "images"
    data.mkdir()
    Image.new("RGB", (16, 16), "red").save(data / "0.png")
    (data / "0.txt").write_text("a red picture")
    c = stage_config_from_dict(SegmentStageConfig, {"model_preset": "tiny", "eval_scenes": 0,
                                                    "train": {"out_dir": str(tmp_path / "d"), "steps": 1},
                                                    "data": {"source": "folder", "path": str(data), "image_size": 16}})
    with pytest.raises(TrainingDataError, match="per-pixel class maps"):
        run_stage(SegmentStage(c))
    res = CliRunner().invoke(app, ["train", "segment", "--data", str(data), "--out", str(tmp_path / "e"), "-q",
                                   "--set", "model_preset=tiny", "--image-size", "16"])
    assert res.exit_code == 2 and "per-pixel class maps" in res.output and len(res.output.strip().splitlines()) == 1


def test_the_data_source_brings_the_held_out_judge_and_a_users_evaluator_gets_probabilities(tmp_path: Path) -> None:
    from opensd.shapes.segmentation import SegmentationJudge
    from opensd.training.sources import default_evaluator

    on_shapes = stage_config_from_dict(SegmentStageConfig, {"data": {"image_size": 16}})
    assert isinstance(default_evaluator("segment", on_shapes), SegmentationJudge)
    assert isinstance(SegmentStage(on_shapes).evaluator, SegmentationJudge)
    off = stage_config_from_dict(SegmentStageConfig, {"eval_scenes": 0})
    assert default_evaluator("segment", off) is None
    folder = stage_config_from_dict(SegmentStageConfig, {"data": {"source": "folder", "path": str(tmp_path)}})
    assert default_evaluator("segment", folder) is None
    seen: list = []
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def judge(segment, classes):
        p = segment(x)
        seen.append((p, classes))
        return {"mine": float(torch.allclose(p.sum(1), torch.ones(3, 16, 16)))}

    run_stage(SegmentStage(cfg(tmp_path / "run", steps=1), evaluator=judge))
    (p, classes), = seen
    assert p.shape == (3, 4, 16, 16) and p.device.type == "cpu" and classes == CLASSES
    ev = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "eval"][-1]
    assert ev["mine"] == 1.0 and "miou" not in ev
    res = CliRunner().invoke(app, ["train", "segment", "--help"])
    assert res.exit_code == 0 and "--evaluator" in res.output
