"""``opensd train`` from the command line: configs/shapes/train.sh, the quick preset, the time estimate."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "configs" / "shapes" / "train.sh"
TOOLS = ("bash", "dirname", "date", "tr", "cat")  # what train.sh calls besides opensd


# ----------------------------------------------------------------------------- configs/shapes/train.sh


def _layout(tmp_path: Path) -> Path:
    """A repository-shaped folder holding a copy of train.sh and its configs; returns the script."""
    shapes = tmp_path / "repo" / "configs" / "shapes"
    shutil.copytree(SCRIPT.parent, shapes)
    return shapes / "train.sh"


def _fake(path: Path, log: Path, python: bool = False) -> Path:
    """An executable that logs its arguments (as python: answers ``-c`` checks with success)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check = 'if [ "$1" = "-c" ]; then exit 0; fi\n' if python else ""
    path.write_text(f'#!/bin/sh\n{check}echo "{path.name} $*" >> "{log}"\n')
    path.chmod(0o755)
    return path


def _tools(tmp_path: Path) -> Path:
    """A PATH folder with only the tools train.sh needs (no opensd, no python)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in TOOLS:
        found = shutil.which(name)
        assert found, name
        (tools / name).symlink_to(found)
    return tools


def _run(script: Path, path: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSD", "VAE_ARGS", "CLIP_ARGS", "UNET_ARGS")}
    env["PATH"] = path
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_train_sh_uses_the_repositorys_venv_without_activation(tmp_path: Path) -> None:
    script, log, tools = _layout(tmp_path), tmp_path / "calls.log", _tools(tmp_path)
    _fake(tmp_path / "repo" / ".venv" / "bin" / "opensd", log)
    _fake(tools / "opensd", tmp_path / "wrong.log")  # the venv comes before PATH
    res = _run(script, str(tools), "--steps", "1")
    assert res.returncode == 0, res.stderr
    calls = _calls(log)
    assert [c.split()[:3] for c in calls] == [["opensd", "train", s] for s in ("vae", "clip", "unet")]
    assert all(c.endswith("--steps 1") and f"{s}.toml" in c for c, s in zip(calls, ("vae", "clip", "unet"), strict=True))
    assert not (tmp_path / "wrong.log").exists()


def test_train_sh_falls_back_to_path_then_python_then_says_what_to_do(tmp_path: Path) -> None:
    script, tools = _layout(tmp_path), _tools(tmp_path)
    res = _run(script, str(tools))
    assert res.returncode == 2
    assert "cannot find opensd" in res.stderr and "make install-runtime" in res.stderr and "OPENSD" in res.stderr
    py_log = tmp_path / "py.log"
    _fake(tools / "python3", py_log, python=True)
    res = _run(script, str(tools))
    assert res.returncode == 0, res.stderr
    assert [c.split()[:5] for c in _calls(py_log)] == [["python3", "-m", "opensd.cli.main", "train", s]
                                                        for s in ("vae", "clip", "unet")]
    path_log = tmp_path / "path.log"
    _fake(tools / "opensd", path_log)
    assert _run(script, str(tools)).returncode == 0 and len(_calls(path_log)) == 3  # PATH before python


def test_train_sh_dry_run_prints_the_commands_and_runs_nothing(tmp_path: Path) -> None:
    script, log, tools = _layout(tmp_path), tmp_path / "calls.log", _tools(tmp_path)
    _fake(tools / "opensd", log)
    res = _run(script, str(tools), "--dry-run", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("opensd train") and "--device cpu" in line for line in lines)
    assert not log.exists()


def test_train_rich_sh_trains_both_u_nets_on_the_rich_world_and_scores_both(tmp_path: Path) -> None:
    """configs/shapes/train_rich.sh: VAE, CLIP, the CLIP U-Net and the MiniLM U-Net on the rich world,
    then the rich benchmark and held-out suites of each; stage extras and eval extras go where they belong."""
    script, log, tools = _layout(tmp_path).with_name("train_rich.sh"), tmp_path / "calls.log", _tools(tmp_path)
    _fake(tools / "opensd", log)
    env_extra = {"OUT": "/tmp/r", "UNET_ARGS": "--set cache_size=64", "EVAL_ARGS": "--per-category 1"}
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSD", "VAE_ARGS", "CLIP_ARGS", "UNET_ARGS")}
    env |= {"PATH": str(tools), **env_extra}
    res = subprocess.run(["bash", str(script), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    calls = _calls(log)
    trains, evals = calls[:4], calls[4:]
    assert [c.split()[:3] for c in trains] == [["opensd", "train", s] for s in ("vae", "clip", "unet", "unet")]
    assert all("--set data.world=rich" in c and "--device cpu" in c for c in trains)
    assert "unet.toml" in trains[2] and "clip_dir=/tmp/r/clip" in trains[2] and "vae_dir=/tmp/r/vae" in trains[2]
    assert "unet_minilm.toml" in trains[3] and "clip_dir" not in trains[3] and "vae_dir=/tmp/r/vae" in trains[3]
    assert all(c.endswith("--set cache_size=64") for c in trains[2:]) and "cache_size" not in trains[0] + trains[1]
    assert [(c.split()[3], c.split()[5]) for c in evals] == [
        (f"/tmp/r/{n}/model", suite) for n in ("unet_clip", "unet_minilm") for suite in ("benchmark", "holdout")]
    assert all("--world rich" in c and c.endswith("--per-category 1") and "--device" not in c for c in evals)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_compare_body_sh_trains_clip_then_both_bodies_and_scores_both(tmp_path: Path, jobs: str) -> None:
    """configs/shapes/compare_body.sh: the rich CLIP, then the default model's U-Net body under it and
    under MiniLM (side by side with JOBS=2), then both suites of each, one thread per command."""
    script, log, tools = _layout(tmp_path).with_name("compare_body.sh"), tmp_path / "calls.log", _tools(tmp_path)
    fake = _fake(tools / "opensd", log)
    fake.write_text(f'#!/bin/sh\necho "opensd $* threads=$OMP_NUM_THREADS" >> "{log}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSD", "CLIP_ARGS", "UNET_ARGS", "EVAL_ARGS")}
    env |= {"PATH": str(tools), "OUT": "/tmp/b", "JOBS": jobs, "UNET_ARGS": "--set cache_size=64",
            "EVAL_ARGS": "--per-category 1"}
    res = subprocess.run(["bash", str(script), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    calls = [c.removesuffix(" threads=1") for c in _calls(log)]
    assert len(calls) == 7 and all(c.endswith(" threads=1") for c in _calls(log))
    clip, unets, evals = calls[0], sorted(calls[1:3]), calls[3:]
    assert clip.split()[:3] == ["opensd", "train", "clip"] and "--set data.world=rich" in clip
    assert "--steps 266" in clip and "train.out_dir=/tmp/b/clip" in clip and clip.endswith("--device cpu")
    assert "unet_body_clip.toml" in unets[0] and "clip_dir=/tmp/b/clip" in unets[0]
    assert "unet_body_minilm.toml" in unets[1] and "clip_dir" not in unets[1]
    assert all("--device cpu --set cache_size=64" in c for c in unets)
    assert sorted((c.split()[3], c.split()[5]) for c in evals) == sorted(
        (f"/tmp/b/{n}/model", suite) for n in ("unet_clip", "unet_minilm") for suite in ("benchmark", "holdout"))
    assert all("--world rich" in c and c.endswith("--per-category 1") and "--device" not in c for c in evals)


# ----------------------------------------------------------------------------- --preset quick


pytestmark = pytest.mark.usefixtures("one_thread")


def _app():
    from typer import Typer

    from opensd.cli.train import register

    app = Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return app


def _config(stage: str, preset: str | None, config=None, sets=(), options=None):
    from opensd.cli.train import _config
    from opensd.training.clip import CLIPStageConfig
    from opensd.training.unet import UNetStageConfig
    from opensd.training.vae import VAEStageConfig

    cls = {"vae": VAEStageConfig, "clip": CLIPStageConfig, "unet": UNetStageConfig}[stage]
    return _config(stage, cls, config, list(sets), options or {}, preset)


def test_quick_preset_is_small_and_everything_the_user_gives_wins(tmp_path: Path) -> None:
    from opensd.training.presets import QUICK_SECONDS, RUN_PRESETS

    for stage, steps, batch in (("vae", 400, 16), ("clip", 400, 64), ("unet", 600, 32)):
        default, quick = _config(stage, None), _config(stage, "quick")
        assert quick.model_preset == "tiny" and default.model_preset == "small", stage
        assert (quick.train.steps, quick.train.batch_size) == (steps, batch), stage
        assert quick.train.steps < default.train.steps and quick.train.checkpoint_every == 0, stage
        assert quick.train.out_dir == default.train.out_dir  # the run folder is still --out's
        assert RUN_PRESETS["quick"][stage]["train"]["steps"] == steps
        assert 0 < QUICK_SECONDS[stage] <= 30 * 60  # measured on a busy 2-core CPU
    assert _config("unet", "quick").cache_size == 2000 and _config("unet", None).cache_size == 20000
    toml = tmp_path / "x.toml"
    toml.write_text("[train]\nsteps = 123\nlr = 0.5\n")
    cfg = _config("vae", "quick", toml, ["train.lr=0.25"], {"train.batch_size": 3})
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size, cfg.model_preset) == (123, 0.25, 3, "tiny")
    res = CliRunner().invoke(_app(), ["train", "vae", "--preset", "slow", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown --preset 'slow'; choose one of quick" in res.output


# ----------------------------------------------------------------------------- the time estimate


def test_durations_read_like_a_person_would_say_them() -> None:
    from opensd.training.estimate import format_duration

    cases = {0: "0 s", 42.4: "42 s", 89: "1 min", 12 * 60: "12 min", 3 * 3600 + 20 * 60: "3 h 20 min",
             7200: "2 h", 53 * 3600 + 5: "2 d 5 h", 48 * 3600: "2 d"}
    assert {k: format_duration(k) for k in cases} == cases


def test_estimate_line_names_time_steps_speed_the_limit_and_the_quick_preset() -> None:
    from opensd.training.estimate import estimate_line

    assert estimate_line("unet", 40_000, 3.3, quick_seconds=180) == (
        "train unet: about 3 h 22 min for 40,000 steps at 3.3 steps/s; --preset quick takes about 3 min")
    assert estimate_line("vae", 600, 10.0, quick_seconds=60) == "train vae: about 1 min for 600 steps at 10 steps/s"
    assert estimate_line("vae", 100_000, 20.0, time_limit=90.0) == (
        "train vae: 100,000 steps at 20 steps/s would take about 1 h 23 min; train.time_limit stops the run "
        "after 2 min, at about 1,800 steps")


def test_time_estimate_waits_for_a_few_timed_steps_then_prints_once() -> None:
    from types import SimpleNamespace

    from opensd.training.estimate import TimeEstimate

    now, lines = [0.0], []
    est = TimeEstimate("clip", 1000, min_steps=4, min_seconds=2.0, clock=lambda: now[0], write=lines.append,
                       quick_seconds=60)
    main = SimpleNamespace(is_main=True)
    for done in range(1, 12):
        now[0] = 100.0 + (done - 1) * 0.5  # the clock starts after the first step (warm-up)
        est(done, main)
        if done < 5:
            assert lines == []  # 4 timed steps, 2 s, are needed
    assert lines == ["train clip: about 8 min for 1,000 steps at 2 steps/s"]
    other = TimeEstimate("clip", 1000, min_steps=1, min_seconds=0.0, clock=lambda: now[0], write=lines.append)
    for done in range(1, 5):
        now[0] += 1
        other(done, SimpleNamespace(is_main=False))
    assert len(lines) == 1  # only rank 0 prints


def test_a_training_run_prints_its_estimate_and_the_bar_its_eta(tmp_path: Path, monkeypatch) -> None:
    import opensd.training.estimate as estimate

    monkeypatch.setattr(estimate, "MIN_STEPS", 2)
    monkeypatch.setattr(estimate, "MIN_SECONDS", 0.0)
    toml = tmp_path / "vae.toml"
    toml.write_text('model_preset = "tiny"\neval_per_category = 0\ngrid_images = 2\nscale_images = 8\n'
                    '[train]\ncheckpoint_every = 0\nsample_every = 0\nwarmup_steps = 0\nlog_every = 2\n')
    res = CliRunner().invoke(_app(), ["train", "vae", "--config", str(toml), "--out", str(tmp_path / "run"),
                                      "--batch-size", "2", "--image-size", "16", "--steps", "6"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.startswith("train vae: about")]
    assert len(lines) == 1 and lines[0].endswith(" steps/s") and " for 6 steps at " in lines[0], res.stderr
    assert "6/6 [" in res.stderr and "<00:00" in res.stderr  # tqdm's bar: elapsed<remaining
    assert " wall" in res.stdout.splitlines()[0]  # the summary line says how long it took


@pytest.mark.slow
def test_the_quick_preset_trains_a_model_that_generate_loads(tmp_path: Path) -> None:
    """The three stages with --preset quick (cut to a few steps) export a model `opensd generate` draws with."""
    from opensd.cli.main import app

    runner, runs = CliRunner(), tmp_path / "runs"
    short = ["--preset", "quick", "--steps", "3", "-q"]
    for args in (["vae", "--out", str(runs / "vae")], ["clip", "--out", str(runs / "clip")],
                 ["unet", "--vae", str(runs / "vae"), "--clip", str(runs / "clip"), "--out", str(runs / "unet"),
                  "--set", "cache_size=64"]):
        res = runner.invoke(app, ["train", *args, *short])
        assert res.exit_code == 0, res.output
    out = tmp_path / "x.png"
    res = runner.invoke(app, ["generate", "a red circle", "-m", str(runs / "unet" / "model"), "--steps", "2",
                              "--seed", "1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (32, 32)
