"""The rooms of docs/architecture.md: which package may import which (lazy imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "opensd"
LIBRARY = {"models", "diffusion", "pipelines", "checkpoints", "prompts", "tokenizers",
           "config", "errors", "defaults", "devices", "kernels", "kernel_routes", "conv_kernels", "attention_kernels", "upsample_kernels",
           "precision"}
AROUND = {"training", "serving", "cli", "explain", "shapes", "eval"}


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports() -> dict[Path, set[str]]:
    """Each module of the package -> the opensd rooms it imports (anywhere in it)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rooms = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            rooms.update(n.split(".")[1] for n in names if n.startswith("opensd."))
        out[path] = rooms
    return out


def test_the_rooms_import_only_what_lies_below_them() -> None:
    imports = _imports()
    assert len(imports) > 100 and {_room(p) for p in imports} >= LIBRARY | AROUND
    forbidden = {room: AROUND for room in LIBRARY}
    forbidden |= {"eval": AROUND - {"eval"}, "explain": AROUND - {"explain"},
                  "serving": AROUND - {"serving", "explain"}, "training": {"serving", "cli", "explain"}}
    broken = sorted(f"{p.relative_to(PACKAGE)} imports {r}" for p, rooms in imports.items()
                    for r in rooms & forbidden.get(_room(p), set()) - {_room(p)})
    assert not broken, broken


def test_only_the_command_line_and_the_source_selection_name_the_shapes_world() -> None:
    naming = sorted(str(p.relative_to(PACKAGE)) for p, rooms in _imports().items()
                    if "shapes" in rooms and _room(p) not in ("shapes", "cli"))
    assert naming == ["training/sources.py"], naming
