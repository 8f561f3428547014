"""ONNX export, checked twice: by ``onnx.checker`` and against PyTorch in onnxruntime (and
in OpenVINO and OpenCV DNN on request).

Why the checks: an exporter that succeeds is not proof that the graph computes the same
function (a mis-exported padding mode or a silently specialised batch size both export
fine), nor that another runtime's graph rewrites keep it. So every export is run in
onnxruntime's CPU provider, and in each runtime of ``verify``, on random inputs at several
batch sizes (including one other than the export example's, to prove the batch dimension is
really dynamic) and compared with the PyTorch model in float32.

What is exported is a copy of the model with BatchNorm and Fire's channel reorder folded
into convs (:mod:`compresscnn.core.folding`: fewer nodes, and none of the Concat/Gather patterns
a runtime may rewrite wrongly); the checks compare the file with the model as given.

The file is written atomically: the exporter writes a temporary file beside the target, all
checks run on that file, and only then is it renamed onto ``path``. A failed export or check
leaves nothing at ``path`` (and no stray temporary file).

The exporter is ``torch.onnx.export(..., dynamo=True)`` (the default since torch 2.9); if it
fails (an op it cannot trace) the legacy TorchScript exporter is tried and the result records
which one produced the file and why the first failed.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from compresscnn.errors import CompressError
from compresscnn.core.folding import fold_for_export
from compresscnn.io.export_config import OnnxSettings, onnx_settings
from compresscnn.util.modules import eval_mode, example_input
from compresscnn.io.onnx_int8 import quantize_qdq, quiet_quantizer
from compresscnn.io.onnx_writer import (strip_debug_info, first_line as _first_line,
                                        write_onnx)
from compresscnn.util.common import atomic_path
from compresscnn.util.progress import doing

__all__ = ["export_onnx", "onnx_parity", "verify_onnx", "check_runtimes",
           "quantize_onnx", "quantize_onnx_dynamic", "quantize_onnx_static", "int8_parity",
           "OnnxModule", "QuantizeError", "RUNTIMES"]




def _cpu_float_model(model: nn.Module) -> nn.Module:
    """The model on CPU in float32, copied only when it is not already there (the caller's
    model is never moved or cast)."""
    tensors = list(model.parameters()) + list(model.buffers())
    needs_copy = any(
        t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32)
        for t in tensors
    )
    if not needs_copy:
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_outputs(v)]
    raise TypeError(f"cannot compare model output of type {type(out).__name__}")


#: runtimes :func:`verify_onnx` can run an exported file in, and the package each needs
RUNTIMES = {"onnxruntime": "onnxruntime", "openvino": "openvino",
            "opencv": "opencv-python-headless"}
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "opencv": "cv2"}

Runner = Callable[[np.ndarray], list]


def _onnxruntime_runner(path: Path) -> Runner:
    import onnxruntime as ort  # heavy: loaded only when used

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def _openvino_runner(path: Path) -> Runner:
    import openvino as ov  # optional: loaded only when used

    # f32 throughout: on CPUs with bf16 units OpenVINO otherwise computes in bf16
    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return lambda x: [v for v in compiled(x).values()]


def _opencv_runner(path: Path) -> Runner:
    import cv2  # optional: loaded only when used

    net = cv2.dnn.readNetFromONNX(str(path))
    names = list(net.getUnconnectedOutLayersNames())

    def run(x: np.ndarray) -> list:
        net.setInput(x)
        return list(net.forward(names))
    return run


_RUNNERS: dict[str, Callable[[Path], Runner]] = {
    "onnxruntime": _onnxruntime_runner, "openvino": _openvino_runner,
    "opencv": _opencv_runner}


def check_runtimes(runtimes: Sequence[str]) -> None:
    """Raise a one-line :class:`CompressError` for a runtime that is not one of
    :data:`RUNTIMES` or whose package is not installed."""
    for rt in runtimes:
        if rt not in RUNTIMES:
            raise CompressError(f"export.verify: unknown runtime {rt!r} "
                                f"(known: {', '.join(RUNTIMES)})")
        if importlib.util.find_spec(_MODULES[rt]) is None:
            raise CompressError(f"export.verify: {rt} needs the package {RUNTIMES[rt]!r}, "
                                f"which is not installed (pip install "
                                f"'compresscnn[runtimes]')")


def _runner(runtime: str, path: Path) -> Runner:
    """A function that runs ``path`` in ``runtime`` on one input array."""
    check_runtimes([runtime])
    try:
        return _RUNNERS[runtime](path)
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own error types
        raise RuntimeError(f"{runtime} cannot load {path.name}: {_first_line(exc)}") from exc


def _parity(model: nn.Module, run: Runner, label: str, input_shape: Sequence[int],
            batches: Sequence[int], seed: int) -> dict[int, tuple[float, float, float, float]]:
    """Per batch size: (max |runtime - PyTorch|, sum of squared differences, sum of squared
    PyTorch outputs, max |PyTorch output|) over all outputs, on ``randn`` inputs."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, tuple[float, float, float, float]] = {}
    for b in batches:
        x = torch.randn((int(b), *input_shape), generator=gen, dtype=torch.float32)
        with torch.inference_mode():
            ref = _flatten_outputs(model(x))
        got = run(x.numpy())
        if len(got) != len(ref):
            raise RuntimeError(f"ONNX model {label} has {len(got)} outputs, PyTorch model "
                               f"{len(ref)}")
        worst, num, den, peak = 0.0, 0.0, 0.0, 0.0
        for r, g in zip(ref, got):
            g_t = torch.from_numpy(np.asarray(g))
            if tuple(g_t.shape) != tuple(r.shape):
                raise RuntimeError(f"ONNX output shape {tuple(g_t.shape)} != PyTorch "
                                   f"{tuple(r.shape)} at batch {b} ({label})")
            d = (g_t.double() - r.double()).abs()
            # NaN anywhere is a failure, not a silent 0 from max()
            if d.numel():
                worst = max(worst, float("inf") if torch.isnan(d).any() else float(d.max()))
            num += float(d.square().sum())
            den += float(r.double().square().sum())
            if r.numel():
                peak = max(peak, float(r.double().abs().max()))
        out[int(b)] = (worst, num, den, peak)
    return out


def onnx_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 3),
    *,
    seed: int = 0,
    runtime: str = "onnxruntime",
) -> dict[int, float]:
    """Max |runtime − PyTorch| over all outputs, per batch size, on ``randn`` inputs.

    ``model`` must already be in eval mode on CPU in float32.
    """
    run = _runner(runtime, Path(onnx_path))
    res = _parity(model, run, f"{onnx_path} in {runtime}", input_shape, batches, seed)
    return {b: v[0] for b, v in res.items()}


def verify_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    input_shape: Sequence[int],
    runtimes: Sequence[str] = tuple(RUNTIMES),
    batches: Sequence[int] = (1, 3),
    *,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run ``onnx_path`` in each of ``runtimes`` (CPU, float32) on the same ``randn`` inputs
    as ``model`` (eval mode, CPU, float32) and compare.

    Returns ``{runtime: {"max_abs_diff", "rel_l2" (||runtime - PyTorch|| / ||PyTorch||
    over all outputs and batches), "max_abs_output" (the largest |PyTorch output|), "diffs"
    (max abs diff per batch size)}}``. A runtime whose
    package is missing is a :class:`CompressError`; one that cannot load or run the file
    raises ``RuntimeError``. Nothing is compared against a tolerance here.
    """
    path = Path(onnx_path)
    out: dict[str, dict[str, Any]] = {}
    for rt in dict.fromkeys(runtimes):
        run = _runner(rt, path)
        try:
            res = _parity(model, run, f"{path.name} in {rt}", input_shape, batches, seed)
        except Exception as exc:  # noqa: BLE001 - a runtime that fails on the file
            raise RuntimeError(f"{rt} cannot run {path.name}: {_first_line(exc)}") from exc
        num, den = sum(v[1] for v in res.values()), sum(v[2] for v in res.values())
        out[rt] = {"max_abs_diff": max(v[0] for v in res.values()),
                   "rel_l2": (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else
                                                                   float("inf")),
                   "max_abs_output": max(v[3] for v in res.values()),
                   "diffs": {str(b): v[0] for b, v in res.items()}}
    return out


def _onnx_target(path: str | os.PathLike) -> Path:
    """``path`` as the file to write: a folder, or a path under a file, is a
    :class:`CompressError` naming it (not an error about a hidden temporary file)."""
    p = Path(path)
    if p.is_dir():
        raise CompressError(f"export_onnx: {p} is a folder; give the path of the .onnx file "
                            f"to write, e.g. {p / 'model.onnx'}")
    probe = p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CompressError(f"export_onnx: cannot write {p}: {probe} is a file, not a folder")
    return p


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...],
                settings: OnnxSettings | dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model`` to one self-contained ``.onnx`` file at ``path`` and verify it.

    ``settings`` (:class:`~compresscnn.io.export_config.OnnxSettings`, or a mapping of its
    keys: ``opset``, ``dynamic_batch``, ``atol``, ``check_batch``, ``seed``, ``verify``,
    ``fold``, ``strip``; None: the defaults) says how. ``input_shape`` is the per-sample shape
    ``(C, H, W)``; the batch dimension is prepended (dynamic when ``dynamic_batch``, else
    fixed to ``check_batch[0]``). The exported graph has
    one input named ``"input"`` and one output ``"output"``.

    With ``fold`` the file is exported from a copy of the model whose BatchNorms are
    folded into the convs that produce their input (:mod:`compresscnn.core.folding`), also
    through the channel Concat/Gather of a Fire module; every check compares the file with
    ``model`` itself. The file is run in onnxruntime and in each runtime of ``verify``
    (:data:`RUNTIMES`).

    Returns ``{"path", "bytes", "max_abs_diff" and "diffs" (onnxruntime's, per check batch),
    "verify" ({runtime: {"max_abs_diff", "rel_l2", "diffs"}}), "folded" (how many of each),
    "opset", "exporter" ("dynamo" or "torchscript"), "fallback_reason" (or None),
    "dynamic_batch", "input_shape", "atol"}``.

    Raises ``RuntimeError`` (an internal failure, not a user error) when both exporters fail,
    or when a runtime disagrees with PyTorch by more than ``atol`` times the outputs' scale
    (:func:`parity_limit`); a runtime in ``verify``
    whose package is missing is a :class:`CompressError`. ``path`` is then left as it was.
    """
    s = onnx_settings(settings)
    path = _onnx_target(path)
    input_shape = tuple(int(x) for x in input_shape)
    opset, dynamic_batch, atol, seed = s.opset, s.dynamic_batch, s.atol, s.seed
    check_batch = tuple(s.check_batch) if dynamic_batch else (s.check_batch[0],)
    runtimes = list(dict.fromkeys(["onnxruntime", *s.verify]))
    check_runtimes(runtimes)
    cpu_model = _cpu_float_model(model)
    with eval_mode(cpu_model):
        folded, done = (fold_for_export(cpu_model) if s.fold
                        else (cpu_model, {"batchnorms": [], "gathers": []}))
        # A batch of 2 as the example: torch.export specialises sizes 0 and 1, so an example
        # of batch 1 could not carry a dynamic batch dimension.
        ex_batch = 2 if dynamic_batch else check_batch[0]
        example = example_input(input_shape, ex_batch, seed)
        with atomic_path(path, suffix=".onnx") as tmp:
            doing("writing the file (the dynamo exporter; TorchScript if it fails)")
            exporter, fallback_reason = write_onnx(folded, example, tmp, opset, dynamic_batch)
            if s.strip:
                strip_debug_info(tmp)
            doing(f"checking the {exporter} file in {', '.join(runtimes)} at batch "
                  f"{', '.join(map(str, check_batch))}")
            checked = _check_file(cpu_model, tmp, input_shape, runtimes, check_batch,
                                  seed=seed + 1, atol=atol,
                                  what=f"{path}", how=f"exporter {exporter}, opset {opset}")
            actual_opset = _default_opset(tmp)
        nbytes = path.stat().st_size
    return {
        "path": str(path),
        "bytes": int(nbytes),
        "max_abs_diff": float(checked["onnxruntime"]["max_abs_diff"]),
        "diffs": dict(checked["onnxruntime"]["diffs"]),
        "verify": checked,
        "folded": {k: len(v) for k, v in done.items()},
        "opset": int(actual_opset if actual_opset is not None else opset),
        "exporter": exporter,
        "fallback_reason": fallback_reason,
        "dynamic_batch": bool(dynamic_batch),
        "input_shape": list(input_shape),
        "atol": float(atol),
    }


def _check_file(model: nn.Module, file: Path, input_shape: tuple[int, ...],
                runtimes: Sequence[str], check_batch: Sequence[int], *, seed: int,
                atol: float, what: str, how: str) -> dict[str, dict[str, Any]]:
    """One self-contained file that ``onnx.checker`` accepts and that every runtime runs
    within ``atol`` of ``model``; returns :func:`verify_onnx`'s result. ``what``/``how``
    (the final path, the exporter and opset) go into the parity message."""
    import onnx  # heavy: loaded only when used

    stray = _external_data_files(file)
    if stray:
        raise RuntimeError(f"ONNX export wrote external data files {stray}; expected one file")
    onnx.checker.check_model(str(file), full_check=True)
    checked = verify_onnx(model, file, input_shape, runtimes, check_batch, seed=seed)
    for rt, res in checked.items():
        limit = parity_limit(atol, res["max_abs_output"])
        if not res["max_abs_diff"] <= limit:  # also catches NaN/inf
            raise RuntimeError(
                f"ONNX parity check failed for {what}: max |{rt} - torch| = "
                f"{res['max_abs_diff']:.3g} > {limit:.3g} (atol {atol:g} x output scale "
                f"{max(1.0, res['max_abs_output']):.3g}; per batch: {res['diffs']}; {how})")
    return checked


def parity_limit(atol: float, max_abs_output: float) -> float:
    """The largest |runtime - PyTorch| an export may show: ``atol`` for outputs within
    [-1, 1], else ``atol`` times the largest |output| (float32 rounding in a runtime that
    orders its sums differently grows with the values' magnitude: the logits of an untrained
    deep ResNet reach hundreds). A NaN output scale makes the limit NaN, which no difference
    meets."""
    return float(atol) * max(1.0, float(max_abs_output)) if max_abs_output == max_abs_output \
        else float("nan")


def _default_opset(path: Path) -> int | None:
    import onnx  # heavy: loaded only when used

    m = onnx.load(str(path), load_external_data=False)
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _external_data_files(path: Path) -> list[str]:
    """Locations of tensors stored outside ``path`` (should be none)."""
    import onnx  # heavy: loaded only when used
    from onnx.external_data_helper import uses_external_data  # heavy: loaded only when used

    m = onnx.load(str(path), load_external_data=False)
    locs = set()
    for init in m.graph.initializer:
        if uses_external_data(init):
            for kv in init.external_data:
                if kv.key == "location":
                    locs.add(kv.value)
    return sorted(locs)


def quantize_onnx_dynamic(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    op_types: Sequence[str] | None = None,
    per_channel: bool = False,
) -> int:
    """Dynamic int8 quantization (weights QInt8, activations quantized at run time) of ``src``
    into ``dst``, written atomically. Returns the size of ``dst`` in bytes.

    ``op_types`` restricts the quantized ops (onnxruntime's default: all it supports, which
    includes Conv → ConvInteger and MatMul/Gemm → MatMulInteger). The result is loaded once in
    onnxruntime to prove it runs. Accuracy is not checked here: evaluate the quantized model.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # heavy: loaded only when used

    def quantize(tmp: Path) -> None:
        with quiet_quantizer():  # quantize_qdq (the static path) silences itself
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=per_channel,
                             op_types_to_quantize=list(op_types) if op_types is not None
                             else None)

    return _quantize_to(dst, quantize)


def _quantize_to(dst: str | os.PathLike, quantize: Callable[[Path], Any]) -> int:
    """Run ``quantize(tmp)`` (an onnxruntime.quantization call writing ``tmp``, its warnings
    silenced by :func:`~compresscnn.io.onnx_int8.quiet_quantizer`), check that the result
    loads in onnxruntime, and move it to ``dst`` atomically; its size in bytes."""
    import onnxruntime as ort  # heavy: loaded only when used

    dst = Path(dst)
    with atomic_path(dst, suffix=".onnx") as tmp:
        quantize(tmp)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    return int(dst.stat().st_size)


def quantize_onnx_static(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    batches: Sequence[torch.Tensor],
    *,
    per_channel: bool = True,
) -> int:
    """Static int8 quantization of ``src`` into ``dst`` in onnxruntime's QDQ format: weights
    QInt8 (per output channel by default), activations QUInt8 with ranges calibrated (min-max)
    on ``batches`` of inputs, e.g. a few hundred training images. Written atomically; loaded
    once in onnxruntime to prove it runs. Returns the size of ``dst`` in bytes."""
    if not batches:
        raise QuantizeError("int8 calibration needs at least one batch of inputs")
    arrays = (x.detach().cpu().float().numpy() for x in batches)
    return _quantize_to(dst, lambda tmp: quantize_qdq(src, tmp, arrays, per_channel=per_channel))


class QuantizeError(CompressError):
    """An int8 file that cannot be made as asked (no calibration images), or that differs
    from its fp32 source by more than the stated bound."""


def int8_parity(fp32: str | os.PathLike, int8: str | os.PathLike,
                batches: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The int8 file against its fp32 source, both in onnxruntime, on ``batches``:
    ``{"images", "rel_error" (||int8 - fp32|| / ||fp32|| over all outputs), "agreement" (%
    of images whose top-1 class is the same in both), "max_abs_diff"}``."""
    a, b = OnnxModule(fp32), OnnxModule(int8)
    num = den = 0.0
    same = n = 0
    worst = 0.0
    for x in batches:
        ya, yb = a(x).double(), b(x).double()
        d = yb - ya
        num += float(d.square().sum())
        den += float(ya.square().sum())
        worst = max(worst, float(d.abs().max()) if d.numel() else 0.0)
        if ya.dim() == 2:
            same += int((ya.argmax(1) == yb.argmax(1)).sum())
        n += int(ya.shape[0])
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    return {"images": n, "rel_error": rel, "max_abs_diff": worst,
            "agreement": 100.0 * same / n if n else None}


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Sequence[torch.Tensor] | None,
    *,
    mode: str = "static",
    per_channel: bool = True,
    max_rel_error: float | None = 0.35,
    where: str = "quantize",
) -> dict[str, Any]:
    """An int8 copy of the fp32 ONNX file ``src`` at ``dst`` (written atomically), checked
    against ``src`` on the ``calibration`` batches (input tensors, e.g. training images;
    never the images accuracy is measured on).

    ``mode="static"``: :func:`quantize_onnx_static` (QDQ, weights int8 per channel with
    ``per_channel``, activation ranges calibrated on ``calibration``); ``"dynamic"``:
    :func:`quantize_onnx_dynamic` (the batches only check it). The check
    (:func:`int8_parity`) fails with a one-line :class:`QuantizeError` when the outputs
    differ by more than ``max_rel_error`` (||int8 - fp32|| / ||fp32||; ``None``: not
    checked), and ``dst`` is then removed.

    Returns ``{"path", "bytes", "fp32_bytes", "mode", "per_channel", "parity" (with
    "max_rel_error")}``.
    """
    src, dst = Path(src), Path(dst)
    if mode not in ("static", "dynamic"):
        raise QuantizeError(f"{where}.mode: {mode!r} is not one of static, dynamic")
    batches = list(calibration or [])
    if not batches:
        raise QuantizeError(f"{where}: int8 {mode} quantization needs calibration images (the "
                            f"activation ranges are measured on them, and the int8 file is "
                            f"checked against {src.name} on them): give training images, "
                            f"never the images accuracy is measured on")
    if not src.is_file():
        raise QuantizeError(f"{where}: {src} does not exist")
    if mode == "static":
        nbytes = quantize_onnx_static(src, dst, batches, per_channel=per_channel)
    else:
        nbytes = quantize_onnx_dynamic(src, dst, per_channel=per_channel)
    parity = {**int8_parity(src, dst, batches),
              "max_rel_error": None if max_rel_error is None else float(max_rel_error)}
    if max_rel_error is not None and not parity["rel_error"] <= float(max_rel_error):
        dst.unlink()
        raise QuantizeError(
            f"{where}: the int8 file differs from {src.name} by {parity['rel_error']:.3g} "
            f"(||int8 - fp32|| / ||fp32|| on {parity['images']} calibration images; top-1 "
            f"agreement {parity['agreement']:.1f}%) > max_rel_error {float(max_rel_error):g}"
            if parity["agreement"] is not None else
            f"{where}: the int8 file differs from {src.name} by {parity['rel_error']:.3g} "
            f"on {parity['images']} calibration images > max_rel_error {float(max_rel_error):g}")
    return {"path": str(dst), "bytes": int(nbytes), "fp32_bytes": int(src.stat().st_size),
            "mode": mode, "per_channel": bool(per_channel), "parity": parity}


class OnnxModule(torch.nn.Module):
    """An ONNX file run in onnxruntime (CPU) behind the ``nn.Module`` call interface, so that
    :func:`compresscnn.measure.evaluation.evaluate` scores an exported (or quantized) file exactly as
    it scores a PyTorch model."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort  # heavy: loaded only when used

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)
