"""Layout control maps and the judge of a layout ControlNet; the default model's one moves objects into place.

The map of a scene is its objects' mask boxes in their colours on black, and a box read
off a mask draws back to exactly that mask's bounding box; the judge gives the scenes' own
renders 1.0 and objects drawn elsewhere 0; the committed ControlNet puts the objects of a
handful of prompts in their regions, which the model alone does not.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from opensd.pipelines.layout import BACKGROUND, LayoutBox, LayoutError, box_pixels, draw_layout, parse_box
from opensd.shapes.control_eval import LAYOUT_MODE, LAYOUT_WEIGHT, LayoutJudge, ceiling, layout_cases, layout_summary, objects_in_place, score_layout
from opensd.shapes.layout import COLORS, scene_boxes, scene_layout
from opensd.shapes.suites import benchmark_suite
from opensd.shapes.world import PALETTE, Scene, SceneObject, masks, render

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "opensd-shapes"
CONTROLNET = ROOT / "models" / "controlnets" / "controlnet-layout.safetensors"


def _scene() -> Scene:
    return Scene((SceneObject("circle", "red", "large", 0.3, 0.3, 0.21), SceneObject("triangle", "blue", "small", 0.75, 0.75, 0.13)),
                 "white", 32)


# ----------------------------------------------------------------------------- the maps


def test_a_scenes_map_is_its_mask_boxes_in_their_colours_on_black() -> None:
    scene = _scene()
    for size in (32, 64):
        arr = np.asarray(scene_layout(scene, size))
        painted = np.zeros((size, size), bool)
        for obj, mask in zip(scene.objects, masks(scene, size), strict=True):
            ys, xs = np.nonzero(mask)
            box = arr[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            assert (box == PALETTE[obj.color]).all()
            painted[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        assert (arr[~painted] == BACKGROUND).all()
    boxes = scene_boxes(scene, 32)
    assert [b.color for b in boxes] == [PALETTE["red"], PALETTE["blue"]]


def test_boxes_draw_by_pixel_centres_and_round_trip_through_masks() -> None:
    assert box_pixels((0.25, 0.0, 0.5, 1.0), 8, 8) == (2, 0, 4, 8)
    assert box_pixels((0.32, 0.0, 0.49, 1.0), 8, 8) == (3, 0, 4, 8)  # centre 2.5/8 = 0.3125 outside, 3.5/8 inside
    assert box_pixels((0.30, 0.30, 0.31, 0.31), 10, 10) == (3, 3, 4, 4)  # thinner than a pixel: the one beneath
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((24, 24), bool)
        y0, x0 = rng.integers(0, 20, 2)
        mask[y0:y0 + rng.integers(1, 4), x0:x0 + rng.integers(1, 4)] = True
        got = np.asarray(draw_layout([LayoutBox.from_mask(mask, (255, 255, 255))], 24))[..., 0] > 0
        assert np.array_equal(got, mask)
    later = np.asarray(draw_layout([LayoutBox((0, 0, 1, 1), (1, 2, 3)), LayoutBox((0.5, 0, 1, 1), (4, 5, 6))], 4))
    assert (later[:, :2] == (1, 2, 3)).all() and (later[:, 2:] == (4, 5, 6)).all()


def test_bad_boxes_and_colours_are_one_line() -> None:
    assert parse_box("red:0.1,0.2,0.5,0.6", COLORS) == LayoutBox((0.1, 0.2, 0.5, 0.6), PALETTE["red"])
    assert parse_box("#0a0b0c:0,0,1,1").color == (10, 11, 12)
    assert parse_box("[1,2,3]:0,0,1,1").color == (1, 2, 3)
    for text, match in (("red", "COLOR:x0,y0,x1,y1"), ("red:0.1,0.2,0.5", "four numbers"), ("mauve:0,0,1,1", "unknown layout colour"),
                        ("red:0.5,0.2,0.1,0.6", "0 <= x0 < x1 <= 1"), ("red:0,0,1.5,1", "0 <= x0 < x1 <= 1"),
                        ("[1,2,300]:0,0,1,1", "unknown layout colour")):
        with pytest.raises(LayoutError, match=match):
            parse_box(text, COLORS)
    with pytest.raises(LayoutError, match="width"):
        draw_layout([], 0)


def test_the_layout_command_writes_the_map(tmp_path: Path) -> None:
    from opensd.cli.main import app

    out = tmp_path / "map.png"
    res = CliRunner().invoke(app, ["layout", "red:0,0,0.5,0.5", "blue:0.5,0.5,1,1", "--size", "16", "-o", str(out)])
    assert res.exit_code == 0, res.output
    arr = np.asarray(Image.open(out))
    assert (arr[:8, :8] == PALETTE["red"]).all() and (arr[8:, 8:] == PALETTE["blue"]).all() and (arr[:8, 8:] == 0).all()
    res = CliRunner().invoke(app, ["layout", "mauve:0,0,1,1", "-o", str(out)])
    assert res.exit_code == 2 and "unknown layout colour 'mauve'" in res.output


def test_the_shapes_source_draws_each_items_map() -> None:
    from opensd.training.config import DataConfig
    from opensd.training.data import ControlMapSource
    from opensd.training.sources import open_source

    source = open_source(DataConfig(image_size=32, pool_size=4))
    assert isinstance(source, ControlMapSource)
    items = [source[i] for i in range(3)]
    maps = source.control_maps(items, 32)
    assert maps.shape == (3, 3, 32, 32) and maps.dtype == torch.uint8
    for e, m in zip(items, maps, strict=True):
        assert np.array_equal(m.permute(1, 2, 0).numpy(), np.asarray(scene_layout(e.scene, 32)))


# ----------------------------------------------------------------------------- the judge


def test_the_judge_gives_true_scenes_all_and_moved_objects_none() -> None:
    cases = layout_cases(benchmark_suite(per_category=10), 32)
    assert ceiling(cases)["in_place"] == 1.0
    scene = _scene()
    assert objects_in_place(render(scene), scene) == [True, True]
    # the same objects elsewhere: swapped places, then one moved by a third of the image
    a, b = scene.objects
    swapped = Scene((a.__class__(a.shape, a.color, a.size, b.cx, b.cy, a.r - 0.08), b.__class__(b.shape, b.color, b.size, a.cx, a.cy, b.r)),
                    "white", 32)
    assert objects_in_place(render(swapped), scene) == [False, False]
    moved = Scene((a, b.__class__(b.shape, b.color, b.size, b.cx - 0.33, b.cy, b.r)), "white", 32)
    assert objects_in_place(render(moved), scene) == [True, False]
    recoloured = Scene((a, b.__class__(b.shape, "green", b.size, b.cx, b.cy, b.r)), "white", 32)
    assert objects_in_place(render(recoloured), scene) == [True, False]  # an object of another colour is not it
    # the map tells colours, not shapes: with the prompt's shapes named, the shapes may trade boxes
    traded = Scene((a.__class__("triangle", a.color, a.size, a.cx, a.cy, a.r), b.__class__("circle", b.color, b.size, b.cx, b.cy, b.r)),
                   "white", 32)
    assert objects_in_place(render(traded), scene, shapes={"circle", "triangle"}) == [True, True]
    assert objects_in_place(render(traded), scene) == [False, False]
    assert objects_in_place(render(traded), scene, shapes={"circle"}) == [False, True]
    # other scenes' renders (shuffled): almost nothing in place
    shuffled = [render(cases[(i + 7) % len(cases)].scene) for i in range(len(cases))]
    assert layout_summary(score_layout(shuffled, cases))["in_place"] < 0.05


def test_the_stage_judge_draws_with_and_without_control(tmp_path: Path) -> None:
    judge = LayoutJudge(per_category=1, image_size=32)
    calls = []

    def draw(prompts, controls):  # a perfect model with control, a blank one without
        calls.append(sum(c is not None for c in controls))
        by_text = {c.prompt.text: c for c in judge.cases}
        return [render(by_text[p].scene) if c is not None else Image.new("RGB", (32, 32), "white")
                for p, c in zip(prompts, controls, strict=True)]

    first = judge(draw, tmp_path / "a.png")
    second = judge(draw, tmp_path / "b.png")
    assert calls == [6, 0, 6]  # without control only once: the frozen model does not change
    assert first == second and first["layout_in_place"] == first["layout_exact_in_place"] == 1.0
    assert first["free_in_place"] == 0.0
    assert first["layout_overall"] == 1.0 and (tmp_path / "a.png").is_file()


# ----------------------------------------------------------------------------- the committed ControlNet


def test_the_default_models_layout_controlnet_puts_objects_in_place() -> None:
    """Eight benchmark prompts (13 objects) at the model's evaluation settings and the
    ControlNet's own: with their layout maps at least 0.75 of the objects are in place, and
    far more than without."""
    from opensd.pipelines.control import ControlUnit, controlnet_for
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_path(MODEL)
    net = controlnet_for(pipe, CONTROLNET)
    prompts = [p for p in benchmark_suite(per_category=20)][::15]  # spread over the categories
    cases = layout_cases(prompts, 32, seed=random.Random(0).randrange(1000) + 10_000)
    kw = dict(steps=20, sampler="dpmpp_2m", cfg_scale=5.0, width=32, height=32)
    controlled, free = [], []
    for i, c in enumerate(cases):
        unit = ControlUnit(net, image=c.control, preprocessor="layout", weight=LAYOUT_WEIGHT, mode=LAYOUT_MODE)
        controlled.append(pipe.txt2img(c.prompt.text, seed=i, control=[unit], **kw)[0])
        free.append(pipe.txt2img(c.prompt.text, seed=i, **kw)[0])
    got, alone = layout_summary(score_layout(controlled, cases)), layout_summary(score_layout(free, cases))
    assert got["objects"] >= 10
    # measured 11 of 13 in place (0.846; 1 of 13 without), at the ControlNet's own setting
    # (LAYOUT_WEIGHT in LAYOUT_MODE): one object of slack for other CPUs' rounding. The issue's
    # target is measured on the benchmark's 120 prompts (0.901 there; docs/controlnet.md).
    assert got["in_place"] >= 0.75, got
    assert got["in_place"] > alone["in_place"] + 0.5, (got, alone)


@pytest.mark.parametrize("args, message", [(["--mode", "louder"], "unknown control mode"),
                                           (["--weight", "9"], "weight")])
def test_the_measurement_refuses_a_bad_mode_or_weight_in_one_line(args, message, capsys) -> None:
    from opensd.shapes.control_eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--controlnet", "missing.safetensors", "-o", "unused", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
