"""The one place the package calls ``torch.onnx.export``: the dynamo exporter (torch's
default since 2.9) and the legacy TorchScript one, tried in the order the caller gives,
falling back to the other when the first raises. ``compresscnn.io.export`` writes deployment
files dynamo first; ``compresscnn.measure.timing`` writes throw-away timing files TorchScript first
(about 0.1 s per layer against 1 s for dynamo)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "EXPORTERS", "write_onnx", "first_line", "strip_debug_info"]

INPUT_NAME, OUTPUT_NAME = "input", "output"
EXPORTERS = ("dynamo", "torchscript")
log = logging.getLogger(__name__)


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def export_dynamo(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool
) -> None:
    kwargs: dict[str, Any] = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    # The dynamo exporter prints progress lines to stdout; keep the caller's stdout clean.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
            **kwargs,
        )


def export_legacy(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool
) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )



def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
               dynamic_batch: bool, order: Sequence[str] = EXPORTERS) -> tuple[str, str | None]:
    """Write ``model`` traced on ``example`` to ``path`` with the first exporter of ``order``
    that works; returns ``(exporter, why the first one failed or None)``. Raises
    ``RuntimeError`` naming both failures when neither works."""
    run = {"dynamo": export_dynamo, "torchscript": export_legacy}
    first, second = order
    try:
        run[first](model, example, path, opset, dynamic_batch)
        return first, None
    except Exception as exc:  # noqa: BLE001 - any exporter failure -> fallback
        reason = first_line(exc)
    log.warning("%s ONNX export failed (%s); trying the %s exporter", first, reason, second)
    with contextlib.suppress(OSError):
        path.unlink()
    try:
        run[second](model, example, path, opset, dynamic_batch)
    except Exception as exc2:
        raise RuntimeError(
            f"ONNX export of {type(model).__name__} failed with both exporters: "
            f"{first}: {reason}; {second}: {type(exc2).__name__}: {exc2}") from exc2
    return second, reason


def strip_debug_info(path: Path) -> int:
    """Drop from the ONNX file at ``path`` (rewritten in place) what only debugging reads:
    each node's ``metadata_props`` and ``doc_string`` (the dynamo exporter writes the PyTorch
    stack trace and module scope of every node there: 78 kB of a 746 kB int8 SqueezeNet) and
    the graph's ``value_info`` (intermediate shapes, which runtimes infer again). Weights,
    names, the graph and the model's own metadata are kept; tensors stored outside the file
    are left where they are. Returns the bytes saved."""
    import onnx  # heavy: loaded only when used

    before = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    for node in m.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del m.graph.value_info[:]
    onnx.save(m, str(path))
    return before - path.stat().st_size
