"""Smaller model files: 8-bit weight storage, a pruned BERT vocabulary, ``opensd compress``."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BERT_PIECES, randomize, tiny_bert_bundle, tiny_word_bundle
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import opensd
from opensd.checkpoints import CheckpointError, load_model
from opensd.checkpoints import int8 as q8
from opensd.checkpoints.compress import compress, read_keep_texts
from opensd.checkpoints.info import describe
from opensd.checkpoints.opensd_format import load_opensd, save_opensd
from opensd.checkpoints.vocab_prune import kept_ids, prune_vocabulary
from opensd.cli.main import app
from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.tokenizers.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer
from opensd.training.text_encoding import encode_ids

runner = CliRunner()

# ---- 8-bit weights -------------------------------------------------------------------------


def test_each_weight_is_within_half_a_step_of_its_row_scale() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 0.5, 0.0]).reshape(6, 1, 1, 1)
    q, s = q8.quantize_tensor(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.float16 and s.shape == (6,)
    assert int(q.abs().max()) == q8.LEVELS  # the largest weight of a row takes the last level
    back = q.float() * s.float().reshape(6, 1, 1, 1)
    err = (back - w).abs().reshape(6, -1).amax(dim=1)
    absmax = w.abs().reshape(6, -1).amax(dim=1)
    assert torch.all(err <= 0.5 * s.float() + absmax * 2**-10)  # half a step (+ the scale's float16 rounding)
    assert float(s[5]) == 1.0 and torch.equal(back[5], torch.zeros_like(back[5]))  # an all-zero row stays zero


def test_quantize_picks_large_unet_and_text_weights_only() -> None:
    model, _ = _lettered_bundle(width=64)  # the text encoder's MLP: 64 x 256, above MIN_ELEMENTS
    state = model.state_dict()
    packed = q8.quantize(state)
    for name, t in state.items():
        if q8.quantizes(name, t):
            assert packed[name].dtype == torch.int8 and packed[name + q8.SCALE_SUFFIX].shape == (t.shape[0],)
        else:
            assert packed[name].dtype == (torch.float16 if t.is_floating_point() else t.dtype)
            assert name + q8.SCALE_SUFFIX not in packed
    picked = [n for n, t in state.items() if q8.quantizes(n, t)]
    assert any(n.startswith("model.diffusion_model.") for n in picked)
    assert any(n.startswith("cond_stage_model.") for n in picked)
    assert not any(n.startswith("first_stage_model.") for n in picked)  # the VAE stays float16
    assert all(state[n].dim() >= 2 and state[n].numel() >= q8.MIN_ELEMENTS for n in picked)
    with pytest.raises(CheckpointError, match="already holds a scale"):
        q8.quantize(packed)


def test_int8_folder_is_smaller_loads_as_floats_and_generates(tmp_path: Path) -> None:
    model, tok = tiny_bert_bundle(seed=3)
    save_opensd(model, tok, tmp_path / "fp16", dtype=torch.float16)
    save_opensd(model, tok, tmp_path / "int8", int8_weights=True)
    size16 = (tmp_path / "fp16" / "model.safetensors").stat().st_size
    size8 = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert size8 < 0.75 * size16
    loaded, tok8 = load_opensd(tmp_path / "int8")
    assert tok8.vocab == tok.vocab and loaded.cfg == model.cfg
    state, back = model.state_dict(), loaded.state_dict()
    packed = q8.quantize(state)
    for name, t in state.items():
        assert back[name].dtype == torch.float32
        if q8.quantizes(name, t):
            s = packed[name + q8.SCALE_SUFFIX].float().reshape(-1, *([1] * (t.dim() - 1)))
            assert torch.equal(back[name], packed[name].float() * s)
        else:
            assert torch.equal(back[name], t.half().float())
    info = describe(tmp_path / "int8")
    n_int8 = sum(q8.quantizes(n, t) for n, t in state.items())
    assert info.dtypes == {"int8": n_int8, "float16": len(state) - n_int8}  # the scales belong to their weights
    pipe = opensd.load(tmp_path / "int8")
    kw = dict(steps=3, sampler="euler", cfg_scale=4.0, width=32, height=32, seed=7)
    full = np.asarray(opensd.load(tmp_path / "fp16").txt2img("a red circle", **kw)[0], dtype=np.float64)
    small = np.asarray(pipe.txt2img("a red circle", **kw)[0], dtype=np.float64)
    assert small.shape == full.shape == (32, 32, 3)
    assert np.abs(small - full).mean() < 4.0  # 8 bits per weight: a few levels out of 255 at most


def _rewrite(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop(next(k for k in s if k.endswith(q8.SCALE_SUFFIX))), "is int8 without its scale"),
    (lambda s: s.__setitem__("model.diffusion_model.nothing.weight" + q8.SCALE_SUFFIX, torch.ones(2)),
     "int8 scale\\(s\\) without a weight: model.diffusion_model.nothing.weight"),
    (lambda s: s.__setitem__(next(k for k in s if k.endswith(q8.SCALE_SUFFIX)), torch.ones(1, 1)),
     "must be a floating-point vector of"),
])
def test_a_broken_int8_file_is_a_clear_error(tmp_path: Path, edit, message: str) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m", int8_weights=True)
    _rewrite(tmp_path / "m" / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "m")


# ---- a pruned vocabulary -------------------------------------------------------------------

LETTERS = [*string.ascii_lowercase, *("##" + c for c in string.ascii_lowercase)]


def _lettered_bundle(seed: int = 0, width: int | None = None):
    """A tiny BERT model whose vocabulary lists the specials, the caption words, then the letters."""
    tokens = [*SPECIAL_TOKENS, *BERT_PIECES, *(t for t in LETTERS if t not in BERT_PIECES)]
    tok = WordPieceTokenizer({t: i for i, t in enumerate(tokens)}, 12)
    cfg = SDConfig.tiny_bert()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size))
    if width is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, width=width, mlp_width=4 * width),
                          unet=dataclasses.replace(cfg.unet, context_dim=width))
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg), seed).eval(), tok


def test_pruning_keeps_the_first_ids_every_character_and_the_kept_texts_tokens() -> None:
    model, tok = _lettered_bundle()
    first = len(SPECIAL_TOKENS) + 4
    pruned, ptok = prune_vocabulary(model, tok, first, keep_texts=["a red circle"])
    characters = {t for t in tok.vocab if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    assert set(LETTERS) <= characters and "," in characters
    expected = {t for t, i in tok.vocab.items() if i < first} | characters | {"a", "red", "circle"}
    assert set(ptok.vocab) == expected and sorted(ptok.vocab.values()) == list(range(len(expected)))
    assert pruned.cfg.text.vocab_size == len(expected) == ptok.vocab_size
    order = sorted(expected, key=tok.vocab.__getitem__)
    assert [ptok.vocab[t] for t in order] == list(range(len(order)))  # the old order, renumbered
    old = model.state_dict()["cond_stage_model.bert.embeddings.word_embeddings.weight"]
    new = pruned.state_dict()["cond_stage_model.bert.embeddings.word_embeddings.weight"]
    assert torch.equal(new, old[[tok.vocab[t] for t in order]])
    assert kept_ids(tok.vocab, first, also=[tok.vocab["blue"]]) == sorted(
        {tok.vocab[t] for t in expected - {"red", "circle"}} | {tok.vocab["blue"]})


def test_a_kept_text_encodes_bit_for_bit_and_a_dropped_word_is_spelled_not_lost() -> None:
    model, tok = _lettered_bundle(seed=1)
    pruned, ptok = prune_vocabulary(model, tok, len(SPECIAL_TOKENS) + 2, keep_texts=["a red circle and a blue square"])
    with torch.no_grad():
        for text in ("a red circle", "a blue square and a red circle"):
            assert torch.equal(encode_ids(model, tok, tok([text]))["context"],
                               encode_ids(pruned, ptok, ptok([text]))["context"])
        assert "triangle" in tok.vocab and "triangle" not in ptok.vocab
        pieces = [t for t in ptok.vocab if ptok.vocab[t] in ptok.encode("triangle")]
        assert len(ptok.encode("triangle")) == len("triangle") and set(pieces) <= set(LETTERS)
        assert ptok.unknown_words("a green triangle") == [] and ptok.unk_id not in ptok.encode("a green triangle")
        a = encode_ids(model, tok, tok(["a green triangle"]))["context"]
        b = encode_ids(pruned, ptok, ptok(["a green triangle"]))["context"]
        assert a.shape == b.shape and not torch.equal(a, b)


def test_pruning_refuses_what_it_cannot_do() -> None:
    model, tok = _lettered_bundle()
    with pytest.raises(CheckpointError, match="prunes nothing"):
        prune_vocabulary(model, tok, tok.vocab_size)
    with pytest.raises(CheckpointError, match="positive integer"):
        prune_vocabulary(model, tok, 0)
    clip_model, word_tok = tiny_word_bundle()
    with pytest.raises(CheckpointError, match="only a model whose text encoder is a BERT"):
        prune_vocabulary(clip_model, word_tok, 10)  # type: ignore[arg-type]


# ---- opensd compress -----------------------------------------------------------------------


def test_compress_writes_a_new_folder_with_the_sidecar_files(tmp_path: Path) -> None:
    model, tok = _lettered_bundle(seed=2)
    src = save_opensd(model, tok, tmp_path / "src")
    (src / "README.md").write_text("card\n")
    (src / "training").mkdir()
    (src / "training" / "log.jsonl").write_text("{}\n")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    report = compress(src, tmp_path / "out", vocab=len(SPECIAL_TOKENS) + 3, keep_texts=["a blue square"])
    assert report.copied == ("README.md", "training") and (tmp_path / "out" / "training" / "log.jsonl").is_file()
    assert report.weights_after < report.weights_before and report.vocab_before == tok.vocab_size
    first = {t for t, i in tok.vocab.items() if i < len(SPECIAL_TOKENS) + 3}
    characters = {t for t in tok.vocab if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    assert report.vocab_after == len(first | characters | {"blue", "square"})
    assert "vocabulary:" in report.render() and "MB" in report.render()
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # the source is untouched
    small = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(encode_ids(model, tok, tok(["a blue square"]))["context"],
                              encode_ids(small.model, small.tokenizer, small.tokenizer(["a blue square"]))["context"],
                              atol=0.05)
    with pytest.raises(CheckpointError, match="not empty; pass --overwrite"):
        compress(src, tmp_path / "out")
    compress(src, tmp_path / "out", overwrite=True)
    with pytest.raises(CheckpointError, match="must be a new folder outside the model"):
        compress(src, src / "inner")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "model.safetensors").mkdir()  # a folder where the weights file must go
    with pytest.raises(CheckpointError, match=f"cannot write {blocked}"):
        compress(src, blocked, overwrite=True)
    clip_src = save_opensd(*tiny_word_bundle(), tmp_path / "clip")
    with pytest.raises(CheckpointError, match="--vocab prunes a BERT"):
        compress(clip_src, tmp_path / "clip-out", vocab=10)


def test_keep_texts_read_lines_or_imagefolder_captions(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a red circle\nthree blue squares\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a cyan triangle"}) + "\n\n")
    assert read_keep_texts([tmp_path / "a.txt", tmp_path / "metadata.jsonl"]) == [
        "a red circle", "three blue squares", "a cyan triangle", ""]
    (tmp_path / "bad.jsonl").write_text('{"file_name": "0.png"}\n')
    with pytest.raises(CheckpointError, match='line 1 has no "text" string'):
        read_keep_texts([tmp_path / "bad.jsonl"])
    (tmp_path / "worse.jsonl").write_text("[1, 2\n")
    with pytest.raises(CheckpointError, match="line 1 is not a JSON object"):
        read_keep_texts([tmp_path / "worse.jsonl"])
    with pytest.raises(CheckpointError, match="keep-text file not found"):
        read_keep_texts([tmp_path / "missing.txt"])


def test_the_command_line(tmp_path: Path) -> None:
    model, tok = _lettered_bundle(seed=4)
    src = save_opensd(model, tok, tmp_path / "src")
    (tmp_path / "keep.txt").write_text("a red circle\n")
    r = runner.invoke(app, ["compress", str(src), "--out", str(tmp_path / "out"), "--vocab", "6",
                            "--keep-text", str(tmp_path / "keep.txt")])
    assert r.exit_code == 0, r.output
    assert "vocabulary:" in r.output and "weights:" in r.output
    assert load_model(tmp_path / "out").tokenizer.vocab_size < tok.vocab_size
    r = runner.invoke(app, ["compress", str(src), "--out", str(tmp_path / "o2"), "--keep-text", str(tmp_path / "keep.txt")])
    assert r.exit_code != 0 and "give --vocab N too" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["compress", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and "--overwrite" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["compress", str(src), "--out", str(tmp_path / "fp16"), "--fp16"])
    assert r.exit_code == 0, r.output
    assert all(t.dtype != torch.int8 for t in load_file(str(tmp_path / "fp16" / "model.safetensors")).values())
