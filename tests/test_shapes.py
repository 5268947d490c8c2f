"""The shapes world: determinism, captions true of scenes, holdout, rendering, export, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import opensd.shapes as S
from opensd.cli.data import app
from opensd.data.imagefolder import ImageFolderError, read_imagefolder, write_imagefolder


@pytest.fixture(scope="module")
def samples() -> list[S.Sample]:
    return S.ShapesDataset(seed=3, image_size=64).take(400)


def test_world_spec_is_sane():
    assert len(S.PALETTE) >= 7 and set(S.SHAPES) == {"circle", "square", "triangle"}
    assert S.SIZES["small"] < S.SIZES["large"]
    # four large objects fit in a 2x2 grid with the gap: the layout fallback relies on it
    assert 4 * S.SIZES["large"] + S.MIN_GAP + 2 * S.BORDER <= 1
    for name, rgb in S.PALETTE.items():  # every colour is far from every background (chroma)
        assert max(rgb) - min(rgb) >= 120, name


def test_determinism_same_seed_index_same_bytes():
    a, b = S.ShapesDataset(seed=5), S.ShapesDataset(seed=5)
    for i in (0, 1, 17, 12345):
        x, y = a[i], b[i]
        assert x.caption == y.caption and x.scene == y.scene and x.spec == y.spec and x.kind == y.kind
        assert x.image.tobytes() == y.image.tobytes()
    assert a[7].image.tobytes() == a[7].image.tobytes()  # random access, any order
    c = S.ShapesDataset(seed=6)
    assert [c[i].caption for i in range(20)] != [a[i].caption for i in range(20)]


def test_captions_true_of_scenes(samples):
    kinds = set()
    for s in samples:
        assert S.check_true(s.spec, s.scene) == [], (s.caption, s.scene)
        kinds.add(s.kind)
        # structural, word-level checks against the scene graph
        words = s.caption.split()
        for o in s.scene.objects:
            assert o.shape in s.caption or S.PLURALS[o.shape] in s.caption
        for color in S.PALETTE:
            if color in words:
                assert any(o.color == color for o in s.scene.objects), s.caption
        if s.spec.relation is None:
            relation_words = (" above ", " below ", " left of ", " right of ", " under ", " over ")
            assert not any(p in s.caption for p in relation_words)
        bg = s.spec.background
        assert s.scene.background == (bg or "white")
        if bg is None:
            assert "background" not in s.caption
    assert kinds == set(S.KINDS)


def test_count_captions_are_exact(samples):
    numbers = {w: n for n, w in S.NUMBERS.items()}
    seen = 0
    for s in samples:
        if s.kind != "count":
            continue
        first = s.caption.replace("there are ", "").replace("there is ", "").split()
        count = next((numbers[w] for w in first if w in numbers), 1)
        assert len(s.scene.objects) == count == s.spec.objects[0].count, s.caption
        shapes = {o.shape for o in s.scene.objects}
        assert shapes == {s.spec.objects[0].shape}
        seen += 1
    assert seen > 50


def test_relations_hold_with_margin(samples):
    seen = 0
    for s in samples:
        if s.spec.relation is None:
            continue
        a, b = s.scene.objects
        assert S.relations_between(a.box(), b.box()) == {s.spec.relation}
        # boxes separated along the relation's axis by at least MIN_GAP
        horizontal = s.spec.relation in ("left of", "right of")
        gap = abs(a.cx - b.cx) if horizontal else abs(a.cy - b.cy)
        assert gap - a.r - b.r >= S.MIN_GAP - 1e-6
        seen += 1
    assert seen > 50


def test_relations_between_geneval_rule():
    box = lambda cx, cy, r=0.1: (cx - r, cy - r, cx + r, cy + r)  # noqa: E731
    assert S.relations_between(box(0.2, 0.5), box(0.8, 0.5)) == {"left of"}
    assert S.relations_between(box(0.8, 0.5), box(0.2, 0.5)) == {"right of"}
    assert S.relations_between(box(0.5, 0.2), box(0.5, 0.8)) == {"above"}
    assert S.relations_between(box(0.5, 0.8), box(0.5, 0.2)) == {"below"}
    assert S.relations_between(box(0.2, 0.2), box(0.8, 0.8)) == {"left of", "above"}  # diagonal: both
    assert S.relations_between(box(0.5, 0.5), box(0.52, 0.5)) == set()  # within the margin


def test_holdout_never_in_training(samples):
    h = S.DEFAULT_HOLDOUT
    more = S.ShapesDataset(seed=11, image_size=32, kinds={"relation": 1, "single": 1, "count": 1}).take(600)
    for s in more + samples:
        assert not h.blocks_scene(s.scene), s.caption
        assert not h.touches(s.spec), s.caption
        for color, shape in h.color_shapes:
            assert f"{color} {shape}" not in s.caption
    # ... while without the holdout they do appear
    free = S.ShapesDataset(seed=11, image_size=32, holdout=None).take(600)
    assert any(h.blocks_scene(s.scene) for s in free)
    assert any(s.spec.relation and h.touches(s.spec) for s in free)


def test_holdout_blocks_converse_wording():
    h = S.Holdout(relations=(("triangle", "left of", "circle"),))
    assert h.blocks_relation("triangle", "left of", "circle")
    assert h.blocks_relation("circle", "right of", "triangle")
    assert not h.blocks_relation("circle", "left of", "triangle")
    with pytest.raises(ValueError, match="unknown color"):
        S.Holdout(color_shapes=(("pink", "circle"),))


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_sizes_and_masks(size):
    scene = S.Scene(
        (
            S.SceneObject("circle", "red", "large", 0.3, 0.3, S.SIZES["large"]),
            S.SceneObject("square", "blue", "small", 0.75, 0.75, S.SIZES["small"]),
            S.SceneObject("triangle", "yellow", "small", 0.25, 0.8, S.SIZES["small"]),
        ),
        "black",
        size,
    )
    img = S.render(scene)
    assert img.size == (size, size) and img.mode == "RGB"
    arr = np.asarray(img)
    assert tuple(arr[0, 0]) == (0, 0, 0)
    assert tuple(arr[int(0.3 * size), int(0.3 * size)]) == S.PALETTE["red"]
    ms = S.masks(scene, size)
    assert len(ms) == 3 and all(m.dtype == bool and m.shape == (size, size) for m in ms)
    assert not (ms[0] & ms[1]).any()
    # mask areas match the analytic areas within a pixel ring
    side = (2 * S.SIZES["large"] * size, 2 * S.SIZES["small"] * size)
    for m, expect, perim in ((ms[0], np.pi * side[0] ** 2 / 4, np.pi * side[0]),
                             (ms[1], side[1] ** 2, 4 * side[1]),
                             (ms[2], side[1] ** 2 / 2, 3.3 * side[1])):
        assert abs(m.sum() - expect) <= 0.5 * perim
    # the same scene at another resolution is the same picture
    small = np.asarray(S.render(scene, 32).resize((16, 16), Image.BOX), np.float32)
    big = np.asarray(S.render(scene, 128).resize((16, 16), Image.BOX), np.float32)
    assert np.abs(small - big).mean() < 3


def test_objects_separate_with_gap(samples):
    for s in samples[:100]:
        ms = S.masks(s.scene, 32)
        pads = [np.pad(m, 1) for m in ms]  # grow each mask by one pixel (4-neighbours)
        grown = [p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:] | m for p, m in zip(pads, ms, strict=True)]
        for i in range(len(ms)):
            for j in range(i + 1, len(ms)):
                assert not (grown[i] & grown[j]).any()


def test_realize_makes_any_spec_true():
    rng = random.Random(0)
    for shape in S.SHAPES:
        for n in range(1, 5):
            spec = S.PromptSpec((S.ObjectSpec(shape, None, "large", n),))
            for _ in range(10):
                assert S.check_true(spec, S.realize(spec, rng)) == []


def test_bad_input_errors():
    with pytest.raises(ValueError, match="allowed: circle"):
        S.ObjectSpec("hexagon")
    with pytest.raises(ValueError, match="count"):
        S.ObjectSpec("circle", count=5)
    with pytest.raises(ValueError, match="relation needs"):
        S.PromptSpec((S.ObjectSpec("circle", count=2), S.ObjectSpec("square")), "above")
    with pytest.raises(ValueError, match="must differ"):
        S.PromptSpec((S.ObjectSpec("circle"), S.ObjectSpec("circle")))
    with pytest.raises(ValueError, match="not supported"):
        S.ShapesDataset(image_size=8)
    with pytest.raises(ValueError, match="kind"):
        S.ShapesDataset(kinds={"pairs": 1.0})
    with pytest.raises(IndexError):
        S.ShapesDataset()[-1]


def test_speed_about_a_millisecond():
    import time

    ds = S.ShapesDataset(seed=1, image_size=64)
    t = time.perf_counter()
    ds.take(200)
    assert (time.perf_counter() - t) / 200 < 0.005  # ~1 ms alone; leave room for a busy machine


def test_imagefolder_round_trip(tmp_path, samples):
    n = write_imagefolder(samples[:6], tmp_path / "ds")
    assert n == 6
    rows = [json.loads(line) for line in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [s.caption for s in samples[:6]]
    assert rows[0]["scene"]["objects"][0]["shape"] == samples[0].scene.objects[0].shape
    back = list(read_imagefolder(tmp_path / "ds"))
    assert [c for _, c in back] == [s.caption for s in samples[:6]]
    for (img, _), s in zip(back, samples[:6], strict=True):
        assert img.tobytes() == s.image.tobytes()  # PNG is lossless
    with pytest.raises(ImageFolderError, match="already exists"):
        write_imagefolder(samples[:1], tmp_path / "ds")


def test_imagefolder_reads_txt_and_caption_key(tmp_path):
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "x.txt").write_text("a red square\n")
    assert [c for _, c in read_imagefolder(tmp_path / "a")] == ["a red square"]
    (tmp_path / "b").mkdir()
    img.save(tmp_path / "b" / "y.jpg")
    (tmp_path / "b" / "metadata.jsonl").write_text('{"file_name": "y.jpg", "caption": "red"}\n')
    assert [c for _, c in read_imagefolder(tmp_path / "b")] == ["red"]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist"):
        read_imagefolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="no images"):
        read_imagefolder(tmp_path / "empty")
    d = tmp_path / "bad"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "z.png")
    (d / "metadata.jsonl").write_text('{"file_name": "z.png", "text": "ok"}\n{"file_name": "z.png", "text": \n')
    with pytest.raises(ImageFolderError, match="line 2"):
        read_imagefolder(d)
    (d / "metadata.jsonl").write_text('{"file_name": "q.png", "text": "ok"}\n')
    with pytest.raises(ImageFolderError, match="does not exist"):
        read_imagefolder(d)
    (d / "metadata.jsonl").unlink()
    with pytest.raises(ImageFolderError, match="no caption"):
        read_imagefolder(d)
    with pytest.raises(ImageFolderError, match="caption must be a string"):
        write_imagefolder([(Image.new("RGB", (4, 4)), 3)], tmp_path / "w")


def test_cli_shapes(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(app, ["shapes", "--n", "5", "--size", "32", "--out", str(out), "--seed", "2", "--no-holdout"])
    assert r.exit_code == 0, r.output
    items = list(read_imagefolder(out))
    assert len(items) == 5 and items[0][0].size == (32, 32)
    ds = S.ShapesDataset(seed=2, image_size=32, holdout=None)
    assert [c for _, c in items] == [ds[i].caption for i in range(5)]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--n", "0"], "at least 1"),
        (["--n", "2", "--size", "33"], "not supported"),
        (["--n", "2", "--size", "8"], "not supported"),
    ],
)
def test_cli_bad_input(tmp_path, args, needle):
    r = CliRunner().invoke(app, ["shapes", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert needle in r.output
    assert "Traceback" not in r.output


def test_cli_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = CliRunner().invoke(app, ["shapes", "--n", "2", "--out", str(blocker / "sub")])
    assert r.exit_code == 2
    assert "cannot create" in r.output and "Traceback" not in r.output


def _digest(items) -> str:
    import hashlib

    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def test_the_classic_world_is_unchanged():
    """The default model was trained and scored on these: samples, renders, suites, hard negatives and
    grounding targets of the classic world stay byte for byte what they were (digests of 2026-12-03)."""
    from opensd.shapes.grounding import grounding_targets
    from opensd.shapes.negatives import hard_negative_captions
    from opensd.shapes.suites import benchmark_suite, holdout_suite, validation_suite
    from opensd.tokenizers.word import WordTokenizer

    first = S.ShapesDataset(seed=0, image_size=32).take(300)
    assert _digest((s.caption, s.kind, s.scene, s.spec) for s in first) == "2dd3a815006d6314"
    assert _digest(s.image.tobytes() for s in first[:60]) == "70c57c9cc9b1aa22"
    free = S.ShapesDataset(seed=3, image_size=64, holdout=None).take(200)
    assert _digest((s.caption, s.kind, s.scene, s.spec) for s in free) == "5c20a40a74776bc0"
    assert _digest((p.text, p.spec, p.category) for p in benchmark_suite()) == "d3c6c4e1a671d43e"
    assert _digest((p.text, p.spec, p.category) for p in validation_suite()) == "156cf8a915477b53"
    assert _digest((p.text, p.spec, p.category) for p in holdout_suite()) == "d199103facf8b693"
    rng = random.Random(0)
    negatives = (hard_negative_captions(s.spec, rng, 3, like=s.caption) for s in first[:120])
    assert _digest(negatives) == "403ddafe328c2c21"
    tok = WordTokenizer.load(Path(__file__).resolve().parents[1] / "models" / "opensd-shapes" / "tokenizer")
    targets = (grounding_targets(s.caption, s.spec, s.scene, tok, (4, 4)) for s in first[:100])
    assert _digest((t.tolist(), m.tolist()) for t, m in targets) == "dc0d917953387d27"
