"""The one timing engine behind every latency figure of the package.

A *runner* is a no-argument callable that runs one forward pass: :func:`torch_runner`
(eager PyTorch, synchronised on CUDA), :func:`torch_bf16_runner` (eager PyTorch CPU
inference in bfloat16 autocast, channels_last) or :func:`ort_runner` (onnxruntime's CPU
provider with :func:`ort_session_options`) or :func:`openvino_runner` (OpenVINO's CPU plugin,
float32, latency hint); :func:`module_runner` builds one for a module, :func:`file_runner` for
an ONNX file.
:func:`time_interleaved` times several runners round-robin, so that a slow spell of a
shared machine hits all of them alike, and returns the raw samples; :func:`median_ms` and
:func:`summarize` turn samples into the figures reports carry.

Whole-model figures (``compresscnn.measure.evaluation.measure_latency``) time one runner;
latency-aware planning (``compresscnn.measure.latency``) times a dense layer against its candidate
decompositions. Thread counts are the caller's: ``nn_utils.num_threads`` for PyTorch,
``threads`` here for onnxruntime.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from compresscnn.util.modules import module_device
from compresscnn.io.onnx_int8 import quantize_qdq
from compresscnn.io.onnx_writer import write_onnx
from compresscnn.errors import CompressError

__all__ = ["RUNTIMES", "FILE_RUNTIMES", "check_runtime", "ort_session_options", "ort_runner",
           "openvino_runner", "torch_runner", "torch_bf16_runner", "onnx_bytes",
           "module_runner", "file_runner", "time_interleaved", "median_ms",
           "summarize"]

RUNTIMES = ("onnxruntime", "openvino", "torch", "torch_bf16")
#: the runtimes that run an ONNX file (the others run a PyTorch module)
FILE_RUNTIMES = ("onnxruntime", "openvino")
#: runtime -> (module to import, the package and the extra that installs it)
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime", None),
             "openvino": ("openvino", "openvino", "runtimes")}

Runner = Callable[[], Any]


def check_runtime(runtime: str, where: str = "runtime") -> None:
    """A one-line :class:`CompressError` for a runtime that is not one of :data:`RUNTIMES` or
    whose package is not installed, naming the extra that installs it."""
    if runtime not in RUNTIMES:
        raise CompressError(f"{where}: unknown runtime {runtime!r} (known: "
                            f"{', '.join(RUNTIMES)})")
    if runtime in _PACKAGES:
        import importlib.util

        module, package, extra = _PACKAGES[runtime]
        if importlib.util.find_spec(module) is None:
            how = f"pip install 'compresscnn[{extra}]'" if extra else f"pip install {package}"
            raise CompressError(f"{where}: {runtime} needs the package {package!r}, which is "
                                f"not installed ({how})")


# ----------------------------------------------------------------------------- runners
def ort_session_options(threads: int) -> Any:
    """CPU onnxruntime session options used for every latency figure: ``threads`` intra-op
    threads, one inter-op thread, sequential execution, all graph optimisations."""
    import onnxruntime as ort  # heavy: loaded only when an onnxruntime figure is asked for

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def ort_runner(model: bytes | str | os.PathLike, x: torch.Tensor, threads: int) -> Runner:
    """One onnxruntime (CPU) run of ``model`` (serialized bytes or a file path) on ``x``."""
    import onnxruntime as ort  # heavy: loaded only when an onnxruntime figure is asked for

    src = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(src, ort_session_options(threads),
                                providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)


def openvino_runner(model: bytes | str | os.PathLike, x: torch.Tensor, threads: int) -> Runner:
    """One OpenVINO (CPU plugin) run of ``model`` (serialized ONNX bytes or a file path) on
    ``x``: ``threads`` inference threads, one stream, the latency performance hint, and float32
    inference precision (on CPUs with bf16 units OpenVINO otherwise computes float32 models in
    bf16, which is another model's speed). An int8 (QDQ) file runs on OpenVINO's int8
    kernels: its quantize/dequantize pairs become FakeQuantize nodes that the CPU plugin
    folds into int8 convolutions."""
    import openvino as ov  # optional: loaded only when an OpenVINO figure is asked for

    core = ov.Core()
    net = (core.read_model(model, ov.Tensor(np.empty(0, np.uint8)))
           if isinstance(model, bytes) else core.read_model(str(model)))
    compiled = core.compile_model(net, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": int(threads),
        "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    xn = x.detach().cpu().numpy()
    return lambda: req.infer([xn])


def torch_runner(module: nn.Module, x: torch.Tensor) -> Runner:
    """One eager call ``module(x)`` (``x`` where the caller put it); on CUDA each call waits
    for the device, so the time is the work's and not the launch's."""
    if x.device.type == "cuda":
        def run() -> Any:
            module(x)
            torch.cuda.synchronize()
        return run
    return lambda: module(x)


def torch_bf16_runner(module: nn.Module, x: torch.Tensor) -> Runner:
    """One eager CPU call of a channels_last copy of ``module`` (the caller's module is left
    as it is) on a channels_last ``x`` under ``torch.autocast("cpu", torch.bfloat16)`` and
    ``torch.inference_mode``: how a CPU that computes bf16 natively (AVX512-BF16, AMX; see
    ``compresscnn.util.common.cpu_bf16_native``) serves a conv net fastest in PyTorch. Elsewhere
    bf16 is emulated and slower than float32."""
    fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    m = copy.deepcopy(module).cpu().eval().to(memory_format=fmt)
    xc = x.detach().cpu().contiguous(memory_format=fmt)

    def run() -> Any:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            return m(xc)
    return run


def onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    """A static-shape ONNX model of ``module`` on input ``x``, for timing only (the
    TorchScript-based exporter first: ~0.1 s for one layer against ~1 s for dynamo)."""
    with tempfile.TemporaryDirectory(prefix="compresscnn-lat-") as d, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(d) / "m.onnx"
        write_onnx(module, x, path, opset=18, dynamic_batch=False,
                   order=("torchscript", "dynamo"))
        return path.read_bytes()


def int8_bytes(model: bytes, x: torch.Tensor) -> bytes:
    """A static int8 copy of the serialized ONNX ``model`` made as deployment files are
    (:func:`compresscnn.io.onnx_int8.quantize_qdq`), its activation ranges calibrated on
    ``x`` alone: for timing only (the kernels an int8 deployment runs; the ranges do not
    change the speed)."""
    with tempfile.TemporaryDirectory(prefix="compresscnn-q-") as d:
        src, dst = Path(d) / "m.onnx", Path(d) / "q.onnx"
        src.write_bytes(model)
        quantize_qdq(src, dst, [x.detach().cpu().float().numpy()])
        return dst.read_bytes()


def module_runner(module: nn.Module, x: torch.Tensor, runtime: str, threads: int,
                  precision: str = "fp32") -> Runner:
    """A runner of ``module`` on ``x`` on ``runtime``: ``"torch"`` on the module's device,
    ``"torch_bf16"`` on the CPU in bf16 autocast (:func:`torch_bf16_runner`),
    ``"onnxruntime"`` / ``"openvino"`` on a timing export of it (:func:`onnx_bytes`), with
    ``precision="int8"`` quantized first (:func:`int8_bytes`)."""
    if runtime == "torch":
        return torch_runner(module, x.to(module_device(module) or torch.device("cpu")))
    if runtime == "torch_bf16":
        return torch_bf16_runner(module, x)
    model = onnx_bytes(module, x)
    if precision == "int8":
        model = int8_bytes(model, x)
    return file_runner(model, x, runtime, threads)


def file_runner(model: bytes | str | os.PathLike, x: torch.Tensor, runtime: str,
                threads: int) -> Runner:
    """A runner of an ONNX model (bytes or a path) on ``x`` in one of :data:`FILE_RUNTIMES`."""
    check_runtime(runtime)
    if runtime == "openvino":
        return openvino_runner(model, x, threads)
    if runtime != "onnxruntime":
        raise CompressError(f"runtime {runtime!r} runs PyTorch modules, not ONNX files "
                            f"(files run in {', '.join(FILE_RUNTIMES)})")
    return ort_runner(model, x, threads)


# ----------------------------------------------------------------------------- timing
def time_interleaved(fns: Sequence[Runner], *, warmup: int, rounds: int,
                     per_round: int = 1, settle: int = 3) -> list[list[float]]:
    """Seconds per call of each runner, timed round-robin: ``warmup`` untimed calls each,
    then ``rounds`` rounds in which every runner is called ``settle`` times untimed and then
    ``per_round`` times timed, in turn.

    The untimed ``settle`` calls (only when there are several runners) give each timed call
    what a server running one model sees: its weights back in cache, its runtime's threads
    awake and no other model's onnxruntime threads still spinning. Without them the first
    calls of each turn pay those costs: on onnxruntime, 2 threads, batch 1, torchvision
    ResNet-18's first three calls of a turn took 40, 37 and 25 ms and the rest 20 ms (a
    2x-fewer-MAC Tucker-2 of it: 22, 21, 16, then 11-12 ms), a nearly fixed overhead that
    pulls every measured speed-up towards 1 (BENCHMARKS.md, "Speed")."""
    for f in fns:
        for _ in range(max(int(warmup), 0)):
            f()
    samples: list[list[float]] = [[] for _ in fns]
    settle = max(int(settle), 0) if len(fns) > 1 else 0
    for _ in range(max(int(rounds), 1)):
        for i, f in enumerate(fns):
            for _ in range(settle):
                f()
            for _ in range(max(int(per_round), 1)):
                t0 = time.perf_counter()
                f()
                samples[i].append(time.perf_counter() - t0)
    return samples


def median_ms(samples_s: Sequence[float]) -> float:
    """The median of samples in seconds, in milliseconds."""
    return statistics.median(samples_s) * 1e3


def summarize(samples_s: Sequence[float]) -> dict[str, float]:
    """``{"median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms"}`` of samples in seconds
    (percentiles by linear interpolation, like numpy's default)."""
    ms = sorted(t * 1e3 for t in samples_s)

    def pct(p: float) -> float:
        if len(ms) == 1:
            return ms[0]
        pos = p / 100 * (len(ms) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    return {"median_ms": statistics.median(ms), "p10_ms": pct(10), "p90_ms": pct(90),
            "mean_ms": statistics.fmean(ms), "min_ms": ms[0]}
