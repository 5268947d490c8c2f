"""What one prompt may cost: a cap in bytes (checked before any parsing) and in tokens.

>>> check_prompt("a red circle", tokenizer, PromptBudget(max_bytes=4096, max_tokens=300))
3

The bytes cap bounds the parser's work, the tokens cap the text encoder's (one pass per
chunk of 75 tokens). Text must be valid Unicode: a lone UTF-16 surrogate (a broken
client's JSON ``"\\ud800"``, or a non-UTF-8 byte in a command-line argument, which Python
turns into one) is refused with its position. The server checks every prompt before it
queues the request; the pipeline checks again before it encodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opensd.errors import OpenSDError

if TYPE_CHECKING:
    from opensd.prompts.syntax import TokenizedPrompt


class PromptBudgetError(OpenSDError):
    """A prompt is not valid text, or is longer than the budget allows."""


@dataclass(frozen=True)
class PromptBudget:
    """``max_bytes``: UTF-8 bytes of one prompt; ``max_tokens``: its tokens, syntax removed (75 per chunk)."""

    max_bytes: int = 64 * 1024
    max_tokens: int = 75 * 40

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PromptBudgetError(f"PromptBudget.{name} must be a positive integer, got {v!r}")


def check_text(text: str, *, what: str = "prompt") -> None:
    """Raise :class:`PromptBudgetError` if ``text`` is not a str or holds a lone surrogate."""
    if not isinstance(text, str):
        raise PromptBudgetError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise PromptBudgetError(
            f"{what} is not valid Unicode text: character {e.start} is a lone surrogate (U+{ord(bad):04X}); "
            "send UTF-8 text (a non-UTF-8 byte in a command-line argument gives this too)"
        ) from None


DEFAULT_BUDGET = PromptBudget()
"""What the pipeline and the server allow unless told otherwise: 64 KiB, 3000 tokens."""


def check_prompt(text: str, tokenizer, budget: PromptBudget = DEFAULT_BUDGET, *, what: str = "prompt", embeddings=None) -> int:
    """Check ``text`` against ``budget`` and return its token count; the error names the limit and the size.

    Raises :class:`PromptBudgetError` (not text, a lone surrogate, too many bytes or
    tokens) or :class:`~opensd.prompts.syntax.PromptSyntaxError` (brackets nested too
    deep, a weight out of range). The bytes are checked before any parsing and the
    tokenizer stops one token past the cap, so a refusal costs at most ``max_bytes`` of
    parsing and ``max_tokens`` of tokenizing. ``embeddings`` (name -> vector count): each
    embedding the text names counts its vectors.
    """
    return tokenize_within_budget(text, tokenizer, budget, what=what, embeddings=embeddings).token_count


def tokenize_within_budget(text: str, tokenizer, budget: PromptBudget = DEFAULT_BUDGET, context: int | None = None, *,
                           comma_backtrack: int | None = None, what: str = "prompt",
                           embeddings: Mapping[str, int] | None = None) -> TokenizedPrompt:
    """:func:`~opensd.prompts.syntax.tokenize_prompt` of ``text`` once it passes :func:`check_prompt`'s checks.

    One tokenization serves both the check and the encoding (``context``,
    ``comma_backtrack`` and ``embeddings`` as ``tokenize_prompt`` takes them: an embedding
    counts its vectors).
    """
    from opensd.prompts.syntax import COMMA_BACKTRACK, tokenize_prompt  # here: syntax imports this module

    if not isinstance(budget, PromptBudget):
        raise PromptBudgetError(f"budget must be a PromptBudget, got {type(budget).__name__}")
    check_text(text, what=what)
    size = len(text.encode("utf-8"))
    if size > budget.max_bytes:
        raise PromptBudgetError(f"{what} is {size} bytes; at most {budget.max_bytes} are allowed")
    backtrack = COMMA_BACKTRACK if comma_backtrack is None else comma_backtrack
    tokenized = tokenize_prompt(tokenizer, text, context, comma_backtrack=backtrack, max_tokens=budget.max_tokens,
                                embeddings=embeddings)
    if tokenized.token_count > budget.max_tokens:
        per_chunk = max(1, int(tokenizer.context_length) - 2)
        raise PromptBudgetError(
            f"{what} holds more than {budget.max_tokens} tokens, the most allowed "
            f"({budget.max_tokens // per_chunk} chunks of {per_chunk} for this model's tokenizer)"
        )
    return tokenized
