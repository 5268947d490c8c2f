"""``--few-step``: the model folder's LCM-LoRA with the settings it was distilled for.

On a tiny random model folder with a random LCM-LoRA-shaped file beside it (the committed
one's quality is tests/test_few_step_quality.py): the CLI applies the file (its hash in the
infotext), sets 4 ``lcm`` steps at CFG 1 unless given, keeps what is given, and a model
without the file, a model file, or ``--turbo`` too is one line of error before the model
loads. From Python, ``few_step_kwargs`` draws what the CLI draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_word_bundle
from PIL import Image
from typer.testing import CliRunner

import opensd
from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app
from opensd.pipelines.few_step import FEW_STEP, LCM_LORA_FILE, FewStepError, few_step_kwargs, few_step_lora, few_step_settings
from opensd.pipelines.infotext import parse_infotext, read_png_parameters
from opensd.training.lora_network import LoRANetwork, LoRATargets

runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """``with``: a tiny model folder holding a random LCM-LoRA (every layer kind, up factors
    non-zero so that it changes the images); ``without``: the same model, no file."""
    model, tok = tiny_word_bundle()
    root = tmp_path_factory.mktemp("few")
    without = save_opensd(model, tok, root / "plain")
    with_lora = save_opensd(model, tok, root / "distilled")
    network = LoRANetwork(model, rank=4, alpha=4.0, targets=LoRATargets.ALL, text_encoder=False, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    write_safetensors({k: v.to(torch.float16) for k, v in network.kohya_state().items()}, with_lora / LCM_LORA_FILE)
    return {"with": with_lora, "without": without}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_settings_fill_only_what_is_not_given() -> None:
    assert few_step_settings({}) == {"steps": 4, "sampler": "lcm", "cfg_scale": 1.0}
    assert few_step_settings({"steps": 6, "sampler": None, "cfg_scale": 1.5}) == {"steps": 6, "sampler": "lcm", "cfg_scale": 1.5}
    assert (FEW_STEP.steps, FEW_STEP.sampler, FEW_STEP.cfg_scale) == (4, "lcm", 1.0)


def test_generate_applies_the_folders_lcm_lora_at_its_settings(folders, tmp_path: Path) -> None:
    out = tmp_path / "fast.png"
    res = invoke("generate", "a red circle", "-m", folders["with"], "--few-step", "--seed", 3, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    fields = parse_infotext(read_png_parameters(out))
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("4", "LCM", "1.0")
    assert "Lora hashes" in fields and "lcm_lora" in fields["Lora hashes"]
    # the same settings by hand, without the LoRA: a different image (the LoRA was applied)
    plain = tmp_path / "plain.png"
    res = invoke("generate", "a red circle", "-m", folders["with"], "--sampler", "lcm", "--steps", 4, "--cfg-scale", 1,
                 "--seed", 3, "-o", plain, "-q")
    assert res.exit_code == 0, res.output
    assert np.abs(pixels(out) - pixels(plain)).max() > 8
    # ... and with it by --lora: the same image, to one 8-bit level (--few-step merges the LoRA
    # into the run's own weights, --lora adds it unmerged: float rounding differs)
    by_hand = tmp_path / "by_hand.png"
    res = invoke("generate", "a red circle", "-m", folders["with"], "--lora", folders["with"] / LCM_LORA_FILE, "--sampler", "lcm",
                 "--steps", 4, "--cfg-scale", 1, "--seed", 3, "-o", by_hand, "-q")
    assert res.exit_code == 0, res.output
    assert np.abs(pixels(out) - pixels(by_hand)).max() <= 1


def test_the_cli_merges_the_lora_for_its_run_and_plain_lora_does_not(folders, tmp_path: Path, monkeypatch) -> None:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    seen = []
    real = StableDiffusionPipeline.txt2img

    def spy(self, *a, **k):
        seen.append(k["networks"].adapters.merge_weights)
        return real(self, *a, **k)

    monkeypatch.setattr(StableDiffusionPipeline, "txt2img", spy)
    for extra in (["--few-step"], ["--lora", folders["with"] / LCM_LORA_FILE]):
        res = invoke("generate", "a red circle", "-m", folders["with"], *extra, "--seed", 1, "-o", tmp_path / "x.png", "-q")
        assert res.exit_code == 0, res.output
    assert seen == [True, False]


def test_what_is_given_stays(folders, tmp_path: Path) -> None:
    out = tmp_path / "six.png"
    res = invoke("generate", "a red circle", "-m", folders["with"], "--few-step", "--steps", 6, "--sampler", "tcd",
                 "--cfg-scale", 1.5, "--seed", 3, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    fields = parse_infotext(read_png_parameters(out))
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("6", "TCD", "1.5")
    assert "lcm_lora" in fields["Lora hashes"]


def test_img2img_takes_it_too(folders, tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    out = tmp_path / "i2i.png"
    res = invoke("img2img", tmp_path / "in.png", "a blue circle", "-m", folders["with"], "--few-step", "--strength", 0.5,
                 "--seed", 2, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    fields = parse_infotext(read_png_parameters(out))
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("4", "LCM", "1.0") and "lcm_lora" in fields["Lora hashes"]


@pytest.mark.parametrize("case, message", [
    ("without", f"has no LCM-LoRA ({{without}}{'/'}{LCM_LORA_FILE} not found)"),
    ("file", "is not a folder: give --lora FILE --sampler lcm --steps 4 --cfg-scale 1 instead"),
    ("turbo", "--few-step and --turbo are two different few-step modes"),
])
def test_errors_are_one_line_before_the_model_loads(folders, tmp_path: Path, case: str, message: str) -> None:
    model = {"without": folders["without"], "file": folders["without"] / "model.safetensors", "turbo": folders["with"]}[case]
    extra = ["--turbo"] if case == "turbo" else []
    res = invoke("generate", "a red circle", "-m", model, "--few-step", *extra, "-o", tmp_path / "e.png", "-q")
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message.format(without=folders["without"]) in errors[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "e.png").exists()


def test_eval_few_step_needs_the_file() -> None:
    res = invoke("eval", "-m", "/nonexistent/model-folder", "--few-step", "-q")
    assert res.exit_code == 2 and "error: --few-step" in res.output, res.output


def test_python_kwargs_draw_what_the_cli_draws(folders, tmp_path: Path) -> None:
    res = invoke("generate", "two green triangles", "-m", folders["with"], "--few-step", "--seed", 7, "-o", tmp_path / "c.png", "-q")
    assert res.exit_code == 0, res.output
    pipe = opensd.load(folders["with"])
    image = pipe.txt2img("two green triangles", seed=7, **few_step_kwargs(pipe))[0]
    assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), pixels(tmp_path / "c.png"))
    assert few_step_lora(folders["with"]) == folders["with"] / LCM_LORA_FILE
    with pytest.raises(FewStepError, match="has no LCM-LoRA"):
        few_step_kwargs(opensd.load(folders["without"]))
