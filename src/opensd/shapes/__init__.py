"""The shapes world: coloured circles, squares and triangles whose every caption is true,
and everything that knows it, in one package.

- :mod:`~opensd.shapes.world`: the vocabulary, the choice of world (classic or rich), scenes,
  rendering, masks, what a caption asserts (:class:`~opensd.shapes.world.PromptSpec`), the
  holdout (:mod:`~opensd.shapes.holdout`), :func:`~opensd.shapes.world.realize`
  (:mod:`~opensd.shapes.placement`);
- :mod:`~opensd.shapes.captions`: the caption grammar, its sentence forms and wordings;
- :mod:`~opensd.shapes.dataset`: :class:`~opensd.shapes.dataset.ShapesDataset`, seeded and endless;
- :mod:`~opensd.shapes.negatives`: hard-negative captions (false, nearly the same words);
- :mod:`~opensd.shapes.grounding`: each caption word's object mask (TokenCompose's targets);
- :mod:`~opensd.shapes.scorer` (with :mod:`~opensd.shapes.shape_fit`,
  :mod:`~opensd.shapes.components`, :mod:`~opensd.shapes.stress_scenes`): the exact judge;
- :mod:`~opensd.shapes.suites` (with :mod:`~opensd.shapes.rich_prompts`),
  :mod:`~opensd.shapes.concept`: the prompt suites;
- :mod:`~opensd.shapes.run`, :mod:`~opensd.shapes.report`, :mod:`~opensd.shapes.ceiling`:
  ``opensd eval``;
- :mod:`~opensd.shapes.features`, :mod:`~opensd.shapes.distribution`: the in-house feature
  net and the distribution report in its feature space;
- :mod:`~opensd.shapes.source`, :mod:`~opensd.shapes.stage_eval`: the world as a training
  data source, and its judges of each training stage.

The generic pieces live where their kind does: the training loop and stages in
:mod:`opensd.training` (which never import this package; :mod:`opensd.training.sources`
picks it when ``data.source = "shapes"``), Fréchet distance and precision/recall in
:mod:`opensd.eval.distribution`, retrieval metrics in :mod:`opensd.eval.retrieval`.

The package itself offers the world's names (those of ``world`` with ``holdout`` and
``placement``, ``captions`` and ``dataset``), so ``import opensd.shapes as S; S.render(S.ShapesDataset(0)[0].scene)`` reads
as the world it is. Everything else is imported from its module.
"""

from opensd.shapes.captions import RELATION_PHRASES, Wording, caption, draw_wording, find_wording, noun_phrase, write
from opensd.shapes.dataset import (
    DEFAULT_KIND_WEIGHTS,
    KINDS,
    RICH_KIND_WEIGHTS,
    RICH_KINDS,
    Sample,
    ShapesDataset,
    sample_spec,
)
from opensd.shapes.world import (
    BACKGROUNDS,
    BORDER,
    CLASSIC_FORMS,
    CONVERSE,
    DEFAULT_BACKGROUND,
    DEFAULT_HOLDOUT,
    MAX_COUNT,
    MAX_GROUPS,
    MIN_GAP,
    NO_HOLDOUT,
    NUMBERS,
    PALETTE,
    PLURALS,
    RELATION_MARGIN,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    SYNONYMS,
    Form,
    Holdout,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    ShapesError,
    World,
    check_image_size,
    check_true,
    distinguishable,
    masks,
    realize,
    relations_between,
    render,
)

__all__ = [
    "BACKGROUNDS", "BORDER", "CLASSIC_FORMS", "CONVERSE", "DEFAULT_BACKGROUND", "DEFAULT_HOLDOUT",
    "DEFAULT_KIND_WEIGHTS", "KINDS", "MAX_COUNT", "MAX_GROUPS", "MIN_GAP", "NO_HOLDOUT", "NUMBERS", "PALETTE",
    "PLURALS", "RELATION_MARGIN", "RELATION_PHRASES", "RELATIONS", "RICH_KINDS", "RICH_KIND_WEIGHTS", "SHAPES",
    "SIZES", "SIZE_WORDS", "SYNONYMS", "Form", "Holdout", "ObjectSpec", "PromptSpec", "Sample", "Scene",
    "SceneObject", "ShapesDataset", "ShapesError", "World", "Wording", "caption", "check_image_size", "check_true",
    "distinguishable", "draw_wording", "find_wording", "masks", "noun_phrase", "realize", "relations_between",
    "render", "sample_spec", "write",
]
