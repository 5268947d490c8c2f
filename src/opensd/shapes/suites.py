"""The shapes-world benchmark: fixed, seeded GenEval-style prompt suites.

Three suites, each a tuple of :class:`BenchmarkPrompt` (text, spec, category), in two worlds
(``world``: :class:`~opensd.shapes.world.World`). The classic suites are described here;
``World.RICH`` gives the same prompts, unchanged and first, followed by the rich world's
categories (:mod:`opensd.shapes.rich_prompts`): the benchmark and validation suites gain
``three_objects``, ``count_pair`` and ``sentence_form``, the held-out suite a category for each
kind held out besides colour-shape pairs and relations (``three_objects`` with a held-out
pair, ``count_pair``, ``sentence_form``, ``synonym``).

* :func:`benchmark_suite` — the test suite, ``per_category`` prompts in each of
  GenEval's six categories (Ghosh et al. 2023), in-distribution: no prompt states a
  combination that ``DEFAULT_HOLDOUT`` keeps out of training;
* :func:`validation_suite` — the same recipe with another seed and no text in
  common with the benchmark, for checkpoint selection;
* :func:`holdout_suite` — only prompts that state a held-out combination (a
  held-out colour-shape pair or relation), in the four categories that can state
  one (colors, counting, color_attr, position), to measure compositional
  generalisation.

Prompts follow GenEval's shapes per category (single_object: one shape;
two_objects: two different shapes; counting: 2-4 of one shape; colors: one
coloured shape; position: two objects and a relation; color_attr: two different
shapes in two different colours). Beyond GenEval a prompt may state sizes and a
background (checked when stated), and counting / position prompts may state
colours, so every category has a few hundred distinct texts. The texts come from
the training caption grammar (:func:`opensd.shapes.captions.caption`). Score each prompt
with ``IMAGES_PER_PROMPT`` images (GenEval uses 4).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from PIL import Image

from opensd.errors import OpenSDError
from opensd.shapes.captions import caption
from opensd.shapes.scorer import ALL_CATEGORIES, CATEGORIES, category_of
from opensd.shapes.world import (
    BACKGROUNDS,
    DEFAULT_HOLDOUT,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZES,
    Holdout,
    ObjectSpec,
    PromptSpec,
    World,
    distinguishable,
    realize,
    render,
)


class PromptSuiteError(OpenSDError):
    """A suite cannot be built as asked (unknown category, too many prompts)."""


IMAGES_PER_PROMPT = 4
BENCHMARK_SEED = 2023
VALIDATION_SEED = 7
HOLDOUT_SEED = 11
HOLDOUT_CATEGORIES: tuple[str, ...] = ("colors", "counting", "color_attr", "position")
# Every category a suite's prompt may have, in report order: the scorer's (GenEval's six, then the
# rich world's three_objects and count_pair), then the rich suites' wording categories.
SUITE_CATEGORIES: tuple[str, ...] = (*ALL_CATEGORIES, "sentence_form", "synonym")


@dataclass(frozen=True)
class BenchmarkPrompt:
    """A prompt text, the spec it states, and its GenEval category."""

    text: str
    spec: PromptSpec
    category: str


def _opt(rng: random.Random, p: float, choices: tuple[str, ...]) -> str | None:
    return rng.choice(choices) if rng.random() < p else None


def _draw(category: str, rng: random.Random) -> PromptSpec:
    """One spec of ``category`` (holdout not applied)."""
    colors, sizes = tuple(PALETTE), tuple(SIZES)
    bg = _opt(rng, 0.2, tuple(BACKGROUNDS))
    if category == "single_object":
        return PromptSpec((ObjectSpec(rng.choice(SHAPES), None, _opt(rng, 0.3, sizes)),), None, bg)
    if category == "colors":
        return PromptSpec((ObjectSpec(rng.choice(SHAPES), rng.choice(colors), _opt(rng, 0.3, sizes)),), None, bg)
    if category == "counting":
        o = ObjectSpec(rng.choice(SHAPES), _opt(rng, 0.3, colors), _opt(rng, 0.2, sizes), rng.choice((2, 3, 4)))
        return PromptSpec((o,), None, bg)
    if category in ("two_objects", "color_attr"):
        s1, s2 = rng.sample(SHAPES, 2)
        c1, c2 = rng.sample(colors, 2) if category == "color_attr" else (None, None)
        a = ObjectSpec(s1, c1, _opt(rng, 0.2, sizes))
        b = ObjectSpec(s2, c2, _opt(rng, 0.2, sizes))
        return PromptSpec((a, b), None, bg)
    if category == "position":
        while True:
            c = tuple(rng.sample(colors, 2)) if rng.random() < 0.5 else (None, None)
            a = ObjectSpec(rng.choice(SHAPES), c[0], _opt(rng, 0.2, sizes))
            b = ObjectSpec(rng.choice(SHAPES), c[1], _opt(rng, 0.2, sizes))
            if distinguishable(a, b):
                return PromptSpec((a, b), rng.choice(RELATIONS), bg)
    raise PromptSuiteError(f"unknown category {category!r}; allowed: {', '.join(CATEGORIES)}")


def sample_category_spec(
    category: str, rng: random.Random, holdout: Holdout = DEFAULT_HOLDOUT, held_out: bool = False
) -> PromptSpec:
    """A random spec of ``category``: avoiding ``holdout`` or, with ``held_out``, touching it."""
    if held_out and category not in HOLDOUT_CATEGORIES:
        allowed = ", ".join(HOLDOUT_CATEGORIES)
        raise PromptSuiteError(f"{category} prompts state no colour or relation; held-out categories: {allowed}")
    if held_out and not (holdout.color_shapes or holdout.relations):
        raise PromptSuiteError("the holdout is empty: there are no held-out prompts")
    for _ in range(100_000):
        spec = _draw(category, rng)
        blocked = any(holdout.blocks_object(o.color, o.shape) for o in spec.objects)
        if held_out and category != "position" and not blocked:
            # draw a held-out pair directly: rejection alone would be slow
            if not holdout.color_shapes:
                continue
            color, shape = rng.choice(holdout.color_shapes)
            first = spec.objects[0]
            objs = (ObjectSpec(shape, color, first.size, first.count), *spec.objects[1:])
            if len(objs) == 2 and (objs[0].color == objs[1].color or objs[0].shape == objs[1].shape):
                continue  # two_objects / color_attr need two shapes in two colours
            if len(objs) == 2 and rng.random() < 0.5:
                objs = objs[::-1]
            spec = PromptSpec(objs, spec.relation, spec.background)
        if holdout.touches(spec) == held_out:
            assert category_of(spec) == category
            return spec
    raise PromptSuiteError(f"could not draw a {category} spec with held_out={held_out} for {holdout}")


def distinct_prompts(
    categories: tuple[str, ...],
    per_category: int,
    rng_key: Callable[[str], str],
    draw: Callable[[str, random.Random], PromptSpec],
    exclude: frozenset[str] = frozenset(),
    what: str = "",
) -> tuple[BenchmarkPrompt, ...]:
    """``per_category`` prompts of distinct text per category: specs from ``draw(category,
    rng)`` worded by the caption grammar, ``rng`` seeded with ``rng_key(category)``; texts
    in ``exclude`` are skipped. ``what`` ends the error when too few can be found."""

    def worded(category: str, rng: random.Random) -> tuple[PromptSpec, str]:
        spec = draw(category, rng)
        return spec, caption(spec, rng)

    return distinct_worded_prompts(categories, per_category, rng_key, worded, exclude, what)


def distinct_worded_prompts(
    categories: tuple[str, ...],
    per_category: int,
    rng_key: Callable[[str], str],
    draw: Callable[[str, random.Random], tuple[PromptSpec, str]],
    exclude: frozenset[str] = frozenset(),
    what: str = "",
) -> tuple[BenchmarkPrompt, ...]:
    """As :func:`distinct_prompts`, ``draw(category, rng)`` giving each prompt's spec and text."""
    if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1:
        raise PromptSuiteError(f"per_category must be an integer >= 1, got {per_category!r}")
    out: list[BenchmarkPrompt] = []
    for category in categories:
        rng = random.Random(rng_key(category))
        texts: set[str] = set()
        tries = 0
        while len(texts) < per_category:
            tries += 1
            if tries > 200 * per_category:
                raise PromptSuiteError(f"only {len(texts)} distinct {category} prompts{what} found; ask for fewer")
            spec, text = draw(category, rng)
            if text in texts or text in exclude:
                continue
            texts.add(text)
            out.append(BenchmarkPrompt(text, spec, category))
    return tuple(out)


def _suite(
    seed: int,
    per_category: int,
    categories: tuple[str, ...],
    holdout: Holdout,
    held_out: bool,
    exclude: frozenset[str] = frozenset(),
) -> tuple[BenchmarkPrompt, ...]:
    return distinct_prompts(categories, per_category, lambda c: f"opensd-prompts:{seed}:{c}",
                            lambda c, rng: sample_category_spec(c, rng, holdout, held_out), exclude)


def _rich_suite(
    seed: int,
    per_category: int,
    categories: Iterable[str],
    holdout: Holdout,
    held_out: bool,
    exclude: Iterable[BenchmarkPrompt] = (),
) -> tuple[BenchmarkPrompt, ...]:
    """The rich world's categories of a suite (:mod:`opensd.shapes.rich_prompts`), no text in ``exclude``'s."""
    from opensd.shapes.rich_prompts import draw_rich_prompt

    return distinct_worded_prompts(tuple(categories), per_category, lambda c: f"opensd-prompts:{seed}:{c}",
                                   lambda c, rng: draw_rich_prompt(c, rng, holdout, held_out),
                                   frozenset(p.text for p in exclude))


def _check_world(world: World) -> World:
    try:
        return World(world)
    except ValueError:
        raise PromptSuiteError(f"unknown world {world!r}; allowed: {', '.join(World)}") from None


@functools.lru_cache(maxsize=8)
def benchmark_suite(
    per_category: int = 100, seed: int = BENCHMARK_SEED, world: World = World.CLASSIC
) -> tuple[BenchmarkPrompt, ...]:
    """The fixed test suite: ``per_category`` distinct prompts per GenEval category, none held out;
    for ``World.RICH`` followed by as many of each of three_objects, count_pair and sentence_form."""
    classic = _suite(seed, per_category, CATEGORIES, DEFAULT_HOLDOUT, held_out=False)
    if _check_world(world) is World.CLASSIC:
        return classic
    from opensd.shapes.rich_prompts import BENCHMARK_RICH_CATEGORIES

    return classic + _rich_suite(seed, per_category, BENCHMARK_RICH_CATEGORIES, DEFAULT_HOLDOUT, False, classic)


@functools.lru_cache(maxsize=8)
def validation_suite(
    per_category: int = 100, seed: int = VALIDATION_SEED, world: World = World.CLASSIC
) -> tuple[BenchmarkPrompt, ...]:
    """The checkpoint-selection suite: like the benchmark (of the same world), another seed, no prompt
    text in common with it."""
    if seed == BENCHMARK_SEED:
        raise PromptSuiteError(f"the validation seed must differ from the benchmark seed {BENCHMARK_SEED}")
    exclude = frozenset(p.text for p in benchmark_suite())
    classic = _suite(seed, per_category, CATEGORIES, DEFAULT_HOLDOUT, held_out=False, exclude=exclude)
    if _check_world(world) is World.CLASSIC:
        return classic
    from opensd.shapes.rich_prompts import BENCHMARK_RICH_CATEGORIES

    taken = classic + benchmark_suite(world=World.RICH)
    return classic + _rich_suite(seed, per_category, BENCHMARK_RICH_CATEGORIES, DEFAULT_HOLDOUT, False, taken)


@functools.lru_cache(maxsize=8)
def holdout_suite(
    holdout: Holdout = DEFAULT_HOLDOUT, per_category: int = 100, seed: int = HOLDOUT_SEED,
    world: World = World.CLASSIC,
) -> tuple[BenchmarkPrompt, ...]:
    """Only prompts that state a combination ``holdout`` keeps out of training (see module doc);
    for ``World.RICH`` followed by the rich world's held-out categories, one for each kind
    ``holdout`` keeps something of besides colour-shape pairs and relations (``three_objects``
    with a held-out colour-shape pair when it keeps pairs)."""
    if _check_world(world) is World.CLASSIC:
        return _suite(seed, per_category, HOLDOUT_CATEGORIES, holdout, held_out=True)
    classic: tuple[BenchmarkPrompt, ...] = ()
    if holdout.color_shapes or holdout.relations:  # else no classic prompt states anything held out
        classic = _suite(seed, per_category, HOLDOUT_CATEGORIES, holdout, held_out=True)
    from opensd.shapes.rich_prompts import HELD_OUT_KIND, HOLDOUT_RICH_CATEGORIES

    kept = holdout.kinds()
    categories = [c for c in HOLDOUT_RICH_CATEGORIES if HELD_OUT_KIND[c] in kept]
    return classic + _rich_suite(seed, per_category, categories, holdout, True, classic)


def accuracy_by_category(records: Iterable[dict]) -> tuple[dict[str, float], dict[str, int]]:
    """Per suite category (SUITE_CATEGORIES order) of ``records`` (each with "category" and
    "correct"): the share correct and the count, for the categories present."""
    rows = list(records)
    accuracy, n = {}, {}
    for c in SUITE_CATEGORIES:
        mine = [r for r in rows if r["category"] == c]
        if mine:
            n[c] = len(mine)
            accuracy[c] = sum(bool(r["correct"]) for r in mine) / len(mine)
    return accuracy, n


def geneval_overall(accuracy: dict[str, float]) -> float | None:
    """The mean accuracy over GenEval's six categories (CATEGORIES) present, None if none is:
    a rich suite's overall next to what the classic suite's overall measures."""
    classic = [accuracy[c] for c in CATEGORIES if c in accuracy]
    return sum(classic) / len(classic) if classic else None


def ground_truth_images(
    prompts: tuple[BenchmarkPrompt, ...] | list[BenchmarkPrompt],
    size: int = 64,
    seed: int = 0,
    holdout: Holdout | None = DEFAULT_HOLDOUT,
) -> list[Image.Image]:
    """One rendered scene per prompt that makes it exactly true (the scorer's upper bound).

    Prompt ``i``'s scene is drawn with ``random.Random(f"{seed}:{i}")``; unstated
    colours avoid ``holdout``'s pairs (pass None for the holdout suite).
    """
    return [render(realize(p.spec, random.Random(f"{seed}:{i}"), size, holdout)) for i, p in enumerate(prompts)]


def score_prompts(images: Iterable[Image.Image], prompts: Iterable[BenchmarkPrompt]) -> dict:
    """:func:`~opensd.shapes.scorer.score_images` of each image against its prompt's spec, the
    accuracy per *prompt* category (SUITE_CATEGORIES: a rich suite's sentence_form prompts are
    positions, pairs, ... to the scorer) and ``overall`` their mean."""
    prompts = list(prompts)
    from opensd.shapes.scorer import score_images

    scored = score_images([(im, p.spec) for im, p in zip(images, prompts, strict=True)])
    items = [{**r, "category": p.category} for r, p in zip(scored["items"], prompts, strict=True)]
    accuracy, n = accuracy_by_category(items)
    return {"overall": sum(accuracy.values()) / len(accuracy), "accuracy": accuracy, "n": n, "items": items}


def validate_scorer(sizes: tuple[int, ...] = (32, 64, 128), world: World = World.RICH) -> list[str]:
    """The scorer's validation table, one line per setting (``python -m opensd.shapes.suites``).

    Ground-truth images of the benchmark (of ``world``) at each size, after a bicubic
    size -> size/2 -> size round trip, with Gaussian noise (sigma 4/255), both, and
    judged against shuffled specs (chance); plus the validation and holdout suites.
    """
    import numpy as np

    rng = np.random.default_rng(0)

    def round_trip(im: Image.Image) -> Image.Image:
        half = (im.size[0] // 2, im.size[1] // 2)
        return im.resize(half, Image.Resampling.BICUBIC).resize(im.size, Image.Resampling.BICUBIC)

    def noisy(im: Image.Image) -> Image.Image:
        arr = np.asarray(im, np.float32) + rng.normal(0, 4, (im.size[1], im.size[0], 3))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))

    lines = []

    def row(name: str, prompts, images) -> None:
        r = score_prompts(images, prompts)
        accs = "  ".join(f"{c} {a:.3f}" for c, a in r["accuracy"].items())
        lines.append(f"{name:30s} overall {r['overall']:.3f}  {accs}")

    bench = benchmark_suite(world=world)
    perm = list(range(len(bench)))
    random.Random(0).shuffle(perm)
    for size in sizes:
        imgs = ground_truth_images(bench, size)
        row(f"benchmark {size} px", bench, imgs)
        row(f"  bicubic {size}->{size // 2}->{size}", bench, [round_trip(i) for i in imgs])
        row("  noise sigma 4/255", bench, [noisy(i) for i in imgs])
        row("  round trip + noise", bench, [noisy(round_trip(i)) for i in imgs])
        row("  shuffled specs (chance)", bench, [imgs[j] for j in perm])
    val, held = validation_suite(world=world), holdout_suite(world=world)
    row("validation suite 64 px", val, ground_truth_images(val, 64, seed=1))
    row("holdout suite 64 px", held, ground_truth_images(held, 64, seed=2, holdout=None))
    return lines


if __name__ == "__main__":  # pragma: no cover
    import sys

    for line in validate_scorer(world=World(sys.argv[1]) if len(sys.argv) > 1 else World.RICH):
        print(line)
