"""``opensd explain --segmenter``: the segmenter's shape maps beside the shape words' attention, the
numbers per shape word, the model folder's segmenter found by default, bad files refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_word_bundle
from PIL import Image
from typer import Typer
from typer.testing import CliRunner

from opensd.checkpoints import LoadedModel
from opensd.checkpoints.segmenter import FILE_NAME, save_segmenter
from opensd.explain import ExplainError, attention_maps, compare_with_attention, explain, save_explanation
from opensd.explain.segmentation import _agreement, find_segmenter, load_for_explain
from opensd.models.segmenter import Segmenter, SegmenterConfig
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

SIZE = 32
CLASSES = ("background", "circle", "square", "triangle")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    model, tok = tiny_word_bundle(seed=2)
    return StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("."), "opensd", "0" * 10))


@pytest.fixture(scope="module")
def segmenter() -> tuple[Segmenter, tuple[str, ...]]:
    torch.manual_seed(3)
    return Segmenter(SegmenterConfig.tiny()).eval(), CLASSES


def test_agreement_numbers_on_hand_made_maps() -> None:
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:4, 2:4] = True
    on = torch.zeros(8, 8)
    on[2:4, 2:4] = 1.0
    a = _agreement("circle", "circle", on, region)
    assert (a.inside, a.iou, a.area) == (1.0, 1.0, 4 / 64)
    off = torch.zeros(8, 8)
    off[6:8, 6:8] = 1.0
    b = _agreement("circle", "circle", off, region)
    assert (b.inside, b.iou) == (0.0, 0.0)
    half = on + off
    c = _agreement("circle", "circle", half, region)
    assert c.inside == 0.5 and c.iou == pytest.approx(4 / 8)
    none = _agreement("circle", "circle", on, torch.zeros(8, 8, dtype=torch.bool))
    assert (none.inside, none.area, none.iou) == (0.0, 0.0, 0.0)  # the segmenter saw no circle


def test_explain_with_a_segmenter_renders_and_its_numbers_lie_in_0_1(pipe, segmenter, tmp_path: Path) -> None:
    ex = explain(pipe, "a red circle above two squares", seed=3, steps=2, sampler="euler", width=SIZE, height=SIZE,
                 noise_steps=1, segmenter=segmenter)
    view = ex.segmentation
    assert view is not None and view.probabilities.shape == (4, SIZE, SIZE)
    torch.testing.assert_close(view.probabilities.sum(0), torch.ones(SIZE, SIZE))
    assert [(a.word, a.shape) for a in view.agreements] == [("circle", "circle"), ("squares", "square")]
    for a in view.agreements:
        assert all(0.0 <= v <= 1.0 for v in (a.inside, a.area, a.iou)), a
    files = save_explanation(ex, tmp_path / "out", panel=48)
    with Image.open(files["segmentation"]) as im:
        assert im.width > 4 * 160 and im.height > 2 * 160  # 4 columns (image + 3 shapes), 2 rows
    summary = json.loads(files["segmentation_json"].read_text())
    assert summary["classes"] == list(CLASSES) and [w["word"] for w in summary["words"]] == ["circle", "squares"]
    plain = explain(pipe, "a red circle", seed=3, steps=1, sampler="euler", width=SIZE, height=SIZE, noise_steps=1)
    assert plain.segmentation is None and "segmentation" not in save_explanation(plain, tmp_path / "plain", panel=48)


def test_the_segmenter_must_fit(pipe, segmenter, tmp_path: Path) -> None:
    attn = attention_maps(pipe, "a circle", seed=1, steps=1, sampler="euler", width=SIZE, height=SIZE)
    gray = Segmenter(SegmenterConfig(in_channels=1, model_channels=16, channel_mult=(1, 1), norm_groups=4))
    with pytest.raises(ExplainError, match="reads 1-channel images"):
        compare_with_attention(attn, gray, CLASSES)
    with pytest.raises(ExplainError, match="background and at least one class"):
        compare_with_attention(attn, segmenter[0], CLASSES[:2])
    path = save_segmenter(gray, CLASSES, tmp_path / "gray.safetensors")
    with pytest.raises(ExplainError, match="RGB"):
        load_for_explain(path)
    with pytest.raises(ExplainError, match="no such file"):
        find_segmenter(str(tmp_path / "missing.safetensors"), None)
    assert find_segmenter("none", tmp_path) is None and find_segmenter("auto", tmp_path) is None


def test_cli_shows_the_segmenter_and_refuses_bad_files_in_one_line(pipe, segmenter, tmp_path: Path) -> None:
    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.cli.explain import register

    app = Typer()
    register(app)
    model_dir = save_opensd(pipe.model, pipe.tokenizer, tmp_path / "m")
    seg_file = save_segmenter(segmenter[0], CLASSES, tmp_path / "seg.safetensors", dtype=torch.float16)
    common = ["--steps", "1", "--sampler", "euler", "--noise-steps", "1", "-m", str(model_dir), "-q"]
    runner = CliRunner()
    res = runner.invoke(app, ["explain", "a triangle", *common, "--segmenter", str(seg_file), "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "segmentation.png").is_file() and "inside the segmenter's triangle" in res.output
    res = runner.invoke(app, ["explain", "a triangle", *common, "-o", str(tmp_path / "b")])  # auto, and none there
    assert res.exit_code == 0 and not (tmp_path / "b" / "segmentation.png").exists()
    shutil.copy(seg_file, model_dir / FILE_NAME)  # the model folder's segmenter, found by default
    res = runner.invoke(app, ["explain", "a triangle", *common, "-o", str(tmp_path / "c")])
    assert res.exit_code == 0 and (tmp_path / "c" / "segmentation.png").is_file()
    res = runner.invoke(app, ["explain", "a triangle", *common, "--segmenter", "none", "-o", str(tmp_path / "d")])
    assert res.exit_code == 0 and not (tmp_path / "d" / "segmentation.png").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    for bad, expected in ((tmp_path / "missing.safetensors", "no such file"), (tmp_path / "junk.safetensors", "not a safetensors"),
                          (tmp_path / "weights.safetensors", "is not a segmenter")):
        res = runner.invoke(app, ["explain", "a triangle", *common, "--segmenter", str(bad), "-o", str(tmp_path / "x")])
        assert res.exit_code == 2 and expected in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
