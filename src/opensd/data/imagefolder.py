"""Image-caption folders in the Hugging Face ``imagefolder`` layout.

Writing: PNGs plus one ``metadata.jsonl`` whose lines are
``{"file_name": "00000000.png", "text": "...", ...}`` (extra keys such as the shapes
world's ``scene`` / ``spec`` / ``kind`` ride along), which ``datasets.load_dataset(
"imagefolder", data_dir=...)`` reads as columns.

Reading: a folder with ``metadata.jsonl`` (``file_name`` plus ``text`` or
``caption``; file names relative to the folder), or, without one, images with a
same-named ``.txt`` caption beside each (``cat.png`` + ``cat.txt``, searched
recursively).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from opensd.config import to_dict
from opensd.errors import OpenSDError


class ImageFolderError(OpenSDError):
    """A folder cannot be written or read as an image-caption folder."""


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


def _record(sample: Any, index: int) -> tuple[Image.Image, dict[str, Any]]:
    """(image, metadata extras with "text") from a shapes Sample or an (image, caption) pair."""
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        image, text = sample
        extra: dict[str, Any] = {}
    elif hasattr(sample, "image") and hasattr(sample, "caption"):
        image, text = sample.image, sample.caption
        extra = {k: to_dict(getattr(sample, k)) for k in ("kind", "scene", "spec", "wording") if hasattr(sample, k)}
        extra = {k: v for k, v in extra.items() if v is not None}
    else:
        got = type(sample).__name__
        raise ImageFolderError(f"sample {index} must be a Sample or an (image, caption) pair, got {got}")
    if not isinstance(image, Image.Image):
        raise ImageFolderError(f"sample {index}: image must be a PIL image, got {type(image).__name__}")
    if not isinstance(text, str):
        raise ImageFolderError(f"sample {index}: caption must be a string, got {type(text).__name__}")
    return image, {"text": text, **extra}


def write_imagefolder(samples: Iterable[Any], out_dir: str | Path, overwrite: bool = False) -> int:
    """Write ``samples`` (shapes Samples or (PIL image, caption) pairs) to ``out_dir``; returns the count.

    Files are ``00000000.png``, ``00000001.png``, ... and ``metadata.jsonl``. An
    existing ``metadata.jsonl`` is an error unless ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ImageFolderError(f"{out} exists and is not a folder")
    if (out / METADATA).exists() and not overwrite:
        raise ImageFolderError(
            f"{out / METADATA} already exists; allow overwriting (overwrite=True, --overwrite) or choose another folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageFolderError(f"cannot create {out}: {e.strerror or e}") from None
    n = 0
    try:
        with open(out / METADATA, "w", encoding="utf-8") as meta:
            for i, sample in enumerate(samples):
                image, record = _record(sample, i)
                name = f"{i:08d}.png"
                image.save(out / name)
                meta.write(json.dumps({"file_name": name, **record}) + "\n")
                n += 1
    except OSError as e:
        raise ImageFolderError(f"cannot write to {out}: {e.strerror or e}") from None
    return n


def _from_metadata(root: Path, meta: Path) -> list[tuple[Path, str]]:
    items = []
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImageFolderError(f"{meta}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise ImageFolderError(f"{meta}: line {lineno} has no \"file_name\"")
            text = row.get("text", row.get("caption"))
            if not isinstance(text, str):
                raise ImageFolderError(f"{meta}: line {lineno} needs a string \"text\" or \"caption\"")
            path = root / row["file_name"]
            if not path.is_file():
                raise ImageFolderError(f"{meta}: line {lineno} names {row['file_name']!r}, which does not exist")
            items.append((path, text))
    return items


def _from_txt(root: Path, skip: Callable[[Path], bool] | None = None) -> list[tuple[Path, str]]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not (skip is not None and skip(p)))
    if not images:
        raise ImageFolderError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no {METADATA}")
    items = []
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise ImageFolderError(f"{p} has no caption: expected {txt.name} beside it or a {METADATA}")
        items.append((p, txt.read_text(encoding="utf-8").strip()))
    return items


def list_imagefolder(folder: str | Path, skip: Callable[[Path], bool] | None = None) -> list[tuple[Path, str]]:
    """``(image path, caption)`` of each image of an image-caption folder (see module doc),
    checked as :func:`read_imagefolder` checks them. ``skip``: without ``metadata.jsonl``,
    images that are not items (a ControlNet folder's control images) and need no caption."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageFolderError(f"{root} is not a folder" if root.exists() else f"{root} does not exist")
    meta = root / METADATA
    items = _from_metadata(root, meta) if meta.is_file() else _from_txt(root, skip)
    if not items:
        raise ImageFolderError(f"{meta} lists no images")
    return items


def read_imagefolder(folder: str | Path) -> Iterator[tuple[Image.Image, str]]:
    """Yield ``(RGB PIL image, caption)`` from an image-caption folder (see module doc).

    The folder's listing and captions are checked before the first item is yielded:
    a missing folder, no images, a malformed ``metadata.jsonl`` line (its number is
    named) or an image without a caption raise :class:`ImageFolderError`.
    """
    items = list_imagefolder(folder)

    def gen() -> Iterator[tuple[Image.Image, str]]:
        for path, text in items:
            with Image.open(path) as im:
                yield im.convert("RGB"), text

    return gen()
