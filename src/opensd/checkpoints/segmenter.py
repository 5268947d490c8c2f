"""Segmenter files: one safetensors file holding a segmentation U-Net and what its classes are.

The tensors are :class:`opensd.models.segmenter.Segmenter`'s state dict (float16 for the
default model's); the file's metadata holds ``format`` (``opensd-segmenter``), ``version``,
``config`` (the :class:`~opensd.models.segmenter.SegmenterConfig` as JSON) and ``classes``
(a JSON list of class names, class id = position, background first), so a reader needs no
other file and no knowledge of the data the segmenter was trained on. Every failure to read
one is a one-line :class:`SegmenterFileError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opensd.checkpoints.io import CheckpointError, load_strict, read_weights, write_safetensors
from opensd.config import ConfigError, from_dict, to_dict
from opensd.models.segmenter import Segmenter, SegmenterConfig

FORMAT = "opensd-segmenter"
VERSION = "1"
FILE_NAME = "segmenter.safetensors"  # what a model folder holds beside its weights


class SegmenterFileError(CheckpointError):
    """A path holds no segmenter opensd can read; the message says what is wrong."""


def save_segmenter(model: Segmenter, classes: tuple[str, ...], path: str | Path,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (cast to ``dtype`` if given) and its class names to ``path``."""
    classes = tuple(classes)
    if len(classes) != model.cfg.n_classes:
        raise SegmenterFileError(f"{len(classes)} class names for a segmenter of {model.cfg.n_classes} classes")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(to_dict(model.cfg)), "classes": json.dumps(list(classes))}
    path = Path(path)
    write_safetensors(state, path, metadata=meta)
    return path


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # a file that is no safetensors file at all
        raise SegmenterFileError(f"{path} is not a safetensors file ({type(e).__name__})") from None


def load_segmenter(path: str | Path) -> tuple[Segmenter, tuple[str, ...]]:
    """(the segmenter in float32, eval mode, its class names) from a file :func:`save_segmenter` wrote."""
    path = Path(path)
    if not path.is_file():
        raise SegmenterFileError(f"segmenter not found: {path} is not a file")
    if path.suffix.lower() != ".safetensors":
        raise SegmenterFileError(f"{path}: a segmenter is a .safetensors file (opensd train segment writes one)")
    meta = _metadata(path)
    if meta.get("format") != FORMAT:
        raise SegmenterFileError(f"{path} is not a segmenter (its metadata format is {meta.get('format')!r}, "
                                 f"expected {FORMAT!r}); opensd train segment writes one")
    if meta.get("version") != VERSION:
        raise SegmenterFileError(f"{path}: segmenter file version {meta.get('version')!r}; this opensd reads {VERSION!r}")
    try:
        cfg = from_dict(SegmenterConfig, json.loads(meta["config"]), _where=f"{path} config")
        classes = tuple(json.loads(meta["classes"]))
    except (KeyError, ValueError, TypeError) as e:
        raise SegmenterFileError(f"{path}: unreadable segmenter metadata ({type(e).__name__}: {e})") from None
    except ConfigError as e:
        raise SegmenterFileError(f"{path}: {e}") from None
    if len(classes) != cfg.n_classes or not all(isinstance(c, str) and c for c in classes):
        raise SegmenterFileError(f"{path}: its metadata names {len(classes)} classes for {cfg.n_classes} outputs")
    model = Segmenter(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_weights(path).items()}
    load_strict(model, state, str(path))
    return model.eval(), classes


__all__ = ["FILE_NAME", "FORMAT", "SegmenterFileError", "load_segmenter", "save_segmenter"]
