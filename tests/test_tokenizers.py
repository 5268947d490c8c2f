"""Tokenizers: CLIP BPE against transformers' CLIPTokenizer, and the word tokenizer.

The reference is transformers' tokenizers-backed ``CLIPTokenizerFast`` (in transformers
>= 5 the only ``CLIPTokenizer``; the one diffusers' SD pipelines use). Its
normalization is NFC, whitespace runs -> " ", per-character lowercase; it applies
no ftfy and no HTML unescaping. transformers 4's pure-Python ``CLIPTokenizer``
without ftfy cleaned text with BERT's BasicTokenizer instead (control characters
dropped, CJK characters split one by one), so it differs on such text; that
comparison is informational only and runs only where that class exists.
"""

from __future__ import annotations

import json
import random
import time
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from opensd.tokenizers import (
    CLIPTokenizer,
    Tokenizer,
    TokenizerError,
    WordTokenizer,
    clip_bpe,
    load_tokenizer,
    unknown_words,
)

# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_open_clip()


@pytest.fixture(scope="module")
def clip_dir(clip_tok: CLIPTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clip_tokenizer")
    clip_tok.save(d)
    return d


@pytest.fixture(scope="module")
def hf_tok(clip_dir: Path):
    return transformers.CLIPTokenizerFast.from_pretrained(str(clip_dir))


def hf_frame(hf, texts: list[str], length: int = 77) -> torch.Tensor:
    return hf(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids


# ---- test strings -------------------------------------------------------------------------

WORDS = [
    "a", "photo", "of", "the", "cat", "dog", "astronaut", "riding", "horse", "on", "mars", "Portrait",
    "masterpiece", "best quality", "highly detailed", "Greg Rutkowski", "trending on ArtStation",
    "8k", "HDR", "UHD", "unreal engine 5", "octane render", "bokeh", "it's", "DON'T", "we'll",
    "they've", "I'm", "you'd", "they're", "o'clock", "rock'n'roll", "self-portrait", "sci-fi",
    "e-mail", "U.S.A.", "Mr.", "pneumonoultramicroscopicsilicovolcanoconiosis", "hello_world", "CamelCase",
]  # fmt: skip
PUNCT = list(",.!?;:()[]{}<>|'\"-_/\\@#$%^&*+=~`") + ["...", "!!!", "?!", "--", "->", "=>", "::", "''", "``"]
NUMBERS = ["0", "1", "42", "3.14", "1,000,000", "2024", "0.8", "1e-3", "½", "²", "٣", "四", "Ⅻ", "１２３"]
UNICODE = [
    "café", "naïve", "Ångström", "São Paulo", "Zürich", "e\u0301", "A\u030a", "東京タワー", "北京の夜景",
    "한국어", "日本語のテキスト", "🐱", "🚀🌕", "👍🏽", "👨‍👩‍👧", "🇯🇵", "שלום עולם", "مرحبا بالعالم",
    "ΟΔΟΣ", "Привет мир", "ﬁne", "\u200b", "\ufeff", "İstanbul", "straße", "ǅ", "ﬀ", "Ⓐ", "™", "©",
    "\x00", "\x07", "\x1b[0m", "\u0345", "Σσς", "ﬃ", "ｆｕｌｌｗｉｄｔｈ",
]  # fmt: skip
SPACE = [" ", " ", " ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2003", "\x0b", "\x1c", "\x85", ""]
A1111 = [
    "(masterpiece:1.2)", "[blue] sky", "((best quality))", "{red|blue}", "<lora:add_detail:0.8>", "BREAK",
    "(worst quality:1.4), lowres", "[cat:dog:0.5]", "embedding:easynegative", "(((ultra-detailed)))",
    "\\(artist\\)", "AND", "(red hair:0.9)",
]  # fmt: skip
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "<|"]
FIXED = [
    "", " ", "   ", "\n", "\t\n  \r\n", "a photo of a cat", "(masterpiece:1.2), [blue] sky",
    "a" * 300, "!" * 120, "1234567890" * 12, " ".join(["word"] * 100), "🐱" * 40,
    "a photo of an astronaut riding a horse on mars, " * 8,
]  # fmt: skip

# Code points from blocks that have been stable since Unicode 7, so every Unicode
# table (Python's, regex's, the tokenizers library's) agrees on them.
_STABLE_RANGES = [(0x20, 0x2FF), (0x370, 0x52F), (0x590, 0x6FF), (0x2000, 0x206F), (0x3040, 0x30FF),
                  (0x4E00, 0x9FA5), (0xAC00, 0xD7A3), (0x1F300, 0x1F5FF)]  # fmt: skip


def _random_chars(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        lo, hi = rng.choice(_STABLE_RANGES)
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) != "Cn":
            out.append(c)
    return "".join(out)


def make_strings(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` seeded varied strings plus the fixed edge cases."""
    rng = random.Random(seed)
    pools = [WORDS] * 4 + [PUNCT, NUMBERS, UNICODE, A1111, SPECIALS]
    texts = list(FIXED)
    for i in range(n):
        parts = []
        for _ in range(rng.randint(1, 40 if i % 10 == 0 else 12)):
            if rng.random() < 0.08:
                parts.append(_random_chars(rng, rng.randint(1, 6)))
            else:
                parts.append(rng.choice(rng.choice(pools)))
            parts.append(rng.choice(SPACE))
        text = "".join(parts)
        texts.append(text.upper() if i % 17 == 0 else text)
    return texts


TEXTS = make_strings()


# ---- CLIP BPE -----------------------------------------------------------------------------


def test_clip_vocab_is_clips(clip_tok: CLIPTokenizer) -> None:
    assert clip_tok.vocab_size == 49408
    assert (clip_tok.bos_id, clip_tok.eos_id, clip_tok.pad_id) == (49406, 49407, 49407)
    assert clip_tok.vocab["!"] == 0 and clip_tok.vocab["!</w>"] == 256
    assert len(clip_tok.merges) == 48894
    # Well-known ids of OpenAI CLIP / SD1 prompts.
    ids = clip_tok("a photo of a cat")[0].tolist()
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [49407] * 70
    assert isinstance(clip_tok, Tokenizer)


def test_clip_matches_transformers_on_varied_strings(clip_tok: CLIPTokenizer, hf_tok) -> None:
    assert len(TEXTS) > 300
    got = clip_tok(TEXTS)
    ref = hf_frame(hf_tok, TEXTS)
    assert got.shape == ref.shape == (len(TEXTS), 77)
    bad = [TEXTS[i] for i in range(len(TEXTS)) if not torch.equal(got[i], ref[i])]
    assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"
    # Untruncated ids too (a third of the strings are longer than 77 tokens or close to it).
    ref_ids = hf_tok(TEXTS, add_special_tokens=False).input_ids
    assert [clip_tok.encode(t) for t in TEXTS] == ref_ids
    assert sum(len(r) > 75 for r in ref_ids) >= 10


def test_clip_framing_and_context_length(clip_tok: CLIPTokenizer, hf_tok) -> None:
    long_text = "a photo of a cat " * 30
    got = clip_tok([long_text, "", "cat"], context_length=12)
    assert torch.equal(got, hf_frame(hf_tok, [long_text, "", "cat"], length=12))
    assert got[0, -1].item() == clip_tok.eos_id  # truncation keeps eos
    assert got[1].tolist() == [49406, 49407] + [49407] * 10
    assert got.dtype == torch.long
    with pytest.raises(TokenizerError, match="context_length must be an integer >= 2"):
        clip_tok("cat", context_length=1)
    with pytest.raises(TokenizerError, match="str or a list of str"):
        clip_tok(123)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="non-str"):
        clip_tok(["cat", None])  # type: ignore[list-item]


def test_clip_sd2_pad_token(clip_tok: CLIPTokenizer, tmp_path: Path) -> None:
    sd2 = CLIPTokenizer(clip_tok.vocab, clip_tok.merges, pad_token="!")
    assert sd2.pad_id == 0
    sd2.save(tmp_path)
    hf = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path))
    texts = ["hello!", "wow!!! nice", "a ! b", "!!!", "(masterpiece:1.2)!, sky"] + TEXTS[:60]
    assert torch.equal(sd2(texts), hf_frame(hf, texts))
    assert sd2("cat")[0, 3:].tolist() == [0] * 74


def test_clip_from_files_reads_special_tokens(clip_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_dir / name).read_bytes())
    tok = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert (tok.pad_id, tok.context_length) == (49407, 77)
    # SD2's tokenizer/ folder: pad "!" in special_tokens_map.json (dict form), model_max_length 77.
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "!", "lstrip": False, "normalized": False}, "eos_token": "<|endoftext|>"})
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "pad_token": "<|endoftext|>"}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, CLIPTokenizer)
    assert (tok.pad_id, tok.context_length) == (0, 64)
    explicit = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", pad_token="<|endoftext|>")
    assert explicit.pad_id == 49407
    with pytest.raises(TokenizerError, match="not found"):
        CLIPTokenizer.from_files(tmp_path / "nope.json", tmp_path / "merges.txt")


def test_clip_save_load_round_trip(clip_tok: CLIPTokenizer, clip_dir: Path, tmp_path: Path) -> None:
    loaded = load_tokenizer(clip_dir)
    assert isinstance(loaded, CLIPTokenizer)
    assert loaded.vocab == clip_tok.vocab and loaded.merges == clip_tok.merges
    assert torch.equal(loaded(TEXTS[:50]), clip_tok(TEXTS[:50]))
    # A diffusers model folder: the tokenizer lives in tokenizer/.
    clip_tok.save(tmp_path / "tokenizer")
    assert isinstance(load_tokenizer(tmp_path), CLIPTokenizer)


def test_clip_decode(clip_tok: CLIPTokenizer) -> None:
    assert clip_tok.decode(clip_tok("A photo of a Cat, 8k 中文 🐱")[0]) == "a photo of a cat , 8 k 中文 🐱"


def test_from_open_clip_without_open_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_bpe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install open_clip_torch"):
        CLIPTokenizer.from_open_clip()


def test_transformers_python_tokenizer_informational(clip_dir: Path, clip_tok: CLIPTokenizer) -> None:
    """transformers 4's pure-Python CLIPTokenizer: reports disagreements, never fails."""
    if transformers.CLIPTokenizer is transformers.CLIPTokenizerFast:
        pytest.skip("transformers >= 5 has only the tokenizers-backed CLIPTokenizer (compared above)")
    slow = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    ref = hf_frame(slow, TEXTS)
    differ = sum(not torch.equal(a, b) for a, b in zip(clip_tok(TEXTS), ref, strict=True))
    if differ:
        warnings.warn(f"transformers' Python CLIPTokenizer differs on {differ}/{len(TEXTS)} strings", stacklevel=1)


# ---- word tokenizer -----------------------------------------------------------------------

CAPTIONS = [
    "A red cube on a blue floor.",
    "a blue sphere next to a red cube",
    "Two green cylinders, (masterpiece:1.2)",
    "a small red sphere on the left",
    "the big blue cube is behind 3 spheres!",
]


@pytest.fixture(scope="module")
def word_tok() -> WordTokenizer:
    return WordTokenizer.train(CAPTIONS, vocab_size=200, context_length=8)


def test_word_vocab_and_specials(word_tok: WordTokenizer) -> None:
    assert (word_tok.bos_id, word_tok.eos_id, word_tok.pad_id, word_tok.unk_id) == (0, 1, 2, 3)
    assert 20 < word_tok.vocab_size < 200  # the corpus has fewer words than asked for
    assert isinstance(word_tok, Tokenizer)
    small = WordTokenizer.train(CAPTIONS, vocab_size=10)
    assert small.vocab_size == 10
    assert small.encode("a red cube") == [small.encode("a")[0], small.encode("red")[0], small.encode("cube")[0]]


def test_word_encoding_rules(word_tok: WordTokenizer) -> None:
    enc = word_tok.encode
    assert enc("RED Cube") == enc("red cube")
    assert len(enc("(masterpiece:1.2)")) == 7  # ( masterpiece : 1 . 2 )
    assert enc("red zebra") == [enc("red")[0], word_tok.unk_id]
    assert word_tok.decode(word_tok("A red zebra.")[0]) == "a red <unk> ."


def test_word_framing(word_tok: WordTokenizer) -> None:
    red, cube = word_tok.encode("red")[0], word_tok.encode("cube")[0]
    got = word_tok(["red cube", "", "red " * 20])
    assert got.shape == (3, 8) and got.dtype == torch.long
    assert got[0].tolist() == [0, red, cube, 1, 2, 2, 2, 2]
    assert got[1].tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    assert got[2].tolist() == [0] + [red] * 6 + [1]
    assert word_tok("red", context_length=3)[0].tolist() == [0, red, 1]
    assert word_tok("red cube", context_length=3)[0].tolist() == [0, red, 1]


def test_word_save_load_round_trip(word_tok: WordTokenizer, tmp_path: Path) -> None:
    word_tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "opensd_tokenizer.json"}
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, WordTokenizer)
    assert (loaded.context_length, loaded.vocab_size) == (8, word_tok.vocab_size)
    texts = CAPTIONS + ["an unseen caption with new words", "", "RED!!! cube?"]
    assert torch.equal(loaded(texts), word_tok(texts))


def test_word_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="vocab_size must be an integer > 4"):
        WordTokenizer.train(CAPTIONS, vocab_size=4)
    with pytest.raises(TokenizerError, match="not a single str"):
        WordTokenizer.train("a red cube")
    with pytest.raises(TokenizerError, match=r"captions\[1\] is int"):
        WordTokenizer.train(["a red cube", 3])  # type: ignore[list-item]
    with pytest.raises(TokenizerError, match="context_length must be an integer >= 2"):
        WordTokenizer.train(CAPTIONS, context_length=1)
    with pytest.raises(TokenizerError, match="holds no known tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")


# ---- numbers, unknown words, long words --------------------------------------------------


def test_word_numbers_in_digits_become_the_words_the_vocabulary_knows() -> None:
    tok = WordTokenizer.train(["three green triangles", "two red circles", "one blue square"], vocab_size=64)
    enc = tok.encode
    assert enc("3 green triangles") == enc("three green triangles")  # drew one triangle before
    assert enc("2 red circles, 1 blue square") == enc("two red circles , one blue square")
    assert tok("3 green triangles").tolist() == tok("three green triangles").tolist()
    assert tok.spell_numbers("3 triangles, 2.5 circles, 3d, x2, 03, 7 squares, 3.") == (
        "three triangles, 2.5 circles, 3d, x2, 03, 7 squares, three."  # "seven" is not in the vocabulary
    )
    assert WordTokenizer.train(["a 3 b"], vocab_size=64).spell_numbers("3") == "3"  # no "three": digits stay


def test_word_unknown_words_are_named(word_tok: WordTokenizer) -> None:
    assert word_tok.unknown_words("a red cube") == []
    assert word_tok.unknown_words("a dog on the Beach, a DOG!") == ["dog", "Beach"]  # once each, case ignored
    assert word_tok.unknown_words("zq7 blue 9") == ["zq7", "9"]  # adjacent unknown pieces stay together
    assert unknown_words(word_tok, "zebra cube") == ["zebra"]
    assert "cube" in word_tok.known_words() and "<unk>" not in word_tok.known_words()
    with pytest.raises(TokenizerError, match="must be a str"):
        word_tok.unknown_words(3)  # type: ignore[arg-type]


def test_clip_has_no_unknown_words(clip_tok: CLIPTokenizer) -> None:
    assert unknown_words(clip_tok, "a dog on the beach, 東京 🐱 \x00") == []


def test_unknown_words_of_other_tokenizers() -> None:
    class Minimal:  # a tokenizer with an unk id but no unknown_words method
        unk_id = 0

        def encode(self, text: str) -> list[int]:
            return [1 if w in {"red", "cube"} else 0 for w in text.split()]

    assert unknown_words(Minimal(), "red dog cube dog") == ["dog"]
    assert unknown_words(object(), "anything") == []  # no unk id: nothing is unknown
    with pytest.raises(TokenizerError, match="must be a str"):
        unknown_words(Minimal(), None)  # type: ignore[arg-type]


def test_clip_long_word_is_fast_and_matches_transformers(clip_tok: CLIPTokenizer, hf_tok) -> None:
    """BPE merged pair by pair over the whole word: a 16 K-letter word took 45 s; now O(n log n)."""
    rng = random.Random(5)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(16_000))
    clip_tok._cache.clear()
    t0 = time.perf_counter()
    ids = clip_tok.encode(word)
    assert time.perf_counter() - t0 < 3.0
    assert ids == hf_tok(word, add_special_tokens=False).input_ids


def test_lone_surrogates_are_a_tokenizer_error(word_tok: WordTokenizer, clip_tok: CLIPTokenizer) -> None:
    """Both crashed (TypeError from the tokenizers library, UnicodeEncodeError in the BPE)."""
    for call in (word_tok.encode, word_tok, word_tok.unknown_words, clip_tok.encode, clip_tok, lambda t: clip_tok([t])):
        with pytest.raises(TokenizerError, match="character 2 is a lone surrogate \\(U\\+DC80\\)"):
            call("ab\udc80")


def test_prompt_warnings_name_the_lost_words_and_list_the_known_ones() -> None:
    from opensd.prompts.vocabulary import prompt_warnings

    tok = WordTokenizer.train(["a red, blue cube", "two cubes"], vocab_size=64)
    (line,) = prompt_warnings(tok, "a (dog:1.2) BREAK on 2 [beaches]")
    head, known = line.split("; it knows: ")
    assert head == "the model does not know the words 'dog', 'on', 'beaches' of the prompt and ignores them"
    assert sorted(known.split(", ")) == ["a", "blue", "cube", "cubes", "red", "two"]  # punctuation left out
    assert prompt_warnings(tok, "two red cubes", "") == []
    # an embedding's name is not a word to read: the embedding replaces it, whatever its case
    (line,) = prompt_warnings(tok, "a red Ugly-Style cube, dog", "", embeddings=["ugly-style"])
    assert line.startswith("the model does not know the word 'dog' of the prompt and ignores it")
    assert prompt_warnings(tok, "a red cube", "ugly-style", embeddings=["ugly-style"]) == []
    assert prompt_warnings(clip_bpe.CLIPTokenizer.from_open_clip(), "a dog on the beach") == []
