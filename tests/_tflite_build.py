"""Write small TensorFlow Lite files for tests, with the ``tflite`` package's flatbuffer
builders (the schema TFLite itself writes), so the reader is tested on files whose every
number the test knows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

tflite = __import__("pytest").importorskip("tflite")
import flatbuffers  # noqa: E402  (installed with tflite)

_TYPES = {np.dtype(np.float32): 0, np.dtype(np.int32): 2, np.dtype(np.uint8): 3,
          np.dtype(np.int8): 9}


@dataclass
class T:
    """A tensor: shape, numpy dtype, constant data (None: an activation) and quantization
    (scale, zero point: scalars or one per channel along ``axis``)."""

    name: str
    shape: tuple[int, ...]
    dtype: Any = np.float32
    data: np.ndarray | None = None
    scale: Any = None
    zero: Any = None
    axis: int = 0


@dataclass
class Op:
    """An operator: builtin name, tensor indices and its options."""

    name: str
    inputs: list[int]
    outputs: list[int]
    opts: dict[str, Any] = field(default_factory=dict)


def _vec(b: flatbuffers.Builder, start: Any, values: list[Any], prepend: str) -> int:
    start(b, len(values))
    for v in reversed(values):
        getattr(b, prepend)(v)
    return b.EndVector()


def build(tensors: list[T], ops: list[Op], inputs: list[int], outputs: list[int]) -> bytes:
    """The bytes of a one-subgraph ``.tflite`` file."""
    b = flatbuffers.Builder(1024)
    # buffers: 0 is the empty sentinel, then one per tensor
    buf_offsets = []
    for t in [None, *tensors]:
        data_off = None
        if t is not None and t.data is not None:
            raw = np.ascontiguousarray(t.data, dtype=t.dtype).tobytes()
            data_off = b.CreateByteVector(raw)
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        buf_offsets.append(tflite.BufferEnd(b))
    t_offsets = []
    for i, t in enumerate(tensors):
        name = b.CreateString(t.name)
        shape = _vec(b, tflite.TensorStartShapeVector, list(t.shape), "PrependInt32")
        q = None
        if t.scale is not None:
            scale = np.atleast_1d(np.asarray(t.scale, np.float32)).tolist()
            zero = np.atleast_1d(np.asarray(t.zero if t.zero is not None else 0,
                                            np.int64)).tolist()
            zero = zero * len(scale) if len(zero) == 1 < len(scale) else zero
            sv = _vec(b, tflite.QuantizationParametersStartScaleVector, scale, "PrependFloat32")
            zv = _vec(b, tflite.QuantizationParametersStartZeroPointVector, zero, "PrependInt64")
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, sv)
            tflite.QuantizationParametersAddZeroPoint(b, zv)
            tflite.QuantizationParametersAddQuantizedDimension(b, t.axis)
            q = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, _TYPES[np.dtype(t.dtype)])
        tflite.TensorAddBuffer(b, i + 1 if t.data is not None else 0)
        tflite.TensorAddName(b, name)
        if q is not None:
            tflite.TensorAddQuantization(b, q)
        t_offsets.append(tflite.TensorEnd(b))
    names = sorted({op.name for op in ops})
    code_offsets = []
    for n in names:
        code = getattr(tflite.BuiltinOperator, n)
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        code_offsets.append(tflite.OperatorCodeEnd(b))
    op_offsets = []
    for op in ops:
        opts_type, opts_off = 0, None
        if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            conv = op.name == "CONV_2D"
            pre = "Conv2DOptions" if conv else "DepthwiseConv2DOptions"
            getattr(tflite, pre + "Start")(b)
            getattr(tflite, pre + "AddPadding")(b, 1 if op.opts.get("padding") == "VALID" else 0)
            getattr(tflite, pre + "AddStrideH")(b, op.opts.get("stride", 1))
            getattr(tflite, pre + "AddStrideW")(b, op.opts.get("stride", 1))
            getattr(tflite, pre + "AddFusedActivationFunction")(b, op.opts.get("act", 0))
            if not conv:
                tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, 1)
            opts_off = getattr(tflite, pre + "End")(b)
            opts_type = 1 if conv else 2
        elif op.name == "FULLY_CONNECTED":
            tflite.FullyConnectedOptionsStart(b)
            tflite.FullyConnectedOptionsAddFusedActivationFunction(b, op.opts.get("act", 0))
            opts_off = tflite.FullyConnectedOptionsEnd(b)
            opts_type = 8
        ins = _vec(b, tflite.OperatorStartInputsVector, op.inputs, "PrependInt32")
        outs = _vec(b, tflite.OperatorStartOutputsVector, op.outputs, "PrependInt32")
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, names.index(op.name))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if opts_off is not None:
            tflite.OperatorAddBuiltinOptionsType(b, opts_type)
            tflite.OperatorAddBuiltinOptions(b, opts_off)
        op_offsets.append(tflite.OperatorEnd(b))
    tv = _vec(b, tflite.SubGraphStartTensorsVector, t_offsets, "PrependUOffsetTRelative")
    iv = _vec(b, tflite.SubGraphStartInputsVector, inputs, "PrependInt32")
    ov = _vec(b, tflite.SubGraphStartOutputsVector, outputs, "PrependInt32")
    opv = _vec(b, tflite.SubGraphStartOperatorsVector, op_offsets, "PrependUOffsetTRelative")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tv)
    tflite.SubGraphAddInputs(b, iv)
    tflite.SubGraphAddOutputs(b, ov)
    tflite.SubGraphAddOperators(b, opv)
    sg = tflite.SubGraphEnd(b)
    sgv = _vec(b, tflite.ModelStartSubgraphsVector, [sg], "PrependUOffsetTRelative")
    cv = _vec(b, tflite.ModelStartOperatorCodesVector, code_offsets, "PrependUOffsetTRelative")
    bv = _vec(b, tflite.ModelStartBuffersVector, buf_offsets, "PrependUOffsetTRelative")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, cv)
    tflite.ModelAddSubgraphs(b, sgv)
    tflite.ModelAddBuffers(b, bv)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())
