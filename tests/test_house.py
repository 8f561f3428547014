"""The house rules the package keeps (ARCHITECTURE.md): no module over 600 lines, no function
over 60 lines of code (docstring, comments and blank lines aside), no public function with
more than 8 parameters (``self``/``cls`` aside): what does not fit is split or takes a
typed config object."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compresscnn"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 600, 60, 8


def _code_lines(src: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = src[fn.lineno - 1:fn.end_lineno]
    doc = 0
    first = fn.body[0] if fn.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        doc = first.end_lineno - first.lineno + 1
    return sum(1 for line in body if line.strip() and not line.strip().startswith("#")) - doc


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
    return n - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)


def house_problems(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        src = text.splitlines()
        name = path.relative_to(root.parent)
        if len(src) > MAX_MODULE_LINES:
            out.append(f"{name}: {len(src)} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if (n := _code_lines(src, node)) > MAX_FUNCTION_LINES:
                out.append(f"{name}:{node.lineno} {node.name}: {n} lines of code")
            if not node.name.startswith("_") and (n := _parameters(node)) > MAX_PARAMETERS:
                out.append(f"{name}:{node.lineno} {node.name}: {n} parameters")
    return out


def test_the_package_keeps_the_house_rules():
    assert house_problems(PACKAGE) == []


def test_the_rules_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    long_body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (pkg / "m.py").write_text(
        f"def f():\n    '''doc'''\n{long_body}\n\n"
        "def g(a, b, c, d, e, f, g, h, i):\n    pass\n\n"
        "def _h(a, b, c, d, e, f, g, h, i):\n    pass\n" + "\n" * 600)
    problems = house_problems(pkg)
    assert len(problems) == 3 and any("f: 62 lines" in p for p in problems)
    assert any("g: 9 parameters" in p for p in problems)
