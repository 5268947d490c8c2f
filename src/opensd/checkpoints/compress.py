"""A model folder made smaller: 8-bit weights and, for a BERT-conditioned model, a pruned
vocabulary; written as a new opensd folder beside the original, which is never touched.

Both steps are storage only. The 8-bit weights (:mod:`opensd.checkpoints.int8`) load back as
floats rounded to a step of 1/127 of each row's largest weight; the pruned vocabulary
(:mod:`opensd.checkpoints.vocab_prune`) gives bit-identical text embeddings for every text
its kept tokens spell. What either costs in image quality is for a suite to say
(``opensd eval`` on both folders).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from opensd.checkpoints import detect_format, load_model, main_weights_file
from opensd.checkpoints.io import CheckpointError
from opensd.checkpoints.opensd_format import CONFIG, WEIGHTS, save_opensd
from opensd.checkpoints.vocab_prune import prune_vocabulary
from opensd.tokenizers.wordpiece import WordPieceTokenizer

OWN_ENTRIES = frozenset({CONFIG, WEIGHTS, "tokenizer"})  # what save_opensd writes; the rest of a folder is copied


@dataclass(frozen=True)
class CompressReport:
    """What :func:`compress` wrote: sizes in bytes, the vocabulary before and after (None
    when not pruned), and the other files of the source folder copied beside the model."""

    out: Path
    weights_before: int
    weights_after: int
    vocab_before: int | None
    vocab_after: int | None
    copied: tuple[str, ...]

    def render(self) -> str:
        lines = [f"wrote {self.out}",
                 f"  weights: {self.weights_before / 1e6:.1f} MB -> {self.weights_after / 1e6:.1f} MB"]
        if self.vocab_after is not None:
            lines.append(f"  vocabulary: {self.vocab_before} -> {self.vocab_after} tokens")
        if self.copied:
            lines.append(f"  copied unchanged: {', '.join(self.copied)}")
        total = sum(f.stat().st_size for f in self.out.rglob("*") if f.is_file())
        lines.append(f"  folder: {total / 1e6:.1f} MB")
        return "\n".join(lines)


def read_keep_texts(paths: Sequence[Path]) -> list[str]:
    """The texts whose tokens a pruned vocabulary keeps: each line of a text file, or the
    ``text`` of each line of an imagefolder ``metadata.jsonl`` (the training captions)."""
    texts: list[str] = []
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"keep-text file not found: {p}")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CheckpointError(f"{p} is not UTF-8 text") from None
        if p.suffix.lower() != ".jsonl":
            texts.extend(lines)
            continue
        for n, line in enumerate(lines, 1):
            try:
                text = json.loads(line).get("text") if line.strip() else ""
            except (json.JSONDecodeError, AttributeError):
                raise CheckpointError(f"{p}: line {n} is not a JSON object") from None
            if not isinstance(text, str):
                raise CheckpointError(f"{p}: line {n} has no \"text\" string (an imagefolder metadata.jsonl has one per line)")
            texts.append(text)
    return texts


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise CheckpointError(f"the output {out} must be a new folder outside the model {src}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"the output {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"the output folder {out} is not empty; pass --overwrite to write into it")


def _copy_sidecars(src: Path, out: Path) -> list[str]:
    """Copy what ``src`` holds besides the model itself into ``out``; the names copied."""
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.name in OWN_ENTRIES:
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, out / entry.name)
        copied.append(entry.name)
    return copied


def compress(src: str | Path, out: str | Path, int8_weights: bool = True, vocab: int | None = None,
             keep_texts: Sequence[str] = (), overwrite: bool = False) -> CompressReport:
    """Write the model at ``src`` (any format :func:`~opensd.checkpoints.load_model` reads) as an
    opensd folder ``out``: float16, or with ``int8_weights`` the U-Net's and text encoders' large
    weights in 8 bits; with ``vocab``, a BERT encoder's vocabulary pruned to its first ``vocab``
    ids plus every character and every token of ``keep_texts``. An opensd source folder's other
    files (a LoRA, a tiny decoder, a model card...) are copied unchanged."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if keep_texts and vocab is None:
        raise CheckpointError("--keep-text names the tokens a pruned vocabulary keeps; give --vocab N too")
    _check_paths(src, out, overwrite)
    fmt = detect_format(src)
    loaded = load_model(src)
    model, tok = loaded.model, loaded.tokenizer
    before = main_weights_file(src, fmt).stat().st_size
    vocab_before = vocab_after = None
    if vocab is not None:
        if not isinstance(tok, WordPieceTokenizer):
            raise CheckpointError(f"--vocab prunes a BERT text encoder's WordPiece vocabulary; {src}'s tokenizer is "
                                  f"{type(tok).__name__}")
        vocab_before = tok.vocab_size
        model, tok = prune_vocabulary(model, tok, vocab, keep_texts)
        vocab_after = tok.vocab_size
    try:
        save_opensd(model, tok, out, dtype=torch.float16, int8_weights=int8_weights)
        copied = _copy_sidecars(src, out) if fmt == "opensd" else []
    except OSError as e:  # a full disk, a read-only folder: the source is untouched either way
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    return CompressReport(out, before, (out / WEIGHTS).stat().st_size, vocab_before, vocab_after, tuple(copied))
