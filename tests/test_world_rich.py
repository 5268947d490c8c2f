"""The rich shapes world: three groups, counts beside other groups, sentence forms, synonyms,
digits; its holdout, captions, hard negatives, grounding, suites and training switch."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import opensd.shapes as S
from opensd.shapes.captions import Wording, draw_wording, find_wording, noun_phrase, write
from opensd.shapes.dataset import RICH_KINDS, ShapesDataset, as_world, sample_spec
from opensd.shapes.holdout import HeldOut
from opensd.shapes.negatives import RICH_NEGATIVE_KINDS, could_be_true, hard_negatives, negative_specs
from opensd.shapes.rich_prompts import HELD_OUT_KIND, RichPromptError, draw_rich_prompt
from opensd.shapes.scorer import category_of, judge
from opensd.shapes.suites import benchmark_suite, holdout_suite, validation_suite
from opensd.shapes.world import DEFAULT_HOLDOUT, Form, Holdout, ObjectSpec, PromptSpec, World

O, P = ObjectSpec, PromptSpec
NUMBER_OF = {**{w: n for n, w in S.NUMBERS.items()}, **{str(n): n for n in S.NUMBERS}}
RELATION_WORDS = (" above ", " below ", " left of ", " right of ", " under ", " over ", " beneath ")


@pytest.fixture(scope="module")
def rich() -> list[S.Sample]:
    return ShapesDataset(seed=3, image_size=32, world=World.RICH).take(1500)


def _held_out_words(text: str, holdout: Holdout) -> bool:
    return any(w in text.replace(",", " ").split() for w in holdout.synonyms)


# ----------------------------------------------------------------------------- the dataset


def test_rich_captions_are_true_of_their_scenes(rich) -> None:
    for s in rich:
        assert S.check_true(s.spec, s.scene) == [], (s.caption, s.scene)
        assert s.wording is not None and write(s.spec, s.wording) == s.caption
        words = s.caption.replace(",", " ").split()
        for color in S.PALETTE:  # a colour named is a colour shown
            if color in words:
                assert any(o.color == color for o in s.scene.objects), s.caption
        for synonym, size in S.SYNONYMS.items():  # "big" is large, "little" small
            if synonym in words:
                assert any(o.size == size for o in s.spec.objects), s.caption
        stated = [NUMBER_OF[w] for w in words if w in NUMBER_OF and w not in ("one", "1")]
        assert sorted(stated) == sorted(o.count for o in s.spec.objects if o.count > 1), s.caption
        if s.spec.relation is None:
            assert not any(p in f" {s.caption} " for p in RELATION_WORDS), s.caption
        assert s.scene.background == (s.spec.background or "white")
    assert {s.kind for s in rich} == set(RICH_KINDS)


def test_rich_scenes_hold_three_groups_and_counts_within_the_object_limit(rich) -> None:
    groups = Counter(len(s.spec.objects) for s in rich)
    assert set(groups) == {1, 2, 3}
    assert max(len(s.scene.objects) for s in rich) == S.MAX_COUNT
    assert any(len(s.spec.objects) == 3 and max(o.count for o in s.spec.objects) == 2 for s in rich)
    assert any(len(s.spec.objects) == 2 and max(o.count for o in s.spec.objects) == 3 for s in rich)
    for s in rich[:300]:  # objects separate at 32 px (grown by a pixel, no two masks touch)
        ms = S.masks(s.scene, 32)
        pads = [np.pad(m, 1) for m in ms]
        grown = [p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:] | m for p, m in zip(pads, ms, strict=True)]
        assert not any((grown[i] & grown[j]).any() for i in range(len(ms)) for j in range(i + 1, len(ms)))


def test_rich_captions_use_every_trained_form_and_word_and_nothing_held_out(rich) -> None:
    h = DEFAULT_HOLDOUT
    forms = Counter(s.wording.form_for(s.spec) for s in rich)
    assert set(forms) == {Form.AND, Form.LIST, Form.RELATION, Form.COPULA}, forms  # not the held-out inverted
    words = Counter(w for s in rich for w in s.caption.replace(",", " ").split())
    assert words["big"] > 20 and words["little"] == 0 and sum(words[d] for d in "234") > 50
    assert any(s.caption.startswith("the ") and " is " in s.caption for s in rich)
    assert any(", " in s.caption and " and " in s.caption and "background" not in s.caption for s in rich)
    for s in rich:
        assert not h.touches(s.spec) and not h.blocks_scene(s.scene), s.caption
        assert not s.wording.held_out_by(h, s.spec), s.caption
        assert not any((o.count, o.shape) in h.count_pairs for o in s.spec.objects if len(s.spec.objects) > 1)
    # ... while without the holdout every kind of it does appear
    free = ShapesDataset(seed=3, image_size=32, world=World.RICH, holdout=None).take(1500)
    assert any(s.wording.form_for(s.spec) is Form.INVERTED for s in free)
    assert any("little" in s.caption.split() for s in free)
    assert any(HeldOut.COUNT_PAIR in h.touched(s.spec) for s in free)
    assert any(h.blocks_scene(s.scene) for s in free)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), index=st.integers(0, 2**40))
def test_any_rich_sample_is_true_and_asserts_nothing_held_out(seed: int, index: int) -> None:
    s = ShapesDataset(seed=seed, image_size=32, world=World.RICH)[index]
    assert S.check_true(s.spec, s.scene) == []
    assert not DEFAULT_HOLDOUT.touches(s.spec) and not DEFAULT_HOLDOUT.blocks_scene(s.scene)
    assert not s.wording.held_out_by(DEFAULT_HOLDOUT, s.spec) and not _held_out_words(s.caption, DEFAULT_HOLDOUT)
    assert find_wording(s.spec, s.caption) is not None


def test_rich_dataset_is_deterministic_and_its_own_stream() -> None:
    a, b = ShapesDataset(seed=5, world=World.RICH), ShapesDataset(seed=5, world="rich")
    for i in (0, 7, 12345):
        assert a[i] == b[i] and a[i].image.tobytes() == b[i].image.tobytes()
    classic = ShapesDataset(seed=5)
    assert [a[i].caption for i in range(20)] != [classic[i].caption for i in range(20)]
    assert classic[0].wording is None


def test_world_and_kind_errors_name_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="unknown world 'flat'; allowed: classic, rich"):
        ShapesDataset(world="flat")
    with pytest.raises(ValueError, match="unknown kind 'triple'; allowed: single, count, pair, relation"):
        ShapesDataset(kinds={"triple": 1.0})  # the classic world has no triples
    with pytest.raises(ValueError, match="unknown kind 'triple'"):
        sample_spec("triple", random.Random(0))
    assert len(sample_spec("triple", random.Random(0), world=World.RICH).objects) == 3
    assert as_world("rich") is World.RICH


# ----------------------------------------------------------------------------- specs and holdout


def test_prompt_spec_rules_for_three_groups() -> None:
    spec = P((O("circle", "red"), O("square", "blue"), O("triangle", count=2)))
    assert category_of(spec) == "three_objects"
    assert category_of(P((O("circle", count=3), O("square")))) == "count_pair"
    with pytest.raises(ValueError, match="1 to 3 object groups"):
        P((O("circle", "red"), O("circle", "blue"), O("circle", "green"), O("square")))
    with pytest.raises(ValueError, match="at most 4 objects"):
        P((O("circle", count=2), O("square", count=2), O("triangle")))
    with pytest.raises(ValueError, match="must differ"):
        P((O("circle", "red"), O("square"), O("circle", "red", "small")))
    with pytest.raises(ValueError, match="relation needs"):
        P((O("circle"), O("square"), O("triangle")), "above")


def test_holdout_checks_its_new_kinds() -> None:
    with pytest.raises(ValueError, match="count in 2..3"):
        Holdout(count_pairs=((4, "circle"),))
    with pytest.raises(ValueError, match="count in 2..3"):
        Holdout(count_pairs=((1, "circle"),))
    with pytest.raises(ValueError, match="classic forms"):
        Holdout(forms=("and",))
    with pytest.raises(ValueError, match="unknown sentence form 'passive'"):
        Holdout(forms=("passive",))
    with pytest.raises(ValueError, match="unknown synonym 'large'; allowed: little, big"):
        Holdout(synonyms=("large",))
    h = Holdout(count_pairs=((3, "square"),), forms=("copula",))
    assert h.forms == (Form.COPULA,) and h.kinds() == (HeldOut.COUNT_PAIR, HeldOut.FORM)
    assert h.touched(P((O("square", count=3), O("circle")))) == {HeldOut.COUNT_PAIR}
    assert not h.touches(P((O("square", count=3),)))  # alone it is stated
    assert not h.touches(P((O("square", count=2), O("circle"))))
    assert DEFAULT_HOLDOUT.kinds() == tuple(HeldOut)


# ----------------------------------------------------------------------------- wording


def test_sentence_forms_synonyms_and_digits_word_one_spec() -> None:
    rel = P((O("circle", "red", "large"), O("square", "blue")), "above", "black")
    assert write(rel, Wording(Form.COPULA, background_phrase=3)) == \
        "the large red circle is above the blue square, black background"
    assert write(rel, Wording(Form.INVERTED, relation_phrase=1, large="big")) == \
        "over the blue square is a big red circle on a black background"
    assert write(rel, Wording(Form.RELATION, wrapper=3)) == "a photo of a large red circle above a blue square on a black background"
    three = P((O("circle", "red"), O("square", "blue"), O("triangle", "green", "small")))
    assert write(three, Wording(Form.LIST, small="little")) == "a red circle, a blue square and a little green triangle"
    assert write(three, Wording(Form.AND)) == "a red circle and a blue square and a small green triangle"
    pair = P((O("circle", "purple", count=3), O("square", "orange")))
    assert write(pair, Wording(wrapper=6, digits=True, agree=True)) == "there are 3 purple circles and an orange square"
    assert write(pair, Wording(wrapper=6)) == "there is three purple circles and an orange square"  # the classic grammar
    assert write(pair, Wording(Form.LIST)) == "three purple circles and an orange square"  # list needs three groups
    assert noun_phrase(O("triangle", "green", count=3), wording=Wording(digits=True)) == "3 green triangles"
    for w in (Wording(Form.COPULA), Wording(Form.INVERTED, 2, 4, 1, "little", "big", True, True, True)):
        assert find_wording(rel, write(rel, w)) is not None
        assert write(rel, find_wording(rel, write(rel, w))) == write(rel, w)
    assert find_wording(rel, "a dog above a cat") is None
    with pytest.raises(ValueError, match="the word for large must be one of large, big"):
        Wording(large="huge")
    with pytest.raises(ValueError, match="Wording.wrapper must be an integer 0..6"):
        Wording(wrapper=7)


def test_drawn_wordings_avoid_what_the_holdout_keeps_out() -> None:
    rel = P((O("circle", "red", "small"), O("square", "blue", "large")), "left of")
    h = Holdout(forms=("inverted", "copula"), synonyms=("little", "big"))
    for i in range(200):
        w = draw_wording(rel, random.Random(i), h)
        assert w.form_for(rel) is Form.RELATION and w.small == "small" and w.large == "large"
    seen = {draw_wording(rel, random.Random(i)).form_for(rel) for i in range(200)}
    assert seen == {Form.RELATION, Form.COPULA, Form.INVERTED}


# ----------------------------------------------------------------------------- scorer


def _scene_image(objects: list[tuple[str, str, str, float, float]], size: int = 64):
    return S.render(S.Scene(tuple(S.SceneObject(sh, c, z, x, y, S.SIZES[z]) for sh, c, z, x, y in objects),
                            "white", size))


def test_the_scorer_judges_three_objects_and_count_pairs_exactly() -> None:
    three = P((O("circle", "red"), O("square", "blue"), O("triangle", "green")))
    all_three = _scene_image([("circle", "red", "small", 0.2, 0.2), ("square", "blue", "small", 0.7, 0.2),
                              ("triangle", "green", "small", 0.45, 0.75)])
    two = _scene_image([("circle", "red", "small", 0.2, 0.2), ("square", "blue", "small", 0.7, 0.2)])
    assert judge(all_three, three).correct and judge(all_three, three).category == "three_objects"
    verdict = judge(two, three)  # the failure users saw: two of three drawn
    assert not verdict.correct and verdict.reason.startswith("missing object: expected a green triangle")
    counted = P((O("circle", "purple", count=3), O("square", "orange")))
    at = [(0.2, 0.2), (0.7, 0.2), (0.2, 0.7), (0.7, 0.7)]
    three_circles = _scene_image([("circle", "purple", "small", *at[0]), ("circle", "purple", "small", *at[1]),
                                  ("circle", "purple", "small", *at[2]), ("square", "orange", "small", *at[3])])
    two_circles = _scene_image([("circle", "purple", "small", *at[0]), ("circle", "purple", "small", *at[1]),
                                ("square", "orange", "small", *at[3])])
    four_circles = _scene_image([("circle", "purple", "small", p[0], p[1]) for p in at[:3]]
                                + [("circle", "purple", "small", 0.45, 0.45)])
    assert judge(three_circles, counted).correct
    assert judge(two_circles, counted).reason == "wrong count: expected exactly 3 purple circles, found 2"
    assert judge(four_circles, counted).reason.startswith("wrong count: expected exactly 3 purple circles, found 4")
    # a synonym's spec states the canonical size: "a big red circle" is a large one
    big = P((O("circle", "red", "large"),))
    assert judge(_scene_image([("circle", "red", "large", 0.5, 0.5)]), big).correct
    assert judge(_scene_image([("circle", "red", "small", 0.5, 0.5)]), big).reason.startswith("wrong size")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), size=st.sampled_from([32, 64, 128]))
def test_ground_truth_of_any_rich_spec_reads_right(seed: int, size: int) -> None:
    rng = random.Random(seed)
    spec = sample_spec(rng.choice(RICH_KINDS), rng, None, World.RICH)
    scene = S.realize(spec, rng, size)
    assert S.check_true(spec, scene) == []
    assert judge(S.render(scene), spec).correct, (spec, judge(S.render(scene), spec).reason)


# ----------------------------------------------------------------------------- hard negatives


def test_rich_hard_negatives_are_false_and_worded_like_the_caption(rich) -> None:
    seen: Counter = Counter()
    for n, s in enumerate(rich[:400]):
        for kind, specs in negative_specs(s.spec).items():
            for neg in specs:
                assert not could_be_true(neg, s.spec) and S.check_true(neg, s.scene) != [], (kind, neg, s.caption)
        like = find_wording(s.spec, s.caption)
        for h in hard_negatives(s.spec, random.Random(n), k=None, like=s.caption):
            seen[h.kind] += 1
            w = find_wording(h.spec, h.text)
            assert h.text != s.caption and w is not None, (s.caption, h.text)
            assert (w.digits, w.small, w.large) == (like.digits, like.small, like.large) or \
                h.kind in ("size", "count", "drop", "count_swap"), (s.caption, h.text)
            if s.wording.form_for(s.spec) is Form.COPULA:
                assert h.text.startswith("the "), (s.caption, h.text)
    assert set(RICH_NEGATIVE_KINDS) <= set(seen), seen
    spec = P((O("circle", "red"), O("square", "blue"), O("triangle", "green")))
    texts = {h.kind: h.text for h in hard_negatives(spec, random.Random(0), k=None,
                                                    like="a red circle, a blue square and a green triangle")}
    assert texts["color_swap"].count(",") == 1 and texts["drop"].count(",") == 0  # two groups: "A and B"


# ----------------------------------------------------------------------------- grounding


def test_grounding_finds_every_form_synonym_and_digit(rich) -> None:
    from opensd.shapes.grounding import grounding_targets
    from opensd.tokenizers.word import WordTokenizer

    tok = WordTokenizer.train([s.caption for s in rich] + ["little above is"], vocab_size=128, context_length=32)

    def words(text: str, positions) -> list[str]:
        framed = tok([text])[0]
        return [tok.decode([int(framed[p])]) for p in positions if p >= 0]

    rel = P((O("circle", "red", "large"), O("square", "blue")), "above")
    scene = S.realize(rel, random.Random(0), 32)
    text = write(rel, Wording(Form.INVERTED, large="big"))  # "above the blue square is a big red circle"
    t, m = grounding_targets(text, rel, scene, tok, (8, 8), max_groups=3)
    assert t.shape == (3, 3) and m.shape == (3, 8, 8) and (t[2] == -1).all()
    assert words(text, t[0]) == ["big", "red", "circle"] and words(text, t[1]) == ["blue", "square"]
    counted = P((O("triangle", "green", count=2), O("circle", "red", "small"), O("square")))
    scene = S.realize(counted, random.Random(1), 32)
    text = write(counted, Wording(Form.LIST, digits=True, small="little"))  # "2 green triangles, a little red ..."
    t, m = grounding_targets(text, counted, scene, tok, (8, 8), max_groups=3, numbers=True)
    assert t.shape == (3, 4)
    assert words(text, t[0]) == ["two", "green", "triangles"]  # the digit, spelled by the tokenizer, grounded
    assert words(text, t[1]) == ["little", "red", "circle"] and words(text, t[2]) == ["square"]
    union = np.logical_or.reduce(S.masks(scene, 32)[:2])  # the counted group: its two objects
    assert float(m[0].sum()) * 16 == pytest.approx(union.sum())
    for s in rich[:300]:
        t, _ = grounding_targets(s.caption, s.spec, s.scene, tok, (8, 8), max_groups=3, numbers=True)
        for g, group in enumerate(s.spec.objects):
            named = words(s.caption, t[g])
            assert named and named[-1] in (group.shape, group.shape + "s"), (s.caption, named)


# ----------------------------------------------------------------------------- suites


def test_rich_suites_keep_the_classic_prompts_first_and_add_the_new_categories() -> None:
    bench, classic = benchmark_suite(world=World.RICH), benchmark_suite()
    assert bench[:600] == classic and len(bench) == 900
    assert Counter(p.category for p in bench[600:]) == {"three_objects": 100, "count_pair": 100, "sentence_form": 100}
    val = validation_suite(world=World.RICH)
    assert val[:600] == validation_suite() and not {p.text for p in val} & {p.text for p in bench}
    held = holdout_suite(world=World.RICH)
    assert held[:400] == holdout_suite() and len(held) == 800
    for p in bench[600:] + val[600:]:  # in distribution: nothing held out, in spec or words
        assert not DEFAULT_HOLDOUT.touches(p.spec), p.text
        w = find_wording(p.spec, p.text)
        assert w is not None and not w.held_out_by(DEFAULT_HOLDOUT, p.spec), p.text
        if p.category == "sentence_form":
            assert not w.is_classic_for(p.spec), p.text
        else:
            assert category_of(p.spec) == p.category and w.is_classic_for(p.spec) or w.agree, p.text
    for p in held[400:]:  # each category states its kind of held-out combination and no other
        kind = HELD_OUT_KIND[p.category]
        w = find_wording(p.spec, p.text)
        assert w is not None, p.text
        touched = DEFAULT_HOLDOUT.touched(p.spec)
        if kind in (HeldOut.COLOR_SHAPE, HeldOut.COUNT_PAIR):
            assert touched == {kind} and not w.held_out_by(DEFAULT_HOLDOUT, p.spec), p.text
        else:
            assert not touched and w.held_out_by(DEFAULT_HOLDOUT, p.spec), p.text
        if kind is HeldOut.FORM:
            assert w.form_for(p.spec) is Form.INVERTED and "little" not in p.text.split()
        if kind is HeldOut.SYNONYM:
            assert "little" in p.text.split() and w.form_for(p.spec) in S.CLASSIC_FORMS


def test_rich_prompt_errors() -> None:
    with pytest.raises(RichPromptError, match="not a benchmark rich category"):
        draw_rich_prompt("synonym", random.Random(0), DEFAULT_HOLDOUT, held_out=False)
    with pytest.raises(RichPromptError, match="keeps no form out"):
        draw_rich_prompt("sentence_form", random.Random(0), Holdout(synonyms=("big",)), held_out=True)
    only = holdout_suite(Holdout(color_shapes=(("red", "circle"),)), per_category=3, world=World.RICH)
    assert {p.category for p in only} == {"colors", "counting", "color_attr", "position", "three_objects"}
    words = holdout_suite(Holdout(synonyms=("big",)), per_category=3, world=World.RICH)
    assert [p.category for p in words] == ["synonym"] * 3 and all("big" in p.text.split() for p in words)


# ----------------------------------------------------------------------------- training and export


def test_data_world_selects_the_rich_world_for_training(tmp_path: Path) -> None:
    from opensd.config import ConfigError, to_dict
    from opensd.shapes.source import ShapesSource
    from opensd.training.config import DataConfig, DataSource, ShapesWorld, stage_config_from_dict
    from opensd.training.data import cache_path
    from opensd.training.vae import VAEStageConfig

    assert [w.value for w in ShapesWorld] == [w.value for w in World]  # training names the world's worlds
    cfg = stage_config_from_dict(VAEStageConfig, {"data": {"world": "rich", "image_size": 32}})
    assert cfg.data.world is ShapesWorld.RICH
    with pytest.raises(ConfigError, match="'flat' is not allowed; choose one of 'classic', 'rich'"):
        stage_config_from_dict(VAEStageConfig, {"data": {"world": "flat"}})
    with pytest.raises(ConfigError, match="needs data.source = 'shapes'"):
        DataConfig(source=DataSource.FOLDER, path="x", world=ShapesWorld.RICH)
    source = ShapesSource(cfg.data)
    assert source.dataset.world is World.RICH and source[0].caption == ShapesDataset(0, 32, world="rich")[0].caption
    classic = DataConfig()
    before = {k: v for k, v in to_dict(classic).items() if k not in ("workers", "world")}
    key = json.dumps({"data": before, "n": 8, "text_dtype": "float16"}, sort_keys=True)
    import hashlib

    assert hashlib.sha256(key.encode()).hexdigest()[:12] in cache_path(tmp_path, "v" * 12, "t" * 12, classic, 8,
                                                                        "float16").name
    assert cache_path(tmp_path, "v" * 12, "t" * 12, cfg.data, 8, "float16") != \
        cache_path(tmp_path, "v" * 12, "t" * 12, DataConfig(image_size=32), 8, "float16")


def test_cli_writes_the_rich_world(tmp_path: Path) -> None:
    from opensd.cli.data import app
    from opensd.data.imagefolder import read_imagefolder

    r = CliRunner().invoke(app, ["shapes", "--n", "4", "--size", "32", "--out", str(tmp_path / "o"), "--world", "rich"])
    assert r.exit_code == 0 and "rich samples" in r.output, r.output
    rows = [json.loads(line) for line in (tmp_path / "o" / "metadata.jsonl").read_text().splitlines()]
    ds = ShapesDataset(0, 32, world=World.RICH)
    assert [row["text"] for row in rows] == [ds[i].caption for i in range(4)]
    assert rows[0]["wording"]["form"] in tuple(Form) and len(list(read_imagefolder(tmp_path / "o"))) == 4
    r = CliRunner().invoke(app, ["shapes", "--n", "1", "--out", str(tmp_path / "p"), "--world", "flat"])
    assert r.exit_code == 2 and "unknown world 'flat'" in r.output and "Traceback" not in r.output


def test_the_rich_source_prefills_grounds_and_negates_as_it_streams() -> None:
    from dataclasses import replace as with_

    import torch

    from opensd.shapes.source import ShapesSource
    from opensd.tokenizers.word import WordTokenizer
    from opensd.training.config import DataConfig, ShapesWorld
    from opensd.training.data import load_batch
    from opensd.training.sources import open_source

    cfg = DataConfig(image_size=16, pool_size=48, world=ShapesWorld.RICH)
    serial, parallel = ShapesSource(cfg), open_source(with_(cfg, workers=2))
    for i in (0, 17, 47):
        a, b = serial[i], parallel[i]
        assert torch.equal(a.image, b.image) and a.caption == b.caption and a.spec == b.spec
    batch = load_batch(serial, range(16))
    tok = WordTokenizer.train(serial.captions(200), vocab_size=96, context_length=32)
    tokens, masks = serial.grounding_targets(batch, tok, (2, 2))
    assert tokens.shape == (16, 3, 4) and masks.shape == (16, 3, 2, 2)
    assert all((tokens[k, len(sp.objects):] == -1).all() for k, sp in enumerate(batch.specs))
    negatives = serial.hard_negative_captions(batch, random.Random(0), 3)
    for caption, spec, scene, negs in zip(batch.captions, batch.specs, batch.scenes, negatives, strict=True):
        assert len(negs) == 3 and caption not in negs
        like = find_wording(spec, caption)  # each a negative spec in the caption's words, false for the scene
        candidates = {write(n, like): n for specs in negative_specs(spec).values() for n in specs}
        for text in negs:
            assert text in candidates and S.check_true(candidates[text], scene) != [], (caption, text)


def test_a_clip_stage_trains_on_the_rich_world_and_judges_its_validation_suite(tmp_path: Path) -> None:
    import torch

    from opensd.training.clip import CLIPStage, CLIPStageConfig
    from opensd.training.config import stage_config_from_dict
    from opensd.training.loop import read_log, run_stage

    torch.set_num_threads(1)
    t = {"out_dir": str(tmp_path / "clip"), "steps": 2, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False}
    cfg = {"model_preset": "tiny", "tokenizer_corpus": 300, "vocab_size": 96, "hard_negatives": 2,
           "eval_per_category": 1, "train": t, "data": {"image_size": 16, "world": "rich"}}
    stage = CLIPStage(stage_config_from_dict(CLIPStageConfig, cfg))
    result = run_stage(stage)
    log = read_log(result.run_dir / "log.jsonl")
    assert [r for r in log if r["kind"] == "train"][-1]["hard_negative_acc"] >= 0
    assert [r for r in log if r["kind"] == "eval"][-1]["count"] == 9  # one prompt of each rich validation category
    words = set(stage.tokenizer.known_words())
    assert {"big", "the", ","} <= words and "little" not in words  # the held-out synonym is no word it knows
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["data"]["world"] == "rich"
