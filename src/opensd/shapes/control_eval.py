"""Does a layout ControlNet put each object where its map says? Judged by the exact scorer.

For each prompt of a suite, a scene that makes it true is drawn (``random.Random(f"{seed}:{i}")``,
the default holdout's colours avoided, as :func:`opensd.shapes.suites.ground_truth_images`)
and its layout map made (:func:`opensd.shapes.layout.scene_layout`: each object's box in its
colour on black). The model then draws the prompt with that map as control and, for
comparison, the same prompt at the same seed without control. In each image the scorer
(:func:`opensd.shapes.scorer.parse`) reads the objects, and a scene object is **in place**
when a detected object of its colour (the map's colour code) and of a shape the prompt
names has its box inside the object's control region, widened by ``tolerance`` (a fraction
of the side: the scorer's boxes are sub-pixel and a drawn edge may blur by a pixel); each
detection serves one object. A map says where each colour goes, not which shape: for "a
circle and a triangle" with two boxes, either may take either box, so the shape is checked
against the prompt; ``exact_in_place`` also asks for the scene object's own shape.

Reported (:func:`layout_summary`): ``in_place``, the share of all objects in place (the
target is 0.9); ``exact_in_place``; ``prompts_in_place``, the share of prompts with every
object in place; ``overall``, the scorer's GenEval overall on the same images (that the
control keeps the prompt's objects right); each per category. Without control, objects
land in their region only by chance. The ground-truth renders of the scenes score 1.0
(:func:`ceiling`).

:class:`LayoutJudge` is the ControlNet stage's evaluator on the shapes world (the
validation suite); :func:`evaluate_layout` runs the measurement for a pipeline and a
ControlNet (``python -m opensd.shapes.control_eval``, benchmarks/control_layout.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from opensd.pipelines.layout import LayoutBox
from opensd.shapes.layout import scene_boxes, scene_layout
from opensd.shapes.scorer import CATEGORIES, DetectedObject, judge
from opensd.shapes.suites import BenchmarkPrompt, benchmark_suite, validation_suite
from opensd.shapes.world import DEFAULT_HOLDOUT, Scene, realize, render

TOLERANCE = 0.05  # of the image side: 1.6 px at 32 px
TARGET = 0.9
SCENE_SEED = 5  # the scenes whose maps are the control (independent of the drawing seeds)
# The default model's layout ControlNet is used (and scored) in A1111's "ControlNet is more
# important" mode at weight 1.5: of weights 0.75 to 2 in that mode and 1 in Balanced, the most
# objects in place on the validation suite (docs/controlnet.md, "The layout ControlNet").
LAYOUT_MODE = "ControlNet is more important"
LAYOUT_WEIGHT = 1.5

Draw = Callable[[Sequence[str], Sequence[Image.Image | None]], list[Image.Image]]


@dataclass(frozen=True)
class LayoutCase:
    """One prompt, the scene its control map is drawn from, and the map."""

    prompt: BenchmarkPrompt
    scene: Scene
    control: Image.Image


def layout_cases(prompts: Sequence[BenchmarkPrompt], size: int, seed: int = SCENE_SEED) -> list[LayoutCase]:
    """A scene making each prompt true, and its layout map at ``size`` pixels."""
    out = []
    for i, p in enumerate(prompts):
        scene = realize(p.spec, random.Random(f"{seed}:{i}"), size, DEFAULT_HOLDOUT)
        out.append(LayoutCase(p, scene, scene_layout(scene, size)))
    return out


def _inside(det: DetectedObject, region: tuple[int, int, int, int], slack: float) -> bool:
    x0, y0, x1, y1 = det.box
    return x0 >= region[0] - slack and y0 >= region[1] - slack and x1 <= region[2] + slack and y1 <= region[3] + slack


def objects_in_place(image: Image.Image, scene: Scene, tolerance: float = TOLERANCE,
                     detected: Sequence[DetectedObject] | None = None, shapes: Collection[str] | None = None) -> list[bool]:
    """Per object of ``scene``: whether a detected object of its colour, and of one of ``shapes``
    (None: of the object's own shape), lies inside its control region (module doc), each
    detection used once (one of the object's own shape first). ``detected``: the image's
    objects if already read (the scorer's ``parse``)."""
    from opensd.shapes.scorer import parse

    side = image.size[0]
    dets = list(parse(image).objects if detected is None else detected)
    boxes: list[LayoutBox] = scene_boxes(scene, side)
    regions = [b.pixel_box(side, side) for b in boxes]
    slack = tolerance * side
    used: set[int] = set()
    out = []
    for obj, region in zip(scene.objects, regions, strict=True):
        allowed = {obj.shape} if shapes is None else set(shapes)
        found = [k for k, d in enumerate(dets) if k not in used and d.shape in allowed and d.color == obj.color
                 and _inside(d, region, slack)]
        found.sort(key=lambda k: dets[k].shape != obj.shape)
        if found:
            used.add(found[0])
        out.append(bool(found))
    return out


def score_layout(images: Sequence[Image.Image], cases: Sequence[LayoutCase], tolerance: float = TOLERANCE) -> list[dict]:
    """One record per image: its category, objects in place (a list of booleans), the scorer's verdict."""
    rows = []
    for image, case in zip(images, cases, strict=True):
        j = judge(image, case.prompt.spec)
        named = {o.shape for o in case.prompt.spec.objects}
        rows.append({"prompt": case.prompt.text, "category": case.prompt.category,
                     "in_place": objects_in_place(image, case.scene, tolerance, j.detected, named),
                     "exact_in_place": objects_in_place(image, case.scene, tolerance, j.detected),
                     "correct": j.correct, "reason": j.reason})
    return rows


def layout_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """``in_place`` and ``exact_in_place`` (objects), ``prompts_in_place``, ``overall`` (the scorer's, mean over categories),
    each also ``by_category``; ``objects`` and ``prompts`` counted."""

    def part(rs: Sequence[dict]) -> dict[str, float]:
        flags = [f for r in rs for f in r["in_place"]]
        exact = [f for r in rs for f in r["exact_in_place"]]
        return {"in_place": sum(flags) / max(1, len(flags)), "exact_in_place": sum(exact) / max(1, len(exact)),
                "prompts_in_place": sum(all(r["in_place"]) for r in rs) / max(1, len(rs)),
                "correct": sum(r["correct"] for r in rs) / max(1, len(rs)), "objects": len(flags), "prompts": len(rs)}

    by = {c: part([r for r in rows if r["category"] == c]) for c in CATEGORIES if any(r["category"] == c for r in rows)}
    out: dict[str, Any] = part(rows)
    out["overall"] = sum(v["correct"] for v in by.values()) / max(1, len(by))
    out["by_category"] = by
    return out


def ceiling(cases: Sequence[LayoutCase], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The judge on the scenes' own renders (what a perfect model scores: 1.0 in place)."""
    return layout_summary(score_layout([render(c.scene) for c in cases], cases, tolerance))


class LayoutJudge:
    """The ControlNet stage's evaluator on the shapes world: ``per_category`` validation
    prompts drawn with their layout maps and without (the latter once: the frozen model does not
    change), ``in_place``, ``prompts_in_place`` and ``overall`` of each as ``layout_*`` and
    ``free_*`` metrics, and a grid (maps, with control, without) beside ``samples``."""

    def __init__(self, per_category: int, image_size: int) -> None:
        self.cases = layout_cases(validation_suite(per_category=per_category), image_size)
        self._free: tuple[list[Image.Image], dict] | None = None

    def __call__(self, draw: Draw, samples: Path) -> dict[str, float]:
        from opensd.training.records import save_grid

        texts = [c.prompt.text for c in self.cases]
        controlled = draw(texts, [c.control for c in self.cases])
        if self._free is None:
            free = draw(texts, [None] * len(texts))
            self._free = (free, layout_summary(score_layout(free, self.cases)))
        got = layout_summary(score_layout(controlled, self.cases))
        n = len(self.cases)
        save_grid([c.control for c in self.cases] + controlled + self._free[0], samples, n)
        samples.with_suffix(".txt").write_text("rows: layout maps, with control, without\n" +
                                               "".join(f"{c.prompt.category}\t{c.prompt.text}\n" for c in self.cases))
        keys = ("in_place", "exact_in_place", "prompts_in_place", "overall")
        return {**{f"layout_{k}": got[k] for k in keys}, **{f"free_{k}": self._free[1][k] for k in keys}}


def evaluate_layout(draw: Draw, *, per_category: int = 20, image_size: int = 32, suite: str = "benchmark",
                    tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The measurement of the module doc on ``per_category`` prompts of each category of
    ``suite`` (``benchmark`` or ``validation``): ``control`` and ``free`` summaries, the
    ``ceiling``, the records, and the images (``images``: (map, with, without) per prompt)."""
    prompts = {"benchmark": benchmark_suite, "validation": validation_suite}[suite](per_category=per_category)
    cases = layout_cases(prompts, image_size)
    texts = [c.prompt.text for c in cases]
    controlled = draw(texts, [c.control for c in cases])
    free = draw(texts, [None] * len(cases))
    rows_c, rows_f = score_layout(controlled, cases, tolerance), score_layout(free, cases, tolerance)
    return {"suite": suite, "per_category": per_category, "tolerance": tolerance, "scene_seed": SCENE_SEED,
            "control": layout_summary(rows_c), "free": layout_summary(rows_f), "ceiling": ceiling(cases, tolerance),
            "items": [{**c, "free_in_place": f["in_place"], "free_exact_in_place": f["exact_in_place"],
                       "free_correct": f["correct"]} for c, f in zip(rows_c, rows_f, strict=True)],
            "images": [(c.control, a, b) for c, a, b in zip(cases, controlled, free, strict=True)]}


# ----------------------------------------------------------------------------- the command


def pipeline_draw(pipe: Any, controlnet: Any, *, steps: int = 20, sampler: str = "dpmpp_2m", cfg_scale: float = 5.0,
                  seed: int = 0, size: int = 32, weight: float = 1.0, mode: str = "Balanced") -> Draw:
    """``draw(prompts, controls)`` for :func:`evaluate_layout`: ``pipe`` (a
    :class:`~opensd.pipelines.stable_diffusion.StableDiffusionPipeline`) with ``controlnet`` on
    each map at ``weight`` in control ``mode`` (A1111's names; None: that prompt without),
    prompt i at seed ``seed + i``."""
    from opensd.pipelines.control import ControlUnit

    def draw(prompts: Sequence[str], controls: Sequence[Image.Image | None]) -> list[Image.Image]:
        out = []
        for i, (text, control) in enumerate(zip(prompts, controls, strict=True)):
            units = None if control is None else [ControlUnit(controlnet, image=control, preprocessor="layout",
                                                              weight=weight, mode=mode)]
            out.append(pipe.txt2img(text, seed=seed + i, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                                    width=size, height=size, control=units)[0])
        return out

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m opensd.shapes.control_eval --controlnet FILE -o DIR``: the measurement of the
    module doc; writes ``DIR/layout.json`` and ``DIR/layout.png`` (rows of map, with, without)."""
    import argparse
    import json

    import torch

    from opensd.pipelines.control import controlnet_for
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
    from opensd.training.records import save_grid

    p = argparse.ArgumentParser(description="Score a layout ControlNet: objects in their control regions, with and without it.")
    p.add_argument("--model", default="models/opensd-shapes")
    p.add_argument("--controlnet", required=True)
    p.add_argument("--suite", choices=("benchmark", "validation"), default="benchmark")
    p.add_argument("--per-category", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight", type=float, default=1.0, help="the ControlNet's weight")
    p.add_argument("--mode", default="Balanced", help="control mode: Balanced, \"My prompt is more important\", "
                                                      "\"ControlNet is more important\"")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="fp32", help="the pipeline's precision (fp32: as the training's evaluations)")
    p.add_argument("--out", "-o", type=Path, required=True)
    a = p.parse_args(argv)
    from opensd.errors import OpenSDError
    from opensd.pipelines.control import check_settings

    try:  # the unit's own checks, before the model loads: one line for a bad --mode or --weight
        check_settings("layout", a.weight, 0.0, 1.0, a.mode, "Crop and Resize")
    except OpenSDError as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_path(a.model, precision=a.precision)
    size = pipe.cfg.image_size
    draw = pipeline_draw(pipe, controlnet_for(pipe, a.controlnet), steps=a.steps, sampler=a.sampler,
                         cfg_scale=a.cfg_scale, seed=a.seed, size=size, weight=a.weight, mode=a.mode)
    result = evaluate_layout(draw, per_category=a.per_category, image_size=size, suite=a.suite)
    images = result.pop("images")
    result.update({"model": a.model, "controlnet": a.controlnet, "steps": a.steps, "sampler": a.sampler,
                   "cfg_scale": a.cfg_scale, "seed": a.seed, "precision": pipe.precision.name,
                   "weight": a.weight, "mode": a.mode})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "layout.json").write_text(json.dumps(result, indent=2) + "\n")
    save_grid([im for row in images for im in row], a.out / "layout.png", 3)
    c, f = result["control"], result["free"]
    print(f"objects in place: {c['in_place']:.3f} with the ControlNet, {f['in_place']:.3f} without "
          f"({c['objects']} objects, {c['prompts']} prompts); wrote {a.out / 'layout.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
