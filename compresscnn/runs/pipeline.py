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
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch.distributed as dist
from torch import nn

# data, evaluation and report are called through their modules, so that a test (or a
# wrapper such as the DDP test's) can replace one of their functions for the whole run
from compresscnn.io import data as data_mod
from compresscnn.measure import evaluation
from compresscnn.runs import report as report_mod
from compresscnn.measure.counting import count
from compresscnn.errors import (DataError, MethodError, ModelError, RankError, RecipeError,
                                StreamError)
from compresscnn.io.export import OnnxModule, export_onnx, quantize_onnx
from compresscnn.measure.inspection import fit_report, fit_text
from compresscnn.io.models import load_model
from compresscnn.util.progress import timed, result
from compresscnn.recipe.schema import dump_resolved, load_recipe
from compresscnn.runs.rundir import RunDir
from compresscnn.core.surgery import Plan, compress, plan_compression
from compresscnn.measure.timing import check_runtime
from compresscnn.util.common import atomic_path, get_world_size, seed_everything
from compresscnn.runs.run_inputs import (_barrier, _calibration, _check_data, _compress_config,
                                         _data_cfg, _data_report, _input_size, _latency_planned,
                                         _log, _measure_latency, _measures_to_plan, _rank,
                                         _replace_head, _shard_eval_loader)
from compresscnn.runs.loading import (_build_untrained, exact_rules, recipe_digest)
from compresscnn.runs.run_training import (_dense_summary, _switch_train, _train_stage,
                                           _training_warnings, _write_tensorboard)


log = logging.getLogger(__name__)


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
    kw = dict(resume=ctx.resume, progress=not ctx.quiet, distributed=ctx.distributed,
              curve=_curve(ctx))
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


def _curve(ctx: _RunContext) -> Any:
    """The learning curve's score (taken where the training section says ``curve: true``):
    top-1 on the evaluation source (a run that trains always has one), as the evaluate stage
    measures it."""
    if ctx.test_loader is None:
        return None
    loader, most = ctx.test_loader, ctx.max_batches
    return lambda m: evaluation.evaluate(m, loader, max_batches=most, progress=False)["top1"]


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


