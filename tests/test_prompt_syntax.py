"""A1111 prompt syntax, chunked weighted encoding, and prompt arithmetic."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clip_tokenizer, tiny_clip_bundle, tiny_word_bundle

from opensd.checkpoints import LoadedModel
from opensd.pipelines import RequestError
from opensd.pipelines.request import GenerationRequest, validate
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.prompts import arithmetic as A
from opensd.prompts.budget import DEFAULT_BUDGET, PromptBudget, PromptBudgetError, check_prompt
from opensd.prompts.syntax import (
    MAX_NESTING,
    MAX_WEIGHT,
    SQUARE_FACTOR,
    PromptSyntaxError,
    apply_emphasis,
    as_pairs,
    encode_prompts,
    match_lengths,
    parse_prompt_attention,
    tokenize_prompt,
)
from opensd.tokenizers import frame

SIZE = 32


def pairs(text: str) -> list[list]:
    return as_pairs(parse_prompt_attention(text))


@pytest.fixture(scope="module")
def clip_pipe() -> StableDiffusionPipeline:
    model, tok = tiny_clip_bundle(seed=3)
    return StableDiffusionPipeline(LoadedModel(model, tok, "tiny-clip", Path("."), "opensd", "0" * 10))


@pytest.fixture(scope="module")
def word_pipe() -> StableDiffusionPipeline:
    model, tok = tiny_word_bundle(seed=1)
    return StableDiffusionPipeline(LoadedModel(model, tok, "tiny-word", Path("."), "opensd", "0" * 10))


# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "text, expected",
    [  # A1111's own documented examples, floats exactly as its parser gives them
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        (r"\(literal\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1],
             ["hill", 0.55], [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]],
        ),
    ],
)
def test_parser_matches_a1111_documented_examples(text: str, expected: list) -> None:
    assert pairs(text) == expected


def test_parser_nesting_and_brackets() -> None:
    assert pairs("((word))") == [["word", 1.1 * 1.1]]
    assert pairs("[[word]]") == [["word", (1 / 1.1) * (1 / 1.1)]]
    assert pairs("(word:1.3)") == [["word", 1.3]]
    assert pairs("( word : 0.5 )") == [[" word ", 0.5]]
    assert pairs("(a (b:1.5) c:0.5)") == [["a ", 0.5], ["b", 0.75], [" c", 0.5]]
    assert pairs("[a (b) c]") == [["a ", 1 / 1.1], ["b", 1.1 / 1.1], [" c", 1 / 1.1]]
    assert pairs("(word:1.0)") == [["word", 1.0]]
    assert pairs("a (red:1.0) circle") == [["a red circle", 1.0]]  # equal weights merge
    assert pairs("(neg:-1)") == [["neg", -1.0]]


def test_parser_escapes() -> None:
    assert pairs(r"\(a\) \[b\]") == [["(a) [b]", 1.0]]
    assert pairs(r"(\(x\))") == [["(x)", 1.1]]
    assert pairs("a\\\\b") == [["a\\b", 1.0]]  # an escaped backslash is one backslash
    assert pairs("a\\b") == [["ab", 1.0]]  # a lone backslash is dropped, as A1111 does
    assert pairs("a:b") == [["a:b", 1.0]]


def test_parser_break() -> None:
    assert pairs("a BREAK b") == [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]
    frags = parse_prompt_attention("(a BREAK b)")  # A1111 turns this into the word "BREAK"; here it breaks
    assert [(f.text, f.weight, f.is_break) for f in frags] == [("a", 1.1, False), ("BREAK", -1.0, True), ("b", 1.1, False)]
    assert pairs("aBREAK b") == [["aBREAK b", 1.0]]  # only the word BREAK
    assert pairs("break") == [["break", 1.0]]  # only upper case


def test_parser_unbalanced_input_falls_back_without_errors() -> None:
    assert pairs("a)") == [["a)", 1.0]]
    assert pairs("a]") == [["a]", 1.0]]
    assert pairs("[a") == [["a", 1 / 1.1]]
    assert pairs("a:1.2) b") == [["a:1.2) b", 1.0]]  # a weight with no open bracket is text
    assert pairs("(a:1.2.3) b") == [["a:1.2.3", 1.1], [" b", 1.0]]  # A1111 raises here
    assert pairs("") == [["", 1.0]]
    rng = random.Random(0)
    alphabet = "()[]:\\ ab1.BREAK,"
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        frags = parse_prompt_attention(s)
        assert frags and all(isinstance(f.text, str) and np.isfinite(f.weight) for f in frags)
    with pytest.raises(PromptSyntaxError, match="must be text"):
        parse_prompt_attention(None)  # type: ignore[arg-type]


def test_nesting_deeper_than_the_cap_is_refused_at_once() -> None:
    t0 = time.perf_counter()
    with pytest.raises(PromptSyntaxError, match=f"more than {MAX_NESTING} deep at character {2 * MAX_NESTING}"):
        parse_prompt_attention("(a" * 60_000)  # 120 KB: held the server's worker 63 s
    assert time.perf_counter() - t0 < 0.5
    deepest = "[" * MAX_NESTING + "a" + "]" * MAX_NESTING
    assert pairs(deepest) == [["a", pytest.approx(SQUARE_FACTOR**MAX_NESTING)]]
    with pytest.raises(PromptSyntaxError, match="deep"):
        parse_prompt_attention("[" + deepest + "]")
    with pytest.raises(PromptSyntaxError, match="deep"):  # round and square count together
        parse_prompt_attention("(" * 16 + "[" * 17 + "a")
    assert pairs(r"\(" * 100 + "a") == [["(" * 100 + "a", 1.0]]  # escaped brackets do not nest


@pytest.mark.parametrize(
    "text",
    [  # 32-64 KB each (the default budget refuses more than 64 KB before parsing)
        " " * 65_536,  # the BREAK split backtracked over whitespace runs: quadratic (10 K spaces took 5 s)
        ("(" * 20 + "[" * 10 + "a" + "]" * 10 + ")" * 20 + " ") * 500,  # deep nesting, repeated
        "(a) [b] (c:0.5) " * 2000,
        "a(b)" * 8_000,  # one 16 K-letter word of many fragments
        ":" * 16_000 + "a:1" * 5_000,
        "\\" * 32_000,
    ],
    ids=["spaces", "deep-nesting", "many-brackets", "one-long-word", "colons", "backslashes"],
)
def test_parser_and_tokenizer_work_is_linear(text: str) -> None:
    """Each of these took seconds to minutes before; linear, it is about 0.2 s (5 s: a loaded CI machine)."""
    _, tok = tiny_word_bundle()
    t0 = time.perf_counter()
    frags = parse_prompt_attention(text)
    tokenize_prompt(tok, text, max_tokens=10**9)
    assert time.perf_counter() - t0 < 5.0
    assert sum(len(f.text) for f in frags) <= len(text)


def test_weights_out_of_range_are_refused_with_the_range() -> None:
    for text in ["(red:1000)", "(red:" + "9" * 40 + ")", "(red:-10.5)", "a (b:" + "1" * 400 + ")"]:
        with pytest.raises(PromptSyntaxError, match=r"out of range; allowed: a number from -10 to 10"):
            parse_prompt_attention(text)
    with pytest.raises(PromptSyntaxError, match="through nesting; allowed: from -10 to 10"):
        parse_prompt_attention("(((((a:9)))))")  # 9 * 1.1**4 = 13.2
    assert pairs("(red:10)") == [["red", 10.0]] and pairs("(red:-10)") == [["red", -10.0]]
    assert pairs("(red:-2.5) sky") == [["red", -2.5], [" sky", 1.0]]  # negative weights stay (A1111)
    assert pairs("(red:1e30)") == [["red:1e30", 1.1]]  # A1111's grammar has no exponents: text
    assert MAX_WEIGHT == 10.0


def test_tokenize_prompt_stops_past_max_tokens() -> None:
    tok = clip_tokenizer()
    tp = tokenize_prompt(tok, "red " * 10_000, max_tokens=100)
    assert tp.token_count == 101 and len(tp.chunks) <= 3
    assert tokenize_prompt(tok, "red " * 100, max_tokens=100).token_count == 100
    with_words = tokenize_prompt(tok, "a (red)dish", max_tokens=100)
    assert with_words.words == ["a", "reddish"] and with_words.token_count == 3


# ----------------------------------------------------------------------------- budget


def test_check_prompt_caps_bytes_before_parsing_and_tokens() -> None:
    tok = clip_tokenizer()
    budget = PromptBudget(max_bytes=1000, max_tokens=20)
    assert check_prompt("a red circle", tok, budget) == 3
    t0 = time.perf_counter()
    with pytest.raises(PromptBudgetError, match="prompt is 1048576 bytes; at most 1000 are allowed"):
        check_prompt("a" * 2**20, tok, budget)  # 1 MB: took minutes and GBs before
    with pytest.raises(PromptBudgetError, match="is 1048576 bytes"):
        check_prompt("(a" * 2**19, tok, budget)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(PromptBudgetError, match=r"negative prompt holds more than 20 tokens.*\(0 chunks of 75"):
        check_prompt("red " * 30, tok, budget, what="negative prompt")
    with pytest.raises(PromptBudgetError, match="character 3 is a lone surrogate \\(U\\+D800\\)"):
        check_prompt("abc\ud800", tok, budget)
    with pytest.raises(PromptSyntaxError, match="deep"):
        check_prompt("(" * 40, tok, budget)
    with pytest.raises(PromptBudgetError, match="must be text"):
        check_prompt(b"red", tok, budget)  # type: ignore[arg-type]
    with pytest.raises(PromptBudgetError, match="budget must be a PromptBudget"):
        check_prompt("red", tok, 100)  # type: ignore[arg-type]
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(PromptBudgetError, match="positive integer"):
            PromptBudget(max_tokens=bad)  # type: ignore[arg-type]
    assert DEFAULT_BUDGET == PromptBudget(64 * 1024, 3000)


def test_encode_and_the_pipeline_enforce_a_budget(word_pipe) -> None:
    enc, tok = word_pipe.model.text_encoder, word_pipe.tokenizer
    with pytest.raises(PromptBudgetError, match="more than 3000 tokens"):
        encode_prompts(enc, tok, "circle " * 3001)  # the default budget
    assert encode_prompts(enc, tok, "circle " * 3001, budget=None).shape[1] == 16 * 215  # 3001 / 14
    small = StableDiffusionPipeline(word_pipe.loaded, prompt_budget=PromptBudget(max_bytes=64, max_tokens=5))
    with pytest.raises(PromptBudgetError, match="more than 5 tokens"):
        small.txt2img("a red circle and a blue square", steps=1, width=SIZE, height=SIZE, seed=0)
    with pytest.raises(PromptBudgetError, match="negative_prompt is 65 bytes; at most 64"):
        small.txt2img("a red circle", "a" * 65, steps=1, width=SIZE, height=SIZE, seed=0)
    assert len(small.txt2img("a red circle", steps=1, width=SIZE, height=SIZE, seed=0)) == 1


def test_pipeline_refuses_a_huge_weight_instead_of_a_black_image(word_pipe) -> None:
    with pytest.raises(PromptSyntaxError, match="from -10 to 10"):
        word_pipe.txt2img("(red:" + "1" + "0" * 30 + ") circle", steps=1, width=SIZE, height=SIZE, seed=0)


# ----------------------------------------------------------------------------- lone surrogates


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_validate_refuses_a_lone_surrogate_naming_its_position(field: str) -> None:
    req = GenerationRequest(**{"prompt": "a red circle", field: "a re\udcffd circle"})
    with pytest.raises(RequestError, match=f"{field} is not valid Unicode text: character 4 is a lone surrogate"):
        validate(req)


def test_cli_prompt_with_a_non_utf8_byte_is_one_line_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from opensd.cli.main import app

    bad = b"a red \xff circle".decode("utf-8", "surrogateescape")  # what Python makes of such an argv
    r = CliRunner().invoke(app, ["generate", bad, "--model", str(tmp_path / "unused"), "--out", str(tmp_path / "o.png")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prompt is not valid Unicode text: character 6"), lines
    assert "Traceback" not in r.output


# ----------------------------------------------------------------------------- unknown words


def test_generation_result_warns_about_unknown_words(word_pipe) -> None:
    req = GenerationRequest(prompt="a (dog:1.2) on the beach", negative_prompt="blurry", steps=1, width=SIZE, height=SIZE, seed=0)
    result = word_pipe.generate(req)
    assert len(result.warnings) == 2
    assert result.warnings[0].startswith("the model does not know the words 'dog', 'beach' of the prompt and ignores them; it knows: a, ")
    assert "'blurry' of the negative prompt and ignores it" in result.warnings[1]
    assert "circle" in result.warnings[0].split("it knows:")[1]
    assert word_pipe.generate(replace(req, prompt="a red circle", negative_prompt="")).warnings == []
    embeds = word_pipe.encode_prompt(["a red circle"])
    assert word_pipe.generate(replace(req, negative_prompt=""), prompt_embeds=embeds).warnings == []


def test_cli_prints_unknown_words_as_one_warning_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.cli.main import app

    model, tok = tiny_word_bundle()
    d = save_opensd(model, tok, tmp_path / "tiny")
    args = ["generate", "3 red dogs", "--model", str(d), "--steps", "1", "--width", "32", "--height", "32", "-q", "--seed", "1"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'dogs' of the prompt" in warnings[0] and "it knows: a, " in warnings[0], r.stderr
    assert "'3'" not in warnings[0]  # "3" is "three", which the captions have
    assert (tmp_path / "o.png").exists()


def test_a1111_server_returns_the_warnings_in_info(word_pipe) -> None:
    import json

    from fastapi.testclient import TestClient

    from opensd.serving import create_app

    with TestClient(create_app(word_pipe)) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1, "width": SIZE, "height": SIZE, "seed": 0, "n_iter": 2})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert len(info["warnings"]) == 1 and "'cat' of the prompt" in info["warnings"][0]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "width": SIZE, "height": SIZE})
        assert json.loads(r.json()["info"])["warnings"] == []
        body = '{"prompt": "a \\ud800 circle", "steps": 1, "width": 32, "height": 32}'  # a lone surrogate: was a 500
        r = client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "character 2 is a lone surrogate" in r.text, r.text


# ----------------------------------------------------------------------------- chunks


def test_chunking_150_tokens_gives_two_full_chunks() -> None:
    tok = clip_tokenizer()
    text = " ".join(["red circle blue square green triangle"] * 25)  # 150 tokens, no commas
    assert len(tok.encode(text)) == 150
    tp = tokenize_prompt(tok, text)
    assert len(tp.chunks) == 2 and tp.token_count == 150
    ids = tp.ids
    assert ids.shape == (2, 77)
    body = tok.encode(text)
    assert ids[0].tolist() == [tok.bos_id, *body[:75], tok.eos_id]
    assert ids[1].tolist() == [tok.bos_id, *body[75:], tok.eos_id]
    assert len(tokenize_prompt(tok, " ".join(["red"] * 75)).chunks) == 1
    assert len(tokenize_prompt(tok, " ".join(["red"] * 76)).chunks) == 2


def test_break_and_comma_backtrack() -> None:
    tok = clip_tokenizer()
    tp = tokenize_prompt(tok, "a red circle BREAK a blue square")
    assert len(tp.chunks) == 2
    assert tp.chunks[0].ids[:5] == [tok.bos_id, *tok.encode("a red circle"), tok.eos_id]
    assert tp.chunks[1].ids[:5] == [tok.bos_id, *tok.encode("a blue square"), tok.eos_id]
    assert len(tokenize_prompt(tok, "BREAK").chunks) == 1
    # 70 words, a comma, 10 words: the chunk fills at 75; the comma lies 5 back, so the
    # 4 words after it move to the second chunk (A1111's comma backtrack of 20)
    text = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)
    tp = tokenize_prompt(tok, text)
    comma = tok.encode(",")[0]
    first = tp.chunks[0].ids
    assert first[71] == comma and first[72] == tok.eos_id and first[73] == tok.pad_id
    assert tp.chunks[1].ids[1:11] == tok.encode("blue") * 10
    tp0 = tokenize_prompt(tok, text, comma_backtrack=0)
    assert tp0.chunks[0].ids[1:76] == tok.encode(text)[:75]


def test_words_and_weights_per_token() -> None:
    tok = clip_tokenizer()
    tp = tokenize_prompt(tok, "a (red)dish (xylophonist:1.5)")
    assert tp.words == ["a", "reddish", "xylophonist"]
    n_xylo = len(tok.encode("xylophonist"))
    wi = tp.chunks[0].word_index
    w = tp.chunks[0].weights
    assert wi[:4] == [-1, 0, 1, 1]  # "red" and "dish" are tokenized apart (A1111) but form one word
    assert wi[4 : 4 + n_xylo] == [2] * n_xylo and wi[4 + n_xylo] == -1
    assert w[1:4] == [1.0, 1.1, 1.0] and w[4 : 4 + n_xylo] == [1.5] * n_xylo


def test_word_tokenizer_uses_its_short_context() -> None:
    _, tok = tiny_word_bundle()
    tp = tokenize_prompt(tok, " ".join(["circle"] * 20))
    assert [len(c.ids) for c in tp.chunks] == [16, 16]  # 14 + 6 tokens
    assert tp.chunks[1].ids[:8] == [tok.bos_id] + tok.encode("circle") * 6 + [tok.eos_id]
    with pytest.raises(PromptSyntaxError, match="context"):
        tokenize_prompt(tok, "a", context=2)


# ----------------------------------------------------------------------------- encoding


def test_plain_prompt_encodes_as_before_and_unit_weights_change_nothing(clip_pipe) -> None:
    enc, tok = clip_pipe.model.text_encoder, clip_pipe.tokenizer
    with torch.no_grad():
        old = enc(tok(["a red circle above a blue square"]))  # the pre-syntax pipeline path
    new = clip_pipe.encode_prompt(["a red circle above a blue square"])
    assert torch.equal(new, old)
    assert torch.equal(clip_pipe.encode_prompt(["a (red:1.0) circle"]), clip_pipe.encode_prompt(["a red circle"]))
    assert torch.equal(clip_pipe.encode_prompt(["(word:1.0)"]), clip_pipe.encode_prompt(["word"]))


def test_weighting_a_word_scales_its_hidden_states_and_keeps_the_mean(clip_pipe) -> None:
    plain = clip_pipe.encode_prompt(["a red circle"])[0]  # (77, D)
    up = clip_pipe.encode_prompt(["a (red:1.5) circle"])[0]
    assert (up - plain).abs().max() > 0.1
    # A1111 "Original": z * w, then times mean(z) / mean(z * w)
    w = torch.ones(77)
    w[2] = 1.5
    expected = plain * w[:, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(up, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up.mean(), plain.mean(), rtol=1e-5, atol=1e-7)
    # the token's own direction is kept: only the scale changes
    assert torch.allclose(up[2] / up[2].norm(), plain[2] / plain[2].norm(), atol=1e-5)


def test_150_token_prompt_is_encoded_in_full(clip_pipe) -> None:
    tok, enc = clip_pipe.tokenizer, clip_pipe.model.text_encoder
    text = " ".join(["red circle blue square green triangle"] * 25)
    emb = clip_pipe.encode_prompt([text])
    assert emb.shape == (1, 154, enc.cfg.width)
    body = tok.encode(text)
    with torch.no_grad():
        parts = [enc(frame([ids], bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, context_length=77))
                 for ids in (body[:75], body[75:])]
    torch.testing.assert_close(emb, torch.cat(parts, dim=1), rtol=1e-5, atol=1e-6)
    # a batch of a long and a short prompt: the short one gets an empty-prompt chunk
    both = clip_pipe.encode_prompt([text, "a red circle"])
    assert both.shape == (2, 154, enc.cfg.width)
    torch.testing.assert_close(both[1, 77:], clip_pipe.encode_prompt([""])[0], rtol=1e-5, atol=1e-6)


def test_match_lengths_pads_with_empty_chunks(clip_pipe) -> None:
    cond = torch.randn(1, 154, 32)
    uncond = torch.randn(1, 77, 32)
    empty = clip_pipe.encode_prompt([""])
    c, u = match_lengths(cond, uncond, empty)
    assert torch.equal(c, cond) and u.shape == (1, 154, 32)
    assert torch.equal(u[:, :77], uncond) and torch.equal(u[:, 77:], empty)
    with pytest.raises(PromptSyntaxError):
        apply_emphasis(torch.zeros(1, 3, 4), torch.ones(1, 4))


def _np(im) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def test_generation_uses_weights_and_long_prompts(clip_pipe) -> None:
    kw = dict(steps=2, sampler="euler", width=SIZE, height=SIZE, seed=7)
    plain = clip_pipe.txt2img("a red circle", **kw)[0]
    same = clip_pipe.txt2img("a (red:1.0) circle", **kw)[0]
    assert np.array_equal(_np(plain), _np(same))
    up = clip_pipe.txt2img("a (red:1.6) circle", **kw)[0]
    assert np.abs(_np(up) - _np(plain)).mean() > 0.5  # grey levels of 255
    # cond of 2 chunks against a 1-chunk negative prompt (padded as A1111 does), and a
    # long prompt whose second chunk differs changes the image: all 150 tokens count
    long_a = " ".join(["red circle"] * 40)
    long_b = " ".join(["red circle"] * 38) + " blue square blue square"
    img_a = clip_pipe.txt2img(long_a, "a green triangle", **kw)[0]
    img_b = clip_pipe.txt2img(long_b, "a green triangle", **kw)[0]
    assert np.abs(_np(img_a) - _np(img_b)).max() > 0


def test_prompt_embeds_replace_the_prompt(clip_pipe) -> None:
    kw = dict(steps=2, sampler="euler", width=SIZE, height=SIZE, seed=3)
    ref = clip_pipe.txt2img("a red circle", "a blue square", **kw)[0]
    emb = clip_pipe.encode_prompt(["a red circle"])
    neg = clip_pipe.encode_prompt(["a blue square"])
    got = A.txt2img_embeds(clip_pipe, emb, neg, label="a red circle", negative_prompt="a blue square", **kw)[0]
    assert np.array_equal(_np(ref), _np(got))
    assert got.info["parameters"].startswith("a red circle")
    with pytest.raises(RequestError, match="prompt_embeds must be"):
        A.txt2img_embeds(clip_pipe, torch.zeros(1, 77, 7), **kw)


# ----------------------------------------------------------------------------- arithmetic


def test_parse_expression() -> None:
    T = A.Term
    assert A.parse_expression('"a red circle" - "red" + "blue"') == [T(1.0, "a red circle"), T(-1.0, "red"), T(1.0, "blue")]
    assert A.parse_expression("0.3 * 'a' + 'b' * 0.7 - 2\"c\"") == [T(0.3, "a"), T(0.7, "b"), T(-2.0, "c")]
    assert A.parse_expression("a cat's hat, (red:1.2)") == [T(1.0, "a cat's hat, (red:1.2)")]
    assert A.parse_expression(r'"say \"hi\""') == [T(1.0, 'say "hi"')]
    for bad in ['"a" "b"', '"a" +', '"a" * x', '2 * "a" *', '"a']:
        with pytest.raises(A.PromptExpressionError):
            A.parse_expression(bad)


def test_expression_coefficients_are_bounded_and_parsing_is_linear() -> None:
    for bad in ['1e999 * "red"', '"red" * 11', '-10.5 "red"', '"a" + 1e30 * "b"']:
        with pytest.raises(A.PromptExpressionError, match="out of range; allowed: a number from -10 to 10"):
            A.parse_expression(bad)
    with pytest.raises(A.PromptExpressionError, match="out of range"):
        A._terms([(float("nan"), "red")])
    assert A.parse_expression('10 * "a" - 10 * "b"') == [A.Term(10.0, "a"), A.Term(-10.0, "b")]
    t0 = time.perf_counter()
    terms = A.parse_expression(' + "a"' * 20_000)  # 120 KB: a slice of the rest per token was quadratic
    assert len(terms) == 20_000 and time.perf_counter() - t0 < 5.0


def test_combine_is_a_token_aligned_weighted_sum(clip_pipe) -> None:
    e = {p: clip_pipe.encode_prompt([p]) for p in ("a red circle", "red", "blue")}
    got = A.combine(clip_pipe, '"a red circle" - "red" + "blue"')
    torch.testing.assert_close(got, e["a red circle"] - e["red"] + e["blue"], rtol=1e-6, atol=1e-6)
    mix = A.blend(clip_pipe, ["red", "blue"], [1.0, 3.0])
    torch.testing.assert_close(mix, 0.25 * e["red"] + 0.75 * e["blue"], rtol=1e-6, atol=1e-6)
    # terms of different lengths: the short ones are padded with empty-prompt chunks
    long = " ".join(["red"] * 80)
    mixed = A.combine(clip_pipe, [(1.0, long), (1.0, "blue")])
    assert mixed.shape == (1, 154, 32)
    torch.testing.assert_close(mixed[:, 77:], clip_pipe.encode_prompt([long])[:, 77:] + clip_pipe.encode_prompt([""]))


def test_slerp_and_lerp() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    torch.testing.assert_close(A.slerp(a, b, 0.0), a)
    torch.testing.assert_close(A.slerp(a, b, 1.0), b)
    mid = A.slerp(a, b, 0.5)
    assert abs(mid.norm() / ((a.norm() + b.norm()) / 2) - 1) < 0.05  # the norm stays, unlike lerp's
    assert A.lerp(a, b, 0.5).norm() < 0.8 * a.norm()
    torch.testing.assert_close(A.slerp(a, a, 0.3), a)
    with pytest.raises(ValueError, match="one shape"):
        A.slerp(a, b[:, :2], 0.5)


def test_seed_noise_is_the_pipelines_noise(word_pipe) -> None:
    kw = dict(steps=2, sampler="euler", width=SIZE, height=SIZE)
    ref = word_pipe.txt2img("a red circle", seed=11, **kw)[0]
    got = word_pipe.txt2img("a red circle", seed=11, latents=A.seed_noise(word_pipe, 11, SIZE, SIZE), **kw)[0]
    assert np.array_equal(_np(ref), _np(got))
    # interpolation ends reproduce the plain generations
    frames = A.interpolate_seeds(word_pipe, "a red circle", 11, 12, frames=3, **kw)
    assert len(frames) == 3
    assert np.array_equal(_np(frames[0]), _np(ref))
    end = word_pipe.txt2img("a red circle", seed=12, **kw)[0]
    assert np.abs(_np(frames[2]) - _np(end)).max() <= 1  # slerp at t=1 is seed 12's noise up to rounding


@pytest.mark.parametrize(
    "field, value, message",
    [  # found by tests/test_prompt_fuzz.py: each was a TypeError (a 500 on the server)
        ("sampler_options", None, "sampler_options must be a mapping"),
        ("sampler_options", {1: 2}, "sampler_options must be a mapping"),
        ("sampler", 3, "sampler must be a sampler name"),
        ("karras", "yes", "karras must be true, false or None"),
    ],
)
def test_validate_refuses_wrong_types_with_a_request_error(field: str, value, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        validate(GenerationRequest(prompt="a red circle", **{field: value}))
