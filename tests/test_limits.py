"""Hard limits on the size of the code (issue #18, part 6): no source file over 500 lines and no
function over 80, in ``src/``, ``benchmarks/`` and ``scripts/``.

A function's length is its own body: the lines from its ``def`` to its last line, less the
lines of the functions and classes defined inside it, which are measured on their own. So a
CLI ``register(app)`` is the few lines that wire its commands up, and each command it defines
is a function of its own (``cli/generate.py``). Decorators and the blank lines between a
function's statements count with it; comment lines inside it count too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "benchmarks", "scripts")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class Function:
    name: str  # qualified: outer.inner, Class.method
    line: int
    length: int  # its own lines, nested definitions left out


def _span(node: ast.AST) -> int:
    """Lines of a definition, its decorators included."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return node.end_lineno - first + 1


def _nested(node: ast.AST) -> list[ast.AST]:
    """The definitions directly inside ``node`` (not those inside them)."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFS):
            found.append(child)
        else:
            found.extend(_nested(child))
    return found


def functions(source: str) -> list[Function]:
    """Every function of ``source`` (at any depth) with its own length."""
    out: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in _nested(node):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                own = _span(child) - sum(_span(n) for n in _nested(child))
                out.append(Function(name, child.lineno, own))
            visit(child, name + ".")

    visit(ast.parse(source), "")
    return out


def over_limits(path: Path, source: str) -> list[str]:
    """One line per limit ``source`` (the file at ``path``) breaks."""
    problems = []
    lines = len(source.splitlines())
    if lines > MAX_FILE_LINES:
        problems.append(f"{path}: {lines} lines (at most {MAX_FILE_LINES})")
    for f in functions(source):
        if f.length > MAX_FUNCTION_LINES:
            problems.append(f"{path}:{f.line}: {f.name} is {f.length} lines (at most {MAX_FUNCTION_LINES})")
    return problems


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_the_tree_keeps_the_limits() -> None:
    files = source_files()
    assert len(files) > 100  # the scan found the tree
    problems = [p for path in files for p in over_limits(path.relative_to(ROOT), path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


def test_an_over_long_function_is_flagged() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # with its def: one line too many
    problems = over_limits(Path("synthetic.py"), f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert problems == [f"synthetic.py:1: long is {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})"]
    exact = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    assert over_limits(Path("synthetic.py"), f"def fits():\n{exact}\n") == []


def test_a_nested_function_is_measured_on_its_own() -> None:
    inner = "\n".join(f"        y{i} = {i}" for i in range(60))
    outer = "\n".join(f"    x{i} = {i}" for i in range(50))
    source = f"def outer():\n{outer}\n\n    @decorator\n    def inner():\n{inner}\n\n    return inner\n"
    lengths = {f.name: f.length for f in functions(source)}
    assert lengths == {"outer": 1 + 50 + 2 + 1, "outer.inner": 1 + 1 + 60}  # outer: def, body, blanks, return
    long_inner = "\n".join(f"            y{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    method = f"class C:\n    def m(self):\n        def helper():\n{long_inner}\n        return helper\n"
    assert [p.split(": ", 1)[1] for p in over_limits(Path("s.py"), method)] == [
        f"C.m.helper is {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})"
    ]


def test_an_over_long_file_is_flagged() -> None:
    source = "\n".join(f"x{i} = {i}" for i in range(MAX_FILE_LINES + 1)) + "\n"
    assert over_limits(Path("big.py"), source) == [f"big.py: {MAX_FILE_LINES + 1} lines (at most {MAX_FILE_LINES})"]
    assert over_limits(Path("ok.py"), "\n".join(f"x{i} = {i}" for i in range(MAX_FILE_LINES))) == []
