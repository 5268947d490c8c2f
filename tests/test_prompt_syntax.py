"""A1111 prompt syntax, chunked weighted encoding, and prompt arithmetic."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from opensd.checkpoints import LoadedModel
from opensd.pipelines import RequestError
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.prompts import arithmetic as A
from opensd.prompts.syntax import (
    PromptSyntaxError,
    apply_emphasis,
    as_pairs,
    encode_prompts,
    match_lengths,
    parse_prompt_attention,
    tokenize_prompt,
)
from opensd.tokenizers import frame

from helpers import clip_tokenizer, tiny_clip_bundle, tiny_word_bundle

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
