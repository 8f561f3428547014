"""Load a script of tools/ (not a package) as a module, for the tests of the benchmarks; a
tiny CIFAR-10-layout archive for the tests that run on data."""

from __future__ import annotations

import importlib.util
import io
import sys
import zipfile
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


def write_fake_cifar(path: Path, per_class: int = 2) -> Path:
    """A zip of random 32x32 PNGs in CIFAR-10's layout (``train/<class>/i.png`` and
    ``test/<class>/i.png``, ``per_class`` of each), seeded: the same images every time."""
    import torch
    from PIL import Image

    from compresscnn.io.data import CIFAR10_CLASSES

    g = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "test"):
            for c in CIFAR10_CLASSES:
                for i in range(per_class):
                    arr = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
                    b = io.BytesIO()
                    Image.fromarray(arr.numpy()).save(b, "PNG")
                    z.writestr(f"{split}/{c}/{i}.png", b.getvalue())
    return path
