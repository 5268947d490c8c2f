"""Stable Diffusion conditioned on a BERT text encoder (MiniLM's architecture): the config,
the conditioner, prompt encoding, opensd-folder round trip and generation, on tiny models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bert_bundle, tiny_clip_bundle, tiny_wordpiece

import opensd
from opensd.checkpoints import CheckpointError, load_model
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.embeddings import TextualInversion
from opensd.checkpoints.opensd_format import read_config, save_opensd
from opensd.checkpoints.original import save_original
from opensd.config import ConfigError, from_dict, to_dict
from opensd.errors import OpenSDError
from opensd.models.bert import BertTextConfig, BertTextModel
from opensd.models.stable_diffusion import BertConditioner, ModelFamily, SDConfig, StableDiffusion
from opensd.pipelines import RequestError
from opensd.pipelines.conditioning import Conditioner, bert_attention_mask
from opensd.prompts.vocabulary import prompt_warnings
from opensd.tokenizers.wordpiece import WordPieceTokenizer
from opensd.training.text_encoding import encode_ids

# ---- the config ----------------------------------------------------------------------------


def test_config_round_trips_both_text_encoder_kinds() -> None:
    bert = SDConfig.tiny_bert()
    d = to_dict(bert)
    assert d["text"]["kind"] == "bert" and bert.context_dim == 32 == bert.unet.context_dim
    assert from_dict(SDConfig, json.loads(json.dumps(d))) == bert
    clip = SDConfig.tiny()
    assert "kind" not in to_dict(clip)["text"]
    assert from_dict(SDConfig, to_dict(clip)) == clip
    minilm = dataclasses.replace(bert, text=BertTextConfig.minilm_l6(pooler=False),
                                 unet=dataclasses.replace(bert.unet, context_dim=384))
    assert minilm.context_dim == 384 and from_dict(SDConfig, to_dict(minilm)) == minilm
    assert BertTextConfig.tiny().max_length == 16 == BertTextConfig.tiny().max_positions


def test_config_errors_are_one_line() -> None:
    d = to_dict(SDConfig.tiny_bert())
    bad_key = {**d, "text": {**d["text"], "max_position": 16}}
    with pytest.raises(ConfigError, match=r"SDConfig.text: unknown key\(s\) max_position") as e:
        from_dict(SDConfig, bad_key)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"text.kind: 't5' is not allowed; choose one of 'bert'"):
        from_dict(SDConfig, {**d, "text": {**d["text"], "kind": "t5"}})
    with pytest.raises(ConfigError, match="unknown key"):  # BERT keys without the kind: read as CLIP's, refused
        from_dict(SDConfig, {**d, "text": {k: v for k, v in d["text"].items() if k != "kind"}})
    tiny_bert = SDConfig.tiny_bert()
    with pytest.raises(ConfigError, match="a BERT text encoder conditions the sd1 family only, not sd2"):
        dataclasses.replace(tiny_bert, family=ModelFamily.SD2)
    with pytest.raises(ConfigError, match="has no pooler"):
        dataclasses.replace(tiny_bert, text=BertTextConfig.tiny())
    with pytest.raises(ConfigError, match=r"context_dim \(32\) must equal the text encoders' width \(384\)"):
        dataclasses.replace(tiny_bert, text=BertTextConfig.minilm_l6(pooler=False))
    with pytest.raises(ConfigError, match="kind must be 'bert'"):
        BertTextConfig(kind="clip")


# ---- the conditioner -----------------------------------------------------------------------


def test_checkpoint_keys_are_bert_names_under_cond_stage_model() -> None:
    model, _ = tiny_bert_bundle()
    keys = [k for k in model.state_dict() if k.startswith("cond_stage_model.")]
    assert isinstance(model.cond_stage_model, BertConditioner)
    assert "cond_stage_model.bert.embeddings.word_embeddings.weight" in keys
    assert "cond_stage_model.bert.encoder.layer.1.attention.self.query.weight" in keys
    assert not any("pooler" in k for k in keys)
    bert_keys = {"cond_stage_model.bert." + k for k in BertTextModel(model.cfg.text).state_dict()}
    assert set(keys) == bert_keys
    assert model.text_encoder is model.cond_stage_model.bert and model.text_prefixes == ["cond_stage_model.bert."]


def test_conditioner_output_is_the_encoders_with_padding_zeroed() -> None:
    model, tok = tiny_bert_bundle()
    batch = tok.batch(["a red circle", "a small blue square above a green triangle", ""])
    assert torch.equal(bert_attention_mask(batch.input_ids, tok.eos_id), batch.attention_mask)
    with torch.no_grad():
        got = model.cond_stage_model(*batch)
        ref = model.text_encoder(*batch)
    real = batch.attention_mask.bool()
    assert torch.equal(got[real], ref[real])
    assert torch.count_nonzero(got[~real]) == 0 and torch.count_nonzero(ref[~real]) > 0


def _encode(model: StableDiffusion, tok: WordPieceTokenizer, prompts: list[str], **kw) -> torch.Tensor:
    with torch.no_grad():
        return Conditioner(model, tok, budget=None).encode(prompts, **kw).context


def test_prompt_conditioning_differs_by_prompt_and_ignores_padding() -> None:
    model, tok = tiny_bert_bundle()
    a, b = _encode(model, tok, ["a red circle"]), _encode(model, tok, ["a blue circle"])
    assert a.shape == (1, 12, 32) and not torch.allclose(a, b)
    # the same prompt framed 16 long: the real tokens' states are the same, the rest zero
    long = _encode(model, tiny_wordpiece(16), ["a red circle"])
    assert long.shape == (1, 16, 32)
    torch.testing.assert_close(long[:, :5], a[:, :5], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(long[:, 5:]) == 0 and torch.count_nonzero(a[:, 5:]) == 0
    # a batch encodes each prompt as it encodes alone
    both = _encode(model, tok, ["a red circle", "a blue circle"])
    torch.testing.assert_close(both, torch.cat([a, b]), rtol=1e-5, atol=1e-6)
    # the context is what the training path (encode_ids) gives for plain text
    with torch.no_grad():
        plain = encode_ids(model, tok, tok(["a red circle"]))["context"]
    assert torch.equal(plain, a)


def test_emphasis_and_chunking_apply_as_for_clip() -> None:
    model, tok = tiny_bert_bundle()
    plain, weighted = _encode(model, tok, ["a red circle"]), _encode(model, tok, ["a (red:1.5) circle"])
    assert weighted.shape == plain.shape and not torch.allclose(plain, weighted)
    long = _encode(model, tok, ["a small blue square above a green triangle , a red circle on a black background"])
    assert long.shape == (1, 24, 32)  # two chunks of [CLS] ... [SEP] [PAD]...


def test_clip_skip_and_textual_inversion_are_refused_clearly() -> None:
    model, tok = tiny_bert_bundle()
    with pytest.raises(RequestError, match="clip_skip 2 does not apply: this model's text encoder is a BERT"):
        _encode(model, tok, ["a red circle"], clip_skip=2)
    ti = TextualInversion("thing", (torch.zeros(1, 32),))
    with pytest.raises(OpenSDError, match="textual-inversion embeddings need a CLIP text encoder"):
        _encode(model, tok, ["a thing"], embeddings={"thing": ti})
    with pytest.raises(ConfigError, match="text encoder is a BERT"):
        encode_ids(model, tok, tok(["a red circle"]), token_embeds=lambda i, e, x: torch.zeros(1, 12, 32))


def test_unknown_words_are_reported() -> None:
    _, tok = tiny_bert_bundle()
    (line,) = prompt_warnings(tok, "a red dog, (a Zebra:1.2)")
    assert "'dog', 'Zebra'" in line and "of the prompt" in line
    assert prompt_warnings(tok, "a red circle") == []


# ---- checkpoints and generation ------------------------------------------------------------


def test_opensd_folder_round_trips_exactly_and_generates(tmp_path: Path) -> None:
    model, tok = tiny_bert_bundle(seed=2)
    save_opensd(model, tok, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m" / "tokenizer").iterdir()) == ["opensd_tokenizer.json", "vocab.txt"]
    assert read_config(tmp_path / "m") == model.cfg
    loaded = load_model(tmp_path / "m")
    assert loaded.model.cfg == model.cfg and isinstance(loaded.tokenizer, WordPieceTokenizer)
    assert loaded.tokenizer.vocab == tok.vocab and loaded.tokenizer.context_length == tok.context_length
    sa, sb = model.state_dict(), loaded.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    pipe = opensd.load(tmp_path / "m")
    kw = dict(steps=3, sampler="euler", cfg_scale=4.0, width=32, height=32, seed=7)
    red = np.asarray(pipe.txt2img("a red circle", **kw)[0], dtype=np.float64)
    again = np.asarray(pipe.txt2img("a red circle", **kw)[0], dtype=np.float64)
    blue = np.asarray(pipe.txt2img("a blue square", **kw)[0], dtype=np.float64)
    assert red.shape == (32, 32, 3) and np.array_equal(red, again) and not np.array_equal(red, blue)
    with pytest.raises(RequestError, match="clip_skip 2 does not apply"):
        pipe.txt2img("a red circle", clip_skip=2, **kw)


def test_folder_with_a_clip_tokenizer_or_other_formats_are_refused(tmp_path: Path) -> None:
    model, tok = tiny_bert_bundle()
    with pytest.raises(CheckpointError, match="BERT text encoder has no diffusers layout"):
        save_diffusers(model, tok, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    with pytest.raises(CheckpointError, match="no original single-file format"):
        save_original(model, tmp_path / "m.safetensors")
    _, clip_tok = tiny_clip_bundle()
    save_opensd(model, clip_tok, tmp_path / "m")
    with pytest.raises(CheckpointError, match="needs a WordPiece tokenizer"):
        load_model(tmp_path / "m")


def test_cli_info_and_generate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from opensd.cli.main import app

    model, tok = tiny_bert_bundle()
    save_opensd(model, tok, tmp_path / "m")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "SD 1.x (sd1): BERT text model" in res.output and "vocab 40, context 16" in res.output
    out = tmp_path / "a.png"
    res = CliRunner().invoke(app, ["generate", "-m", str(tmp_path / "m"), "a red dog", "--steps", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "does not know the word 'dog'" in res.output and out.is_file()
    res = CliRunner().invoke(app, ["generate", "-m", str(tmp_path / "m"), "a red circle", "--steps", "2",
                                   "--clip-skip", "2", "-o", str(out)])
    assert res.exit_code == 2 and "clip_skip 2 does not apply" in res.output
