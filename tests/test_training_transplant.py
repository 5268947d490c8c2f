"""``unet_from``: a model's VAE and U-Net body under a new text encoder
(:mod:`opensd.training.transplant`): every U-Net weight but the cross-attention's keys and
values is the donor's, those start fresh at the new encoder's width, and the run trains,
exports and generates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import randomize, tiny_family_model, tiny_word_bundle
from test_training_minilm import write_bert_folder

import opensd
from opensd.checkpoints import bert
from opensd.checkpoints.opensd_format import save_opensd
from opensd.config import ConfigError, to_dict
from opensd.models.clip import CLIPTextModel
from opensd.models.stable_diffusion import ModelFamily
from opensd.models.unet import UNetConfig, UNetModel
from opensd.training.config import stage_config_from_dict
from opensd.training.data import save_text_encoder
from opensd.training.loop import run_stage
from opensd.training.transplant import reads_text
from opensd.training.unet import UNetStage, UNetStageConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16


@pytest.fixture(scope="module")
def donor(tmp_path_factory) -> Path:
    """A tiny SD 1.x opensd model at 16 px: the body to start from."""
    model, tok = tiny_word_bundle(seed=3)
    model.cfg = model.cfg.replace(image_size=SIZE)
    return save_opensd(model, tok, tmp_path_factory.mktemp("donor") / "model")


def run_cfg(out: Path, donor: Path, **extra) -> dict:
    t = {"out_dir": str(out), "steps": 1, "batch_size": 4, "lr": 1e-12, "warmup_steps": 0, "ema_decay": 0.0,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False}
    return {"unet_from": str(donor), "cache_size": 4, "cache_batch": 4, "train": t, "data": {"image_size": SIZE},
            "eval_per_category": 0, "sample_steps": 2, **extra}


def test_only_the_cross_attention_keys_and_values_read_the_text() -> None:
    keys = list(UNetModel(UNetConfig.tiny()).state_dict())
    text = [k for k in keys if reads_text(k)]
    blocks = {k.rsplit(".attn2.", 1)[0] for k in text}
    assert text and len(text) == 2 * len(blocks)  # to_k and to_v of every transformer block, no biases
    assert all(k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in text)
    assert not any(reads_text(k) for k in keys if ".attn1." in k or ".to_q." in k or ".to_out." in k)


@pytest.mark.parametrize("change, message", [
    ({"vae_dir": "runs/vae"}, "unet_from brings its model's VAE and U-Net: leave init_from and vae_dir empty"),
    ({"init_from": "models/x"}, "unet_from brings its model's VAE and U-Net: leave init_from and vae_dir empty"),
    ({}, "set clip_dir .* or text_encoder = 'minilm'"),
])
def test_config_errors(tmp_path: Path, donor: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        stage_config_from_dict(UNetStageConfig, {**run_cfg(tmp_path, donor), **change})


def _check_start(stage: UNetStage, donor: Path, width: int) -> None:
    """The run's U-Net (one step at lr 1e-12) is the donor's but for fresh keys and values of ``width`` inputs."""
    ref = opensd.load(donor).model
    start = stage.ctx.modules["unet"].unet.state_dict()
    fresh = [k for k in start if reads_text(k)]
    assert stage.fresh == sorted(fresh) and fresh
    for k, v in start.items():
        if k in fresh:
            assert v.shape[1] == width and (v.shape != ref.unet.state_dict()[k].shape
                                            or not torch.allclose(v, ref.unet.state_dict()[k], atol=1e-3))
        else:
            torch.testing.assert_close(v, ref.unet.state_dict()[k], atol=1e-9, rtol=0)
    assert all(torch.equal(v, ref.vae.state_dict()[k]) for k, v in stage.vae.state_dict().items())
    assert stage.sd_cfg.schedule == ref.cfg.schedule
    assert dataclasses.replace(stage.sd_cfg.unet, context_dim=1) == dataclasses.replace(ref.cfg.unet, context_dim=1)


def test_a_new_clip_starts_from_the_body_trains_and_generates(tmp_path: Path, donor: Path) -> None:
    other, tok = tiny_word_bundle(seed=9)  # another text encoder, of another width
    text_cfg = dataclasses.replace(other.cfg.text, width=48, heads=4)
    torch.manual_seed(9)
    encoder = randomize(CLIPTextModel(text_cfg), 9)
    save_text_encoder(encoder, tok, tmp_path / "clip" / "text_encoder")
    stage = UNetStage(stage_config_from_dict(UNetStageConfig, run_cfg(tmp_path / "run", donor,
                                                                      clip_dir=str(tmp_path / "clip"))))
    result = run_stage(stage)
    _check_start(stage, donor, 48)
    assert stage.sd_cfg.unet.context_dim == 48
    assert stage.resolved_config()["model"] == to_dict(stage.sd_cfg.unet)  # the run records what it trained
    pipe = opensd.load(result.export)
    assert pipe.cfg == stage.sd_cfg
    assert pipe.txt2img("a red circle", steps=2, seed=1, cfg_scale=3.0)[0].size == (SIZE, SIZE)


def test_minilm_starts_from_the_body(tmp_path: Path, donor: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_bert_folder(tmp_path / "bert")
    monkeypatch.setattr(bert, "minilm_folder", lambda: tmp_path / "bert")
    stage = UNetStage(stage_config_from_dict(UNetStageConfig, run_cfg(tmp_path / "run", donor, text_encoder="minilm",
                                                                      text_context=12)))
    run_stage(stage)
    _check_start(stage, donor, 32)
    assert stage.context.shape == (4, 12, 32)


def test_models_it_cannot_take(tmp_path: Path, donor: Path) -> None:
    clip, tok = tiny_word_bundle(seed=1)
    save_text_encoder(clip.text_encoder, tok, tmp_path / "clip" / "text_encoder")
    other = {"clip_dir": str(tmp_path / "clip")}
    with pytest.raises(ConfigError, match="unet_from's model makes 16 px images; set data.image_size = 16"):
        run_stage(UNetStage(stage_config_from_dict(UNetStageConfig, {**run_cfg(tmp_path / "a", donor, **other),
                                                                     "data": {"image_size": 32}})))
    with pytest.raises(ConfigError, match="unet_from: .* neither a diffusers pipeline .* nor an opensd model"):
        run_stage(UNetStage(stage_config_from_dict(UNetStageConfig, run_cfg(tmp_path / "b", tmp_path / "clip",
                                                                            **other))))
    model, xl_tok = tiny_family_model(ModelFamily.SDXL)
    model.cfg = model.cfg.replace(image_size=SIZE)
    xl = save_opensd(model, xl_tok, tmp_path / "xl")
    with pytest.raises(ConfigError, match="sdxl model, whose U-Net also reads the pooled text"):
        run_stage(UNetStage(stage_config_from_dict(UNetStageConfig, run_cfg(tmp_path / "c", xl, **other))))
