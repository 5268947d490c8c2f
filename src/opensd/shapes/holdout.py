"""What training never asserts: the shapes world's held-out combinations (re-exported by
:mod:`opensd.shapes.world`).

A model that draws a combination it has never been shown has generalised rather than
remembered. :class:`Holdout` names five kinds (:class:`HeldOut`); what a kind keeps out of
training differs:

* a colour-shape pair: no training *image* shows one (unstated colours avoid it too);
* a relation between two shapes, a count of a shape beside another group, a sentence form
  and a size synonym: no training *caption* states one; images may still show the
  arrangement, or a count of that shape with other objects, when the caption does not say so.

The classic world writes neither the rich sentence forms nor synonyms nor a count beside
another group, so :data:`DEFAULT_HOLDOUT` holds the rich world's kinds too and the classic
world is drawn exactly as before.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from opensd.shapes.world import (
    CLASSIC_FORMS,
    CONVERSE,
    MAX_COUNT,
    PALETTE,
    RELATIONS,
    SHAPES,
    SYNONYMS,
    Form,
    PromptSpec,
    Scene,
    ShapesError,
    check_name,
)


class HeldOut(enum.StrEnum):
    """The kinds of combination a :class:`Holdout` keeps out."""

    COLOR_SHAPE = "color_shape"
    RELATION = "relation"
    COUNT_PAIR = "count_pair"
    FORM = "form"
    SYNONYM = "synonym"


def _forms(values: tuple) -> tuple[Form, ...]:
    out = []
    for v in values:
        try:
            form = Form(v)
        except ValueError:
            raise ShapesError(f"unknown sentence form {v!r}; allowed: {', '.join(Form)}") from None
        if form in CLASSIC_FORMS:
            classic = ", ".join(CLASSIC_FORMS)
            raise ShapesError(f"the classic forms ({classic}) cannot be held out: every caption needs one of them")
        out.append(form)
    return tuple(out)


@dataclass(frozen=True)
class Holdout:
    """Combinations kept out of training, to test compositional generalisation.

    ``color_shapes``: ``(color, shape)`` pairs that no training *image* shows.
    ``relations``: ``(shape_a, relation, shape_b)`` triples that no training
    *caption* asserts, in either wording ("triangle left of circle" also blocks
    "circle right of triangle"); images may still show the arrangement unstated.
    ``count_pairs``: ``(count, shape)``: no training caption states ``count`` objects of
    ``shape`` beside another group ("three squares and a circle"); alone ("three squares")
    they are stated.
    ``forms``: sentence forms (:class:`~opensd.shapes.world.Form`, not the classic ones) no
    training caption is written in. ``synonyms``: size words (:data:`~opensd.shapes.world.SYNONYMS`,
    "big", "little") no training caption uses.
    """

    color_shapes: tuple[tuple[str, str], ...] = ()
    relations: tuple[tuple[str, str, str], ...] = ()
    count_pairs: tuple[tuple[int, str], ...] = ()
    forms: tuple[Form, ...] = ()
    synonyms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "color_shapes", tuple(tuple(p) for p in self.color_shapes))
        object.__setattr__(self, "relations", tuple(tuple(t) for t in self.relations))
        object.__setattr__(self, "count_pairs", tuple(tuple(p) for p in self.count_pairs))
        object.__setattr__(self, "forms", _forms(tuple(self.forms)))
        object.__setattr__(self, "synonyms", tuple(self.synonyms))
        for pair in self.color_shapes:
            if len(pair) != 2:
                raise ShapesError(f"a held-out colour-shape pair is (color, shape), got {pair!r}")
            check_name("color", pair[0], PALETTE, optional=False)
            check_name("shape", pair[1], SHAPES, optional=False)
        for triple in self.relations:
            if len(triple) != 3:
                raise ShapesError(f"a held-out relation is (shape_a, relation, shape_b), got {triple!r}")
            check_name("shape", triple[0], SHAPES, optional=False)
            check_name("relation", triple[1], RELATIONS, optional=False)
            check_name("shape", triple[2], SHAPES, optional=False)
        for cp in self.count_pairs:
            if len(cp) != 2 or isinstance(cp[0], bool) or not isinstance(cp[0], int) or not 2 <= cp[0] < MAX_COUNT:
                raise ShapesError(f"a held-out count beside another group is (count, shape) with count in "
                                  f"2..{MAX_COUNT - 1}, got {cp!r}")
            check_name("shape", cp[1], SHAPES, optional=False)
        for word in self.synonyms:
            check_name("synonym", word, SYNONYMS, optional=False)
        for shape in SHAPES:
            if all((c, shape) in self.color_shapes for c in PALETTE):
                raise ShapesError(f"holdout blocks every colour of {shape}; leave at least one")

    def blocks_object(self, color: str | None, shape: str) -> bool:
        return (color, shape) in self.color_shapes

    def blocks_relation(self, shape_a: str, relation: str, shape_b: str) -> bool:
        converse = (shape_b, CONVERSE[relation], shape_a)
        return (shape_a, relation, shape_b) in self.relations or converse in self.relations

    def blocks_count_pair(self, spec: PromptSpec) -> bool:
        """Whether ``spec`` states a held-out count of a shape beside another group."""
        return len(spec.objects) >= 2 and any((o.count, o.shape) in self.count_pairs for o in spec.objects)

    def blocks_form(self, form: Form) -> bool:
        return form in self.forms

    def blocks_word(self, word: str) -> bool:
        return word in self.synonyms

    def touched(self, spec: PromptSpec) -> frozenset[HeldOut]:
        """The kinds of held-out combination ``spec`` asserts (colour-shape pair, relation, count pair)."""
        kinds = set()
        if any(self.blocks_object(o.color, o.shape) for o in spec.objects):
            kinds.add(HeldOut.COLOR_SHAPE)
        if spec.relation is not None and self.blocks_relation(spec.objects[0].shape, spec.relation,
                                                              spec.objects[1].shape):
            kinds.add(HeldOut.RELATION)
        if self.blocks_count_pair(spec):
            kinds.add(HeldOut.COUNT_PAIR)
        return frozenset(kinds)

    def touches(self, spec: PromptSpec) -> bool:
        """Whether ``spec`` asserts a held-out colour-shape pair, relation or count beside another group."""
        return bool(self.touched(spec))

    def blocks_scene(self, scene: Scene) -> bool:
        return any(self.blocks_object(o.color, o.shape) for o in scene.objects)

    def allowed_colors(self, shape: str) -> list[str]:
        return [c for c in PALETTE if not self.blocks_object(c, shape)]

    def kinds(self) -> tuple[HeldOut, ...]:
        """The kinds this holdout keeps something of, in :class:`HeldOut` order."""
        fields = {HeldOut.COLOR_SHAPE: self.color_shapes, HeldOut.RELATION: self.relations,
                  HeldOut.COUNT_PAIR: self.count_pairs, HeldOut.FORM: self.forms, HeldOut.SYNONYM: self.synonyms}
        return tuple(k for k in HeldOut if fields[k])


DEFAULT_HOLDOUT = Holdout(
    color_shapes=(("purple", "triangle"), ("orange", "circle"), ("cyan", "square")),
    relations=(("triangle", "left of", "circle"), ("square", "above", "triangle")),
    count_pairs=((3, "square"), (2, "triangle")),
    forms=(Form.INVERTED,),
    synonyms=("little",),
)
NO_HOLDOUT = Holdout()
