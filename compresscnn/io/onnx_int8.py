"""The one place the package calls onnxruntime's static quantizer: a QDQ int8 copy of an ONNX
file (weights QInt8, per output channel by default; activations QUInt8, their min-max ranges
measured on the inputs given). :func:`compresscnn.io.export.quantize_onnx_static` writes
deployment files with it, :func:`compresscnn.measure.timing.int8_bytes` throw-away timing
files, so that what is timed is what is shipped.

Before quantizing, an ``Identity`` node that only renames an initializer is replaced by a copy
of that initializer (:func:`inline_initializer_identities`). The TorchScript exporter writes
such nodes where two parameters are equal (the zero biases of BatchNorms folded at their
initial values, in every randomly initialised torchvision model); the quantizer then takes the
bias for an activation, leaves the conv in float and wraps it in Quantize/Dequantize pairs: a
ResNet-18 timed that way ran 3.7x slower than the int8 file it stands for."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = ["inline_initializer_identities", "quantize_qdq", "quiet_quantizer"]


def inline_initializer_identities(model: Any) -> int:
    """Replace, in the ``onnx.ModelProto`` ``model`` (changed in place), every top-level
    ``Identity`` node whose input is an initializer (or the output of such a node) by a copy of
    that initializer under the node's output name. Returns how many were replaced."""
    import onnx  # heavy: loaded only when used

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep, copies = [], []
    for node in graph.node:
        if (node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits
                and node.output[0] not in outputs):
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            inits[t.name] = t
            copies.append(t)
        else:
            keep.append(node)
    if copies:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(copies)
    return len(copies)


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger: only its errors pass while
    the block runs; the level is restored."""
    qlog = logging.getLogger()
    old = qlog.level
    qlog.setLevel(max(old, logging.ERROR))
    try:
        yield
    finally:
        qlog.setLevel(old)


def quantize_qdq(src: str | Path, dst: str | Path, inputs: Iterable[np.ndarray], *,
                 per_channel: bool = True) -> None:
    """Write the static int8 QDQ copy of the ONNX file ``src`` to ``dst`` (not atomically:
    the callers write a temporary path), its activation ranges calibrated on ``inputs``
    (arrays for the graph's one input). onnxruntime's quantizer warns through the root
    logger; those warnings are silenced while it runs."""
    import onnx  # heavy: loaded only when used
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    model = onnx.load(str(src))
    name = model.graph.input[0].name
    feed = iter(inputs)

    class _Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, Any] | None:
            x = next(feed, None)
            return None if x is None else {name: x}

    with tempfile.TemporaryDirectory(prefix="compresscnn-q-") as d:
        if inline_initializer_identities(model):
            src = Path(d) / "inlined.onnx"
            onnx.save(model, str(src))
        with quiet_quantizer():
            quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8)
