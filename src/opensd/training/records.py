"""What a run writes for people to read: its log, its loss plot and its sample grids.

Run folder (beside ``config.json`` and ``checkpoints/``)::

    log.jsonl                 one JSON object per line: {"step", "kind": "train"|"eval"|"resume", ...}
    loss.png                  training losses and evaluation metrics against step
    samples/step_XXXXXXXX.png the stage's sample grids

Every file is written to a temporary name and renamed, so a killed run leaves whole files
(``log.jsonl`` is appended to; a torn last line is skipped by :func:`read_log`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from opensd.errors import OpenSDError

LOG = "log.jsonl"
PLOT = "loss.png"
SAMPLES = "samples"


def save_grid(images: Sequence[Image.Image], path: Path, cols: int, min_tile: int = 64) -> Path:
    """Paste equally sized images into a grid of ``cols`` columns; written atomically as PNG.

    Tiles smaller than ``min_tile`` px are enlarged by an integer factor (nearest
    neighbour, so every pixel stays visible as it is)."""
    if not images:
        raise OpenSDError("save_grid needs at least one image")
    w, h = images[0].size
    k = max(1, min_tile // max(w, h))
    if k > 1:
        images = [im.resize((im.size[0] * k, im.size[1] * k), Image.Resampling.NEAREST) for im in images]
        w, h = w * k, h * k
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (a torn last line from a killed run is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_log(log_path: Path, png_path: Path) -> Path | None:
    """Plot training losses (log scale) and eval metrics (fractions, then the rest) against step."""
    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    loss_keys = sorted({k for r in train for k in r if "loss" in k})
    eval_keys = sorted({k for r in evals for k in r if k not in ("step", "kind", "time", "eval_seconds")
                        and isinstance(r[k], (int, float))})
    fractions = [k for k in eval_keys if all(0 <= v <= 1 for _, v in series(evals, k))]
    others = [k for k in eval_keys if k not in fractions]
    panels = [("training loss", train, loss_keys, "-")]
    panels += [("evaluation (fractions)", evals, fractions, "o-")] if fractions else []
    panels += [("evaluation", evals, others, "o-")] if others else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, keys, style) in zip(axes[0], panels, strict=False):
        for k in keys:
            pts = series(rows, k)
            if pts:
                ax.plot(*zip(*pts, strict=False), style, label=k, markersize=3)
        if title == "training loss" and all(v > 0 for k in keys for _, v in series(rows, k)):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path

