"""What hostile prompts cost: the budget check, the parser and the tokenizers, on one core.

    OMP_NUM_THREADS=1 python scripts/prompt_cost.py

Each line: the prompt, the call, its wall time (best of 3) and what came of it (the
result's size, or the error). The budget check is what the server runs before queueing
a request, and the pipeline before encoding; the other calls run with no budget, to
show that parsing and tokenizing are linear in the prompt's length.
"""

from __future__ import annotations

import random
import time

from opensd.defaults import resolve_model
from opensd.prompts.budget import DEFAULT_BUDGET, check_prompt
from opensd.prompts.syntax import parse_prompt_attention, tokenize_prompt
from opensd.tokenizers import load_tokenizer
from opensd.tokenizers.clip_bpe import CLIPTokenizer


def timed(label: str, fn) -> None:
    best, out = float("inf"), ""
    for _ in range(3):
        t0 = time.perf_counter()
        try:
            r = fn()
            out = f"ok ({r})"
        except ValueError as e:
            out = f"{type(e).__name__}: {str(e)[:90]}"
        best = min(best, time.perf_counter() - t0)
    print(f"{label:<52} {best * 1000:9.1f} ms  {out}", flush=True)


def main() -> None:
    word = load_tokenizer(resolve_model(None))
    clip = CLIPTokenizer.from_open_clip()
    rng = random.Random(0)
    prompts = {
        "1 MB plain text": "a red circle " * (2**20 // 13),
        "120 KB of nested '(a'": "(a" * 60_000,
        "64 KB plain text": "a red circle " * (2**16 // 13),
        "64 KB of brackets '(a) [b] (c:0.5) '": "(a) [b] (c:0.5) " * 4096,
        "64 KB of spaces": " " * 2**16,
        "64 KB, 30 deep, repeated": ("(" * 20 + "[" * 10 + "a" + "]" * 10 + ")" * 20 + " ") * 1050,
        "16 KB one random word": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2**14)),
    }
    for name, text in prompts.items():
        for tok_name, tok in (("word", word), ("clip", clip)):
            timed(f"{name}: check_prompt ({tok_name})", lambda text=text, tok=tok: check_prompt(text, tok, DEFAULT_BUDGET))
        if len(text) <= 2**17:
            timed(f"{name}: parse", lambda text=text: len(parse_prompt_attention(text)))
    timed("1 MB plain text: tokenize, no budget (word)", lambda: tokenize_prompt(word, prompts["1 MB plain text"]).token_count)
    clip._cache.clear()
    timed("16 KB one random word: tokenize (clip)", lambda: tokenize_prompt(clip, prompts["16 KB one random word"]).token_count)


if __name__ == "__main__":
    main()
