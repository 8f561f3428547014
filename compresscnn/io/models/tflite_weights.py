"""Weights from a TensorFlow Lite model file (``.tflite``) for the same network in PyTorch.

``model: {spec: "torchvision:mobilenet_v2", weights: mobilenet_v2_1.0_224_quant.tflite}``
gives torchvision's ``mobilenet_v2`` with the TFLite file's weights (TF-slim's and Keras'
MobileNetV2 1.0, float or quantized) and the file's own preprocessing:

* **Layers**: the file's ``CONV_2D`` / ``DEPTHWISE_CONV_2D`` / ``FULLY_CONNECTED`` operators
  are paired, in execution order, with the model's ``Conv2d`` / ``Linear`` layers (a
  ``torch.fx`` trace); every pair must agree on kernel shape, groups, stride, dilation and
  the activation after it (the operator's fused activation against the ``ReLU6`` / ``ReLU``
  after the layer and its BatchNorm), the file's residual ``ADD`` count must equal the
  model's additions, and the file holds no operator that computes anything else. A file of
  another network is a one-line :class:`~compresscnn.errors.CheckpointError` naming the
  first difference.
* **Weights**: quantized tensors (uint8 or int8, per tensor or per channel) are dequantized,
  ``scale * (q - zero_point)``; the file's BatchNorm is already folded into each layer's
  weights and bias, so the BatchNorm after a layer becomes the identity plus the folded bias
  (``weight`` 1, ``running_mean`` 0, ``running_var`` ``1 - eps``). Re-estimating these
  BatchNorm statistics (``calibration.bn_recalibrate``) would therefore undo the fold.
* **Padding**: TF's ``SAME`` pads a stride-2 layer asymmetrically (nothing before, one row
  and column after, on even sizes), which a symmetric ``Conv2d.padding`` cannot express.
  Such a layer becomes ``nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)),
  Conv2d(padding=0))`` (so ``features.0.0.weight`` is ``features.0.0.1.weight``): plain
  modules that decomposition, counting, folding and ONNX export see as usual. The padding is
  computed for the file's input size (224 x 224 for MobileNetV2 1.0 224) and is exact at
  every input size whose feature maps are even where a stride-2 layer reads them.
* **Head**: a file with one class more than the model (TF's 1001 ImageNet classes, index 0
  "background") loses that first class; the 1000 others are ImageNet-1k's in the usual
  sorted-wnid order.
* **Input**: the input tensor's quantization says what the model expects: a pixel ``q`` in
  0..255 means ``scale * (q - zero_point)``, i.e. ``(x - mean) / std`` on ``x = q / 255``
  with ``mean = zero_point / 255`` and ``std = 1 / (255 * scale)`` (``[-1, 1]`` for
  MobileNet); a float input is taken to expect ``[-1, 1]``, TF's MobileNet convention.

The file is parsed with the ``tflite`` package (the flatbuffer schema; ``pip install
'compresscnn[tflite]'``); nothing here runs the TFLite interpreter.
"""

from __future__ import annotations

import math
import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from compresscnn.errors import CheckpointError, ModelError

__all__ = ["TFLiteGraph", "TFLiteLayer", "read_tflite", "load_tflite", "tf_same_padding",
           "is_tflite_path"]

TFLITE_SUFFIX = ".tflite"

# operators that compute a layer (paired with Conv2d / Linear) ...
_LAYER_OPS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise",
              "FULLY_CONNECTED": "fully_connected"}
# ... and those that only move, pool, add or re-quantize values
_PLAIN_OPS = {"ADD", "AVERAGE_POOL_2D", "MEAN", "RESHAPE", "SQUEEZE", "SOFTMAX", "QUANTIZE",
              "DEQUANTIZE"}
_ACTIVATIONS = {0: "none", 1: "relu", 2: "relu_n1_to_1", 3: "relu6", 4: "tanh",
                5: "sign_bit", 6: "sigmoid"}
_PADDINGS = {0: "SAME", 1: "VALID"}
# tflite TensorType -> numpy dtype (the types weights and biases come in)
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16,
           9: np.int8}


def is_tflite_path(weights: str | os.PathLike[str] | None) -> bool:
    """Whether ``weights`` names a ``.tflite`` file (by its suffix)."""
    return weights is not None and str(weights).lower().endswith(TFLITE_SUFFIX)


@dataclass
class TFLiteLayer:
    """One layer operator of the file, its weights in PyTorch's layout (float32)."""

    index: int            # operator index in the subgraph
    name: str             # the weight tensor's name (for messages)
    kind: str             # "conv", "depthwise" or "fully_connected"
    weight: torch.Tensor  # OIHW (depthwise: C*m, 1, kh, kw); fully connected: (out, in)
    bias: torch.Tensor | None
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    activation: str = "none"


@dataclass
class TFLiteGraph:
    """What :func:`read_tflite` reads of a file."""

    path: Path
    layers: list[TFLiteLayer]
    ops: Counter = field(default_factory=Counter)
    input_shape: tuple[int, ...] = ()           # NHWC
    input_quant: tuple[float, float] | None = None  # (scale, zero_point) of the input
    num_outputs: int = 0


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"TFLite file {path}: {what}")


def _import_tflite() -> Any:
    try:
        import tflite  # optional extra: only .tflite weights need it
    except ImportError:
        raise ModelError("reading .tflite weights needs the 'tflite' package: "
                         "pip install 'compresscnn[tflite]'") from None
    return tflite


def _opname(tflite: Any, code: Any) -> str:
    builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
    try:
        return str(tflite.opcode2name(builtin))
    except ValueError:
        return f"CUSTOM({(code.CustomCode() or b'?').decode(errors='replace')})"


def _tensor_array(tflite: Any, model: Any, graph: Any, idx: int, producers: dict[int, Any],
                  path: Path) -> np.ndarray:
    """Tensor ``idx`` of the subgraph as float32, dequantized; a tensor computed at run time
    from a constant by a ``DEQUANTIZE`` (float16 or dynamic-range weights) is followed."""
    t = graph.Tensors(idx)
    name = (t.Name() or b"?").decode(errors="replace")
    buf = model.Buffers(t.Buffer())
    if buf is None or buf.DataLength() == 0:
        if hasattr(buf, "Offset") and buf is not None and buf.Offset() > 1:
            raise _fail(path, f"tensor {name!r} is stored outside the flatbuffer "
                        "(files over 2 GB are not supported)")
        prod = producers.get(idx)
        if prod is not None and prod[0] == "DEQUANTIZE":
            return _tensor_array(tflite, model, graph, int(prod[1].Inputs(0)), producers, path)
        raise _fail(path, f"tensor {name!r} has no constant data (weights computed at run "
                    "time are not supported)")
    ttype = int(t.Type())
    if ttype not in _DTYPES:
        raise _fail(path, f"tensor {name!r} has an unsupported type (TensorType {ttype})")
    shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    raw = buf.DataAsNumpy().tobytes()
    dtype = np.dtype(_DTYPES[ttype])
    if len(raw) != dtype.itemsize * math.prod(shape):
        raise _fail(path, f"tensor {name!r} holds {len(raw)} bytes, not the "
                    f"{dtype.itemsize * math.prod(shape)} of its shape {list(shape)}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    q = t.Quantization()
    if q is not None and q.ScaleLength() > 0 and np.issubdtype(dtype, np.integer):
        scale = q.ScaleAsNumpy().astype(np.float64)
        zero = (q.ZeroPointAsNumpy().astype(np.float64) if q.ZeroPointLength()
                else np.zeros_like(scale))
        axis = int(q.QuantizedDimension())
        if scale.size > 1:
            if axis >= arr.ndim or arr.shape[axis] != scale.size or zero.size != scale.size:
                raise _fail(path, f"tensor {name!r}: {scale.size} quantization scales for "
                            f"dimension {axis} of shape {list(shape)}")
            bshape = [1] * arr.ndim
            bshape[axis] = scale.size
            scale, zero = scale.reshape(bshape), zero.reshape(bshape)
        arr = (arr.astype(np.float64) - zero) * scale
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise _fail(path, f"tensor {name!r} holds non-finite values")
    return out


def _options(tflite: Any, op: Any, cls: Any) -> Any:
    table = op.BuiltinOptions()
    if table is None:
        return None
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    return opts


def read_tflite(path: str | os.PathLike[str]) -> TFLiteGraph:
    """Read the layers of a ``.tflite`` file (one subgraph) in execution order, weights
    dequantized to float32 in PyTorch's layout. A missing, truncated, corrupt or
    unsupported file is a one-line :class:`CheckpointError` naming it."""
    tflite = _import_tflite()
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"TFLite file not found: {p}" if not p.exists()
                              else f"TFLite file is not a file: {p}")
    data = p.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise _fail(p, "not a TensorFlow Lite model (no 'TFL3' flatbuffer identifier)")
    try:
        return _read(tflite, p, data)
    except CheckpointError:
        raise
    except Exception as exc:  # flatbuffers reads past the end of a truncated/corrupt file
        kind = type(exc).__name__
        mod = type(exc).__module__
        kind = kind if mod in ("builtins", None) else f"{mod}.{kind}"
        raise _fail(p, f"truncated or corrupt ({kind} while reading it)") from None


#: per layer kind: (TFLite options class, expected weight rank, how to reach PyTorch's layout)
_LAYOUTS = {
    "conv": ("Conv2DOptions", 4, lambda w: w.permute(0, 3, 1, 2)),          # OHWI -> OIHW
    "depthwise": ("DepthwiseConv2DOptions", 4, lambda w: w.permute(3, 0, 1, 2)),  # 1HW(C*m)
    "fully_connected": ("FullyConnectedOptions", 2, lambda w: w),
}


def _layer(tflite: Any, model: Any, g: Any, i: int, name: str, op: Any,
           producers: dict[int, Any], p: Path) -> TFLiteLayer:
    """One CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op as a layer in PyTorch's layout."""
    kind = _LAYER_OPS[name]
    w_idx = int(op.Inputs(1))
    w = _tensor_array(tflite, model, g, w_idx, producers, p)
    # TF joins the names of the ops it fused with ';': the first is the layer's own
    wname = (g.Tensors(w_idx).Name() or b"?").decode(errors="replace").split(";")[0]
    b_idx = int(op.Inputs(2)) if op.InputsLength() > 2 else -1
    b = torch.from_numpy(_tensor_array(tflite, model, g, b_idx, producers, p)) \
        if b_idx >= 0 else None
    options, ndim, layout = _LAYOUTS[kind]
    if w.ndim != ndim or (kind == "depthwise" and w.shape[0] != 1):
        raise _fail(p, f"{name} weights {wname!r} have shape {list(w.shape)}")
    layer = TFLiteLayer(index=i, name=wname, kind=kind, bias=b,
                        weight=layout(torch.from_numpy(w)).contiguous())
    o = _options(tflite, op, getattr(tflite, options))
    if o is not None:
        layer.activation = _ACTIVATIONS.get(int(o.FusedActivationFunction()), "other")
        if kind != "fully_connected":
            layer.stride = (int(o.StrideH()), int(o.StrideW()))
            layer.dilation = (int(o.DilationHFactor()) or 1, int(o.DilationWFactor()) or 1)
            layer.padding = _PADDINGS.get(int(o.Padding()), "other")
    return layer


def _input_quant(g: Any) -> tuple[float, float] | None:
    q = g.Tensors(int(g.Inputs(0))).Quantization()
    if q is None or q.ScaleLength() != 1:
        return None
    return (float(q.ScaleAsNumpy()[0]),
            float(q.ZeroPointAsNumpy()[0]) if q.ZeroPointLength() else 0.0)


def _read(tflite: Any, p: Path, data: bytes) -> TFLiteGraph:
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() != 1:
        raise _fail(p, f"{model.SubgraphsLength()} subgraphs (one is supported)")
    g = model.Subgraphs(0)
    names = [_opname(tflite, model.OperatorCodes(i)) for i in range(model.OperatorCodesLength())]
    ops = [(names[g.Operators(i).OpcodeIndex()], g.Operators(i))
           for i in range(g.OperatorsLength())]
    producers: dict[int, Any] = {}
    for name, op in ops:
        for j in range(op.OutputsLength()):
            producers[int(op.Outputs(j))] = (name, op)
    other = sorted({n for n, _ in ops} - set(_LAYER_OPS) - _PLAIN_OPS)
    if other:
        raise _fail(p, f"operator(s) {', '.join(other)} not supported (a network of "
                    f"{', '.join(sorted(_LAYER_OPS))}, residual ADDs and pooling is)")
    layers = [_layer(tflite, model, g, i, name, op, producers, p)
              for i, (name, op) in enumerate(ops) if name in _LAYER_OPS]
    if not layers:
        raise _fail(p, "holds no convolution or fully connected layer")
    inp, out = g.Tensors(int(g.Inputs(0))), g.Tensors(int(g.Outputs(0)))
    return TFLiteGraph(path=p, layers=layers, ops=Counter(n for n, _ in ops),
                       input_shape=tuple(int(s) for s in inp.ShapeAsNumpy()),
                       input_quant=_input_quant(g), num_outputs=int(out.ShapeAsNumpy()[-1]))


# --------------------------------------------------------------------------------------
# the PyTorch side


@dataclass
class _Site:
    """A Conv2d / Linear of the model, where it runs and what follows it."""

    name: str
    module: nn.Module
    in_hw: tuple[int, int] | None
    bn: str | None        # the BatchNorm2d that alone consumes its output
    activation: str       # "none", "relu" or "relu6" after it (and its BatchNorm)


_ADDS = {operator.add, operator.iadd, torch.add}


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _sites(model: nn.Module, input_size: tuple[int, int, int], spec: str
           ) -> tuple[list[_Site], int]:
    """The model's Conv2d/Linear layers in execution order (a torch.fx trace, shapes from
    one forward pass at ``input_size``) and its number of tensor additions."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise ModelError(f"{spec}: cannot trace the model to pair it with TFLite layers "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    mods = dict(gm.named_modules())
    with torch.no_grad():
        was = model.training
        gm.eval()
        ShapeProp(gm).propagate(torch.zeros(1, *input_size))
        model.train(was)
    sites: list[_Site] = []
    adds = 0
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target in _ADDS) or \
                (node.op == "call_method" and node.target in ("add", "add_")):
            if all(isinstance(a, fx.Node) for a in node.args[:2]):
                adds += 1
        if node.op != "call_module":
            continue
        mod = mods[str(node.target)]
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        meta = node.args[0].meta.get("tensor_meta") if node.args else None
        in_hw = tuple(int(s) for s in meta.shape[-2:]) if meta is not None else None
        bn, act, cur = None, "none", _single_user(node)
        if cur is not None and cur.op == "call_module" and \
                isinstance(mods[str(cur.target)], nn.BatchNorm2d):
            bn, cur = str(cur.target), _single_user(cur)
        if cur is not None and cur.op == "call_module":
            m = mods[str(cur.target)]
            act = "relu6" if isinstance(m, nn.ReLU6) else "relu" if isinstance(m, nn.ReLU) \
                else "none"
        sites.append(_Site(str(node.target), mod, in_hw, bn, act))  # type: ignore[arg-type]
    return sites, adds


def _same_pad(in_hw: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """TF 'SAME' padding (left, right, top, bottom) of ``conv`` on an ``in_hw`` input."""
    pads = []
    for size, k, s, d in zip(in_hw, conv.kernel_size, conv.stride, conv.dilation):
        eff = (k - 1) * d + 1
        total = max((math.ceil(size / s) - 1) * s + eff - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _pad_conv(model: nn.Module, site: _Site) -> nn.Conv2d:
    """Give ``site``'s conv TF 'SAME' padding at its input size; returns the conv (moved
    into ``Sequential(ZeroPad2d, conv)`` where the padding is asymmetric)."""
    conv = site.module
    assert isinstance(conv, nn.Conv2d) and site.in_hw is not None
    left, right, top, bottom = _same_pad(site.in_hw, conv)
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (None, None)
    if (top, bottom, left, right) == (ph, ph, pw, pw):
        return conv
    if conv.padding_mode != "zeros":
        raise ModelError(f"{site.name}: padding_mode {conv.padding_mode!r} cannot take TF "
                         "'SAME' zero padding")
    conv.padding = (0, 0)
    conv._reversed_padding_repeated_twice = [0, 0, 0, 0]
    parent, _, child = site.name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    new = nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
    if isinstance(holder, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        holder[int(child)] = new
    else:
        setattr(holder, child, new)
    return conv


def tf_same_padding(model: nn.Module, input_size: tuple[int, int, int], *,
                    spec: str = "") -> list[str]:
    """Give every Conv2d of ``model`` TF's 'SAME' padding at ``input_size`` (C, H, W), the
    architecture :func:`load_tflite` builds (without reading any file: how a compressed run
    is rebuilt). Returns the names of the convs that got a ``ZeroPad2d`` in front."""
    sites, _ = _sites(model, input_size, spec or type(model).__name__)
    padded = []
    for s in sites:
        if isinstance(s.module, nn.Conv2d) and s.in_hw is not None:
            before = s.module.padding
            _pad_conv(model, s)
            if s.module.padding != before:
                padded.append(s.name)
    return padded


def _check_pair(t: TFLiteLayer, s: _Site, graph: TFLiteGraph, spec: str,
                n_classes: int) -> None:
    where = f"TFLite file {graph.path} does not match {spec}: operator {t.index} ({t.name!r})"
    m = s.module
    if isinstance(m, nn.Linear):
        shape = tuple(t.weight.shape[:1]) + (int(t.weight[0].numel()),)
        if t.kind == "depthwise" or (t.kind == "conv" and tuple(t.weight.shape[2:]) != (1, 1)):
            raise CheckpointError(f"{where} is a {t.kind} layer where the model has the Linear "
                                  f"{s.name}")
        want = (m.out_features, m.in_features)
        if shape != want and not (shape == (want[0] + 1, want[1]) and n_classes == want[0]):
            raise CheckpointError(f"{where} has weights {list(t.weight.shape)} where the "
                                  f"Linear {s.name} has {list(want)}")
    else:
        assert isinstance(m, nn.Conv2d)
        depthwise = m.groups > 1 and m.groups == m.in_channels
        if t.kind == "fully_connected" or (t.kind == "depthwise") != depthwise or \
                (not depthwise and m.groups != 1):
            raise CheckpointError(f"{where} is a {t.kind} layer where the model has "
                                  f"{s.name} (Conv2d, groups={m.groups})")
        if tuple(t.weight.shape) != tuple(m.weight.shape):
            raise CheckpointError(f"{where} has weights {list(t.weight.shape)} (OIHW) where "
                                  f"{s.name} has {list(m.weight.shape)}")
        if t.stride != tuple(m.stride) or t.dilation != tuple(m.dilation):
            raise CheckpointError(f"{where} has stride {list(t.stride)}, dilation "
                                  f"{list(t.dilation)} where {s.name} has {list(m.stride)}, "
                                  f"{list(m.dilation)}")
        if t.padding != "SAME" and (s.in_hw is None or any(_same_pad(s.in_hw, m))):
            raise CheckpointError(f"{where} has {t.padding} padding (only TF 'SAME' is "
                                  "reproduced)")
    if t.activation != s.activation:
        raise CheckpointError(f"{where} is followed by activation {t.activation!r} where "
                              f"{s.name} is followed by {s.activation!r}")


def _match(model: nn.Module, graph: TFLiteGraph, spec: str,
           input_size: tuple[int, int, int]) -> tuple[list[_Site], int]:
    """The model's layer sites, paired one to one with the file's layers (or a one-line
    error), and the model's number of classes."""
    try:
        sites, adds = _sites(model, input_size, spec)
    except RuntimeError as exc:  # the model cannot take the file's input
        raise CheckpointError(f"TFLite file {graph.path} does not match {spec}: its input "
                              f"{list(graph.input_shape)} (NHWC) does not fit the model "
                              f"({str(exc).splitlines()[0][:120]})") from None
    if len(sites) != len(graph.layers):
        raise CheckpointError(
            f"TFLite file {graph.path} does not match {spec}: {len(graph.layers)} "
            f"convolution/fully connected layers in the file, {len(sites)} Conv2d/Linear in "
            "the model")
    if graph.ops["ADD"] != adds:
        raise CheckpointError(f"TFLite file {graph.path} does not match {spec}: "
                              f"{graph.ops['ADD']} residual ADDs in the file, {adds} in the model")
    head = sites[-1].module
    n_model = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    for t, s in zip(graph.layers, sites):
        _check_pair(t, s, graph, spec, n_model)
    return sites, n_model


@torch.no_grad()
def _copy(model: nn.Module, t: TFLiteLayer, s: _Site, weight: torch.Tensor,
          bias: torch.Tensor | None, where: str) -> None:
    """The file's kernel into the layer; its bias into the BatchNorm after it (made an
    identity), else into the layer's bias; a bias with nowhere to go is an error."""
    m = s.module
    m.weight.copy_(weight)
    if s.bn is not None:
        bn = model.get_submodule(s.bn)
        assert isinstance(bn, nn.BatchNorm2d)
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias if bias is not None else torch.zeros_like(bn.bias))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        if m.bias is not None:
            m.bias.zero_()
    elif m.bias is not None:
        m.bias.copy_(bias if bias is not None else torch.zeros_like(m.bias))
    elif bias is not None and bool(bias.abs().max() > 0):
        raise CheckpointError(f"{where}: operator {t.index} has a bias where {s.name} has "
                              "neither a bias nor a BatchNorm after it")


def _normalisation(graph: TFLiteGraph, channels: int) -> tuple[tuple, tuple]:
    """Mean and std (on [0, 1] inputs) that reproduce the file's input quantization."""
    if graph.input_quant is None:  # float input: TF's MobileNet convention, [-1, 1]
        return (0.5,) * channels, (0.5,) * channels
    scale, zero = graph.input_quant
    return (zero / 255.0,) * channels, (1.0 / (255.0 * scale),) * channels


def load_tflite(model: nn.Module, path: str | os.PathLike[str], *, spec: str = ""
                ) -> dict[str, Any]:
    """Load the ``.tflite`` file at ``path`` into ``model`` (in place; see the module
    docstring), returning what the file says of its preprocessing: ``input_size``,
    ``mean``, ``std`` and ``num_classes``, plus ``tflite`` (the classes dropped, the convs
    padded). Every mismatch is a one-line :class:`CheckpointError` naming the file."""
    spec = spec or type(model).__name__
    graph = read_tflite(path)
    if len(graph.input_shape) != 4:
        raise _fail(graph.path, f"input of shape {list(graph.input_shape)} (NHWC expected)")
    _, h, w, c = graph.input_shape
    input_size = (int(c), int(h), int(w))
    sites, n_model = _match(model, graph, spec, input_size)
    dropped, padded = 0, []
    for t, s in zip(graph.layers, sites):
        weight, bias = t.weight, t.bias
        m = s.module
        if isinstance(m, nn.Linear):
            weight = weight.reshape(weight.shape[0], -1)
            if weight.shape[0] == m.out_features + 1:  # TF's class 0, "background"
                weight, bias = weight[1:], None if bias is None else bias[1:]
                dropped = 1
        else:
            before = m.padding
            _pad_conv(model, s)
            if m.padding != before:
                padded.append(s.name)
        _copy(model, t, s, weight, bias, f"TFLite file {graph.path} does not match {spec}")
    mean, std = _normalisation(graph, input_size[0])
    return {"input_size": input_size, "mean": mean, "std": std, "num_classes": n_model,
            "tflite": {"background_dropped": bool(dropped), "padded": padded,
                       "layers": len(sites)}}
