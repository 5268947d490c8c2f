"""``opensd train`` from the command line: configs/shapes/train.sh, the quick preset, the time estimate."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
    assert all(c.endswith("--steps 1") and f"{s}.toml" in c for c, s in zip(calls, ("vae", "clip", "unet")))
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
