"""Side-by-side table of several ``opensd eval`` results: the command behind docs/shapes.md's
"CLIP or MiniLM under one U-Net body" tables.

    python scripts/eval_table.py clip=runs/rich-cpu/eval/unet_clip-holdout \
        minilm=runs/rich-cpu/eval/unet_minilm-holdout [--json docs/bench/x.json]

Each ``NAME=FOLDER`` is an ``opensd eval --out`` folder (its ``results.json``). Prints one
Markdown row per category (in the first result's order, then any others), ``overall`` and
GenEval's six; ``--json`` writes the accuracies, each run's model, suite and settings, and the
machine (CPU, its flags, torch) beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def read(spec: str) -> tuple[str, dict]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise SystemExit(f"error: expected NAME=FOLDER, got {spec!r}")
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (an `opensd eval --out` folder holds it)")
    return name, json.loads(path.read_text())


def table(runs: dict[str, dict]) -> str:
    categories: list[str] = []
    for r in runs.values():
        categories += [c for c in r["accuracy"] if c not in categories]
    lines = ["| category | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for c in categories:
        cells = [f"{r['accuracy'][c]:.3f}" if c in r["accuracy"] else "—" for r in runs.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| overall | " + " | ".join(f"{r['overall']:.3f}" for r in runs.values()) + " |")
    lines.append("| GenEval's six | " + " | ".join(f"{r['overall_geneval']:.3f}" for r in runs.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=FOLDER of an `opensd eval --out` folder")
    ap.add_argument("--json", type=Path, help="also write the table and the machine here")
    args = ap.parse_args()
    runs = dict(read(s) for s in args.runs)
    print(table(runs))
    if args.json:
        import torch
        from harness import cpu_flags, cpu_model

        out = {"date": datetime.date.today().isoformat(),
               "machine": {"cpu": cpu_model(), "cpu_flags": [f for f, on in cpu_flags().items() if on],
                           "torch": torch.__version__},
               "runs": {n: {k: r.get(k) for k in ("model", "config", "overall", "overall_geneval", "accuracy", "n",
                                                  "prompts", "seconds")} for n, r in runs.items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
