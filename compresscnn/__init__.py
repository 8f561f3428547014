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
    "decompose": "compresscnn.core.ranks",
    "register_decomposer": "compresscnn.core.decomposers",
    "get_decomposer": "compresscnn.core.decomposers",
    "list_decomposers": "compresscnn.core.decomposers",
    "Decomposer": "compresscnn.core.decomposers",
    "load_model": "compresscnn.io.models",
    "count": "compresscnn.measure.counting",
    "trace_layers": "compresscnn.measure.counting",
    "make_loaders": "compresscnn.io.data",
    "calibration_batches": "compresscnn.io.data",
    "evaluate_predictions": "compresscnn.measure.evaluation",
    "agreement_margins": "compresscnn.measure.evaluation",
    "recalibrate_bn": "compresscnn.fit.calibration",
    "factorized_layers": "compresscnn.train.scratch",
    "verify_onnx": "compresscnn.io.export",
    "cpu_bf16_native": "compresscnn.util.common",
    "LatencyConfig": "compresscnn.measure.latency_config",
    "time_modules": "compresscnn.measure.latency",
    "example_input": "compresscnn.util.modules",
    "onnx_bytes": "compresscnn.measure.timing",
    "compress": "compresscnn.core.surgery",
    "plan": "compresscnn.core.planning",
    "apply": "compresscnn.core.applying",
    "factorize": "compresscnn.train.scratch",
    "SemiOrthogonal": "compresscnn.train.scratch",
    "FrobeniusDecay": "compresscnn.train.scratch",
    "StableRankMonitor": "compresscnn.train.cuttlefish",
    "stable_rank": "compresscnn.train.cuttlefish",
    "dense_kernel": "compresscnn.train.scratch",
    "load_recipe": "compresscnn.recipe.schema",
    "rule_model": "compresscnn.core.rules",
    "Recipe": "compresscnn.recipe.schema",
    "load_sweep": "compresscnn.recipe.sweep",
    "run_sweep": "compresscnn.runs.sweep",
    "Target": "compresscnn.core.rules",
    "MethodOptions": "compresscnn.config",
    "run": "compresscnn.runs.pipeline",
    "load_compressed": "compresscnn.runs.loading",
    "evaluate": "compresscnn.measure.evaluation",
    "finetune": "compresscnn.train.loop",
    "TrainRun": "compresscnn.train.loop",
    "TrainConfig": "compresscnn.train.config",
    "export_onnx": "compresscnn.io.export",
    "quantize_onnx": "compresscnn.io.export",
    "CompressError": "compresscnn.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'compresscnn' has no attribute {name!r}")
