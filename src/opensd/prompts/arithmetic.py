"""Prompt arithmetic and interpolation: weighted sums of prompt embeddings, and slerp of seeds.

What is added and subtracted. A prompt's embedding is the text encoder's whole
context, (1, L, D): one vector per token position, padding included (CLIP's
causal attention writes the whole prompt into every position after it, so the
padding positions carry the prompt too). ``"a red circle" - "red" + "blue"`` is

    E("a red circle") - E("red") + E("blue")

position by position. Every term is encoded on its own (A1111 syntax works inside
each), then all are made the same length by appending empty-prompt chunks (as for
cond / uncond); nothing is aligned by word. Coefficients that sum to 1 (as
``1 - 1 + 1``, or a blend ``0.3 "a" + 0.7 "b"``) keep the embedding's scale;
``normalize=True`` divides by the sum of the coefficients.

Families. The sum is taken per named tensor of the conditioning. SD 1.x and 2.x have
only the context, and an expression gives a (1, L, D) tensor. SDXL and its refiner
also condition on the pooled text embedding (in ``y``): every term's pooled vector
(its first chunk's, as A1111) is summed with the same coefficients, and an expression
gives ``{"context": (1, L, 2048 in SDXL), "pooled": (1, P)}``, which
``pipe.generate(prompt_embeds=...)`` takes as it is; the size part of ``y`` comes from
the request, not from the prompt. Interpolation lerps each tensor.

Expressions: ``[coef [*]] "prompt" [* coef]`` terms joined by ``+`` / ``-``, quotes
``"..."`` or ``'...'`` (a backslash escapes a quote). Text that does not start
with a quote (or a coefficient and a quote) is one prompt with coefficient 1, so
every ordinary prompt, apostrophes included, is an expression.

Interpolation: prompts by linear interpolation of their embeddings (same noise);
seeds by spherical interpolation (slerp, Shoemake 1985; White 2016, "Sampling
Generative Networks") of the initial noise, which keeps its norm where a straight
line between two Gaussian draws would shrink it. With no end prompt and no end
seed, an interpolation is a seed walk: the same prompt from ``seed``'s noise to the
next seed's (:func:`walk_end_seed`), never ``frames`` copies of one image. At most
:data:`MAX_FRAMES` frames (each is a whole generation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from PIL import Image

from opensd.errors import OpenSDError
from opensd.prompts.attention import MAX_WEIGHT
from opensd.prompts.syntax import pad_context


class PromptExpressionError(OpenSDError):
    """A prompt expression cannot be read; the message says where and what is allowed."""


@dataclass(frozen=True)
class Term:
    """``coef * E(prompt)``."""

    coef: float
    prompt: str


# ----------------------------------------------------------------------------- expressions

_LEX = re.compile(
    r"""\s*(?:
      (?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)
    | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<op>[-+*])
    )""",
    re.X | re.S,
)

_NON_SPACE = re.compile(r"\S")
_EXPRESSION_START = re.compile(r"""\s*[-+]?\s*(?:[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?\s*\*?\s*)?["']""")


def parse_expression(expr: str) -> list[Term]:
    """``'"a red circle" - "red" + "blue"'`` -> ``[Term(1, 'a red circle'), Term(-1, 'red'), Term(1, 'blue')]``."""
    if not isinstance(expr, str):
        raise PromptExpressionError(f"a prompt expression must be text, got {type(expr).__name__}")
    if not _EXPRESSION_START.match(expr):
        return [Term(1.0, expr)]
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(expr):
        if not _NON_SPACE.search(expr, pos):  # only whitespace left (no slice per token: that was quadratic)
            break
        m = _LEX.match(expr, pos)
        if m is None or m.end() == pos:
            raise PromptExpressionError(
                f"cannot read the prompt expression at character {pos}: {expr[pos:pos + 20]!r}; "
                'write terms as [number *] "prompt" joined by + or -'
            )
        kind = m.lastgroup
        assert kind is not None  # every alternative of _LEX is a named group
        tokens.append((kind, m.group(kind), pos))
        pos = m.end()

    terms: list[Term] = []
    i = 0

    def expect_number_after_star() -> float:
        nonlocal i
        if i < len(tokens) and tokens[i][0] == "op" and tokens[i][1] == "*":
            if i + 1 >= len(tokens) or tokens[i + 1][0] != "num":
                raise PromptExpressionError("'*' must be followed by a number")
            i += 2
            return float(tokens[i - 1][1])
        return 1.0

    while i < len(tokens):
        sign = 1.0
        while i < len(tokens) and tokens[i][0] == "op" and tokens[i][1] in "+-":
            sign = -sign if tokens[i][1] == "-" else sign
            i += 1
        if i >= len(tokens):
            raise PromptExpressionError("the expression ends with an operator; a quoted prompt must follow")
        coef = 1.0
        if tokens[i][0] == "num":
            coef = float(tokens[i][1])
            i += 1
            if i < len(tokens) and tokens[i][0] == "op" and tokens[i][1] == "*":
                i += 1
        if i >= len(tokens) or tokens[i][0] != "str":
            where = tokens[i][2] if i < len(tokens) else len(expr)
            raise PromptExpressionError(f'expected a quoted prompt at character {where}: write terms as [number *] "prompt"')
        raw = tokens[i][1]
        text = re.sub(r"\\(.)", r"\1", raw[1:-1])
        i += 1
        coef *= expect_number_after_star()
        terms.append(_checked(Term(sign * coef, text)))
        if i < len(tokens) and not (tokens[i][0] == "op" and tokens[i][1] in "+-"):
            raise PromptExpressionError(f"expected + or - between terms at character {tokens[i][2]}")
    if not terms:
        raise PromptExpressionError("the expression holds no prompt")
    return terms


def _checked(term: Term) -> Term:
    """``term`` if its coefficient is finite and within +-MAX_WEIGHT (as prompt weights: inf gave a black image)."""
    if not isinstance(term.coef, (int, float)) or not math.isfinite(term.coef) or abs(term.coef) > MAX_WEIGHT:
        raise PromptExpressionError(
            f"the coefficient {term.coef!r} of {term.prompt[:30]!r} is out of range; "
            f"allowed: a number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}"
        )
    return term


def _terms(terms: str | Sequence[Term | tuple[float, str]]) -> list[Term]:
    if isinstance(terms, str):
        return parse_expression(terms)
    out = []
    for t in terms:
        if isinstance(t, Term):
            out.append(_checked(t))
        elif isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], str) and isinstance(t[0], (int, float)):
            out.append(_checked(Term(float(t[0]), t[1])))
        else:
            raise PromptExpressionError(f"a term must be a Term or a (coef, prompt) pair, got {t!r}")
    if not out:
        raise PromptExpressionError("no terms to combine")
    return out


# ----------------------------------------------------------------------------- embeddings

Embeds = torch.Tensor | dict[str, torch.Tensor]  # what ``pipe.generate`` takes as ``prompt_embeds``


def as_prompt_embeds(parts: dict[str, torch.Tensor]) -> Embeds:
    """``parts`` in the form ``pipe.generate`` takes: the bare context (1, L, D) when that is
    all the family uses (SD 1.x, 2.x), else the dict ``{"context", "pooled"}`` (SDXL families)."""
    return parts["context"] if set(parts) == {"context"} else parts


def embeds_parts(embeds: Embeds) -> dict[str, torch.Tensor]:
    """The named tensors of ``embeds`` (a bare tensor is the context)."""
    return {"context": embeds} if isinstance(embeds, torch.Tensor) else dict(embeds)


def encode_terms(pipe, prompts: Sequence[str], *, clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """Each prompt encoded on its own by the pipeline's conditioner: ``context`` (N, L, D),
    padded with empty-prompt chunks to one length, and for SDXL families ``pooled`` (N, P)
    (the projected bigG embedding of each prompt's first chunk)."""
    with torch.inference_mode():
        texts = [pipe.conditioner.encode([p], clip_skip) for p in prompts]
        contexts = [t.context for t in texts]
        n = max(c.shape[1] for c in contexts)
        if any(c.shape[1] != n for c in contexts):
            empty = pipe.conditioner.encode([""], clip_skip).context
            contexts = [pad_context(c, n, empty) for c in contexts]
        out = {"context": torch.cat(contexts).clone()}
        if texts[0].pooled is not None:
            out["pooled"] = torch.cat([t.pooled for t in texts]).clone()
        return out


def encode_same_length(pipe, prompts: Sequence[str], *, clip_skip: int = 1) -> torch.Tensor:
    """(N, L, D): each prompt's context (:func:`encode_terms`), padded with empty-prompt chunks to one length."""
    return encode_terms(pipe, prompts, clip_skip=clip_skip)["context"]


def combine(
    pipe, terms: str | Sequence[Term | tuple[float, str]], *, clip_skip: int = 1, normalize: bool = False
) -> Embeds:
    """``sum_i coef_i * E(prompt_i)`` per named tensor (see the module doc); ``normalize``
    divides by ``sum coef_i``. Returns the context (1, L, D) for SD 1.x / 2.x, and for SDXL
    families ``{"context": (1, L, D), "pooled": (1, P)}``, the pooled embedding combined
    with the same coefficients (:func:`as_prompt_embeds`)."""
    ts = _terms(terms)
    coefs = torch.tensor([t.coef for t in ts], dtype=torch.float32)
    if normalize:
        total = float(coefs.sum())
        if abs(total) < 1e-8:
            raise PromptExpressionError("normalize=True needs coefficients whose sum is not 0")
        coefs = coefs / total
    parts = encode_terms(pipe, [t.prompt for t in ts], clip_skip=clip_skip)  # name -> (N, ...)
    summed = {k: (coefs.to(v).reshape(-1, *[1] * (v.ndim - 1)) * v).sum(0, keepdim=True) for k, v in parts.items()}
    return as_prompt_embeds(summed)


def blend(pipe, prompts: Sequence[str], weights: Sequence[float] | None = None, *, clip_skip: int = 1) -> Embeds:
    """The weighted mean of the prompts' embeddings (equal weights by default), in :func:`combine`'s form."""
    weights = [1.0] * len(prompts) if weights is None else list(weights)
    if len(weights) != len(prompts) or not prompts:
        raise PromptExpressionError(f"blend needs one weight per prompt, got {len(weights)} weights for {len(prompts)} prompts")
    return combine(pipe, list(zip(weights, prompts, strict=False)), clip_skip=clip_skip, normalize=True)


@overload
def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor: ...
@overload
def lerp(a: Embeds, b: Embeds, t: float) -> Embeds: ...
def lerp(a: Embeds, b: Embeds, t: float) -> Embeds:
    """``(1 - t) a + t b``, of tensors or, key by key, of embedding dicts with the same keys."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            raise OpenSDError(f"lerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        return a + (b - a) * t
    pa, pb = embeds_parts(a), embeds_parts(b)
    if set(pa) != set(pb):
        raise OpenSDError(f"lerp needs embeddings with the same parts, got {sorted(pa)} and {sorted(pb)}")
    return {k: lerp(pa[k], pb[k], t) for k in pa}


def pad_embeds(embeds: Embeds, length: int, empty: torch.Tensor) -> Embeds:
    """``embeds`` with its context extended to ``length`` tokens by empty-prompt chunks (``pooled`` unchanged)."""
    parts = embeds_parts(embeds)
    return as_prompt_embeds({**parts, "context": pad_context(parts["context"], length, empty)})


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of ``a`` and ``b`` seen as flat vectors (lerp when nearly parallel)."""
    if a.shape != b.shape:
        raise OpenSDError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(eps)
    theta = float(torch.arccos(cos.clamp(-1, 1)))
    if abs(math.sin(theta)) < 1e-4:
        return lerp(a, b, t)
    s = math.sin(theta)
    out = (math.sin((1 - t) * theta) / s) * a64 + (math.sin(t * theta) / s) * b64
    return out.reshape(a.shape).to(a.dtype)


def seed_noise(pipe, seed: int, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """(1, C, h, w): the initial noise the pipeline draws for ``seed`` at this size."""
    cfg = pipe.cfg
    width = cfg.image_size if width is None else width
    height = cfg.image_size if height is None else height
    f = cfg.vae.downsample_factor
    return torch.randn((1, cfg.vae.embed_dim, height // f, width // f), generator=torch.Generator("cpu").manual_seed(seed))


MAX_FRAMES = 100  # each frame is a whole generation; 100 is a 4 s clip at 25 fps
SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1, as in the pipeline


def check_frames(frames: int) -> int:
    """``frames`` if it is an integer in ``1 .. MAX_FRAMES``, else an error naming the range."""
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise OpenSDError(f"frames must be an integer from 1 to {MAX_FRAMES}, got {frames!r}")
    return frames


def check_seed(seed: int, name: str = "seed") -> int:
    """``seed`` if it is an integer in ``0 .. 2**32 - 1``, else an error naming the range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise OpenSDError(f"{name} must be an integer from 0 to {SEED_LIMIT - 1}, got {seed!r}")
    return seed


def walk_end_seed(seed: int) -> int:
    """The end seed of a seed walk from ``seed`` (the next seed, wrapping at 2**32)."""
    return (check_seed(seed) + 1) % SEED_LIMIT


def _fractions(frames: int) -> list[float]:
    check_frames(frames)
    return [0.0] if frames == 1 else [i / (frames - 1) for i in range(frames)]


# ----------------------------------------------------------------------------- generation

def txt2img_embeds(
    pipe,
    prompt_embeds: Embeds,
    negative_embeds: Embeds | None = None,
    *,
    label: str = "",
    negative_prompt: str = "",
    **txt2img_args: Any,
) -> list[Image.Image]:
    """:meth:`txt2img` with ready embeddings instead of a prompt: ``prompt_embeds`` is the
    context (1 or B, L, D), or for SDXL families ``{"context": ..., "pooled": (1 or B, P)}``.

    ``label`` is the prompt written into the infotext; ``negative_embeds`` replaces the
    encoded ``negative_prompt`` when given.
    """
    return pipe.txt2img(
        label, negative_prompt, prompt_embeds=prompt_embeds, negative_embeds=negative_embeds, **txt2img_args
    )


def generate_expression(pipe, expr: str, *, clip_skip: int = 1, normalize: bool = False, **kw: Any) -> list[Image.Image]:
    """Images for a prompt expression such as ``'"a red circle" - "red" + "blue"'``."""
    embeds = combine(pipe, expr, clip_skip=clip_skip, normalize=normalize)
    return txt2img_embeds(pipe, embeds, label=expr, clip_skip=clip_skip, **kw)


def interpolate(
    pipe,
    prompt: str,
    to_prompt: str | None = None,
    *,
    seed: int = 0,
    to_seed: int | None = None,
    frames: int = 8,
    width: int | None = None,
    height: int | None = None,
    clip_skip: int = 1,
    **kw: Any,
) -> list[Image.Image]:
    """``frames`` images going from (``prompt``, ``seed``) to (``to_prompt``, ``to_seed``).

    Embeddings are lerped, initial noises slerped; a missing end stays fixed. With
    neither end given, ``to_seed`` is :func:`walk_end_seed` (a seed walk on ``prompt``).
    Either prompt may be an expression (:func:`parse_expression`). Frame i is at
    ``t = i / (frames - 1)``. ``frames`` is 1 .. :data:`MAX_FRAMES`; seeds are
    0 .. 2**32 - 1. Extra keywords (``steps``, ``callback`` ...) go to ``txt2img``.
    """
    ts = _fractions(frames)
    check_seed(seed)
    if to_prompt is None and to_seed is None:
        to_seed = walk_end_seed(seed)
    if to_seed is not None:
        check_seed(to_seed, "to_seed")
    if frames > 1 and (to_prompt is None or to_prompt == prompt) and (to_seed is None or to_seed == seed):
        raise OpenSDError(
            f"nothing to interpolate: the start and the end are both prompt {prompt!r} with seed {seed}; "
            "give a different end prompt (--to) or end seed (--to-seed)"
        )
    ea = combine(pipe, prompt, clip_skip=clip_skip)
    eb = ea if to_prompt is None else combine(pipe, to_prompt, clip_skip=clip_skip)
    la, lb = embeds_parts(ea)["context"].shape[1], embeds_parts(eb)["context"].shape[1]
    if la != lb:
        empty = encode_same_length(pipe, [""], clip_skip=clip_skip)
        ea, eb = pad_embeds(ea, max(la, lb), empty), pad_embeds(eb, max(la, lb), empty)
    na = seed_noise(pipe, seed, width, height)
    nb = na if to_seed is None else seed_noise(pipe, to_seed, width, height)
    out = []
    for t in ts:
        label = prompt if to_prompt is None else f"{prompt} -> {to_prompt} @ {t:.3f}"
        out += txt2img_embeds(
            pipe, lerp(ea, eb, t), label=label, seed=seed, latents=slerp(na, nb, t) if to_seed is not None else na,
            width=width, height=height, clip_skip=clip_skip, **kw,
        )
    return out


def interpolate_prompts(pipe, prompt_a: str, prompt_b: str, frames: int = 8, *, seed: int = 0, **kw: Any) -> list[Image.Image]:
    """``frames`` images from ``prompt_a`` to ``prompt_b`` (lerp of embeddings, one seed)."""
    return interpolate(pipe, prompt_a, prompt_b, seed=seed, frames=frames, **kw)


def interpolate_seeds(pipe, prompt: str, seed_a: int, seed_b: int, frames: int = 8, **kw: Any) -> list[Image.Image]:
    """``frames`` images of ``prompt`` from ``seed_a``'s initial noise to ``seed_b``'s (slerp)."""
    return interpolate(pipe, prompt, seed=seed_a, to_seed=seed_b, frames=frames, **kw)


__all__ = [
    "MAX_FRAMES",
    "PromptExpressionError",
    "Embeds",
    "Term",
    "blend",
    "check_frames",
    "check_seed",
    "combine",
    "as_prompt_embeds",
    "embeds_parts",
    "encode_same_length",
    "encode_terms",
    "generate_expression",
    "interpolate",
    "interpolate_prompts",
    "interpolate_seeds",
    "lerp",
    "pad_embeds",
    "parse_expression",
    "seed_noise",
    "slerp",
    "txt2img_embeds",
    "walk_end_seed",
]
