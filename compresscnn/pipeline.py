"""The main job: recipe -> model -> plan -> apply -> fine-tune -> evaluate -> ONNX -> report.

Every stage is a function of its own module; this file only orders them, times them and
writes the run directory. Nothing is written until the recipe, the model, its weights, the
data and the plan have all been checked, and the run is assembled in ``<out>.partial`` and
renamed to ``<out>`` only when it is complete, so a failed run never leaves a directory that
looks finished (``--resume`` picks ``<out>.partial`` up again).

Run directory::

    report.json  report.md  layers.png   the report (compresscnn.report)
    recipe.yaml                          the recipe as run: defaults filled, and one rule per
                                         replaced layer with its exact rank (target: null),
                                         so ``load_compressed`` rebuilds the architecture
    model.safetensors                    the compressed weights (tensors only)
    model.onnx                           the ONNX export, checked in onnxruntime
    checkpoints/last.pt  train_log.csv   fine-tuning state (resume) and per-step log
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .counting import count
from .errors import CompressError
from .surgery import Plan, apply, plan


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def exact_rules(p: Plan) -> list[dict[str, Any]]:
    """One rule per replaced layer with its exact rank: what rebuilds the architecture."""
    rules = []
    for r in p.replacements:
        if r.applied:
            rules.append({"match": r.name, "method": r.method, "rank": list(r.rank),
                          **r.options})
    return rules


def _input_size(recipe: dict[str, Any], model: nn.Module) -> tuple[int, ...]:
    size = recipe["model"].get("input_size")
    if size is None:
        size = getattr(model, "pretrained_cfg", {}).get("input_size")
    if size is None:
        raise CompressError("model.input_size: the model has no default input size; "
                            "give model.input_size: [C, H, W]")
    return tuple(int(x) for x in size)


def _stage_dirs(out: Path, resume: bool, overwrite: bool) -> Path:
    """Check the output directory before anything runs; return the staging directory."""
    staging = out.with_name(out.name + ".partial")
    if out.exists() and not overwrite:
        raise CompressError(f"output {out}: already exists (use --overwrite to replace it, "
                            f"or --out for another directory)")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise CompressError(f"output {out}: {probe} is not writable")
    if staging.exists() and not resume:
        shutil.rmtree(staging)
    if resume and not (staging / "checkpoints" / "last.pt").exists():
        raise CompressError(f"--resume: no checkpoint at {staging / 'checkpoints' / 'last.pt'}")
    return staging


def run(recipe: dict[str, Any], *, out: str | Path | None = None, dry_run: bool = False,
        resume: bool = False, overwrite: bool = False, quiet: bool = False,
        recipe_path: str | None = None) -> dict[str, Any]:
    """Run a validated recipe (``compresscnn.recipe.load_recipe``). Returns the report dict
    (or ``{"plan": plan}`` for a dry run, which writes nothing)."""
    from . import data as data_mod
    from .evaluate import evaluate, measure_latency
    from .export import export_onnx
    from .finetune import finetune
    from .models import load_model
    from .recipe import dump_resolved
    from .report import collect_versions, write_report
    from .utils import Timer, seed_everything

    timings: dict[str, float] = {}
    seed_everything(int(recipe.get("seed", 0)))
    with Timer(timings, "load_model"):
        model = load_model(recipe["model"]["spec"], recipe["model"].get("weights"))
        model.eval()
    input_size = _input_size(recipe, model)
    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})

    with Timer(timings, "plan"):
        p = plan(model, recipe["rules"], input_size, target=recipe.get("target"))
    if dry_run:
        print(p.summary())
        return {"plan": p}
    _log(p.summary(), quiet)

    out = Path(out if out is not None else recipe["output"])
    staging = _stage_dirs(out, resume, overwrite)

    ev, ft = recipe["evaluate"], recipe["finetune"]
    need_train = bool(ft["enabled"]) and (ft["epochs"] > 0 or ft.get("max_steps"))
    need_test = bool(ev["baseline"] or ev["zero_shot"] or need_train)
    train_loader = test_loader = None
    if recipe.get("data") and (need_train or need_test):
        with Timer(timings, "load_data"):
            train_loader, test_loader = data_mod.make_loaders(
                {**recipe["data"], "seed": int(recipe.get("seed", 0))}, pcfg,
                train=need_train, test=need_test)
    progress = not quiet
    maxb = ev.get("max_batches")
    report: dict[str, Any] = {"name": recipe.get("name"), "recipe": recipe_path,
                              "model": recipe["model"]["spec"], "input_size": list(input_size),
                              "target": recipe.get("target"), "rules": recipe["rules"]}
    base_count = count(model, input_size)

    def stage(key: str, m: nn.Module, counts: dict[str, int], reference: nn.Module | None):
        row: dict[str, Any] = {"params": counts["params"], "macs": counts["macs"],
                               "top1": None, "top5": None}
        if test_loader is not None:
            with Timer(timings, f"evaluate_{key}"):
                r = evaluate(m, test_loader, reference=reference, max_batches=maxb,
                             progress=progress)
            row.update({k: r.get(k) for k in ("top1", "top5", "n", "agreement", "loss")})
            _log(f"[{key}] top1 {r['top1']:.2f}  top5 {r.get('top5')}  "
                 f"agreement {r.get('agreement')}", quiet)
        report[key] = row

    if ev["baseline"]:
        stage("baseline", model, base_count, None)
    else:
        report["baseline"] = {**base_count, "top1": None, "top5": None}

    with Timer(timings, "apply"):
        compressed = apply(copy.deepcopy(model), p)
    cal = recipe.get("calibration")
    if cal and cal.get("bn_recalibrate"):
        from .calibration import recalibrate_bn

        with Timer(timings, "bn_recalibrate"):
            batches = data_mod.calibration_batches(
                {**recipe["data"], "seed": int(recipe.get("seed", 0))}, pcfg, cal["batches"],
                batch_size=cal["batch_size"])
            report["bn_recalibrated_layers"] = recalibrate_bn(compressed, batches)
    comp_count = count(compressed, input_size)
    if comp_count["macs"] != p.macs_after or comp_count["params"] != p.params_after:
        raise RuntimeError(f"planned cost {p.params_after}/{p.macs_after} differs from the "
                           f"counted {comp_count['params']}/{comp_count['macs']}")
    if ev["zero_shot"]:
        stage("compressed", compressed, comp_count, model)
    else:
        report["compressed"] = {**comp_count, "top1": None, "top5": None}

    staging.mkdir(parents=True, exist_ok=True)
    ft_stats = None
    if need_train and train_loader is not None:
        with Timer(timings, "finetune"):
            ft_stats = finetune(
                compressed, train_loader,
                teacher=model if ft["distill"]["enabled"] else None,
                epochs=ft["epochs"], max_steps=ft.get("max_steps"), optimizer=ft["optimizer"],
                lr=ft["lr"], momentum=ft["momentum"], weight_decay=ft["weight_decay"],
                schedule=ft["schedule"], warmup_steps=ft["warmup_steps"], distill=ft["distill"],
                device=ft["device"], amp=ft["amp"], checkpoint_dir=staging / "checkpoints",
                checkpoint_every=ft.get("checkpoint_every"), resume=resume,
                log_every=ft["log_every"], seed=int(recipe.get("seed", 0)), progress=progress)
        compressed = compressed.cpu().eval()
        stage("finetuned", compressed, comp_count, model)
    else:
        report["finetuned"] = None
    report["finetune"] = ft_stats

    # save weights and the exact recipe before exporting: they are what load_compressed needs
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in compressed.state_dict().items()}
    save_file(state, str(staging / "model.safetensors.tmp"))
    os.replace(staging / "model.safetensors.tmp", staging / "model.safetensors")
    resolved = copy.deepcopy(recipe)
    resolved["rules"] = exact_rules(p)
    resolved["target"] = None
    resolved["output"] = str(out)
    dump_resolved(resolved, staging / "recipe.yaml")

    if recipe["export"]["onnx"]:
        with Timer(timings, "export_onnx"):
            onnx = export_onnx(compressed, staging / "model.onnx", input_size,
                               opset=recipe["export"]["opset"],
                               dynamic_batch=recipe["export"]["dynamic_batch"],
                               atol=recipe["export"]["atol"])
        onnx["path"] = "model.onnx"
        report["onnx"] = onnx
        _log(f"[onnx] {onnx['bytes']:,} bytes, max |onnxruntime - torch| = "
             f"{onnx['max_abs_diff']:.2e}", quiet)
    else:
        report["onnx"] = None

    if recipe["report"]["latency"]:
        with Timer(timings, "latency"):
            lat = []
            thr = recipe["report"]["threads"]
            for b in recipe["report"]["latency_batch"]:
                shape = (b, *input_size)
                for label, m in (("baseline", model), ("compressed", compressed)):
                    r = measure_latency(m, shape, runtime="torch", threads=thr, batch=b)
                    lat.append({"model": label, "runtime": "torch", "batch": b, **r})
            report["latency"] = lat

    report["layers"] = p.to_rows()
    report["plan"] = {"params_before": p.total_params, "params_after": p.params_after,
                      "macs_before": p.total_macs, "macs_after": p.macs_after}
    report["timings"] = timings
    report["versions"] = collect_versions()
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_report(staging, report, plots=recipe["report"]["plots"])
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    _log(f"wrote {out}", quiet)
    return report


def load_compressed(run_dir: str | Path) -> nn.Module:
    """Rebuild a run's compressed model from its ``recipe.yaml`` and load its weights.

    The architecture is rebuilt by applying the recorded exact ranks to the model spec (with
    randomly initialised weights, so nothing is downloaded), then the saved tensors are
    loaded strictly. No module is unpickled.
    """
    from safetensors.torch import load_file

    from .models import load_model
    from .recipe import load_recipe

    run_dir = Path(run_dir)
    for f in ("recipe.yaml", "model.safetensors"):
        if not (run_dir / f).is_file():
            raise CompressError(f"{run_dir}: not a compresscnn run directory ({f} missing)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    model = load_model(recipe["model"]["spec"], None)
    input_size = _input_size(recipe, model)
    p = plan(model, recipe["rules"], input_size) if recipe["rules"] else None
    if p is not None:
        apply(model, p)
    try:
        state = load_file(str(run_dir / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types
        raise CompressError(f"{run_dir / 'model.safetensors'}: unreadable ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CompressError(f"{run_dir / 'model.safetensors'}: does not fit the rebuilt model "
                            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    return model.eval()
