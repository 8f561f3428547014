"""compresscnn: make pretrained CNNs smaller and faster by low-rank factorization.

The public API is re-exported here lazily (importing ``compresscnn`` does not import torch
models or onnx until a name is used, and sets no global state).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it. No submodule may share a public name: importing
#: ``compresscnn.<name>`` binds the submodule on the package and would hide the function.
_EXPORTS = {
    "decompose": "compresscnn.ranks",
    "register_decomposer": "compresscnn.decomposers",
    "get_decomposer": "compresscnn.decomposers",
    "list_decomposers": "compresscnn.decomposers",
    "Decomposer": "compresscnn.decomposers",
    "load_model": "compresscnn.models",
    "count": "compresscnn.counting",
    "compress": "compresscnn.surgery",
    "plan": "compresscnn.surgery",
    "apply": "compresscnn.surgery",
    "factorize": "compresscnn.lowrank",
    "SemiOrthogonal": "compresscnn.lowrank",
    "FrobeniusDecay": "compresscnn.lowrank",
    "StableRankMonitor": "compresscnn.lowrank",
    "stable_rank": "compresscnn.lowrank",
    "dense_kernel": "compresscnn.lowrank",
    "load_recipe": "compresscnn.recipe",
    "rule_model": "compresscnn.recipe",
    "Recipe": "compresscnn.recipe",
    "Target": "compresscnn.config",
    "MethodOptions": "compresscnn.config",
    "run": "compresscnn.pipeline",
    "load_compressed": "compresscnn.pipeline",
    "evaluate": "compresscnn.evaluation",
    "finetune": "compresscnn.training",
    "export_onnx": "compresscnn.export",
    "quantize_onnx": "compresscnn.export",
    "CompressError": "compresscnn.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'compresscnn' has no attribute {name!r}")
