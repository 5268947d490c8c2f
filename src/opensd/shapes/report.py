"""The eval report: a per-category bar plot, a grid of failures with reasons, and markdown."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image

from opensd.shapes.scorer import CATEGORIES
from opensd.shapes.suites import SUITE_CATEGORIES

LABELS = {
    "single_object": "single object",
    "two_objects": "two objects",
    "counting": "counting",
    "colors": "colors",
    "position": "position",
    "color_attr": "color attribution",
    "three_objects": "three objects",
    "count_pair": "count pair",
    "sentence_form": "sentence form",
    "synonym": "synonym",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(results: dict, path: Path) -> None:
    plt = _pyplot()
    cats = [c for c in SUITE_CATEGORIES if c in results["accuracy"]]
    vals = [results["accuracy"][c] for c in cats]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    bars = ax.bar([LABELS.get(c, c) for c in cats] + ["overall"], vals + [results["overall"]],
                  color=["#4c78a8"] * len(cats) + ["#f58518"])
    for b, v in zip(bars, vals + [results["overall"]], strict=False):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    model = results.get("model", {}).get("name", "")
    ax.set_title(f"{model} — {results['config']['suite']} suite, {sum(results['n'].values())} images", fontsize=9)
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def failure_grid(kept: list[tuple[Image.Image, dict]], path: Path, limit: int = 24, cols: int = 6) -> None:
    plt = _pyplot()
    kept = kept[:limit]
    rows = (len(kept) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 2.6), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (im, rec) in zip(axes.flat, kept, strict=False):
        ax.imshow(im.resize((128, 128), Image.Resampling.NEAREST))
        text = "\n".join(textwrap.wrap(rec["prompt"], 28)[:3]) + "\n" + "\n".join(textwrap.wrap("✗ " + rec["reason"], 28)[:3])
        ax.set_title(text, fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_report(results: dict, paths: dict[str, Path]) -> str:
    cfg, model = results["config"], results.get("model", {})
    lines = [
        f"# Eval: {model.get('name', 'model')} on the {cfg['suite']} suite",
        "",
        f"Model `{model.get('path', '?')}` (hash {model.get('hash', '?')}); {cfg['steps']} steps of "
        f"{cfg['sampler']}, CFG {cfg['cfg_scale']}, {cfg['images_per_prompt']} images per prompt, "
        f"{results['prompts']} prompts, {results['seconds']} s.",
        "",
        "| category | accuracy | images |",
        "|---|---|---|",
    ]
    for c in SUITE_CATEGORIES:
        if c in results["accuracy"]:
            lines.append(f"| {LABELS.get(c, c)} | {results['accuracy'][c]:.3f} | {results['n'][c]} |")
    lines.append(f"| **overall** | **{results['overall']:.3f}** | {sum(results['n'].values())} |")
    geneval = results.get("overall_geneval")
    if geneval is not None and len(results["accuracy"]) > sum(c in results["accuracy"] for c in CATEGORIES):
        lines.append(f"| overall of GenEval's six (the classic suite's overall) | {geneval:.3f} | |")
    lines += ["", f"![accuracy per category]({paths['plot'].name})", ""]
    if "failures" in paths:
        lines += ["## Failures (first 24, with the scorer's reason)", "", f"![failures]({paths['failures'].name})", ""]
    if "distribution" in results:
        lines += [
            "## Distribution (against ground-truth renders of the same prompts)",
            "",
            "| features | FD | real-vs-real FD | FD ratio | precision | recall | memorization |",
            "|---|---|---|---|---|---|---|",
        ]
        for net, d in results["distribution"]["nets"].items():
            g, b = d["generated"], d["real_baseline"]
            ratio = "n/a" if d["fd_ratio"] is None else f"{d['fd_ratio']:.2f}"
            lines.append(
                f"| {net} | {g['fd']:.2f} | {b['fd']:.2f} | {ratio} | {g['precision']:.2f} | {g['recall']:.2f} | "
                f"{g.get('memorization', float('nan')):.3f} |"
            )
        lines.append("")
    reasons: dict[str, int] = {}
    for r in results["items"]:
        if not r["correct"]:
            key = r["reason"].split(":")[0].split(";")[0]
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines += ["| failure reason | images |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"
