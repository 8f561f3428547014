"""What a run reads before it compresses: its data sources and calibration batches, the
model's input size and head, the compression and latency settings of the recipe."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

# data, evaluation and report are called through their modules, so that a test (or a
# wrapper such as the DDP test's) can replace one of their functions for the whole run
from compresscnn.io import data as data_mod
from compresscnn.errors import CompressError, RecipeError
from compresscnn.measure.evaluation import measure_latencies
from compresscnn.io.export import export_onnx, quantize_onnx
from compresscnn.measure.latency import LatencyConfig, layer_latency_table
from compresscnn.io.models import replace_head
from compresscnn.util.progress import emit
from compresscnn.recipe.schema import CALIBRATED_ALLOCATIONS
from compresscnn.core.rules import CompressConfig
from compresscnn.core.surgery import Plan
from compresscnn.fit.config import Calibration, FitConfig
from compresscnn.measure.timing import FILE_RUNTIMES
from compresscnn.util.common import get_rank, get_world_size

log = logging.getLogger(__name__)


def _log(msg: str, quiet: bool) -> None:
    if not quiet and _rank() == 0:
        emit(msg)


def _rank() -> int:
    return get_rank()


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _data_cfg(recipe: dict[str, Any]) -> dict[str, Any]:
    return {**recipe["data"], "seed": int(recipe.get("seed", 0))}


def _calibration_batches(recipe: dict[str, Any], pcfg: dict[str, Any]) -> list:
    """The calibration batches from ``data.calibration``, at the model's input size (in
    ``pcfg``)."""
    cal = recipe["calibration"]
    return data_mod.calibration_batches(_data_cfg(recipe), pcfg, cal["batches"],
                                        batch_size=cal["batch_size"])


def _check_data(recipe: dict[str, Any], pcfg: dict[str, Any], *,
                train: bool) -> tuple[list[str], bool]:
    """Before anything runs: the model's classes match the data's, and neither fine-tuning
    nor calibration reads the images accuracy is measured on. Returns the warnings the
    report starts with (an allowed overlap, a replaced head) and whether a source overlaps
    the eval images (``data.allow_eval_overlap``)."""
    if not recipe.get("data"):
        return [], False
    cfg = _data_cfg(recipe)
    data_mod.check_classes(cfg, pcfg.get("num_classes"), recipe["model"]["spec"])
    overlap = data_mod.check_sources(cfg, train=train, calibrate=_calibrates(recipe))
    notes = list(overlap)
    head = pcfg.get("head_replaced")
    if head:
        notes.append(f"model.num_classes: the {head['from']}-class head ({head['layer']}) was "
                     f"replaced by a new, untrained {head['to']}-class one: the baseline and "
                     f"zero-shot accuracies are those of an untrained head")
    return notes, bool(overlap)


def _data_report(recipe: dict[str, Any], train_loader: Any, test_loader: Any) -> dict | None:
    """Which images each source read (root, split, count) and how they were fed."""
    if not recipe.get("data"):
        return None
    cfg = data_mod.resolve_data_cfg(_data_cfg(recipe))
    out: dict[str, Any] = {"dataset": cfg["dataset"], "resize": cfg["resize"],
                           "crop": cfg["crop"]}
    for role, loader in (("train", train_loader), ("eval", test_loader)):
        if loader is not None:
            out[role] = {**data_mod.source_of(cfg, role), "images": len(loader.dataset)}
    if recipe.get("calibration"):
        out["calibration"] = data_mod.source_of(cfg, "calibration")
    return out


def _replace_head(recipe: dict[str, Any], model: nn.Module) -> None:
    """``model.num_classes``: a new head; distilling from the original (whose head is now
    untrained too) is refused."""
    n = recipe["model"].get("num_classes")
    if not n or not replace_head(model, n, seed=int(recipe.get("seed", 0))):
        return
    ft = recipe["finetune"]
    if ft["enabled"] and ft["distill"]["enabled"]:
        raise RecipeError(f"finetune.distill: the original model's head is replaced too "
                          f"(model.num_classes: {n}), so it cannot teach the new classes; set "
                          f"finetune.distill.enabled: false to train with cross-entropy")


def _calibration(recipe: dict[str, Any], pcfg: dict[str, Any]) -> list | None:
    """The calibration batches when the recipe needs them (:func:`_calibrates`), else None."""
    cal = recipe.get("calibration")
    if _measures_to_plan(recipe) and not cal:
        raise RecipeError(f"allocation: {recipe['allocation']} needs a calibration section "
                          "(the layers' effect on the output is measured on calibration "
                          "batches)")
    return _calibration_batches(recipe, pcfg) if _calibrates(recipe) else None


def _measures_to_plan(recipe: dict[str, Any]) -> bool:
    """Whether planning measures the model on calibration batches (``allocation:
    sensitivity`` or ``output`` with a global target)."""
    return bool(recipe.get("allocation") in CALIBRATED_ALLOCATIONS and recipe.get("target"))


def _calibrates(recipe: dict[str, Any]) -> bool:
    """Whether the run reads calibration batches: a data-aware fit, BatchNorm re-estimation,
    calibration distillation or an allocation measured on them."""
    cal = recipe.get("calibration")
    return bool(cal and (cal.get("reconstruct") or cal.get("bn_recalibrate")
                         or cal.get("distill") is not None or _measures_to_plan(recipe)))


def _compress_config(recipe: dict[str, Any]) -> CompressConfig:
    """The recipe's settings of :func:`compresscnn.core.surgery.compress`: its
    ``allocation``, ``latency`` and ``seed``, and its ``calibration`` section as the fit
    (a :class:`~compresscnn.fit.config.Calibration` is a ``FitConfig``)."""
    cal = recipe.get("calibration")
    return CompressConfig(allocation=recipe.get("allocation", "spectral"),
                          latency=_latency_cfg(recipe), seed=int(recipe.get("seed", 0)),
                          fit=Calibration.model_validate(cal) if cal else FitConfig())


def _latency_cfg(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The ``latency`` section as planning takes it: a model that will be deployed as a
    static int8 file (``export.quantize``) has its candidates timed as int8 files on an ONNX
    runtime."""
    lat = recipe.get("latency")
    q = (recipe.get("export") or {}).get("quantize")
    if lat is None or not q or q["mode"] != "static" or lat.get("runtime") not in FILE_RUNTIMES:
        return lat
    return {**lat, "precision": "int8"}


def _measure_latency(model: nn.Module, compressed: nn.Module, p: Plan,
                     input_size: tuple[int, ...], recipe: dict[str, Any], staging: Path,
                     onnx: dict[str, Any] | None, int8: dict[str, Any] | None,
                     batches: list | None) -> tuple[list, list]:
    """Whole-model latency in each of ``report.runtimes`` at every ``report.latency_batch``:
    the original and compressed models (PyTorch modules, or their ONNX files when the run
    exported one; with ``export.quantize`` their int8 files too, the original's quantized
    here on the same calibration ``batches``), all models of one runtime and batch timed
    against each other, interleaved; and each replaced layer, dense vs decomposed, timed
    against each other at the first batch."""
    thr = recipe["report"]["threads"]
    lat_batches = recipe["report"]["latency_batch"]
    runtimes = [rt for rt in recipe["report"]["runtimes"] if rt == "torch" or onnx]
    q = recipe["export"].get("quantize")
    lat = []
    with tempfile.TemporaryDirectory(prefix="compresscnn-base-") as tmp:
        files: dict[str, Path] = {}
        if onnx:
            files["baseline"] = Path(tmp) / "baseline.onnx"
            export_onnx(model, files["baseline"], input_size,
                        {"dynamic_batch": recipe["export"]["dynamic_batch"], "check_batch": [1],
                         "atol": recipe["export"]["atol"]})
            files["compressed"] = staging / onnx["path"]
        if int8:
            files["baseline int8"] = Path(tmp) / "baseline.int8.onnx"
            quantize_onnx(files["baseline"], files["baseline int8"], batches, mode=q["mode"],
                          per_channel=q["per_channel"], max_rel_error=None)
            files["compressed int8"] = staging / int8["path"]
        for b in lat_batches:
            for rt in runtimes:
                if rt != "torch" and b != 1 and not recipe["export"]["dynamic_batch"]:
                    continue  # a static ONNX file runs at its export batch only
                targets: dict[str, Any] = (
                    {"baseline": model, "compressed": compressed} if rt == "torch" else
                    {k: v for k, v in files.items()
                     if not (rt == "openvino" and "int8" in k and q["mode"] != "static")})
                res = measure_latencies(targets, input_size, runtime=rt, threads=thr, batch=b)
                lat += [{"model": label, **r} for label, r in res.items()]
    names = [r.name for r in p.replacements if r.applied] if p is not None else []
    layers = layer_latency_table(model, compressed, names, input_size,
                                 LatencyConfig(batch=lat_batches[0], threads=thr),
                                 runtimes=runtimes) if names else []
    return lat, layers


def _latency_planned(recipe: dict[str, Any]) -> bool:
    target = recipe.get("target") or {}
    return "latency" in target or any(r.get("objective") == "latency"
                                      for r in recipe.get("rules") or [])


def _input_size(recipe: dict[str, Any], model: nn.Module) -> tuple[int, ...]:
    size = recipe["model"].get("input_size")
    if size is None:
        size = getattr(model, "pretrained_cfg", {}).get("input_size")
    if size is None:
        raise CompressError("model.input_size: the model has no default input size; "
                            "give model.input_size: [C, H, W]")
    return tuple(int(x) for x in size)


def _shard_eval_loader(loader: Any, max_batches: int | None) -> Any:
    """Under DDP, each rank evaluates every ``world``-th image of the (first ``max_batches``
    batches of the) test set, without padding, so the all-reduced counts are exact."""
    world, rank = get_world_size(), get_rank()
    n = len(loader.dataset)
    if max_batches is not None:
        n = min(n, max_batches * int(loader.batch_size))
    if n < world:  # too few images to shard: every rank sees all (counts scale by world)
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=list(range(rank, n, world)), num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
