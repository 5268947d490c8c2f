"""scripts/eval_table.py: the side-by-side table of ``opensd eval`` results that docs/shapes.md prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "eval_table.py"


def _result(folder: Path, accuracy: dict[str, float], geneval: float) -> Path:
    folder.mkdir(parents=True)
    overall = sum(accuracy.values()) / len(accuracy)
    (folder / "results.json").write_text(json.dumps({
        "model": {"path": str(folder)}, "config": {"suite": "holdout"}, "overall": overall,
        "overall_geneval": geneval, "accuracy": accuracy, "n": {k: 100 for k in accuracy}, "prompts": 100,
        "seconds": 1.0}))
    return folder


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_rows_per_category_with_gaps_and_the_json(tmp_path: Path) -> None:
    a = _result(tmp_path / "a", {"counting": 0.5, "colors": 0.25}, 0.375)
    b = _result(tmp_path / "b", {"counting": 0.75, "synonym": 1.0}, 0.75)
    res = _run(f"clip={a}", f"minilm={b}", "--json", str(tmp_path / "out" / "t.json"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "| category | clip | minilm |", "|---|---:|---:|",
        "| counting | 0.500 | 0.750 |", "| colors | 0.250 | — |", "| synonym | — | 1.000 |",
        "| overall | 0.375 | 0.875 |", "| GenEval's six | 0.375 | 0.750 |"]
    out = json.loads((tmp_path / "out" / "t.json").read_text())
    assert out["runs"]["minilm"]["accuracy"] == {"counting": 0.75, "synonym": 1.0}
    assert set(out["machine"]) == {"cpu", "cpu_flags", "torch"}


def test_bad_arguments_say_what_is_expected(tmp_path: Path) -> None:
    res = _run("no-equals-sign")
    assert res.returncode != 0 and "expected NAME=FOLDER" in res.stderr
    res = _run(f"x={tmp_path}")
    assert res.returncode != 0 and "results.json does not exist" in res.stderr
