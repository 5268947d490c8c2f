"""The autoencoder's ceiling (opensd.shapes.ceiling, opensd eval --autoencoder): true scenes
through the VAE, scored."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_word_bundle
from typer.testing import CliRunner

from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.shapes.ceiling import autoencoder_ceiling, ground_truth_holdout
from opensd.shapes.concept import concept_by_name
from opensd.shapes.run import EvalConfig, Suite
from opensd.shapes.world import DEFAULT_HOLDOUT


class _Posterior:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean


class _PixelVAE(torch.nn.Module):
    """An 'autoencoder' whose latent is the image itself, decoded through ``colour``."""

    def __init__(self, colour: torch.Tensor) -> None:
        super().__init__()
        self.colour = torch.nn.Parameter(colour, requires_grad=False)  # (3, 3) channel mix
        self.cfg = SimpleNamespace(downsample_factor=1)

    def encode(self, x: torch.Tensor) -> _Posterior:
        return _Posterior(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.colour, z)


def _pipe(colour: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(vae=_PixelVAE(colour)), cfg=SimpleNamespace(image_size=32))


def test_a_lossless_autoencoder_keeps_every_scene_and_a_colour_swap_keeps_none_of_the_colours() -> None:
    cfg = EvalConfig(suite=Suite.CONCEPT, concept="purple-triangle", per_category=10)
    r = autoencoder_ceiling(_pipe(torch.eye(3)), cfg)
    assert r["overall"] == 1.0 and r["prompts"] == 40 and r["image_size"] == 32
    assert r["n"] == {c: 10 for c in r["accuracy"]} and all(rec["correct"] for rec in r["items"])
    swapped = autoencoder_ceiling(_pipe(torch.eye(3)[[2, 1, 0]]), cfg)  # red <-> blue
    assert swapped["accuracy"]["colors"] == 0.0 and swapped["overall"] < 0.3
    assert any("color" in rec["reason"] for rec in swapped["items"] if not rec["correct"])


def test_the_true_scenes_avoid_what_the_suite_keeps_out() -> None:
    assert ground_truth_holdout(EvalConfig()) == DEFAULT_HOLDOUT
    assert ground_truth_holdout(EvalConfig(suite=Suite.HOLDOUT)) is None
    concept = EvalConfig(suite=Suite.CONCEPT, concept="orange-circle")
    assert ground_truth_holdout(concept) == concept_by_name("orange-circle").others


def test_cli_eval_autoencoder_writes_the_ceiling(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    args = ["eval", "-m", str(tmp_path / "m"), "--suite", "benchmark", "--per-category", "2", "--autoencoder", "-q"]
    res = CliRunner().invoke(app, args + ["-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["kind"] == "autoencoder_ceiling" and r["suite"] == "benchmark" and r["prompts"] == 18
    assert 0.0 <= r["overall"] <= 1.0 and f"{r['overall']:.3f}" in res.output and r["model"]["hash"]
    res = CliRunner().invoke(app, args + ["-o", str(tmp_path / "ev2"), "--lora", str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0 and "Traceback" not in res.output


@pytest.mark.parametrize("concept", ["orange-circle"])
def test_the_default_models_autoencoder_carries_the_taught_concept(concept: str) -> None:
    import opensd
    from opensd.defaults import default_model_path

    pipe = opensd.load(default_model_path())
    r = autoencoder_ceiling(pipe, EvalConfig(suite=Suite.CONCEPT, concept=concept, per_category=25))
    assert r["overall"] >= 0.95, r["accuracy"]  # the concept docs/teach.md teaches is one the VAE can draw
