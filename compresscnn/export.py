"""ONNX export, checked twice: by ``onnx.checker`` and against PyTorch in onnxruntime.

Why the checks: an exporter that succeeds is not proof that the graph computes the same
function (a mis-exported padding mode or a silently specialised batch size both export
fine). So every export is run in onnxruntime's CPU provider on random inputs at several batch
sizes (including one other than the export example's, to prove the batch dimension is really
dynamic) and compared with the PyTorch model in float32.

The file is written atomically: the exporter writes a temporary file beside the target, all
checks run on that file, and only then is it renamed onto ``path``. A failed export or check
leaves nothing at ``path`` (and no stray temporary file).

The exporter is ``torch.onnx.export(..., dynamo=True)`` (the default since torch 2.9); if it
fails (an op it cannot trace) the legacy TorchScript exporter is tried and the result records
which one produced the file and why the first failed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .utils import atomic_path

__all__ = ["export_onnx", "onnx_parity", "quantize_onnx_dynamic"]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _cpu_float_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model on CPU in float32, copied only when it is not already there.

    Returns ``(model, copied)``. The caller's model is never moved or cast.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    needs_copy = any(
        t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32)
        for t in tensors
    )
    if not needs_copy:
        return model, False
    clone = copy.deepcopy(model)
    return clone.to(device="cpu", dtype=torch.float32), True


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_outputs(v)]
    raise TypeError(f"cannot compare model output of type {type(out).__name__}")


def _export_dynamo(
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


def _export_legacy(
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


def onnx_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 3),
    *,
    seed: int = 0,
) -> dict[int, float]:
    """Max |onnxruntime − PyTorch| over all outputs, per batch size, on ``randn`` inputs.

    ``model`` must already be in eval mode on CPU in float32.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    diffs: dict[int, float] = {}
    for b in batches:
        x = torch.randn((int(b), *input_shape), generator=gen, dtype=torch.float32)
        with torch.inference_mode():
            ref = _flatten_outputs(model(x))
        got = sess.run(None, {in_name: x.numpy()})
        if len(got) != len(ref):
            raise RuntimeError(
                f"ONNX model {onnx_path} has {len(got)} outputs, PyTorch model {len(ref)}"
            )
        worst = 0.0
        for r, g in zip(ref, got):
            g_t = torch.from_numpy(g)
            if tuple(g_t.shape) != tuple(r.shape):
                raise RuntimeError(
                    f"ONNX output shape {tuple(g_t.shape)} != PyTorch {tuple(r.shape)} "
                    f"at batch {b} ({onnx_path})"
                )
            d = (g_t.double() - r.double()).abs()
            # NaN anywhere is a failure, not a silent 0 from max()
            if d.numel():
                worst = max(worst, float("inf") if torch.isnan(d).any() else float(d.max()))
        diffs[int(b)] = worst
    return diffs


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    atol: float = 1e-3,
    check_batch: Sequence[int] = (1, 3),
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``model`` to one self-contained ``.onnx`` file at ``path`` and verify it.

    ``input_shape`` is the per-sample shape ``(C, H, W)``; the batch dimension is prepended
    (dynamic when ``dynamic_batch``, else fixed to ``check_batch[0]``). The exported graph has
    one input named ``"input"`` and one output ``"output"``.

    Returns ``{"path", "bytes", "max_abs_diff", "diffs" (per check batch), "opset",
    "exporter" ("dynamo" or "torchscript"), "fallback_reason" (or None), "dynamic_batch",
    "input_shape", "atol"}``.

    Raises ``RuntimeError`` (an internal failure, not a user error) when both exporters fail,
    or when onnxruntime disagrees with PyTorch by more than ``atol``; ``path`` is then left as
    it was.
    """
    import onnx

    path = Path(path)
    input_shape = tuple(int(s) for s in input_shape)
    check_batch = tuple(int(b) for b in check_batch) or (1,)
    if any(b < 1 for b in check_batch):
        raise ValueError(f"check_batch must be positive batch sizes, got {check_batch}")
    if not dynamic_batch:
        check_batch = (check_batch[0],)

    cpu_model, copied = _cpu_float_model(model)
    was_training = cpu_model.training
    cpu_model.eval()
    try:
        # A batch of 2 as the example: torch.export specialises sizes 0 and 1, so an example
        # of batch 1 could not carry a dynamic batch dimension.
        ex_batch = 2 if dynamic_batch else check_batch[0]
        example = torch.randn((ex_batch, *input_shape), generator=torch.Generator().manual_seed(seed))
        exporter = "dynamo"
        fallback_reason: str | None = None
        with atomic_path(path, suffix=".onnx") as tmp:
            try:
                _export_dynamo(cpu_model, example, tmp, opset, dynamic_batch)
            except Exception as exc:  # noqa: BLE001 - any exporter failure -> fallback
                fallback_reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
                log.warning("dynamo ONNX export failed (%s); trying the legacy exporter", fallback_reason)
                exporter = "torchscript"
                with contextlib.suppress(OSError):
                    tmp.unlink()
                try:
                    _export_legacy(cpu_model, example, tmp, opset, dynamic_batch)
                except Exception as exc2:
                    raise RuntimeError(
                        f"ONNX export of {type(model).__name__} failed with both exporters: "
                        f"dynamo: {fallback_reason}; torchscript: {type(exc2).__name__}: {exc2}"
                    ) from exc2
            stray = _external_data_files(tmp)
            if stray:
                raise RuntimeError(f"ONNX export wrote external data files {stray}; expected one file")
            onnx.checker.check_model(str(tmp), full_check=True)
            diffs = onnx_parity(cpu_model, tmp, input_shape, check_batch, seed=seed + 1)
            max_diff = max(diffs.values())
            if not max_diff <= atol:  # also catches NaN/inf
                raise RuntimeError(
                    f"ONNX parity check failed for {path}: max |onnxruntime - torch| = "
                    f"{max_diff:.3g} > atol {atol:g} (per batch: {diffs}; exporter {exporter}, "
                    f"opset {opset})"
                )
            actual_opset = _default_opset(tmp)
        nbytes = path.stat().st_size
    finally:
        if not copied:
            cpu_model.train(was_training)
    return {
        "path": str(path),
        "bytes": int(nbytes),
        "max_abs_diff": float(max_diff),
        "diffs": {str(k): float(v) for k, v in diffs.items()},
        "opset": int(actual_opset if actual_opset is not None else opset),
        "exporter": exporter,
        "fallback_reason": fallback_reason,
        "dynamic_batch": bool(dynamic_batch),
        "input_shape": list(input_shape),
        "atol": float(atol),
    }


def _default_opset(path: Path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _external_data_files(path: Path) -> list[str]:
    """Locations of tensors stored outside ``path`` (should be none)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

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
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    qlog = logging.getLogger()  # onnxruntime.quantization warns via the root logger
    with atomic_path(dst, suffix=".onnx") as tmp:
        old_level = qlog.level
        qlog.setLevel(max(old_level, logging.ERROR))
        try:
            quantize_dynamic(
                str(src),
                str(tmp),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=list(op_types) if op_types is not None else None,
            )
        finally:
            qlog.setLevel(old_level)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    return int(dst.stat().st_size)
