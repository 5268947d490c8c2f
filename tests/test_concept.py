"""A concept to teach (opensd.shapes.concept): its suite, its training images, eval with a LoRA,
and the reproduction script's plumbing (benchmarks/teach_concept.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_word_bundle
from typer.testing import CliRunner

from opensd.checkpoints import LoadedModel
from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.lora import LoRAFile, LoRAUse, bind_loras
from opensd.checkpoints.lora_names import kohya_names
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.shapes.concept import (
    CONCEPTS,
    concept_by_name,
    concept_suite,
    concept_training_samples,
    parse_suite_name,
    write_concept_data,
)
from opensd.shapes.run import EvalConfig, Suite, evaluate, select_prompts
from opensd.shapes.scorer import category_of, score_images
from opensd.shapes.suites import HOLDOUT_CATEGORIES, PromptSuiteError, ground_truth_images
from opensd.shapes.world import DEFAULT_HOLDOUT, check_true

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_concepts_are_the_default_holdouts_pairs() -> None:
    assert set(CONCEPTS) == {"purple-triangle", "orange-circle", "cyan-square"}
    c = concept_by_name("purple-triangle")
    assert c.words == "purple triangle" and c.holdout.color_shapes == (("purple", "triangle"),)
    assert ("purple", "triangle") not in c.others.color_shapes and len(c.others.color_shapes) == 2
    assert c.others.relations == DEFAULT_HOLDOUT.relations
    with pytest.raises(PromptSuiteError, match="unknown concept 'red-circle'; allowed: purple-triangle"):
        concept_by_name("red-circle")


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_the_suite_states_the_concept_and_nothing_else_held_out(name: str) -> None:
    c = CONCEPTS[name]
    suite = concept_suite(name, per_category=30)
    assert suite == concept_suite.__wrapped__(name, per_category=30)  # deterministic, not just cached
    assert [p.category for p in suite] == [k for k in HOLDOUT_CATEGORIES for _ in range(30)]
    assert len({p.text for p in suite}) == len(suite)
    for p in suite:
        assert c.holdout.touches(p.spec) and not c.others.touches(p.spec), p.text
        assert category_of(p.spec) == p.category and c.words in p.text
    other = concept_suite.__wrapped__(name, per_category=30, seed=1)
    assert [p.text for p in other] != [p.text for p in suite]


def test_the_scorer_reads_the_concepts_ground_truth_as_right_and_a_swapped_colour_as_wrong() -> None:
    c = concept_by_name("purple-triangle")
    suite = concept_suite("purple-triangle", per_category=25)
    for size in (32, 64):
        images = ground_truth_images(suite, size, seed=3, holdout=c.others)
        r = score_images([(im, p.spec) for im, p in zip(images, suite, strict=True)])
        assert r["overall"] == 1.0, r["accuracy"]
    # the same scenes judged against the concept's colour on another shape fail
    images = ground_truth_images(suite[:25], 32, seed=3, holdout=c.others)  # the colors prompts
    swapped = [type(p.spec)(tuple(o.__class__(o.shape, "blue", o.size, o.count) for o in p.spec.objects),
                            p.spec.relation, p.spec.background) for p in suite[:25]]
    assert score_images(list(zip(images, swapped, strict=True)))["overall"] == 0.0


def test_training_images_are_true_deterministic_and_disjoint_from_the_suite(tmp_path: Path) -> None:
    c = concept_by_name("purple-triangle")
    samples = concept_training_samples("purple-triangle", 64, 32)
    again = concept_training_samples("purple-triangle", 64, 32)
    assert [s.caption for s in samples] == [s.caption for s in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(samples, again, strict=True))
    suite_texts = {p.text for p in concept_suite("purple-triangle")}
    assert not suite_texts & {s.caption for s in samples}
    assert len({s.caption for s in samples}) == 64
    assert [s.kind for s in samples[:8]] == list(HOLDOUT_CATEGORIES) * 2  # interleaved: a prefix is balanced
    for s in samples:
        assert check_true(s.spec, s.scene) == [], s.caption
        assert any((o.color, o.shape) == ("purple", "triangle") for o in s.scene.objects), s.caption
        assert not c.others.blocks_scene(s.scene) and s.image.size == (32, 32)
    assert [s.caption for s in concept_training_samples("purple-triangle", 8, 32)] == [s.caption for s in samples[:8]]
    assert write_concept_data(tmp_path / "d", n=5) == 5
    lines = (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(x)["text"] for x in lines] == [s.caption for s in samples[:5]]
    for bad in (0, 65, True):
        with pytest.raises(PromptSuiteError, match="from 1 to 64 images"):
            concept_training_samples("purple-triangle", bad)


def test_suite_names_and_the_eval_config() -> None:
    assert parse_suite_name("benchmark") == ("benchmark", None)
    assert parse_suite_name("concept:cyan-square") == ("concept", "cyan-square")
    for bad, msg in (("concept", "names no concept"), ("concept:", "names no concept"),
                     ("concept:nope", "unknown concept"), ("holdout:x", "only concept suites")):
        with pytest.raises(PromptSuiteError, match=msg):
            parse_suite_name(bad)
    prompts = select_prompts(EvalConfig(suite=Suite.CONCEPT, concept="orange-circle", per_category=3))
    full = concept_suite("orange-circle")
    assert prompts == [p for k in HOLDOUT_CATEGORIES for p in [q for q in full if q.category == k][:3]]
    with pytest.raises(ValueError, match="concept goes with the concept suite"):
        EvalConfig(suite=Suite.CONCEPT)
    with pytest.raises(ValueError, match="concept goes with the concept suite"):
        EvalConfig(concept="orange-circle")


def _kohya_file(model, path: Path, network: str, seed: int = 0) -> Path:
    """A random kohya LoRA on every layer of ``network`` ("unet" or "te1")."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in sorted(kohya_names(model).items()):
        if t.network != network:
            continue
        out_f, *rest = t.weight_shape
        tensors[f"{name}.lora_down.weight"] = torch.randn((2, *rest), generator=g) * 0.3
        tail = (1, 1) if len(rest) == 3 else ()
        tensors[f"{name}.lora_up.weight"] = torch.randn((out_f, 2, *tail), generator=g) * 0.3
    write_safetensors(tensors, path)
    return path


def _images(pipe, cfg, networks=None):
    _, kept = evaluate(pipe, cfg, keep_images=lambda rec: True, networks=networks)
    return [np.asarray(im, dtype=int) for im, _ in kept]


@pytest.mark.parametrize("network", ["te1", "unet"])
def test_eval_applies_a_lora_in_batched_and_single_calls(network: str, tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    pipe = StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("."), "opensd", "0"))
    path = _kohya_file(model, tmp_path / "l.safetensors", network)
    networks = RequestNetworks(adapters=bind_loras(model, [LoRAUse(LoRAFile.load(path))]))
    alone = EvalConfig(suite=Suite.CONCEPT, concept="purple-triangle", per_category=1, images_per_prompt=1, steps=2,
                       batch_size=1)
    shared = EvalConfig(suite=Suite.CONCEPT, concept="purple-triangle", per_category=1, images_per_prompt=1, steps=2,
                        batch_size=4)
    base = _images(pipe, alone)
    with_lora = _images(pipe, alone, networks)
    batched = _images(pipe, shared, networks)
    assert len(base) == len(with_lora) == len(batched) == 4
    assert all(np.abs(a - b).max() > 8 for a, b in zip(base, with_lora, strict=True))  # the LoRA changes every image
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(with_lora, batched, strict=True))  # and reaches the batched text encoding
    assert all(np.array_equal(a, b) for a, b in zip(base, _images(pipe, alone), strict=True))  # nothing stays on the model


def test_cli_eval_with_a_lora_and_a_concept_suite(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    path = _kohya_file(model, tmp_path / "l.safetensors", "unet")
    args = ["eval", "-m", str(tmp_path / "m"), "--suite", "concept:purple-triangle", "--per-category", "1",
            "--images-per-prompt", "1", "--steps", "1", "-q"]
    res = CliRunner().invoke(app, args + ["-o", str(tmp_path / "ev"), "--lora", f"{path}:0.5"])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["config"]["suite"] == "concept" and results["config"]["concept"] == "purple-triangle"
    assert sorted(results["n"]) == sorted(HOLDOUT_CATEGORIES) and results["model"]["loras"] == f"{path}:0.5"
    res = CliRunner().invoke(app, args + ["-o", str(tmp_path / "ev2"), "--lora", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2 and "missing.safetensors: no such file" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, args[:4] + ["concept:blue-blob", "-q", "-o", str(tmp_path / "ev3")])
    assert res.exit_code == 2 and "unknown concept 'blue-blob'" in res.output


def _teach_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import teach_concept
    finally:
        sys.path.remove(str(BENCHMARKS))
    return teach_concept


def test_the_script_summarizes_and_writes_its_table() -> None:
    t = _teach_module()
    r = t.summarize({"overall": 0.75, "accuracy": {"colors": 1.0, "counting": 0.5}, "n": {"colors": 4, "counting": 4}})
    assert r["se"] == {"colors": 0.0, "counting": 0.25} and r["overall_se"] == pytest.approx(0.125) and r["images"] == 8
    s, out, skip = t.parse_args(["--out", "x", "--concept-eval", "3x2", "--train", "--steps", "2", "--no-text-encoder"])
    assert out == Path("x") and not skip and s.concept_eval == t.EvalSettings(3, 2)
    assert s.train == {"--steps": "2", "--no-text-encoder": None}
    cmd = t.train_command(s, Path("d"), Path("p"), Path("o"))
    assert cmd[-7:] == ["--steps", "2", "--no-text-encoder", "--set", "min_snr_gamma=5", "--set", "sample_images=0"]


def test_the_script_runs_every_phase_on_a_tiny_model(tmp_path: Path) -> None:
    t = _teach_module()
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    s = t.TeachSettings(model=str(tmp_path / "m"), concept_images=4, prior_images=4, prior="generated",
                        concept_eval=t.EvalSettings(1, 1), benchmark_eval=t.EvalSettings(1, 1), steps=1,
                        train={"--steps": "2", "--batch-size": "2", "--rank": "2", "--alpha": "2",
                               "--no-text-encoder": None, "--seed": "0"})
    report = t.teach(s, tmp_path / "teach")
    out = tmp_path / "teach"
    assert json.loads(json.dumps(report)) == json.loads((out / "teach.json").read_text())
    assert (out / "lora" / "orange-circle.safetensors").is_file()
    assert report["data"]["concept_images"] == 4 and report["data"]["prior_images"] == 4
    for when in ("before", "after"):
        assert report[when]["concept"]["images"] == 4 and report[when]["benchmark"]["images"] == 6
    after = json.loads((out / "after" / "concept" / "results.json").read_text())
    assert after["model"]["loras"].endswith("orange-circle.safetensors")
    assert report["phases"]["train"]["cpu_s"] > 0 and set(report["verdict"]) == {
        "concept_met", "benchmark_drop", "drop_met", "fine_tune_cpu_s", "cpu_met"}
    assert report["data"]["prior"].startswith("the model's own images") and report["data"]["prior_cpu_s"] > 0
    assert report["verdict"]["fine_tune_cpu_s"] >= report["phases"]["train"]["cpu_s"] + report["data"]["prior_cpu_s"] - 0.2
    assert report["ceiling"]["images"] == 4 and 0.0 <= report["ceiling"]["overall"] <= 1.0
    assert json.loads((out / "ceiling" / "results.json").read_text())["kind"] == "autoencoder_ceiling"
    md = (out / "teach.md").read_text()
    assert "| orange-circle prompts (4 images) | before | after | change |" in md and "CPU-minutes" in md
    assert "| the autoencoder's ceiling (4 true scenes through the VAE) |" in md
