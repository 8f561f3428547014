"""Accuracy, agreement with the original model, and latency (PyTorch and onnxruntime).

* :func:`evaluate` — top-k accuracy, mean cross-entropy, and *agreement*: the percentage of
  samples on which the compressed model's argmax equals the original model's. Agreement needs
  no labels and is the most sensitive single number for "did compression change the function"
  (two models can both be 76 % accurate while disagreeing on 10 % of the images).
* :func:`measure_latency` — median / p10 / p90 wall time of one forward pass, with an explicit
  thread count (latency numbers without one are not comparable across machines), timed by
  :mod:`compresscnn.measure.timing`.

Counts are accumulated on the model's device and read back once at the end, so evaluation on a
GPU does not synchronise after every batch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from compresscnn.errors import DataError
from compresscnn.io.export import export_onnx
from compresscnn.util.modules import eval_mode, example_input, module_device, num_threads
from compresscnn.util.progress import bar as progress_bar
from compresscnn.measure.timing import (ort_runner, summarize, time_interleaved, torch_runner,
                                        file_runner)
from compresscnn.util.common import get_world_size, is_dist, resolve_device

__all__ = ["agreement_margins", "evaluate", "evaluate_predictions", "measure_latency",
           "split_batch"]


# --------------------------------------------------------------------------- accuracy
def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of a batch: a pair, or a dict with ``image``/``label``,
    ``input``/``target`` or ``x``/``y``."""
    if isinstance(batch, dict):
        for xk, yk in (("image", "label"), ("input", "target"), ("x", "y")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "expected batches of (inputs, labels) (or a dict with 'image'/'label'), got "
        f"{type(batch).__name__}"
    )


#: a reference decision whose two largest softmax probabilities differ by less than this is
#: a near tie (``disagreements_near_tie`` of :func:`evaluate`)
NEAR_TIE = 0.05


def _top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the largest softmax probability minus the second largest."""
    top2 = logits.float().softmax(1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def _counts(
    logits: torch.Tensor,
    targets: torch.Tensor,
    topk: Sequence[int],
    reference_logits: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Per-batch sums (as tensors on the logits' device): correct@k, loss, agreement, n."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (N, classes), got {tuple(logits.shape)}")
    n, num_classes = logits.shape
    targets = targets.to(logits.device).long().view(-1)
    if targets.numel() != n:
        raise ValueError(f"{n} logits rows but {targets.numel()} labels")
    out: dict[str, torch.Tensor] = {}
    # Labels outside the model's classes are counted here and reported at the end (checking
    # them now would synchronise the GPU every batch); the loss uses clamped labels meanwhile.
    invalid = (targets < 0) | (targets >= num_classes)
    out["invalid"] = invalid.sum()
    targets = targets.clamp(0, num_classes - 1)
    kmax = min(max(topk), num_classes) if topk else 1
    pred = logits.topk(kmax, dim=1).indices  # (N, kmax), best first
    hit = pred.eq(targets.unsqueeze(1))  # at most one True per row
    for k in topk:
        if k <= num_classes:
            out[f"top{k}"] = hit[:, :k].any(dim=1).sum()
    out["loss"] = F.cross_entropy(logits.float(), targets, reduction="sum")
    if reference_logits is not None:
        if reference_logits.shape[0] != n:
            raise ValueError("reference logits and logits differ in batch size")
        ref = reference_logits.to(logits.device).float()
        same = logits.argmax(1).eq(ref.argmax(1))
        out["agreement"] = same.sum()
        if num_classes >= 2:  # disagreements where the reference's top two are a near tie
            out["near_tie"] = (~same & (_top2_gap(ref) < NEAR_TIE)).sum()
    out["n"] = torch.tensor(n, device=logits.device)
    return out


def _finish(sums: dict[str, torch.Tensor], topk: Sequence[int], num_classes: int | None) -> dict[str, Any]:
    n = int(sums["n"]) if "n" in sums else 0
    bad = int(sums["invalid"]) if "invalid" in sums else 0
    if bad:
        raise DataError(
            f"{bad} of {n} labels are outside the model's {num_classes} classes [0, {num_classes})"
        )
    res: dict[str, Any] = {"n": n}
    for k in topk:
        key = f"top{k}"
        res[key] = (100.0 * float(sums[key]) / n) if (key in sums and n) else None
    for key in ("top1", "top5"):  # always present, None when not computable
        res.setdefault(key, None)
    res["loss"] = float(sums["loss"]) / n if n else None
    if "agreement" in sums:
        res["agreement"] = 100.0 * float(sums["agreement"]) / n if n else None
        off = n - int(sums["agreement"])
        res["disagreements_near_tie"] = (100.0 * float(sums["near_tie"]) / off
                                         if off and "near_tie" in sums else None)
    res["num_classes"] = num_classes
    return res


def evaluate_predictions(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    reference_logits: torch.Tensor | None = None,
    topk: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Metrics for one set of predictions, in the same format as :func:`evaluate`.

    ``topk`` entries larger than the number of classes give ``None`` (e.g. top-5 of a 3-class
    problem) rather than a meaningless 100 %.
    """
    sums = _counts(logits.detach(), targets, tuple(topk), reference_logits)
    return _finish(sums, tuple(topk), int(logits.shape[1]))


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    reference: nn.Module | None = None,
    topk: Sequence[int] = (1, 5),
    max_batches: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``loader`` (batches of ``(images, labels)``).

    Returns ``{"top1", "top5", ..., "n", "loss", "num_classes"}`` with accuracies in percent
    (``None`` when k exceeds the number of classes) and ``loss`` the mean cross-entropy; with
    ``reference`` also ``"agreement"``: the percentage of samples whose argmax equals the
    reference model's, and ``"disagreements_near_tie"``: the percentage of the other samples
    on which the reference's two largest softmax probabilities differ by less than
    :data:`NEAR_TIE` (decisions the reference makes by a hair; None without disagreements). The model may have more classes than the labels use (an ImageNet head
    on a 10-class subset); a label outside the model's classes is a :class:`DataError`.

    ``model`` (and ``reference``) are moved to ``device`` and put in eval mode for the call
    (the mode is restored afterwards). When a process group is
    initialised the sums are all-reduced, so every rank returns the global result (use a
    sampler that shards without padding for exact counts).
    """
    topk = tuple(int(k) for k in topk)
    dev = resolve_device(device)
    if module_device(model) != dev:
        model.to(dev)
    if reference is not None and module_device(reference) != dev:
        reference.to(dev)
    sums: dict[str, torch.Tensor] = {}
    num_classes: int | None = None
    total = None
    with contextlib.suppress(TypeError):
        total = len(loader)  # type: ignore[arg-type]
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    bar = progress_bar(total, "eval", enabled=progress, unit="batches")
    with eval_mode(model, reference), torch.inference_mode():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            x = x.to(dev, non_blocking=True)
            logits = model(x)
            ref = reference(x) if reference is not None else None
            num_classes = int(logits.shape[1])
            for key, v in _counts(logits, y, topk, ref).items():
                sums[key] = sums[key] + v if key in sums else v.clone()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if is_dist() and get_world_size() > 1:
        sums = _all_reduce_sums(sums, dev)
    if not sums:
        raise DataError("evaluation loader produced no batches")
    return _finish(sums, topk, num_classes)


def agreement_margins(model: nn.Module, reference: nn.Module, loader: Iterable, *,
                      thresholds: Sequence[float] = (NEAR_TIE, 0.1, 0.2), mirror: bool = True,
                      bf16: bool = False, max_batches: int | None = None) -> dict[str, Any]:
    """Where ``model`` and ``reference`` disagree, and how firm ``reference``'s decisions
    are there: what an agreement figure can and cannot reach.

    Returns ``agreement`` (percent of images with the same argmax), ``n``,
    ``disagreements``; for each threshold ``m`` in ``thresholds``, ``margin_below[m]``: the
    percentage of the disagreements, and ``margin_below_all[m]`` of all images, on which
    ``reference``'s two largest softmax probabilities differ by less than ``m`` (a near tie,
    which any perturbation of the weights may flip); with ``mirror``,
    ``reference_mirror_agreement``: ``reference``'s agreement with itself on the images
    mirrored left-right (a perturbation of the input that the training augmentation made
    irrelevant to the label: how stable the reference's own decisions are); with ``bf16``,
    ``reference_bf16_agreement``: ``reference`` under bf16 autocast against itself in its
    own precision (what bf16 rounding alone changes)."""
    thresholds = tuple(float(m) for m in thresholds)
    same, margins, flips, rounded = [], [], [], []
    with eval_mode(model, reference), torch.inference_mode():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, _ = split_batch(batch)
            x = x.to(module_device(model))
            xr = x.to(module_device(reference))
            ref = reference(xr).float().cpu()
            margins.append(_top2_gap(ref))
            same.append(model(x).float().cpu().argmax(1) == ref.argmax(1))
            if mirror:
                mirrored = reference(xr.flip(-1)).float().cpu()
                flips.append(mirrored.argmax(1) == ref.argmax(1))
            if bf16:
                with torch.autocast(xr.device.type, torch.bfloat16):
                    low = reference(xr).float().cpu()
                rounded.append(low.argmax(1) == ref.argmax(1))
    if not same:
        raise DataError("agreement_margins: the loader produced no batches")
    agree, margin = torch.cat(same), torch.cat(margins)
    off = margin[~agree]
    out: dict[str, Any] = {
        "n": int(agree.numel()), "agreement": 100.0 * float(agree.float().mean()),
        "disagreements": int(off.numel()),
        "margin_below": {m: (100.0 * float((off < m).float().mean()) if off.numel() else None)
                         for m in thresholds},
        "margin_below_all": {m: 100.0 * float((margin < m).float().mean()) for m in thresholds},
        "reference_mirror_agreement": (100.0 * float(torch.cat(flips).float().mean())
                                       if mirror else None),
        "reference_bf16_agreement": (100.0 * float(torch.cat(rounded).float().mean())
                                     if bf16 else None)}
    return out


def _all_reduce_sums(sums: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    keys = sorted(sums)
    vec = torch.stack([sums[k].double().to(dev) for k in keys])
    dist.all_reduce(vec)
    return {k: vec[i] for i, k in enumerate(keys)}


# --------------------------------------------------------------------------- latency
def measure_latency(
    model_or_onnx_path: nn.Module | str | os.PathLike,
    input_shape: Sequence[int],
    *,
    runtime: str = "torch",
    threads: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    batch: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Wall time of one forward pass on a random float32 input (seeded: the same input on
    every call).

    ``input_shape`` is the per-sample shape ``(C, H, W)`` and the input is
    ``(batch or 1, C, H, W)``; a 4-D ``input_shape`` is taken as the full ``(N, C, H, W)``
    (then ``batch``, if given, must equal ``N``).

    ``runtime="torch"`` times an ``nn.Module`` under ``inference_mode`` with
    ``torch.set_num_threads(threads)`` (restored afterwards) on ``device`` (default CPU: the
    deployment target this toolkit measures; a model living elsewhere is timed as a CPU copy,
    the caller's model is not moved; CUDA timings synchronise). ``runtime="onnxruntime"``
    times an ``.onnx`` file (or a module, exported to a temporary file first) on the CPU
    provider with ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, sequential
    execution.

    Returns ``{"median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "repeats", "warmup",
    "threads", "runtime", "batch", "input_shape", "device"}``.
    """
    runtime = runtime.lower().replace("-", "").replace("_", "")
    if runtime in ("ort", "onnx"):
        runtime = "onnxruntime"
    if runtime not in ("torch", "onnxruntime"):
        raise ValueError(f"runtime must be 'torch' or 'onnxruntime', got {runtime!r}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) == 4:
        if batch is not None and int(batch) != input_shape[0]:
            raise ValueError(f"batch={batch} contradicts the full input shape {input_shape}")
        batch, input_shape = input_shape[0], input_shape[1:]
    batch = 1 if batch is None else int(batch)
    x = example_input(input_shape, batch, 0)
    info: dict[str, Any] = {
        "repeats": int(max(repeats, 1)),
        "warmup": int(max(warmup, 0)),
        "threads": int(threads),
        "runtime": runtime,
        "batch": int(batch),
        "input_shape": list(input_shape),
    }
    if runtime == "torch":
        if not isinstance(model_or_onnx_path, nn.Module):
            raise TypeError("runtime='torch' needs an nn.Module, not a path")
        model = model_or_onnx_path
        dev = resolve_device(device)
        if module_device(model) not in (None, dev):
            model = copy.deepcopy(model).to(dev)
        with num_threads(threads), eval_mode(model), torch.inference_mode():
            run = torch_runner(model, x.to(dev))
            times = time_interleaved([run], warmup=warmup, rounds=repeats)[0]
        info["device"] = str(dev)
        return {**summarize(times), **info}

    with contextlib.ExitStack() as stack:
        if isinstance(model_or_onnx_path, nn.Module):
            tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="compresscnn-lat-"))
            path = Path(tmpdir) / "model.onnx"
            export_onnx(model_or_onnx_path, path, input_shape, {"check_batch": [int(batch)]})
        else:
            path = Path(model_or_onnx_path)
            if not path.is_file():
                raise FileNotFoundError(f"ONNX file not found: {path}")
        times = time_interleaved([ort_runner(path, x, threads)], warmup=warmup,
                                 rounds=repeats)[0]
    info["device"] = "cpu"
    return {**summarize(times), **info}


def measure_latencies(
    targets: dict[str, nn.Module | str | os.PathLike],
    input_shape: Sequence[int],
    *,
    runtime: str = "torch",
    threads: int = 1,
    batch: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Several models timed against each other on one runtime: ``targets`` maps a label to
    an ``nn.Module`` (``runtime="torch"``) or an ONNX file (``"onnxruntime"``,
    ``"openvino"``), all run on the same random ``(batch, *input_shape)`` input, interleaved
    round by round (:func:`compresscnn.measure.timing.time_interleaved`), so that a busy spell of a
    shared machine slows them all alike and their ratios hold. Returns ``{label:
    {"median_ms", ..., "runtime", "threads", "batch", "repeats", "input_shape"}}``."""
    x = example_input(tuple(int(s) for s in input_shape), int(batch), seed)
    labels = list(targets)
    with contextlib.ExitStack() as stack:
        if runtime == "torch":
            stack.enter_context(num_threads(threads))
            stack.enter_context(torch.inference_mode())
            mods = [copy.deepcopy(targets[k]).cpu().eval() for k in labels]
            fns = [torch_runner(m, x) for m in mods]
        else:
            for k in labels:
                if isinstance(targets[k], nn.Module):
                    raise TypeError(f"{runtime} times ONNX files; {k} is a module")
            fns = [file_runner(targets[k], x, runtime, threads) for k in labels]
        samples = time_interleaved(fns, warmup=warmup, rounds=repeats)
    info = {"runtime": runtime, "threads": int(threads), "batch": int(batch),
            "repeats": int(repeats), "warmup": int(warmup), "input_shape": list(input_shape),
            "device": "cpu"}
    return {k: {**summarize(t), **info} for k, t in zip(labels, samples)}
