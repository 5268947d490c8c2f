"""A concept to teach a shapes-world model, its prompt suite and its training data.

A concept is one colour-shape pair the default model never saw: one of
``DEFAULT_HOLDOUT``'s pairs (purple triangle, orange circle, cyan square), which no
image of its training showed. Its words are in the model's tokenizer and the scorer
judges them, so a fine-tune's effect on it can be measured exactly.

* :func:`concept_suite` — GenEval-style prompts that each state the concept, in the
  four categories that can state a colour (colors, counting, color_attr, position),
  and nothing else held out (no other held-out pair, no held-out relation), so the
  suite measures the concept alone;
* :func:`concept_training_samples` — at most a few dozen images of the concept from
  the world's renderer, captioned by its grammar, drawn with another seed and with no
  caption in common with the suite (the DreamBooth instance images of Ruiz et al.
  2023; the regularization images are the world's own, :class:`ShapesDataset`);
* :func:`write_concept_data` — those samples as an image-caption folder.

``concept:NAME`` names the suite on ``opensd eval --suite`` (:func:`parse_suite_name`).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from opensd.shapes.dataset import Sample
from opensd.shapes.suites import (
    HOLDOUT_CATEGORIES,
    BenchmarkPrompt,
    PromptSuiteError,
    distinct_prompts,
    sample_category_spec,
)
from opensd.shapes.world import DEFAULT_HOLDOUT, Holdout, PromptSpec, realize, render

CONCEPT_SEED = 31  # the suite's prompts
TRAIN_SEED = 37  # the training images
MAX_TRAINING_IMAGES = 64


@dataclass(frozen=True)
class Concept:
    """A colour-shape pair to teach: ``purple-triangle`` is the purple triangle."""

    color: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.color}-{self.shape}"

    @property
    def words(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def holdout(self) -> Holdout:
        """The concept alone as a holdout: what the suite's prompts must touch."""
        return Holdout(((self.color, self.shape),), ())

    @property
    def others(self) -> Holdout:
        """``DEFAULT_HOLDOUT`` without the concept: what its prompts and images must avoid."""
        pairs = tuple(p for p in DEFAULT_HOLDOUT.color_shapes if p != (self.color, self.shape))
        return Holdout(pairs, DEFAULT_HOLDOUT.relations)


CONCEPTS: dict[str, Concept] = {c.name: c for c in (Concept(*p) for p in DEFAULT_HOLDOUT.color_shapes)}
DEFAULT_CONCEPT = "purple-triangle"


def concept_by_name(name: str) -> Concept:
    """The concept called ``name`` (``purple-triangle``); one-line error naming the allowed ones."""
    concept = CONCEPTS.get(name)
    if concept is None:
        raise PromptSuiteError(f"unknown concept {name!r}; allowed: {', '.join(CONCEPTS)}")
    return concept


def parse_suite_name(text: str) -> tuple[str, str | None]:
    """``"benchmark"`` -> ``("benchmark", None)``; ``"concept:purple-triangle"`` -> ``("concept", "purple-triangle")``."""
    kind, sep, name = text.partition(":")
    if kind != "concept":
        if sep:
            raise PromptSuiteError(f"suite {text!r}: only concept suites take a name (concept:NAME)")
        return kind, None
    if not name:
        raise PromptSuiteError(f"suite {text!r} names no concept; use concept:NAME with NAME one of {', '.join(CONCEPTS)}")
    return kind, concept_by_name(name).name


def _draw(concept: Concept, category: str, rng: random.Random) -> PromptSpec:
    """A spec of ``category`` that states the concept and no other held-out combination."""
    for _ in range(10_000):
        spec = sample_category_spec(category, rng, concept.holdout, held_out=True)
        if not concept.others.touches(spec):
            return spec
    raise PromptSuiteError(f"could not draw a {category} prompt of {concept.words} alone")


def _prompts(
    concept: Concept, per_category: int, seed: int, exclude: frozenset[str] = frozenset()
) -> tuple[BenchmarkPrompt, ...]:
    return distinct_prompts(HOLDOUT_CATEGORIES, per_category, lambda c: f"opensd-concept:{concept.name}:{seed}:{c}",
                            lambda c, rng: _draw(concept, c, rng), exclude, f" of {concept.words}")


@functools.lru_cache(maxsize=8)
def concept_suite(name: str = DEFAULT_CONCEPT, per_category: int = 50, seed: int = CONCEPT_SEED) -> tuple[BenchmarkPrompt, ...]:
    """``per_category`` distinct prompts stating concept ``name`` in each of colors,
    counting, color_attr and position (see the module doc)."""
    return _prompts(concept_by_name(name), per_category, seed)


def concept_training_samples(
    name: str = DEFAULT_CONCEPT,
    n: int = MAX_TRAINING_IMAGES,
    image_size: int = 32,
    seed: int = TRAIN_SEED,
) -> list[Sample]:
    """``n`` images of the concept with true captions, none a caption of :func:`concept_suite`.

    The captions cycle over the suite's four categories (a quarter each); sample ``i``'s
    scene is drawn with ``random.Random(f"{seed}:{i}")``, unstated colours avoiding the
    other held-out pairs. ``kind`` is the category.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TRAINING_IMAGES:
        raise PromptSuiteError(f"a concept is taught from 1 to {MAX_TRAINING_IMAGES} images, got n={n!r}")
    concept = concept_by_name(name)
    exclude = frozenset(p.text for p in concept_suite(name))
    per_category = -(-n // len(HOLDOUT_CATEGORIES))
    by_category = _prompts(concept, per_category, seed, exclude)
    # interleave the categories: a prefix of the list keeps them balanced
    order = sorted(range(len(by_category)), key=lambda k: (k % per_category, k // per_category))
    prompts = [by_category[k] for k in order][:n]
    samples = []
    for i, p in enumerate(prompts):
        scene = realize(p.spec, random.Random(f"{seed}:{i}"), image_size, concept.others)
        samples.append(Sample(render(scene, image_size), p.text, scene, p.category, p.spec))
    return samples


def write_concept_data(
    out_dir: str | Path,
    name: str = DEFAULT_CONCEPT,
    n: int = MAX_TRAINING_IMAGES,
    image_size: int = 32,
    seed: int = TRAIN_SEED,
    overwrite: bool = False,
) -> int:
    """Write :func:`concept_training_samples` as an image-caption folder; returns the count."""
    from opensd.data.imagefolder import write_imagefolder

    return write_imagefolder(concept_training_samples(name, n, image_size, seed), out_dir, overwrite=overwrite)
