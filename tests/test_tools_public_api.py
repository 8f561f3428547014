"""The scripts of tools/ are thin loops over the user's path: they import the toolkit only
through its public API (``compresscnn``'s ``__all__``), never a submodule, and never load
each other or put the tree on ``sys.path``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import compresscnn

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compresscnn"):
            if node.module != "compresscnn":
                out.append(f"line {node.lineno}: from {node.module} import ...")
            out += [f"line {node.lineno}: {a.name} is not in compresscnn.__all__"
                    for a in node.names if a.name not in compresscnn.__all__]
        elif isinstance(node, ast.Import):
            out += [f"line {node.lineno}: import {a.name}" for a in node.names
                    if a.name.startswith("compresscnn.")]
        elif isinstance(node, ast.Attribute) and node.attr in ("spec_from_file_location",):
            out.append(f"line {node.lineno}: loads a module from a file")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "insert" and isinstance(node.func.value, ast.Attribute)
              and node.func.value.attr == "path"):
            out.append(f"line {node.lineno}: sys.path.insert")
    return out


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_tool_imports_only_the_public_api(path):
    assert _problems(path) == []


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.path.insert(0, '.')\nimport compresscnn.io.data\n"
                   "from compresscnn.core.surgery import compress\nfrom compresscnn import nope\n")
    assert len(_problems(bad)) == 4
