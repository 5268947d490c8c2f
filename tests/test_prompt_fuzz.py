"""Property tests (hypothesis) over the prompt parsers, the tokenizers and request validation.

Every property runs twice: a bounded, derandomized run in the normal suite (this file
stays under ~10 s) and a ``slow`` run with many more random examples (``make test-slow``).

The parser is checked against :func:`reference_parse`, the quadratic parser it replaced
(kept here as the oracle): the same fragments, bit for bit, wherever the new one accepts
the input, and a refusal only where the nesting or a weight is out of bounds.
"""

from __future__ import annotations

import math
import re
import string

import pytest
from helpers import clip_tokenizer, tiny_word_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensd.errors import OpenSDError
from opensd.pipelines.request import GenerationRequest, RequestError, validate
from opensd.prompts.arithmetic import PromptExpressionError, parse_expression
from opensd.prompts.budget import PromptBudget, PromptBudgetError, check_prompt
from opensd.prompts.syntax import (
    MAX_NESTING,
    MAX_WEIGHT,
    ROUND_FACTOR,
    SQUARE_FACTOR,
    Fragment,
    PromptSyntaxError,
    parse_prompt_attention,
    tokenize_prompt,
)
from opensd.tokenizers import TokenizerError, unknown_words

FAST, SLOW = 150, 3000  # examples per property


def both(strategy_args: tuple, fast: int = FAST, slow: int = SLOW):
    """A property as two tests: ``fast`` derandomized examples, and ``slow`` random ones marked slow."""

    def wrap(prop):
        common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        quick = settings(max_examples=fast, derandomize=True, **common)(given(*strategy_args)(prop))
        many = pytest.mark.slow(settings(max_examples=slow, **common)(given(*strategy_args)(prop)))
        return quick, many

    return wrap


# ----------------------------------------------------------------------------- the oracle

_REF_SYNTAX = re.compile(
    r"\\[\\()\[\]]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
)
_REF_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def reference_parse(text: str) -> tuple[list[Fragment], int, list[float]]:
    """The parser before the rewrite (quadratic in the nesting, no caps): fragments, deepest nesting, explicit weights."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []
    deepest, explicit = 0, []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= factor

    for m in _REF_SYNTAX.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0, False])
        elif tok in "([" and len(tok) == 1:
            (round_open if tok == "(" else square_open).append(len(res))
            deepest = max(deepest, len(round_open) + len(square_open))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
                explicit.append(factor)
            except ValueError:
                res.append([tok[:-1].rstrip(), 1.0, False])
                factor = ROUND_FACTOR
            multiply(round_open.pop(), factor)
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_REF_BREAK.split(tok)):
                if i > 0:
                    res.append(["BREAK", -1.0, True])
                res.append([part, 1.0, False])
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, SQUARE_FACTOR)
    merged: list[list] = []
    for item in res:
        if item[2] or not merged or merged[-1][2] or merged[-1][1] != item[1]:
            merged.append(list(item))
        else:
            merged[-1][0] += item[0]
    return [Fragment(*m) for m in merged] or [Fragment("", 1.0)], deepest, explicit


# ----------------------------------------------------------------------------- strategies

SYNTAX_PIECES = ["(", ")", "[", "]", ":", "\\", " ", "a", "b", "1", ".", "BREAK", ",", ":1.5)", ":0.5)", ":-2)",
                 ":9)", ":12)", "\n", "\u00a0", "\\(", "\\]"]  # fmt: skip
PROMPTS = st.one_of(
    st.lists(st.sampled_from(SYNTAX_PIECES), max_size=60).map("".join),  # syntax-heavy
    st.text(max_size=80),  # any Unicode (no surrogates)
    st.lists(st.one_of(st.sampled_from(SYNTAX_PIECES), st.text(max_size=4)), max_size=30).map("".join),
)
PLAIN = st.text(alphabet=st.characters(blacklist_characters="()[]\\:", blacklist_categories=("Cs",)), max_size=80)
WORD = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8)


# ----------------------------------------------------------------------------- parser


@both((PROMPTS,))
def _parser_matches_the_reference_or_refuses_for_a_cap(text: str) -> None:
    ref, deepest, explicit = reference_parse(text)
    try:
        got = parse_prompt_attention(text)
    except PromptSyntaxError as e:  # only for the two caps, and the reference shows the cap is passed
        over_weight = any(not abs(f.weight) <= MAX_WEIGHT for f in ref if not f.is_break)
        over_explicit = any(not abs(w) <= MAX_WEIGHT for w in explicit)
        assert deepest > MAX_NESTING or over_weight or over_explicit, (text, str(e))
        return
    assert got == ref  # the same texts and the same floats, bit for bit
    assert all(isinstance(f, Fragment) and math.isfinite(f.weight) for f in got)


test_parser_matches_the_reference, test_parser_matches_the_reference_slow = _parser_matches_the_reference_or_refuses_for_a_cap


@both((st.text(max_size=300) | st.lists(st.sampled_from(SYNTAX_PIECES), max_size=200).map("".join),))
def _parser_output_is_linear_in_the_input(text: str) -> None:
    """A bound on the work: the fragments hold no more text than the input, and at most one per input character."""
    try:
        frags = parse_prompt_attention(text)
    except PromptSyntaxError:
        return
    assert len(frags) <= len(text) + 1
    assert sum(len(f.text) for f in frags if not f.is_break) <= len(text)


test_parser_output_is_linear, test_parser_output_is_linear_slow = _parser_output_is_linear_in_the_input


@both((PLAIN,))
def _plain_text_round_trips(text: str) -> None:
    frags = parse_prompt_attention(text)
    if re.search(r"\bBREAK\b", text):
        assert [f.is_break for f in frags].count(True) == len(re.findall(r"\bBREAK\b", text))
    else:
        assert frags == [Fragment(text, 1.0)]


test_plain_text_round_trips, test_plain_text_round_trips_slow = _plain_text_round_trips


@both((WORD, st.integers(0, 12), st.integers(0, 12), st.one_of(st.none(), st.sampled_from(["0.5", "1.3", "-2", "0", "7.25"]))))
def _weights_multiply_through_nesting(word: str, rounds: int, squares: int, explicit: str | None) -> None:
    """``(`` x 1.1, ``[`` / 1.1, ``(w:x)`` x x, multiplied through nesting, as the module doc says."""
    inner = word if explicit is None else f"({word}:{explicit})"
    text = "(" * rounds + "[" * squares + inner + "]" * squares + ")" * rounds
    expected = ROUND_FACTOR**rounds * SQUARE_FACTOR**squares * (1.0 if explicit is None else float(explicit))
    if abs(expected) > MAX_WEIGHT * (1 - 1e-9):
        with pytest.raises(PromptSyntaxError, match="allowed: from -10 to 10"):
            parse_prompt_attention(text)
        return
    assert [(f.text, f.weight) for f in parse_prompt_attention(text)] == [(word, pytest.approx(expected, rel=1e-12))]
    unclosed = parse_prompt_attention(text[: len(text) - rounds - squares])  # unclosed brackets apply to the end
    assert [(f.text, f.weight) for f in unclosed] == [(word, pytest.approx(expected, rel=1e-12))]


test_weights_multiply, test_weights_multiply_slow = _weights_multiply_through_nesting


EXPRESSION_PIECES = ['"a red circle"', "'b'", '"', "'", "+", "-", "*", " ", "0.5", "2", "1e3", "1e999", ".", "\\", "x"]


@both((st.lists(st.sampled_from(EXPRESSION_PIECES) | st.text(max_size=3), max_size=20).map("".join),))
def _expressions_parse_or_raise_their_error(expr: str) -> None:
    try:
        terms = parse_expression(expr)
    except PromptExpressionError:
        return
    assert terms and all(isinstance(t.prompt, str) and abs(t.coef) <= MAX_WEIGHT for t in terms)


test_expressions_parse_or_raise_their_error, test_expressions_parse_or_raise_their_error_slow = _expressions_parse_or_raise_their_error


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def word_tok():
    return tiny_word_bundle()[1]


# st.characters() leaves lone surrogates out; a broken client or a non-UTF-8 argv brings them in
WITH_SURROGATES = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, blacklist_categories=())


def texts_with_surrogates(max_size: int) -> st.SearchStrategy[str]:
    return st.lists(WITH_SURROGATES, max_size=max_size).map("".join)  # st.text() drops surrogates from any alphabet


ANY_TEXT = st.text(max_size=60) | texts_with_surrogates(60)


def _tokenizer_property(tok, text: str) -> None:
    try:
        ids = tok.encode(text)
    except TokenizerError as e:  # only for a lone surrogate
        assert "lone surrogate" in str(e) and any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert ids == tok.encode(text)
    framed = tok([text, "a"])
    assert framed.shape == (2, tok.context_length)
    assert int(framed.min()) >= 0 and int(framed.max()) < tok.vocab_size
    assert framed[0, 0].item() == tok.bos_id and tok.eos_id in framed[0].tolist()
    lost = unknown_words(tok, text)
    assert all(isinstance(w, str) and w for w in lost) and len(lost) == len({w.lower() for w in lost})


@both((ANY_TEXT,), fast=100)
def _word_tokenizer_never_crashes(word_tok, text: str) -> None:
    _tokenizer_property(word_tok, text)


test_word_tokenizer_never_crashes, test_word_tokenizer_never_crashes_slow = _word_tokenizer_never_crashes


@both((ANY_TEXT,), fast=100)
def _clip_tokenizer_never_crashes(text: str) -> None:
    tok = clip_tokenizer()
    _tokenizer_property(tok, text)
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert unknown_words(tok, text) == []


test_clip_tokenizer_never_crashes, test_clip_tokenizer_never_crashes_slow = _clip_tokenizer_never_crashes


@both((PROMPTS, st.integers(3, 80)), fast=100)
def _tokenize_prompt_chunks_are_framed(word_tok, text: str, context: int) -> None:
    try:
        tp = tokenize_prompt(word_tok, text, context)
    except PromptSyntaxError:
        return
    assert tp.chunks and all(len(c.ids) == len(c.weights) == len(c.word_index) == context for c in tp.chunks)
    assert all(c.ids[0] == word_tok.bos_id and word_tok.eos_id in c.ids for c in tp.chunks)
    assert tp.token_count == sum(sum(1 for i in c.word_index if i >= 0) for c in tp.chunks)
    assert all(-MAX_WEIGHT <= w <= MAX_WEIGHT for c in tp.chunks for w in c.weights)


test_tokenize_prompt_chunks_are_framed, test_tokenize_prompt_chunks_are_framed_slow = _tokenize_prompt_chunks_are_framed


@both((texts_with_surrogates(200), st.integers(1, 300), st.integers(1, 50)), fast=100)
def _check_prompt_raises_only_its_errors(word_tok, text: str, max_bytes: int, max_tokens: int) -> None:
    try:
        n = check_prompt(text, word_tok, PromptBudget(max_bytes=max_bytes, max_tokens=max_tokens))
    except (PromptBudgetError, PromptSyntaxError):
        return
    assert len(text.encode("utf-8")) <= max_bytes and 0 <= n <= max_tokens


test_check_prompt_raises_only_its_errors, test_check_prompt_raises_only_its_errors_slow = _check_prompt_raises_only_its_errors


# ----------------------------------------------------------------------------- request validation

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    texts_with_surrogates(12), st.binary(max_size=4),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
FIELDS = ["prompt", "negative_prompt", "steps", "sampler", "karras", "cfg_scale", "guidance_rescale", "width", "height",
          "seed", "batch_size", "strength", "clip_skip", "tiled_vae", "sampler_options"]  # fmt: skip
SAMPLERS = st.sampled_from(["euler", "Euler a", "dpmpp_2m", "DPM++ 2M Karras", "ddim", "nope", ""])


@both((st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE | SAMPLERS, max_size=6), st.booleans()))
def _validate_raises_only_request_errors(fields: dict, start_valid: bool) -> None:
    base = {"prompt": "a red circle"} if start_valid else {"prompt": fields.pop("prompt", "")}
    try:
        req = GenerationRequest(**{**base, **fields})
        validate(req)
    except RequestError:
        return
    except OpenSDError as e:  # pragma: no cover - the property's failure message
        raise AssertionError(f"validate raised {type(e).__name__}, not RequestError: {e}") from None


test_validate_raises_only_request_errors, test_validate_raises_only_request_errors_slow = _validate_raises_only_request_errors
