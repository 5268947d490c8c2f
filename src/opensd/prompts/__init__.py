"""Prompts: A1111's attention syntax and chunked weighted encoding, and prompt arithmetic.

- :mod:`opensd.prompts.syntax`: ``(word:1.3)``, ``(word)``, ``[word]``, escapes,
  ``BREAK``; prompts of any length in chunks of 75 tokens; emphasis "Original"
  (the parser itself: :mod:`opensd.prompts.attention`).
- :mod:`opensd.prompts.budget`: what one prompt may cost (bytes, tokens, valid Unicode).
- :mod:`opensd.prompts.vocabulary`: the prompt words a model cannot read, as warnings.
- :mod:`opensd.prompts.arithmetic`: ``'"a red circle" - "red" + "blue"'``, blends,
  prompt (lerp) and seed (slerp) interpolation, generation from ready embeddings.
"""

from opensd.prompts.arithmetic import (
    PromptExpressionError,
    Term,
    blend,
    combine,
    generate_expression,
    interpolate,
    interpolate_prompts,
    interpolate_seeds,
    lerp,
    parse_expression,
    seed_noise,
    slerp,
    txt2img_embeds,
)
from opensd.prompts.syntax import (
    BREAK,
    Fragment,
    PromptSyntaxError,
    TokenizedPrompt,
    encode_prompts,
    match_lengths,
    parse_prompt_attention,
    tokenize_prompt,
)

__all__ = [
    "BREAK",
    "Fragment",
    "PromptExpressionError",
    "PromptSyntaxError",
    "Term",
    "TokenizedPrompt",
    "blend",
    "combine",
    "encode_prompts",
    "generate_expression",
    "interpolate",
    "interpolate_prompts",
    "interpolate_seeds",
    "lerp",
    "match_lengths",
    "parse_expression",
    "parse_prompt_attention",
    "seed_noise",
    "slerp",
    "tokenize_prompt",
    "txt2img_embeds",
]
