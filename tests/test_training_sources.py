"""Training knows nothing of the shapes world: the data source picks the evaluator, a folder run
never loads the world, a stage takes a user's evaluator (Python and ``--evaluator``)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from opensd.shapes.stage_eval import GenerationJudge, RetrievalJudge, RoundTripJudge, TinyRoundTripJudge
from opensd.training.clip import CLIPStage, CLIPStageConfig
from opensd.training.config import stage_config_from_dict
from opensd.training.evaluation import FROM_DATA
from opensd.training.lcm import LCMStage, LCMStageConfig
from opensd.training.loop import read_log, run_stage
from opensd.training.sources import default_evaluator
from opensd.training.taesd import TAESDStage, TAESDStageConfig
from opensd.training.unet import UNetStage, UNetStageConfig
from opensd.training.vae import VAEStage, VAEStageConfig

SRC = Path(__file__).resolve().parents[1] / "src"
TRAINING = SRC / "opensd" / "training"


def _folder(path: Path, n: int = 4, size: int = 16) -> Path:
    """``n`` captioned images of one colour each (an image-caption folder, kohya layout)."""
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 60 * i, np.uint8)).save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(f"a plain picture number {i}")
    return path


def _vae_cfg(out: Path, data: dict, **top) -> dict:
    train = {"out_dir": str(out), "steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
             "sample_every": 0, "checkpoint_every": 0, "progress": False}
    return {"model_preset": "tiny", "train": train, "data": data, "eval_per_category": 1, "grid_images": 2,
            "scale_images": 4, **top}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_training_module_but_the_source_selection_imports_the_shapes_world() -> None:
    files = sorted(TRAINING.glob("*.py"))
    assert len(files) > 10
    naming = {f.name: sorted(m for m in _imported_modules(f) if m == "opensd.shapes" or m.startswith("opensd.shapes.")
                             or m.startswith("opensd.eval.") and m != "opensd.eval.distribution")
              for f in files}
    assert {name for name, mods in naming.items() if mods} == {"sources.py"}, naming
    assert naming["sources.py"] == ["opensd.shapes.source", "opensd.shapes.stage_eval"]


def test_the_data_source_picks_the_judge_and_a_folder_none(tmp_path: Path) -> None:
    shapes = {"image_size": 16}
    folder = {"source": "folder", "path": str(_folder(tmp_path / "imgs"))}
    for cls, judge in ((VAEStageConfig, RoundTripJudge), (CLIPStageConfig, RetrievalJudge),
                       (UNetStageConfig, GenerationJudge), (TAESDStageConfig, TinyRoundTripJudge),
                       (LCMStageConfig, GenerationJudge)):
        name = {VAEStageConfig: "vae", CLIPStageConfig: "clip", UNetStageConfig: "unet", TAESDStageConfig: "taesd",
                LCMStageConfig: "lcm"}[cls]
        on_shapes = stage_config_from_dict(cls, {"data": shapes})
        assert isinstance(default_evaluator(name, on_shapes), judge)
        assert default_evaluator(name, stage_config_from_dict(cls, {"data": folder})) is None
        assert default_evaluator(name, stage_config_from_dict(cls, {"data": shapes, "eval_per_category": 0})) is None
        assert default_evaluator("lora", on_shapes) is None  # a stage the world has no judge for
    cfg = stage_config_from_dict(VAEStageConfig, {"data": shapes})
    assert isinstance(VAEStage(cfg).evaluator, RoundTripJudge)  # the default is FROM_DATA
    assert VAEStage(cfg, evaluator=None).evaluator is None
    mine = lambda round_trip: {}  # noqa: E731
    assert VAEStage(cfg, evaluator=mine).evaluator is mine
    assert CLIPStage(stage_config_from_dict(CLIPStageConfig, {"data": folder}), evaluator=FROM_DATA).evaluator is None
    assert UNetStage(stage_config_from_dict(UNetStageConfig, {"data": folder})).evaluator is None
    assert isinstance(TAESDStage(stage_config_from_dict(TAESDStageConfig, {"data": shapes})).evaluator,
                      TinyRoundTripJudge)
    assert LCMStage(stage_config_from_dict(LCMStageConfig, {"data": folder})).evaluator is None
    assert LCMStage(stage_config_from_dict(LCMStageConfig, {"data": shapes}), evaluator=mine).evaluator is mine


def test_a_folder_run_loads_no_shapes_module_and_calls_the_users_evaluator(tmp_path: Path) -> None:
    """In a fresh interpreter: a VAE run on a folder with a user's evaluator, which gets the
    autoencoder's round trip; afterwards not one ``opensd.shapes`` module is loaded."""
    folder = _folder(tmp_path / "imgs")
    cfg = _vae_cfg(tmp_path / "run", {"source": "folder", "path": str(folder), "image_size": 16})
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from opensd.training.config import stage_config_from_dict
        from opensd.training.loop import run_stage
        from opensd.training.vae import VAEStage, VAEStageConfig

        calls = []

        def judge(round_trip):
            x = torch.zeros(3, 3, 16, 16)
            y = round_trip(x)
            calls.append(tuple(y.shape))
            return {{"mine": float(y.abs().max() <= 1), "calls": float(len(calls))}}

        torch.set_num_threads(1)
        run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, json.loads({json.dumps(json.dumps(cfg))})),
                           evaluator=judge))
        print(json.dumps({{"calls": calls, "shapes": sorted(m for m in sys.modules if m.startswith("opensd.shapes")),
                           "eval": sorted(m for m in sys.modules if m.startswith("opensd.eval"))}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["calls"] == [[3, 3, 16, 16]]  # once, at the last step, on the images it was given
    assert out["shapes"] == [] and out["eval"] == []
    evals = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["mine"] == 1.0 and evals[0]["calls"] == 1.0
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()  # the stage's own grid


def test_without_an_evaluator_a_shapes_run_logs_no_metrics(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = stage_config_from_dict(VAEStageConfig, _vae_cfg(tmp_path / "run", {"image_size": 16}))
    run_stage(VAEStage(cfg, evaluator=None))
    evals = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 1 and set(evals[0]) == {"step", "kind", "eval_seconds"}


def test_cli_evaluator_option_loads_a_callable_and_refuses_bad_ones(tmp_path: Path, monkeypatch) -> None:
    from opensd.cli.main import app

    (tmp_path / "my_judges.py").write_text(textwrap.dedent("""
        SEEN = []

        def judge(round_trip):
            SEEN.append(1)
            return {"from_cli": 0.5}

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = _folder(tmp_path / "imgs")
    base = ["train", "vae", "--data", str(folder), "--image-size", "16", "--steps", "2", "--batch-size", "2", "-q",
            "--set", "model_preset=tiny", "--set", "train.sample_every=0", "--set", "train.checkpoint_every=0",
            "--set", "grid_images=2", "--set", "scale_images=4"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--evaluator", "my_judges:judge"])
    assert res.exit_code == 0, res.output
    evals = [r for r in read_log(tmp_path / "a" / "log.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["from_cli"] == 0.5
    for spec, problem in (("my_judges", "give MODULE:NAME"), ("no_such_module_xyz:f", "cannot load it"),
                          ("my_judges:missing", "cannot load it"), ("my_judges:NOT_CALLABLE", "not a callable")):
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--evaluator", spec])
        assert res.exit_code == 2 and problem in res.output and "Traceback" not in res.output, (spec, res.output)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("stage", ["vae", "clip", "unet", "taesd", "lcm"])
def test_every_command_with_an_evaluator_protocol_takes_an_evaluator(stage: str) -> None:
    from opensd.cli.main import app

    res = CliRunner().invoke(app, ["train", stage, "--help"])
    assert res.exit_code == 0 and "--evaluator" in res.output
