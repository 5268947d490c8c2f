"""The training loop on a GPU: the same stages run unchanged, and the queued NaN check still stops the run.

Skipped where CUDA is absent (this project's CI has none); run on a GPU machine with
``pytest tests/test_training_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opensd.training.config import stage_config_from_dict
from opensd.training.data import load_vae
from opensd.training.loop import NonFiniteLossError, list_checkpoints, read_log, run_stage
from opensd.training.vae import VAEStage, VAEStageConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cfg(out: Path, **train) -> dict:
    t = {"out_dir": str(out), "steps": 6, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "log_every": 4,
         "sample_every": 0, "checkpoint_every": 2, "keep_checkpoints": 5, "progress": False, "device": "cuda",
         **train}
    return {"model_preset": "tiny", "train": t, "data": {"image_size": 16}, "eval_per_category": 1,
            "grid_images": 2, "scale_images": 8}


def test_vae_stage_trains_and_exports_on_the_gpu(tmp_path: Path) -> None:
    result = run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg(tmp_path / "run"))))
    assert result.step == 6
    rows = [r for r in read_log(tmp_path / "run/log.jsonl") if r["kind"] == "train"]
    assert rows and all(r["loss"] == r["loss"] for r in rows)
    vae = load_vae(tmp_path / "run")
    assert all(p.device.type == "cpu" for p in vae.parameters())  # exports load anywhere


def test_nan_on_the_gpu_stops_at_its_step_before_any_later_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import opensd.training.vae as vae_mod

    calls = {"n": 0}
    real = vae_mod.kl_per_pixel

    def kl_with_nan(mean, logvar, pixels):
        calls["n"] += 1
        out = real(mean, logvar, pixels)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(vae_mod, "kl_per_pixel", kl_with_nan)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(NaN\) in group 'vae' at step 3.*step 2"):
        run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg(tmp_path / "run", steps=10))))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]


def test_clip_and_unet_stages_train_export_and_generate_on_the_gpu(tmp_path: Path) -> None:
    import opensd
    from opensd.training.clip import CLIPStage, CLIPStageConfig
    from opensd.training.unet import UNetStage, UNetStageConfig

    run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg(tmp_path / "vae", steps=2))))
    t = {"out_dir": str(tmp_path / "clip"), "steps": 4, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0,
         "log_every": 2, "sample_every": 0, "checkpoint_every": 0, "progress": False, "device": "cuda",
         "ema_decay": 0.9}
    clip = {"model_preset": "tiny", "tokenizer_corpus": 300, "vocab_size": 96, "hard_negatives": 2,
            "eval_per_category": 1, "train": t, "data": {"image_size": 16, "pool_size": 64, "workers": 2}}
    run_stage(CLIPStage(stage_config_from_dict(CLIPStageConfig, clip)))
    t = {**t, "out_dir": str(tmp_path / "unet"), "steps": 6, "sample_every": 6}
    unet = {"model_preset": "tiny", "vae_dir": str(tmp_path / "vae"), "clip_dir": str(tmp_path / "clip"),
            "cache_size": 32, "cache_batch": 16, "train": t, "data": {"image_size": 16, "workers": 2},
            "eval_per_category": 1, "sample_steps": 2, "min_snr_gamma": 5.0, "export_half": True}
    result = run_stage(UNetStage(stage_config_from_dict(UNetStageConfig, unet)))
    rows = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "train"]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    pipe = opensd.load(result.export)
    assert pipe.txt2img("a red circle", steps=2, seed=1)[0].size == (16, 16)


def test_a_gpu_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Checkpoints hold CPU and CUDA RNG states; resuming on the GPU restores both."""
    run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg(tmp_path / "run", steps=4))))
    result = run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, cfg(tmp_path / "run", steps=6))), resume=True)
    assert result.step == 6 and [s for s, _ in list_checkpoints(tmp_path / "run")][-1] == 6
