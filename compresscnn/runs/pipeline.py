"""The main job: recipe -> model -> plan -> apply -> fine-tune -> evaluate -> ONNX -> report.

Every stage is a function of its own module; this file only orders them, times them and
writes the run directory. Nothing is written until the recipe, the model, its weights and
the plan have all been checked, and the run is assembled in ``<out>.partial`` and renamed to
``<out>`` only when it is complete, so a failed run never leaves a directory that looks
finished (``--resume`` picks ``<out>.partial`` up again). What a run may create, replace
and delete (marker files, the lock, atomic ``--overwrite``) is :mod:`compresscnn.runs.rundir`.

Run directory::

    report.json  report.md  layers.png   the report (compresscnn.runs.report)
    recipe.yaml                          the recipe as run: defaults filled, and one rule per
                                         replaced layer with its exact rank (target: null),
                                         so ``load_compressed`` rebuilds the architecture
    model.safetensors                    the compressed weights (tensors only)
    model.onnx                           the ONNX export, checked in onnxruntime
    model.int8.onnx                      with ``export.quantize``: its int8 copy, checked
                                         against it on the calibration images
    checkpoints/last.pt  train_log.csv   fine-tuning state (resume) and per-step log; each
                                         checkpoint's sha256 beside it (last.pt.sha256),
                                         checked before --resume reads it
    checkpoints/switch.json              with ``train.switch``: the stable ranks and the switch;
    checkpoints/factorized/last.pt       checkpoints/last.pt and train_log_dense.csv are then
                                         the dense phase's, these the factorized phase's
    .compresscnn-run                     marker: the run's id and the recipe keys --resume
                                         must match (compresscnn.runs.rundir); the manifest: the
                                         sha256 of recipe.yaml, model.safetensors, model.onnx
                                         and its own, checked by load_compressed
    tb/                                  TensorBoard scalars (only with the ``tensorboard``
                                         package and ``COMPRESSCNN_TENSORBOARD=1``)

Under ``torchrun`` (``distributed=True``, the process group initialised by the caller) every
rank loads the model, plans, evaluates (on its shard of the test set, all-reduced) and
fine-tunes (DistributedSampler + DDP); only rank 0 creates and writes the run directory.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

# data, evaluation and report are called through their modules, so that a test (or a
# wrapper such as the DDP test's) can replace one of their functions for the whole run
from compresscnn.io import data as data_mod
from compresscnn.measure import evaluation
from compresscnn.runs import report as report_mod
from compresscnn.measure.counting import count
from compresscnn.core.decomposers import get_decomposer
from compresscnn.errors import (CompressError, DataError, MethodError, ModelError, RankError,
                                RecipeError, CheckpointError, StreamError)
from compresscnn.measure.evaluation import measure_latencies
from compresscnn.io.export import OnnxModule, export_onnx, quantize_onnx
from compresscnn.measure.inspection import fit_report, fit_text
from compresscnn.measure.latency import LatencyConfig, layer_latency_table
from compresscnn.train.config import Finetune, Train, TrainConfig
from compresscnn.train.cuttlefish import StableRankMonitor, SwitchPoint, planned_layers
from compresscnn.train.scratch import FrobeniusDecay, SemiOrthogonal, factorize
from compresscnn.io.models import load_architecture, load_model, replace_head
from compresscnn.io.models.checkpoints import load_weights
from compresscnn.util.progress import emit, timed, result
from compresscnn.recipe.schema import CALIBRATED_ALLOCATIONS, dump_resolved, load_recipe
from compresscnn.runs.rundir import RunDir, MARKER, check_file, read_manifest
from compresscnn.core.rules import CompressConfig
from compresscnn.core.surgery import Plan, apply, compress, plan, plan_compression
from compresscnn.fit.config import Calibration, FitConfig
from compresscnn.measure.timing import FILE_RUNTIMES, check_runtime
from compresscnn.train.loop import TrainRun, finetune
from compresscnn.util.common import atomic_path, get_rank, get_world_size, seed_everything


log = logging.getLogger(__name__)


def _log(msg: str, quiet: bool) -> None:
    if not quiet and _rank() == 0:
        emit(msg)


def _rank() -> int:
    return get_rank()


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def exact_rules(p: Plan) -> list[dict[str, Any]]:
    """One rule per replaced layer with its exact rank: what rebuilds the architecture."""
    rules = []
    for r in p.replacements:
        if r.applied:
            rules.append({"match": r.name, "method": r.method, "rank": list(r.rank),
                          **r.options})
    return rules


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


def _write_tensorboard(csv_path: Path, tb_dir: Path, quiet: bool) -> None:
    """Copy the per-step CSV log into TensorBoard scalars when ``COMPRESSCNN_TENSORBOARD=1``
    and the ``tensorboard`` package is installed; otherwise nothing."""
    if os.environ.get("COMPRESSCNN_TENSORBOARD", "") not in ("1", "true", "yes") \
            or not csv_path.is_file():
        return
    try:  # optional package: imported only when asked for
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _log("[tensorboard] COMPRESSCNN_TENSORBOARD=1 but the tensorboard package is not "
             "installed; skipped", quiet)
        return
    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        with csv_path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key in ("loss", "kd_loss", "ce_loss", "lr", "images_per_s"):
                    if row.get(key):
                        writer.add_scalar(f"finetune/{key}", float(row[key]), int(row["step"]))
    finally:
        writer.close()


def _build_untrained(recipe: dict[str, Any], model: nn.Module,
                     input_size: tuple[int, ...]) -> tuple[nn.Module, Plan | None]:
    """The model a ``train`` job trains: the dense architecture, or (with rules) its layers
    factorized before training (``compresscnn.train.scratch.factorize``)."""
    student = copy.deepcopy(model)
    if recipe["train"].get("switch"):
        _check_switch(recipe)
        return student, None  # dense until the switch (_switch_train)
    if not recipe["rules"]:
        return student, None
    tr = recipe["train"]
    return factorize(student, recipe["rules"], input_size, target=recipe.get("target"),
                     init=tr["init"], seed=int(recipe.get("seed", 0)))


def _check_switch(recipe: dict[str, Any]) -> None:
    """``train.switch`` needs rules (the layers it factorizes) and an epoch budget that leaves
    the factorized model at least one epoch; it has no use for a factorized initialisation."""
    tr = recipe["train"]
    sw = tr["switch"]
    if not recipe["rules"]:
        raise RecipeError("train.switch: needs rules (they choose the layers to factorize at "
                          "the switch, and their methods); with rules: [] the model trains dense")
    for i, rule in enumerate(recipe["rules"]):
        if get_decomposer(rule["method"]).chooses:
            raise RecipeError(f"rules[{i}].method: {rule['method']} chooses methods by measured "
                              f"error at a budget; train.switch factorizes at stable ranks and "
                              f"needs a concrete method (cp, spatial, tucker2, svd)")
    if tr.get("max_steps"):
        raise RecipeError("train.switch: give the budget as train.epochs, not train.max_steps "
                          "(the switch happens at an epoch end)")
    if tr["init"] != "kaiming":
        raise RecipeError(f"train.init: {tr['init']} initialises factorized layers; with "
                          f"train.switch the layers start dense and are factorized from their "
                          f"trained weights (remove train.init)")
    last = tr["epochs"] - 1
    if sw["max_epochs"] is not None and sw["max_epochs"] > last:
        raise RecipeError(f"train.switch.max_epochs: {sw['max_epochs']} leaves no epoch of "
                          f"train.epochs: {tr['epochs']} to train the factorized model (at most "
                          f"{last})")
    if last < 1:
        raise RecipeError(f"train.epochs: {tr['epochs']} with train.switch: needs at least 2 "
                          f"(a dense epoch, then a factorized one)")


def _switch_train(recipe: dict[str, Any], student: nn.Module, loader: Any,
                  pcfg: dict[str, Any], staging: Path, *, resume: bool, progress: bool,
                  distributed: bool, input_size: tuple[int, ...]
                  ) -> tuple[nn.Module, Plan, dict[str, Any], dict[str, Any]]:
    """Cuttlefish (``train.switch``): train the dense ``student`` on the schedule of the whole
    ``train.epochs`` budget until the stable ranks of the layers the rules take settle (or
    to ``max_epochs``), factorize its trained weights at the scaled stable ranks, and train
    the factorized model for the remaining epochs with the same settings and a fresh
    schedule. Dense phase: ``checkpoints/last.pt``, ``train_log_dense.csv`` and the monitor
    in ``checkpoints/switch.json``; factorized phase: ``checkpoints/factorized/last.pt``,
    ``train_log.csv``. A resumed run that had switched does not train the dense phase again.
    Returns ``(model, plan, the factorized phase's stats, the report's switch entry)``."""

    tr = _train_config(recipe, "train")
    sw = tr.switch
    ckpts = staging / "checkpoints"
    monitor = StableRankMonitor(student, planned_layers(student, recipe["rules"], input_size),
                                tol=sw.tol, window=sw.window, min_fraction=sw.min_fraction)
    point = SwitchPoint(monitor, sw.max_epochs or tr.epochs - 1, ckpts / "switch.json",
                        write=_rank() == 0)
    kw = dict(pcfg=pcfg, progress=progress, distributed=distributed)
    dense = _train_stage(recipe, "train", student, None, None, loader, staging=staging,
                         resume=resume, extra=[point], log=staging / "train_log_dense.csv",
                         config=tr.model_copy(update={"keep": "last"}), **kw)
    if point.epoch is None:
        raise RuntimeError("the dense phase ended without reaching its switch epoch")
    model, p = monitor.switch(student.cpu().eval(), recipe["rules"], input_size)
    point.start_factorized()
    fdir = ckpts / "factorized"
    stats = _train_stage(recipe, "train", model, None, p, loader, staging=staging, ckpt=fdir,
                         resume=resume and (fdir / "last.pt").is_file(), extra=[point],
                         config=tr.model_copy(update={"epochs": tr.epochs - point.epoch}), **kw)
    rep = point.report()
    rep["dense"] = {k: dense[k] for k in ("steps", "seconds", "images_per_s",
                                          "resumed_from_step")}
    rep["dense"]["log_csv"] = "train_log_dense.csv"
    kept = sum(not r.applied for r in p.replacements)
    rep["warnings"] = []
    if kept:
        rep["warnings"].append(f"train.switch: {kept} of the {len(p.replacements)} layer(s) the "
                               f"rules take stay dense: at their stable ranks after epoch "
                               f"{point.epoch} the factorized layer would be no smaller (see "
                               f"the layer table)")
    return model, p, stats, rep


def _dense_summary(recipe: dict[str, Any], model: nn.Module,
                   input_size: tuple[int, ...]) -> str:
    """What a run without a plan prints in place of one."""
    if not (recipe.get("train") or {}).get("switch"):
        return "dense model: no layer factorized"

    names = planned_layers(model, recipe["rules"], input_size)
    return (f"dense training until the stable ranks settle, then {len(names)} layer(s) "
            f"factorized at their stable ranks: {', '.join(names)}")


def _train_callbacks(tr: Train, model: nn.Module, p: Plan | None) -> list[Any]:
    """Semi-orthogonal steps and Frobenius decay of factorized layers (``train`` jobs)."""
    if p is None or not (tr.semi_orthogonal or tr.frobenius_decay):
        return []
    names = [r.name for r in p.replacements if r.applied]
    out: list[Any] = []
    if tr.semi_orthogonal:
        out.append(SemiOrthogonal(model, names, every=int(tr.semi_orthogonal)))
    if tr.frobenius_decay:
        out.append(FrobeniusDecay(model, names, float(tr.frobenius_decay)))
    return out


def _split_holdout(recipe: dict[str, Any], pcfg: dict[str, Any], loader: Any, n: int,
                   distributed: bool) -> tuple[Any, Any]:
    """``n`` training images (seeded choice, no augmentation) held out of ``loader`` to score
    epochs; the loader over the rest."""
    full = loader.dataset
    if n >= len(full):
        raise DataError(f"holdout: {n} images asked, the training split has {len(full)}")
    seed = int(recipe.get("seed", 0))
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    plain = data_mod.build_dataset(_data_cfg(recipe), pcfg, train=True,
                                   augment=False)
    held = DataLoader(Subset(plain, order[:n]), batch_size=recipe["data"]["eval_batch_size"],
                      collate_fn=loader.collate_fn)
    rest = Subset(full, order[n:])
    sampler = DistributedSampler(rest, shuffle=True, seed=seed) if distributed else None
    train = DataLoader(rest, batch_size=loader.batch_size, shuffle=sampler is None,
                       sampler=sampler, num_workers=loader.num_workers,
                       collate_fn=loader.collate_fn, drop_last=loader.drop_last,
                       generator=torch.Generator().manual_seed(seed))
    return train, held


def _train_config(recipe: dict[str, Any], section: str) -> TrainConfig:
    """The recipe's ``finetune`` or ``train`` section as the typed config the loop reads."""
    return (Finetune if section == "finetune" else Train).model_validate(recipe[section])


def _train_stage(recipe: dict[str, Any], section: str, student: nn.Module,
                 teacher: nn.Module | None, p: Plan | None, loader: Any, pcfg: dict[str, Any],
                 staging: Path, *, resume: bool, progress: bool, distributed: bool,
                 extra: Sequence[Any] = (), ckpt: Path | None = None, log: Path | None = None,
                 config: TrainConfig | None = None) -> dict[str, Any]:
    """Fine-tune (``section="finetune"``, distilled from ``teacher``) or train from scratch
    (``"train"``) with the recipe's section (or ``config``, one derived from it);
    :func:`finetune` scales the rate from ``lr_batch`` to the global batch. ``extra``: more
    training-loop callbacks; ``ckpt`` / ``log``: the checkpoint folder and CSV log (default
    ``checkpoints/``, ``train_log.csv`` in ``staging``)."""
    cfg = config if config is not None else _train_config(recipe, section)
    evaluator = None
    if cfg.holdout:
        loader, held = _split_holdout(recipe, pcfg, loader, cfg.holdout, distributed)
        evaluator = lambda m: evaluation.evaluate(m, held, progress=False)["top1"]  # noqa: E731
    callbacks = [*(_train_callbacks(cfg, student, p) if section == "train" else ()), *extra]
    stats = finetune(student, loader, cfg, teacher=teacher, evaluator=evaluator,
                     callbacks=callbacks, checkpoint_dir=ckpt or staging / "checkpoints",
                     run=TrainRun(resume=resume, seed=int(recipe.get("seed", 0)),
                                  log_path=log or staging / "train_log.csv", progress=progress,
                                  section=section))
    stats["world_size"] = get_world_size()
    stats["holdout"] = cfg.holdout
    return stats


def _training_warnings(report: dict[str, Any], stats: dict[str, Any], section: str) -> list[str]:
    """What the first lines of the report must say about the training stage."""
    out = []
    before = (report.get("compressed") or {}).get("top1")
    after = (report.get("finetuned") or {}).get("top1")
    if section == "finetune" and before is not None and after is not None and after < before:
        out.append(f"the fine-tuned model ({after:.2f} top-1) is worse than the zero-shot "
                   f"compressed one ({before:.2f}); lower finetune.lr or use finetune.keep: "
                   "best with finetune.holdout")
    if stats.get("stopped_early"):
        out.append(f"{section} stopped early after {stats['steps']} of "
                   f"{stats['total_steps']} steps")
    return out


def run(recipe: dict[str, Any], *, out: str | Path | None = None, dry_run: bool = False,
        resume: bool = False, overwrite: bool = False, quiet: bool = False,
        recipe_path: str | None = None, distributed: bool = False) -> dict[str, Any]:
    """Run a validated recipe (``compresscnn.recipe.schema.load_recipe``). Returns the report dict
    (or ``{"plan": plan}`` for a dry run, which writes nothing).

    ``distributed``: the caller (``torchrun`` via the CLI) has initialised the process group;
    every rank calls this and only rank 0 writes (see the module docstring).

    A run that fails leaves nothing behind, except a ``<out>.partial`` that holds a
    fine-tuning checkpoint (``--resume`` continues it)."""
    rundir = RunDir(out if out is not None else recipe["output"])
    try:
        return _run(recipe, rundir=rundir, dry_run=dry_run, resume=resume,
                    overwrite=overwrite, quiet=quiet, recipe_path=recipe_path,
                    distributed=distributed)
    except BaseException as exc:
        rundir.abandon()
        full = rundir.no_space(exc)
        if full is not None:
            raise full from None
        raise
    finally:
        rundir.release()


def _compress_stage(recipe: dict[str, Any], model: nn.Module, p: Plan, batches: Any,
                    pcfg: dict[str, Any], input_size: tuple[int, ...],
                    timings: dict[str, float], quiet: bool) -> tuple[nn.Module, Plan]:
    """The planned compression, fitted on the recipe's calibration batches."""
    if batches is None:
        batches = _calibration(recipe, pcfg)
    n_fit = sum(1 for r in p.replacements if r.applied)
    with timed(timings, "compress", f"{n_fit} layers"
               + (f", fitted on {len(batches)} calibration batches" if batches else ""),
               quiet=quiet):
        return compress(model, recipe["rules"], input_size, recipe.get("target"),
                        config=_compress_config(recipe), calibration=batches, planned=p)


@dataclass(eq=False)
class _RunContext:
    """One ``compresscnn run``: its options, and what each stage leaves for the next."""

    recipe: dict[str, Any]
    rundir: RunDir
    resume: bool
    quiet: bool
    recipe_path: str | None
    distributed: bool
    timings: dict[str, float] = field(default_factory=dict)
    model: Any = None                      # the original, in eval mode
    input_size: tuple[int, ...] = ()
    pcfg: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    overlap: bool = False
    batches: list | None = None            # calibration batches the plan measured on
    plan: Plan | None = None
    compressed: Any = None                 # the model a train job trains, then the result
    staging: Path | None = None
    train_loader: Any = None
    test_loader: Any = None
    max_batches: int | None = None
    report: dict[str, Any] = field(default_factory=dict)
    base_count: dict[str, int] = field(default_factory=dict)
    comp_count: dict[str, int] = field(default_factory=dict)
    int8_batches: list | None = None       # export.quantize's calibration batches

    @property
    def where(self) -> str:
        return f"{self.recipe_path}: " if self.recipe_path else ""

    @property
    def train_cfg(self) -> dict[str, Any] | None:
        return self.recipe.get("train")

    @property
    def section(self) -> str:
        return "train" if self.train_cfg is not None else "finetune"

    @property
    def ft(self) -> dict[str, Any]:
        return self.recipe[self.section]

    @property
    def need_train(self) -> bool:
        ft = self.ft
        return bool(self.train_cfg is not None or ft["enabled"]) and bool(
            ft["epochs"] > 0 or ft.get("max_steps"))

    @property
    def ev(self) -> dict[str, Any]:
        if self.train_cfg is not None:  # untrained weights: nothing to score
            return {**self.recipe["evaluate"], "baseline": False, "zero_shot": False}
        return self.recipe["evaluate"]


def _run(recipe: dict[str, Any], *, rundir: RunDir, dry_run: bool, resume: bool,
         overwrite: bool, quiet: bool, recipe_path: str | None,
         distributed: bool) -> dict[str, Any]:
    ctx = _RunContext(recipe, rundir, resume, quiet, recipe_path, distributed)
    seed_everything(int(recipe.get("seed", 0)))
    _load_stage(ctx)
    if dry_run and _rank() == 0:  # what fits the model, also when the plan then refuses
        print(fit_text(fit_report(ctx.model, ctx.input_size)) + "\n", flush=True)
    _plan_stage(ctx)
    summary = (ctx.plan.summary() if ctx.plan is not None
               else _dense_summary(recipe, ctx.model, ctx.input_size))
    if dry_run:
        if _rank() == 0:
            result(summary)
        return {"plan": ctx.plan}
    _open_stage(ctx, overwrite=overwrite)
    if _rank() == 0:  # the run's first result, on stdout as in a dry run, once every input is checked
        result(summary)
    _start_report(ctx)
    _compress_and_score(ctx)
    _train_and_score(ctx)
    if _rank() != 0:  # rank 0 writes the run; the others wait for it
        _barrier(distributed)
        return ctx.report
    _write_tensorboard(ctx.staging / "train_log.csv", ctx.staging / "tb", quiet)
    _save_stage(ctx)
    _export_stage(ctx)
    _report_stage(ctx)
    _barrier(distributed)
    return ctx.report


def _load_stage(ctx: _RunContext) -> None:
    """The model (head replaced when asked), its input size, and the data checks."""
    recipe = ctx.recipe
    with timed(ctx.timings, "load_model", recipe["model"]["spec"], quiet=ctx.quiet):
        try:
            model = load_model(recipe["model"]["spec"], recipe["model"].get("weights"))
        except ModelError as e:  # the spec or named weights (a file's errors name the file)
            raise ModelError(f"{ctx.where}model: {e}") from None
        _replace_head(recipe, model)
        model.eval()
    ctx.model = model
    ctx.input_size = _input_size(recipe, model)
    # the data is fed at the size the plan, MACs, latency and ONNX file describe
    ctx.pcfg = {**(getattr(model, "pretrained_cfg", {}) or {}), "input_size": ctx.input_size}
    ctx.warnings, ctx.overlap = _check_data(recipe, ctx.pcfg, train=ctx.need_train)
    _check_deploy(recipe)


def _check_deploy(recipe: dict[str, Any]) -> None:
    """Before anything runs: every runtime the report times is installed, and
    ``export.quantize`` has an ONNX file to quantize and calibration images that are not the
    evaluation images (never, whatever ``data.allow_eval_overlap`` says)."""
    if recipe["report"]["latency"]:
        for rt in recipe["report"]["runtimes"]:
            check_runtime(rt, "report.runtimes")
    q = recipe["export"].get("quantize")
    if not q:
        return
    if not recipe["export"]["onnx"]:
        raise RecipeError("export.quantize: quantizes the exported ONNX file; set export.onnx: "
                          "true")
    if not recipe.get("data"):
        raise RecipeError("export.quantize: needs calibration images: give a data section "
                          "whose train (or calibration) source holds training images")
    cfg = data_mod.resolve_data_cfg(_data_cfg(recipe))
    n = data_mod.eval_overlap(cfg, "calibration")
    if n:
        src = data_mod.source_of(cfg, "calibration")
        raise DataError(f"export.quantize: the calibration source ({src['root']}, split "
                        f"{src['split']}) shares {n} images with data.eval: int8 is never "
                        f"calibrated on the images accuracy is measured on; point "
                        f"data.calibration.root (or data.train.root) at training images")


def _plan_stage(ctx: _RunContext) -> None:
    """The plan (and, for a train job, the model it trains); nothing is written yet."""
    recipe = ctx.recipe
    with timed(ctx.timings, "plan", quiet=ctx.quiet):
        try:
            if ctx.distributed and _latency_planned(recipe):
                raise RecipeError("latency-aware planning (objective: latency / target: "
                                  "latency) times layers on one process; under torchrun the "
                                  "processes would measure different plans. Run it once "
                                  "without torchrun, then fine-tune its run directory's "
                                  "recipe.yaml (exact ranks) with torchrun")
            if ctx.train_cfg is not None:
                ctx.compressed, ctx.plan = _build_untrained(recipe, ctx.model, ctx.input_size)
            elif recipe["rules"]:
                # sensitivity and output allocations measure layers on calibration batches
                ctx.batches = (_calibration(recipe, ctx.pcfg)
                               if _measures_to_plan(recipe) else None)
                ctx.plan = plan_compression(ctx.model, recipe["rules"], ctx.input_size,
                                            recipe.get("target"), ctx.batches,
                                            config=_compress_config(recipe))
        except (RecipeError, RankError, MethodError) as e:  # these name rules[i]: add the file
            raise type(e)(f"{ctx.where}{e}") from None


def _open_stage(ctx: _RunContext, *, overwrite: bool) -> None:
    """The staging directory (``<out>.partial``) and the data loaders."""
    p = ctx.plan
    ctx.staging = ctx.rundir.prepare(ctx.recipe, exact_rules(p) if p is not None else [],
                                     resume=ctx.resume, overwrite=overwrite,
                                     main=_rank() == 0, recipe_path=ctx.recipe_path)
    ev = ctx.ev
    need_test = bool(ev["baseline"] or ev["zero_shot"] or ctx.need_train)
    if ctx.recipe.get("data") and (ctx.need_train or need_test):
        with timed(ctx.timings, "load_data", quiet=ctx.quiet):
            ctx.train_loader, ctx.test_loader = data_mod.make_loaders(
                _data_cfg(ctx.recipe), ctx.pcfg, train=ctx.need_train, test=need_test,
                distributed=ctx.distributed)
    ctx.max_batches = ev.get("max_batches")
    if ctx.distributed and ctx.test_loader is not None:
        ctx.test_loader, ctx.max_batches = _shard_eval_loader(ctx.test_loader,
                                                              ctx.max_batches), None


def _start_report(ctx: _RunContext) -> None:
    recipe = ctx.recipe
    ctx.report = {"name": recipe.get("name"), "recipe": ctx.recipe_path,
                  "model": recipe["model"]["spec"], "input_size": list(ctx.input_size),
                  "target": recipe.get("target"), "rules": recipe["rules"],
                  "warnings": ctx.warnings, "eval_overlap": ctx.overlap,
                  "data": _data_report(recipe, ctx.train_loader, ctx.test_loader)}
    ctx.base_count = count(ctx.model, ctx.input_size)


def _evaluate_stage(ctx: _RunContext, key: str, m: nn.Module, counts: dict[str, int],
                    reference: nn.Module | None) -> None:
    """``report[key]``: ``m``'s counts, and its accuracy (and agreement with ``reference``)
    on the test set when the run has one."""
    row: dict[str, Any] = {"params": counts["params"], "macs": counts["macs"],
                           "top1": None, "top5": None}
    loader = ctx.test_loader
    if loader is not None:
        with timed(ctx.timings, f"evaluate_{key}", f"{len(loader.dataset)} images",
                   quiet=ctx.quiet):
            r = evaluation.evaluate(m, loader, reference=reference, max_batches=ctx.max_batches,
                                    progress=not ctx.quiet)
        row.update({k: r.get(k) for k in ("top1", "top5", "n", "agreement",
                                          "disagreements_near_tie", "loss")})
        _log(f"[evaluate_{key}] top1 {r['top1']:.2f}  top5 {r.get('top5')}  "
             f"agreement {r.get('agreement')}", ctx.quiet)
    ctx.report[key] = row


def _compress_and_score(ctx: _RunContext) -> None:
    """Baseline accuracy, the compression (fitted), the planned cost checked against the
    counted one, and zero-shot accuracy."""
    report, ev, model = ctx.report, ctx.ev, ctx.model
    if ctx.train_cfg is not None:  # the dense architecture's counts, for the ratios
        report["baseline"] = {**ctx.base_count, "top1": None, "top5": None}
    else:
        if ev["baseline"]:
            _evaluate_stage(ctx, "baseline", model, ctx.base_count, None)
        else:
            report["baseline"] = {**ctx.base_count, "top1": None, "top5": None}
        if ctx.plan is None:  # `rules: []`: the dense model, fine-tuned as a compressed one would be
            ctx.compressed = copy.deepcopy(model)
        else:
            ctx.compressed, ctx.plan = _compress_stage(
                ctx.recipe, model, ctx.plan, ctx.batches, ctx.pcfg, ctx.input_size,
                ctx.timings, ctx.quiet)
            _fit_report(ctx.plan, report, ctx.quiet)
    p = ctx.plan
    ctx.comp_count = comp = count(ctx.compressed, ctx.input_size)
    if p is not None and (comp["macs"] != p.macs_after or comp["params"] != p.params_after):
        raise RuntimeError(f"planned cost {p.params_after}/{p.macs_after} differs from the "
                           f"counted {comp['params']}/{comp['macs']}")
    if ev["zero_shot"]:
        _evaluate_stage(ctx, "compressed", ctx.compressed, comp, model)
    else:
        report["compressed"] = {**comp, "top1": None, "top5": None}


def _fit_report(p: Plan, report: dict[str, Any], quiet: bool) -> None:
    """What the data-aware fit and the not-slower check of :func:`surgery.compress` found."""
    report["bn_recalibrated_layers"] = p.bn_recalibrated
    if p.calibration is not None:
        report["calibration"] = p.calibration
    if p.latency_check is not None:
        chk = p.latency_check
        _log(f"[latency_check] {p.latency_config.runtime}: original "
             f"{chk['original_ms']:.3g} ms, compressed {chk['compressed_ms']:.3g} ms"
             + (f"; put back {len(chk['reverted'])} layer(s)" if chk["reverted"] else ""),
             quiet)
        report["latency_plan"] = p.latency


def _train_and_score(ctx: _RunContext) -> None:
    """Fine-tune (distilled from the original) or train, then score the result."""
    report, staging = ctx.report, ctx.staging
    if _rank() == 0:
        staging.mkdir(parents=True, exist_ok=True)
    _barrier(ctx.distributed)
    train_job = ctx.train_cfg is not None
    key = "trained" if train_job else "finetuned"
    report["finetuned" if train_job else "trained"] = None
    ft_stats = None
    if ctx.need_train and ctx.train_loader is not None:
        ft_stats = _training(ctx)
        ctx.compressed = ctx.compressed.cpu().eval()
        _evaluate_stage(ctx, key, ctx.compressed, ctx.comp_count,
                        None if train_job else ctx.model)
        report["warnings"] = report["warnings"] + _training_warnings(report, ft_stats,
                                                                     ctx.section)
    else:
        report[key] = None
    if ft_stats:  # paths relative to the run directory (staging is renamed at the end)
        ft_stats = {k: (os.path.relpath(v, staging) if isinstance(v, str)
                        and v.startswith(str(staging)) else v) for k, v in ft_stats.items()}
    report["finetune"] = ft_stats


def _training(ctx: _RunContext) -> dict[str, Any]:
    """The training loop of the recipe's ``finetune`` or ``train`` section (with
    ``train.switch``: dense, then factorized); returns its statistics."""
    ft, section, report = ctx.ft, ctx.section, ctx.report
    kw = dict(resume=ctx.resume, progress=not ctx.quiet, distributed=ctx.distributed)
    with timed(ctx.timings, section, f"{ft.get('max_steps') or ft['epochs']} "
               f"{'steps' if ft.get('max_steps') else 'epochs'}"
               + (f" on {get_world_size()} processes" if ctx.distributed else "")
               + (" (resuming)" if ctx.resume else ""), quiet=ctx.quiet):
        if ctx.train_cfg is not None and ctx.train_cfg.get("switch"):
            ctx.compressed, ctx.plan, ft_stats, report["switch"] = _switch_train(
                ctx.recipe, ctx.compressed, ctx.train_loader, ctx.pcfg, ctx.staging,
                input_size=ctx.input_size, **kw)
            ctx.comp_count = count(ctx.compressed, ctx.input_size)
            report["compressed"] = {**ctx.comp_count, "top1": None, "top5": None}
            report["warnings"] = report["warnings"] + report["switch"].pop("warnings")
        else:
            ft_stats = _train_stage(ctx.recipe, section, ctx.compressed,
                                    None if ctx.train_cfg is not None else ctx.model, ctx.plan,
                                    ctx.train_loader, ctx.pcfg, ctx.staging, **kw)
    if ctx.distributed:  # DDP syncs gradients, not BatchNorm running stats: take rank 0's,
        for buf in ctx.compressed.buffers():
            dist.broadcast(buf, 0)  # the ones it saves, so all ranks agree
    _log(f"[{section}] {ft_stats['steps']} steps, final loss {ft_stats['final_loss']}, "
         f"{ft_stats['images_per_s']:.1f} images/s ({ft_stats['amp'] or 'fp32'}, "
         f"{ft_stats['memory_format']})", ctx.quiet)
    return ft_stats


def _save_stage(ctx: _RunContext) -> None:
    """The weights and the exact recipe, before exporting: what load_compressed needs."""
    staging = ctx.staging
    state = {k: v.detach().cpu().contiguous() for k, v in ctx.compressed.state_dict().items()}
    with atomic_path(staging / "model.safetensors", suffix=".safetensors") as tmp:
        safetensors.torch.save_file(state, str(tmp))
    ctx.rundir.record("model.safetensors")
    resolved = copy.deepcopy(ctx.recipe)
    resolved["rules"] = exact_rules(ctx.plan) if ctx.plan is not None else []
    resolved["target"] = None
    resolved["output"] = str(ctx.rundir.out)
    if ctx.train_cfg is not None:  # sections a train job has no use for
        resolved.pop("finetune", None)
        resolved.pop("calibration", None)
    dump_resolved(resolved, staging / "recipe.yaml")
    ctx.rundir.record("recipe.yaml", content_sha256=recipe_digest(
        load_recipe(staging / "recipe.yaml")))


def _export_stage(ctx: _RunContext) -> None:
    exp = ctx.recipe["export"]
    if not exp["onnx"]:
        ctx.report["onnx"] = None
        return
    with timed(ctx.timings, "export_onnx", quiet=ctx.quiet):
        onnx = export_onnx(ctx.compressed, ctx.staging / "model.onnx", ctx.input_size, exp)
    onnx["path"] = "model.onnx"
    ctx.rundir.record("model.onnx")
    ctx.report["onnx"] = onnx
    _log(f"[export_onnx] {onnx['bytes']:,} bytes, max |runtime - torch|: " + ", ".join(
        f"{rt} {v['max_abs_diff']:.2e}" for rt, v in onnx["verify"].items()), ctx.quiet)
    if exp.get("quantize"):
        _quantize_stage(ctx)


def _quantize_stage(ctx: _RunContext) -> None:
    """``export.quantize``: ``model.int8.onnx`` from ``model.onnx``, calibrated and checked
    on the calibration source's images, then scored on the eval images like the models."""
    q, staging = ctx.recipe["export"]["quantize"], ctx.staging
    with timed(ctx.timings, "quantize", f"int8 {q['mode']}, {q['batches']} calibration "
               f"batches of {q['batch_size']}", quiet=ctx.quiet):
        ctx.int8_batches = data_mod.calibration_batches(
            _data_cfg(ctx.recipe), ctx.pcfg, q["batches"], batch_size=q["batch_size"])
        int8 = quantize_onnx(staging / "model.onnx", staging / "model.int8.onnx",
                             ctx.int8_batches, mode=q["mode"], per_channel=q["per_channel"],
                             max_rel_error=q["max_rel_error"], where="export.quantize")
    int8["path"] = "model.int8.onnx"
    _log(f"[quantize] {int8['bytes']:,} bytes ({int8['fp32_bytes'] / int8['bytes']:.2f}x "
         f"smaller), ||int8 - fp32|| / ||fp32|| {int8['parity']['rel_error']:.3g} on "
         f"{int8['parity']['images']} calibration images", ctx.quiet)
    ctx.report["int8"] = int8
    if ctx.test_loader is not None:
        _evaluate_stage(ctx, "int8", OnnxModule(staging / "model.int8.onnx",
                                                ctx.recipe["report"]["threads"]),
                        ctx.comp_count, ctx.model)
        ctx.report["int8"] = {**int8, **ctx.report["int8"]}


def _report_stage(ctx: _RunContext) -> None:
    """Latency (when asked), the layer table and totals, the report files; then the
    staging directory becomes the run directory."""
    report, recipe = ctx.report, ctx.recipe
    if recipe["report"]["latency"]:
        with timed(ctx.timings, "latency", "timing the original and the compressed model",
                   quiet=ctx.quiet):
            report["latency"], report["layer_latency"] = _measure_latency(
                ctx.model, ctx.compressed, ctx.plan, ctx.input_size, recipe, ctx.staging,
                report.get("onnx"), report.get("int8"), ctx.int8_batches)
    base, comp = ctx.base_count, ctx.comp_count
    report["layers"] = ctx.plan.to_rows() if ctx.plan is not None else []
    report["plan"] = {"params_before": base["params"], "params_after": comp["params"],
                      "macs_before": base["macs"], "macs_after": comp["macs"]}
    report["timings"] = ctx.timings
    report["versions"] = report_mod.collect_versions()
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report_mod.write_report(ctx.staging, report, plots=recipe["report"]["plots"])
    ctx.rundir.commit()
    try:
        result(f"wrote {ctx.rundir.out}")
    except StreamError as e:
        raise StreamError(f"the run is complete in {ctx.rundir.out}, but {e}") from None


def recipe_digest(recipe: dict[str, Any]) -> str:
    """The sha256 of a loaded recipe's content (not of its text: comments, layout and key
    order do not change it)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _checked_run_files(run_dir: Path) -> dict[str, Any]:
    """A run folder's recipe, once its manifest (``.compresscnn-run``), ``recipe.yaml`` and
    ``model.safetensors`` are checked against the sha256 the run recorded: a file edited by
    hand is a :class:`CheckpointError` naming it, except a recipe edited only in comments,
    layout or key order (the recipe it holds is unchanged: loaded with a warning). A folder
    without recorded hashes (written by an older version) is loaded with a warning."""
    manifest = read_manifest(run_dir)
    recipe_path, weights = run_dir / "recipe.yaml", run_dir / "model.safetensors"
    recipe = load_recipe(recipe_path)
    if check_file(run_dir, "recipe.yaml", manifest) is False:
        rec = manifest["files"]["recipe.yaml"]  # type: ignore[index]
        if rec.get("content_sha256") != recipe_digest(recipe):
            raise CheckpointError(f"{recipe_path}: edited after the run wrote it (its sha256 "
                                  f"and the recipe it holds differ from those recorded in "
                                  f"{MARKER}); the weights fit the recipe the run wrote: "
                                  f"restore it, or run the edited recipe")
        log.warning("%s: edited after the run wrote it, but only in comments, layout or key "
                    "order (the recipe it holds is the one recorded in %s); loaded",
                    recipe_path, MARKER)
    if check_file(run_dir, "model.safetensors", manifest) is False:
        raise CheckpointError(f"{weights}: its content does not match the sha256 recorded in "
                              f"{MARKER} when the run wrote it: the file is corrupt or was "
                              f"replaced")
    if not (manifest or {}).get("files"):
        log.warning("%s: no file hashes recorded (no %s manifest: a run folder of an older "
                    "version, or copied without it); recipe.yaml and model.safetensors are "
                    "loaded unchecked", run_dir, MARKER)
    return recipe


def load_compressed(run_dir: str | Path) -> nn.Module:
    """Rebuild a run's compressed model from its ``recipe.yaml`` and load its weights.

    The architecture is rebuilt by applying the recorded exact ranks to the model spec (with
    randomly initialised weights, so nothing is downloaded or read; the kind of weights may
    shape it, as a ``.tflite`` file's padding does: ``models.load_architecture``), then the
    saved tensors are checked (names, shapes, dtypes, finite values: a recipe.yaml whose
    ranks were edited is a one-line error) and loaded strictly. No module is unpickled. First
    the folder's files are checked against the sha256 the run recorded in its manifest
    (:func:`_checked_run_files`): a recipe, weights file or manifest edited by hand is refused,
    naming the file; a recipe edited only in comments or layout is loaded with a warning.
    """
    run_dir = Path(run_dir)
    for f in ("recipe.yaml", "model.safetensors"):
        if not (run_dir / f).is_file():
            raise CompressError(f"{run_dir}: not a compresscnn run directory ({f} missing)")
    recipe = _checked_run_files(run_dir)
    model = load_architecture(recipe["model"]["spec"], recipe["model"].get("weights"))
    if recipe["model"].get("num_classes"):
        replace_head(model, recipe["model"]["num_classes"])
    input_size = _input_size(recipe, model)
    p = plan(model, recipe["rules"], input_size) if recipe["rules"] else None
    if p is not None:
        apply(model, p)
    load_weights(model, run_dir / "model.safetensors", spec=f"{run_dir / 'recipe.yaml'}")
    return model.eval()
