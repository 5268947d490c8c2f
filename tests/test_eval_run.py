"""`opensd eval`: the harness scores what it generates, writes results and a report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import tiny_word_bundle
from PIL import Image
from typer.testing import CliRunner

from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.shapes.run import EvalConfig, Suite, evaluate, select_prompts, write_results
from opensd.shapes.suites import benchmark_suite
from opensd.shapes.world import World, realize, render

GENEVAL = {"single_object", "two_objects", "counting", "colors", "position", "color_attr"}
RICH = GENEVAL | {"three_objects", "count_pair", "sentence_form"}


class GroundTruthPipeline:
    """Draws each prompt's scene exactly: a perfect model, so eval must score 1.0."""

    def __init__(self) -> None:
        self.specs = {p.text: p.spec for p in benchmark_suite(world=World.RICH)}
        self.calls = []

    def txt2img(self, prompt, negative_prompt="", *, seed, batch_size, **kw):
        self.calls.append((prompt, seed, batch_size, kw))
        return [render(realize(self.specs[prompt], random.Random(seed + j), 64)) for j in range(batch_size)]


class BlankPipeline:
    def txt2img(self, prompt, negative_prompt="", *, batch_size, **kw):
        return [Image.new("RGB", (64, 64), "white") for _ in range(batch_size)]


def test_perfect_generator_scores_one_and_blank_scores_zero(tmp_path: Path) -> None:
    cfg = EvalConfig(per_category=3, images_per_prompt=2, steps=7, sampler="euler")
    gt = GroundTruthPipeline()
    results, kept = evaluate(gt, cfg, model_info={"name": "truth"})
    assert results["overall"] == results["overall_geneval"] == 1.0 and not kept
    assert set(results["accuracy"]) == RICH  # the rich benchmark (the default): GenEval's six and three more
    assert all(n == 6 for n in results["n"].values())
    assert gt.calls[1][1] == 1000 and gt.calls[0][3]["steps"] == 7 and gt.calls[0][3]["sampler"] == "euler"
    classic, _ = evaluate(gt, EvalConfig(per_category=3, images_per_prompt=2, world=World.CLASSIC))
    assert set(classic["accuracy"]) == GENEVAL and classic["overall"] == 1.0
    # the classic prompts come first, with the same seeds: the same images
    assert [(c[0], c[1]) for c in gt.calls[-18:]] == [(c[0], c[1]) for c in gt.calls[:18]]
    blank, kept = evaluate(BlankPipeline(), cfg)
    assert blank["overall"] == 0.0 and len(kept) == 54
    assert all(r["reason"].startswith(("missing object", "wrong count")) for r in blank["items"])
    paths = write_results(blank, kept, tmp_path / "out")
    for key in ("results", "report", "plot", "failures"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    report = paths["report"].read_text()
    assert "| **overall** | **0.000** | 54 |" in report and "| missing object |" in report
    assert "| three objects | 0.000 | 6 |" in report and "| sentence form | 0.000 | 6 |" in report
    assert "GenEval's six" in report
    config = json.loads(paths["results"].read_text())["config"]
    assert config["suite"] == "benchmark" and config["world"] == "rich"


def test_suites_and_selection() -> None:
    bench = select_prompts(EvalConfig(per_category=2))
    val = select_prompts(EvalConfig(suite=Suite.VALIDATION, per_category=2))
    held = select_prompts(EvalConfig(suite=Suite.HOLDOUT, per_category=2))
    assert len(bench) == 18 and len(val) == 18 and len(held) == 16
    assert not {p.text for p in bench} & {p.text for p in val}
    classic = select_prompts(EvalConfig(per_category=2, world=World.CLASSIC))
    assert len(classic) == 12 and bench[:12] == classic  # the classic prompts, unchanged and first
    with pytest.raises(ValueError, match="images_per_prompt"):
        EvalConfig(images_per_prompt=0)
    with pytest.raises(ValueError, match="world must be"):
        EvalConfig(world="rich")  # type: ignore[arg-type]  # an enum, not its name


def test_cli_eval_end_to_end(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    res = CliRunner().invoke(app, ["eval", "-m", str(tmp_path / "m"), "--per-category", "1", "--images-per-prompt", "1",
                                   "--steps", "2", "-o", str(tmp_path / "ev"), "-q"])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert sum(results["n"].values()) == 9 and results["model"]["name"] == "m"
    assert "GenEval six" in res.output or results["overall_geneval"] == results["overall"]
    assert (tmp_path / "ev" / "report.md").is_file() and (tmp_path / "ev" / "accuracy.png").is_file()
    res = CliRunner().invoke(app, ["eval", "-m", str(tmp_path / "m"), "--suite", "nope", "-q"])
    assert res.exit_code == 2 and "unknown suite 'nope'" in res.output
    res = CliRunner().invoke(app, ["eval", "-m", str(tmp_path / "m"), "--world", "flat", "-q"])
    assert res.exit_code == 2 and "unknown --world 'flat'; choose one of classic, rich" in res.output


def test_distribution_metrics_separate_truth_from_blank(tmp_path: Path) -> None:
    cfg = EvalConfig(per_category=2, images_per_prompt=2)
    truth, _ = evaluate(GroundTruthPipeline(), cfg, distribution=True)
    blank, kept = evaluate(BlankPipeline(), cfg, distribution=True)
    t, b = truth["distribution"]["nets"]["shapes"], blank["distribution"]["nets"]["shapes"]
    assert t["fd_ratio"] < 2.0 and b["fd_ratio"] > 5 * t["fd_ratio"]  # measured 1.33 vs 12.9 with 24 images
    assert b["generated"]["recall"] == 0.0 and t["generated"]["recall"] > 0.5  # identical blanks cover nothing
    report = write_results(blank, kept, tmp_path)["report"].read_text()
    assert "| shapes |" in report and "| random |" in report


def test_prompts_sharing_a_batch_give_the_images_each_prompt_gets_alone() -> None:
    import numpy as np

    from opensd.checkpoints import LoadedModel
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
    from opensd.shapes.run import _generate

    model, tok = tiny_word_bundle()
    pipe = StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("."), "opensd", "0"))
    cfg = EvalConfig(per_category=1, images_per_prompt=2, steps=3, sampler="dpmpp_2m", cfg_scale=3.0, batch_size=8)
    chunk = list(enumerate(select_prompts(cfg)[:4]))
    together = _generate(pipe, cfg, chunk)
    alone = [_generate(pipe, cfg, [item])[0] for item in chunk]
    assert [len(x) for x in together] == [2, 2, 2, 2]
    for a, b in zip(together, alone, strict=True):
        for x, y in zip(a, b, strict=True):
            diff = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int))
            assert diff.max() <= 1  # equal up to float rounding in batched kernels
    # the rows differ: each prompt and seed has its own image
    assert not np.array_equal(np.asarray(together[0][0]), np.asarray(together[0][1]))
    assert not np.array_equal(np.asarray(together[0][0]), np.asarray(together[1][0]))


def test_batch_size_is_checked() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)


def test_cli_rejects_a_bad_batch_size(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    res = CliRunner().invoke(app, ["eval", "-m", str(tmp_path / "m"), "--batch-size", "0", "-o", str(tmp_path / "ev"), "-q"])
    assert res.exit_code == 2 and "batch_size must be an integer >= 1" in res.output and "Traceback" not in res.output
