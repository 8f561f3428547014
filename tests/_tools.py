"""Load a script of tools/ (not a package) as a module, for the tests of the benchmarks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:  # the scripts import each other, as when run from tools/
    sys.path.insert(0, str(TOOLS))


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a fresh module named ``_<name>``."""
    spec = importlib.util.spec_from_file_location(f"_{name}", TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
