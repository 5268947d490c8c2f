"""An installed opensd (a wheel, not the source tree) finds its default model.

The fast tests check the lookup order of :mod:`opensd.defaults`; the slow one builds
a wheel from a copy of the repository, installs it with ``pip install --no-deps
--target`` and loads the default model from outside the repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import opensd.defaults as d
from opensd.checkpoints.opensd_format import CONFIG, WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_the_packaged_model_comes_first_then_the_repository_then_none(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(d.ENV_VAR, raising=False)
    packaged = _fake_model(tmp_path / "pkg" / d.DEFAULT_MODEL_NAME)
    repo = _fake_model(tmp_path / "repo" / d.DEFAULT_MODEL_NAME)
    monkeypatch.setattr(d, "PACKAGE_MODELS", packaged.parent)
    monkeypatch.setattr(d, "REPO_MODELS", repo.parent)
    assert d.default_model_path() == packaged  # an installed wheel's copy
    shutil.rmtree(packaged)
    assert d.default_model_path() == repo  # a source checkout or an editable install
    (repo / "model.safetensors").unlink()
    assert d.default_model_path() is None  # a folder without weights is no model
    with pytest.raises(ValueError, match=r"no default model found.*OPENSD_MODEL=PATH"):
        d.resolve_model(None)
    monkeypatch.setenv(d.ENV_VAR, str(tmp_path / "mine"))
    assert d.default_model_path() == tmp_path / "mine"  # $OPENSD_MODEL wins


def test_setup_ships_the_files_a_model_folder_needs() -> None:
    text = (REPO / "setup.py").read_text()
    model = REPO / "models" / d.DEFAULT_MODEL_NAME
    if not model.is_dir():
        pytest.skip("no models/opensd-shapes in this checkout")
    for needed in (CONFIG, WEIGHTS, "tokenizer"):
        assert f'"{needed}"' in text, needed
        assert (model / needed).exists(), needed
    manifest = (REPO / "MANIFEST.in").read_text()
    for needed in (CONFIG, WEIGHTS, "tokenizer"):
        assert f"models/opensd-shapes/{needed}" in manifest, needed
    tiny = "taesd_decoder.safetensors"  # its tiny decoder (decoder="tiny", TAESD previews)
    assert f'"{tiny}"' in text and f"models/opensd-shapes/{tiny}" in manifest and (model / tiny).is_file()
    seg = "segmenter.safetensors"  # its segmenter (opensd explain --segmenter)
    assert f'"{seg}"' in text and f"models/opensd-shapes/{seg}" in manifest and (model / seg).is_file()


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_and_loads_the_default_model(tmp_path: Path) -> None:
    if not (REPO / "models" / d.DEFAULT_MODEL_NAME / WEIGHTS).is_file():
        pytest.skip("no models/opensd-shapes in this checkout")
    src = tmp_path / "src-copy"  # build from a copy: an in-tree build would leave build/ in the repository
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "models" / d.DEFAULT_MODEL_NAME, src / "models" / d.DEFAULT_MODEL_NAME)
    wheels = tmp_path / "wheels"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(wheels), str(src)], check=True, timeout=300)
    (wheel,) = wheels.glob("opensd-*.whl")
    assert wheel.stat().st_size < 40 * 2**20, wheel.stat().st_size  # the 34 MB model compresses a little
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in (d.ENV_VAR, "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    code = ("import opensd; from opensd.defaults import default_model_path; p = default_model_path(); print(p); "
            "print(opensd.__file__); print(opensd.load(p).txt2img('a red circle', steps=1, seed=1)[0].size)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    model_path, module, size = out.stdout.split("\n")[:3]
    assert Path(module).is_relative_to(target) and Path(model_path).is_relative_to(target), out.stdout
    assert size == "(32, 32)"

