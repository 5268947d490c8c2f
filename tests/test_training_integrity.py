"""Training checkpoints verify themselves: a corrupt one is set aside and resume falls back.

One short VAE run (checkpoints at steps 2, 4 and 6) is copied for each test and damaged:
bit flips, truncation, a missing hash file, a checkpoint of another stage or shape.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from test_training import assert_states_equal, vae_cfg

from opensd.training.checkpoint_store import atomic_save, hash_path
from opensd.training.config import stage_config_from_dict
from opensd.training.loop import NonFiniteLossError, ResumeError, list_checkpoints, run_stage
from opensd.training.vae import VAEStage, VAEStageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def stage(out: Path, steps: int = 6, **train) -> VAEStage:
    cfg = vae_cfg(out, steps=steps, **{"checkpoint_every": 2, "keep_checkpoints": 3, **train})
    cfg["eval_per_category"] = 0
    return VAEStage(stage_config_from_dict(VAEStageConfig, cfg))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run_stage(stage(out))
    torch.set_num_threads(n)
    return out


@pytest.fixture
def run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}.pt"


def flip_bits(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x10
    data[i + 7] ^= 0x01
    path.write_bytes(bytes(data))


def training_state(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    return {k: state[k] for k in ("modules", "optimizers", "ema", "rng", "data", "step")}


def test_every_checkpoint_records_its_sha256(reference: Path) -> None:
    assert [s for s, _ in list_checkpoints(reference)] == [2, 4, 6]
    for _, p in list_checkpoints(reference):
        digest, name = hash_path(p).read_text().split()
        assert name == p.name and digest == hashlib.sha256(p.read_bytes()).hexdigest()  # `sha256sum -c` format


def test_flipped_bits_are_set_aside_and_resume_falls_back_exactly(reference: Path, run: Path, capsys) -> None:
    flip_bits(ckpt(run, 6))
    damaged = ckpt(run, 6).read_bytes()
    result = run_stage(stage(run, steps=6), resume=True)
    err = capsys.readouterr().err
    assert "step_00000006.pt" in err and "is corrupt" in err and f"falling back to {ckpt(run, 4)} (step 4)" in err
    kept = run / "checkpoints" / "step_00000006.pt.corrupt"
    assert kept.read_bytes() == damaged  # no data lost
    # steps 5 and 6 trained again from step 4 give the unbroken run's state, bit for bit
    assert result.step == 6
    assert_states_equal(training_state(ckpt(reference, 6)), training_state(ckpt(run, 6)))


def test_a_truncated_checkpoint_is_set_aside_too(run: Path, capsys) -> None:
    data = ckpt(run, 6).read_bytes()
    ckpt(run, 6).write_bytes(data[: len(data) // 3])
    assert run_stage(stage(run, steps=6), resume=True).step == 6
    assert "falling back to" in capsys.readouterr().err and (run / "checkpoints/step_00000006.pt.corrupt").exists()


def test_when_no_checkpoint_is_good_the_error_is_one_line_naming_them(run: Path) -> None:
    for step in (2, 4, 6):
        flip_bits(ckpt(run, step), at=0.3)
    with pytest.raises(ResumeError, match="no good checkpoint to resume") as e:
        run_stage(stage(run, steps=6), resume=True)
    msg = str(e.value)
    assert "\n" not in msg and all(f"step_0000000{s}.pt" in msg for s in (2, 4, 6))
    assert sorted(p.name for p in (run / "checkpoints").glob("*.corrupt")) == [
        f"step_0000000{s}.pt.corrupt" for s in (2, 4, 6)]


def test_a_checkpoint_without_a_hash_resumes_unverified(reference: Path, run: Path, capsys) -> None:
    hash_path(ckpt(run, 6)).unlink()
    assert run_stage(stage(run, steps=8), resume=True).step == 8
    assert "resuming from it unverified" in capsys.readouterr().err


def test_nan_stop_names_the_checkpoint_that_really_is_good(run: Path, monkeypatch) -> None:
    import opensd.training.vae as vae_mod

    real, calls = vae_mod.kl_per_pixel, {"n": 0}

    def kl_with_nan(mean, logvar, pixels):
        calls["n"] += 1
        return real(mean, logvar, pixels) * (float("nan") if calls["n"] == 2 else 1.0)

    def damage(step: int, ctx) -> None:
        if step == 7:
            flip_bits(ckpt(run, 6))

    monkeypatch.setattr(vae_mod, "kl_per_pixel", kl_with_nan)
    with pytest.raises(NonFiniteLossError) as e:
        run_stage(stage(run, steps=10, keep_checkpoints=5), resume=True, hooks=[damage])
    msg = str(e.value)
    assert "at step 8" in msg and "step_00000006.pt is corrupt" in msg
    assert f"the last good checkpoint is {ckpt(run, 4)} (step 4)" in msg


def rewrite(path: Path, change) -> None:
    """Change a checkpoint's content and record its new hash (a well-formed file of the wrong structure)."""
    state = torch.load(path, weights_only=True)
    change(state)
    atomic_save(state, path)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s.update(stage="unet"), "is a checkpoint of the 'unet' stage, not of 'vae'"),
        (lambda s: s.pop("optimizers"), "lacks optimizers"),
        (lambda s: s["modules"].clear(), "lacks the modules state of vae"),
        (lambda s: s["modules"]["vae"].update({k: torch.zeros(3) for k in list(s["modules"]["vae"])[:1]}),
         "does not fit this run's vae module"),
    ],
    ids=["other-stage", "missing-part", "no-modules", "wrong-shape"],
)
def test_a_checkpoint_of_the_wrong_structure_is_one_line_naming_it(run: Path, change, problem: str) -> None:
    rewrite(ckpt(run, 6), change)
    with pytest.raises(ResumeError) as e:
        run_stage(stage(run, steps=6), resume=True)
    msg = str(e.value)
    assert problem in msg and str(ckpt(run, 6)) in msg and "\n" not in msg, msg
