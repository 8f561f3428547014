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
    tb/                                  TensorBoard scalars (only with the ``tensorboard``
                                         package and ``COMPRESSCNN_TENSORBOARD=1``)

Under ``torchrun`` (``distributed=True``, the process group initialised by the caller) every
rank loads the model, plans, evaluates (on its shard of the test set, all-reduced) and
fine-tunes (DistributedSampler + DDP); only rank 0 creates and writes the run directory.
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
from .errors import CompressError, MethodError, ModelError, RankError, RecipeError
from .surgery import Plan, apply, plan, refine


def _log(msg: str, quiet: bool) -> None:
    if not quiet and _rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def _rank() -> int:
    from .utils import get_rank

    return get_rank()


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def exact_rules(p: Plan) -> list[dict[str, Any]]:
    """One rule per replaced layer with its exact rank: what rebuilds the architecture."""
    rules = []
    for r in p.replacements:
        if r.applied:
            rules.append({"match": r.name, "method": r.method, "rank": list(r.rank),
                          **r.options})
    return rules


def _calibration_batches(recipe: dict[str, Any], pcfg: dict[str, Any]) -> list:
    from . import data as data_mod

    cal = recipe["calibration"]
    return data_mod.calibration_batches(
        {**recipe["data"], "seed": int(recipe.get("seed", 0))}, pcfg, cal["batches"],
        batch_size=cal["batch_size"])


def _sensitivity(recipe: dict[str, Any], model: nn.Module, input_size: tuple[int, ...],
                 pcfg: dict[str, Any]) -> dict[str, float] | None:
    """Per-layer budget weights when ``allocation: sensitivity``."""
    if not (recipe.get("allocation") == "sensitivity" and recipe.get("target")):
        return None
    if not recipe.get("calibration"):
        raise RecipeError("allocation: sensitivity needs a calibration section (the layers' "
                          "effect on the output is measured on calibration batches)")
    from .calibration import layer_sensitivity

    return layer_sensitivity(model, recipe["rules"], input_size,
                             _calibration_batches(recipe, pcfg))


def _measure_latency(model: nn.Module, compressed: nn.Module, p: Plan,
                     input_size: tuple[int, ...], recipe: dict[str, Any], staging: Path,
                     onnx: dict[str, Any] | None) -> tuple[list, list]:
    """Whole-model latency of the original and compressed models in PyTorch and (when the
    run exported ONNX) onnxruntime at every ``report.latency_batch``; and each replaced
    layer, dense vs decomposed, timed against each other at the first batch."""
    import tempfile

    from .evaluate import measure_latency
    from .export import export_onnx
    from .latency import layer_latency_table

    thr = recipe["report"]["threads"]
    batches = recipe["report"]["latency_batch"]
    runtimes = ["torch"] + (["onnxruntime"] if onnx else [])
    lat = []
    with tempfile.TemporaryDirectory(prefix="compresscnn-base-") as tmp:
        files = {}
        if onnx:
            files["baseline"] = Path(tmp) / "baseline.onnx"
            export_onnx(model, files["baseline"], input_size,
                        dynamic_batch=recipe["export"]["dynamic_batch"], check_batch=(1,))
            files["compressed"] = staging / onnx["path"]
        for b in batches:
            for rt in runtimes:
                if rt == "onnxruntime" and b != 1 and not recipe["export"]["dynamic_batch"]:
                    continue  # a static ONNX file runs at its export batch only
                for label, m in (("baseline", model), ("compressed", compressed)):
                    target = m if rt == "torch" else files[label]
                    r = measure_latency(target, (b, *input_size), runtime=rt, threads=thr,
                                        batch=b)
                    lat.append({"model": label, **r})
    names = [r.name for r in p.replacements if r.applied]
    layers = layer_latency_table(model, compressed, names, input_size, batch=batches[0],
                                 threads=thr, runtimes=runtimes) if names else []
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


def _is_run_dir(path: Path) -> bool:
    return (path / "report.json").is_file() or ((path / "recipe.yaml").is_file()
                                                and (path / "model.safetensors").is_file())


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _stage_dirs(out: Path, resume: bool, overwrite: bool, weights: Any = None,
                main: bool = True) -> Path:
    """Check the output directory before anything runs; return the staging directory.

    Every rank runs the checks; only ``main`` (rank 0) removes a stale staging directory.
    """
    staging = out.with_name(out.name + ".partial")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output {out}: exists and is not a directory")
    if out.exists() and not overwrite:
        raise CompressError(f"output {out}: already exists (use --overwrite to replace it, "
                            f"or --out for another directory)")
    if out.exists() and not _is_run_dir(out) and any(out.iterdir()):
        raise CompressError(f"output {out}: not a compresscnn run directory (no report.json); "
                            f"refusing to replace it even with --overwrite")
    if isinstance(weights, str) and Path(weights).expanduser().is_file():
        w = Path(weights).expanduser()
        for folder in (out, staging):
            if _inside(w, folder):
                raise CompressError(f"output {out}: would overwrite the input weights {w}; "
                                    f"choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CompressError(f"output {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CompressError(f"output {out}: {probe} is not writable")
    if main and staging.exists() and not staging.is_dir():  # rank 0 may be removing it
        raise CompressError(f"output {out}: {staging} exists and is not a directory")
    if resume and not (staging / "checkpoints" / "last.pt").exists():
        raise CompressError(f"--resume: no checkpoint at {staging / 'checkpoints' / 'last.pt'}")
    if staging.exists() and not resume and main:
        shutil.rmtree(staging)
    return staging


def _shard_eval_loader(loader: Any, max_batches: int | None) -> Any:
    """Under DDP, each rank evaluates every ``world``-th image of the (first ``max_batches``
    batches of the) test set, without padding, so the all-reduced counts are exact."""
    from torch.utils.data import DataLoader

    from .utils import get_rank, get_world_size

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
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _log("[tensorboard] COMPRESSCNN_TENSORBOARD=1 but the tensorboard package is not "
             "installed; skipped", quiet)
        return
    import csv

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        with csv_path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key in ("loss", "kd_loss", "ce_loss", "lr", "images_per_s"):
                    if row.get(key):
                        writer.add_scalar(f"finetune/{key}", float(row[key]), int(row["step"]))
    finally:
        writer.close()


def run(recipe: dict[str, Any], *, out: str | Path | None = None, dry_run: bool = False,
        resume: bool = False, overwrite: bool = False, quiet: bool = False,
        recipe_path: str | None = None, distributed: bool = False) -> dict[str, Any]:
    """Run a validated recipe (``compresscnn.recipe.load_recipe``). Returns the report dict
    (or ``{"plan": plan}`` for a dry run, which writes nothing).

    ``distributed``: the caller (``torchrun`` via the CLI) has initialised the process group;
    every rank calls this and only rank 0 writes (see the module docstring).

    A run that fails leaves nothing behind, except a ``<out>.partial`` that holds a
    fine-tuning checkpoint (``--resume`` continues it)."""
    staging = Path(out if out is not None else recipe["output"])
    staging = staging.with_name(staging.name + ".partial")
    try:
        return _run(recipe, out=out, dry_run=dry_run, resume=resume, overwrite=overwrite,
                    quiet=quiet, recipe_path=recipe_path, distributed=distributed)
    except BaseException:
        if _rank() == 0 and staging.is_dir() \
                and not (staging / "checkpoints" / "last.pt").exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _run(recipe: dict[str, Any], *, out: str | Path | None, dry_run: bool, resume: bool,
         overwrite: bool, quiet: bool, recipe_path: str | None,
         distributed: bool) -> dict[str, Any]:
    from . import data as data_mod
    from .evaluate import evaluate, measure_latency
    from .export import export_onnx
    from .finetune import finetune
    from .models import load_model
    from .recipe import dump_resolved
    from .report import collect_versions, write_report
    from .utils import Timer, get_world_size, seed_everything

    timings: dict[str, float] = {}
    where = f"{recipe_path}: " if recipe_path else ""
    seed_everything(int(recipe.get("seed", 0)))
    with Timer(timings, "load_model"):
        try:
            model = load_model(recipe["model"]["spec"], recipe["model"].get("weights"))
        except ModelError as e:  # the spec or named weights (a file's errors name the file)
            raise ModelError(f"{where}model: {e}") from None
        model.eval()
    input_size = _input_size(recipe, model)
    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})

    with Timer(timings, "plan"):
        try:
            if distributed and _latency_planned(recipe):
                raise RecipeError("latency-aware planning (objective: latency / target: "
                                  "latency) times layers on one process; under torchrun the "
                                  "processes would measure different plans. Run it once "
                                  "without torchrun, then fine-tune its run directory's "
                                  "recipe.yaml (exact ranks) with torchrun")
            p = plan(model, recipe["rules"], input_size, target=recipe.get("target"),
                     latency=recipe.get("latency"),
                     sensitivity=_sensitivity(recipe, model, input_size, pcfg),
                     allocation=recipe.get("allocation", "spectral"))
        except (RecipeError, RankError, MethodError) as e:  # these name rules[i]: add the file
            raise type(e)(f"{where}{e}") from None
    if dry_run:
        if _rank() == 0:
            print(p.summary())
        return {"plan": p}
    _log(p.summary(), quiet)

    main = _rank() == 0
    out = Path(out if out is not None else recipe["output"])
    staging = _stage_dirs(out, resume, overwrite, recipe["model"].get("weights"), main=main)

    ev, ft = recipe["evaluate"], recipe["finetune"]
    need_train = bool(ft["enabled"]) and (ft["epochs"] > 0 or ft.get("max_steps"))
    need_test = bool(ev["baseline"] or ev["zero_shot"] or need_train)
    train_loader = test_loader = None
    if recipe.get("data") and (need_train or need_test):
        _log("[data] loading", quiet)
        with Timer(timings, "load_data"):
            train_loader, test_loader = data_mod.make_loaders(
                {**recipe["data"], "seed": int(recipe.get("seed", 0))}, pcfg,
                train=need_train, test=need_test, distributed=distributed)
    progress = not quiet
    maxb = ev.get("max_batches")
    if distributed and test_loader is not None:
        test_loader, maxb = _shard_eval_loader(test_loader, maxb), None
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
    if cal and (cal.get("reconstruct") or cal.get("bn_recalibrate")):
        batches = _calibration_batches(recipe, pcfg)
        with Timer(timings, "calibrate"):
            report["bn_recalibrated_layers"] = refine(
                model, compressed, p, batches, reconstruct=cal["reconstruct"],
                steps=cal["steps"], lr=cal["lr"], bn_recalibrate=cal["bn_recalibrate"],
                fit_through=cal["fit_through"], refit_dense=cal["refit_dense"],
                solver=cal["solver"])
            report["calibration"] = p.calibration
    if p.latency_config is not None:
        from .latency import ensure_not_slower

        with Timer(timings, "latency_check"):
            chk = ensure_not_slower(model, compressed, p, p.latency_config)
        _log(f"[latency] {p.latency_config.runtime}: original {chk['original_ms']:.3g} ms, "
             f"compressed {chk['compressed_ms']:.3g} ms"
             + (f"; put back {len(chk['reverted'])} layer(s)" if chk["reverted"] else ""),
             quiet)
        report["latency_plan"] = p.latency
    comp_count = count(compressed, input_size)
    if comp_count["macs"] != p.macs_after or comp_count["params"] != p.params_after:
        raise RuntimeError(f"planned cost {p.params_after}/{p.macs_after} differs from the "
                           f"counted {comp_count['params']}/{comp_count['macs']}")
    if ev["zero_shot"]:
        stage("compressed", compressed, comp_count, model)
    else:
        report["compressed"] = {**comp_count, "top1": None, "top5": None}

    if main:
        staging.mkdir(parents=True, exist_ok=True)
    _barrier(distributed)
    ft_stats = None
    if need_train and train_loader is not None:
        _log(f"[finetune] {ft.get('max_steps') or ft['epochs']} "
             f"{'steps' if ft.get('max_steps') else 'epochs'}"
             + (f" on {get_world_size()} processes" if distributed else "")
             + (" (resuming)" if resume else ""), quiet)
        with Timer(timings, "finetune"):
            ft_stats = finetune(
                compressed, train_loader,
                teacher=model if ft["distill"]["enabled"] else None,
                epochs=ft["epochs"], max_steps=ft.get("max_steps"), optimizer=ft["optimizer"],
                lr=ft["lr"], momentum=ft["momentum"], weight_decay=ft["weight_decay"],
                schedule=ft["schedule"], warmup_steps=ft["warmup_steps"], distill=ft["distill"],
                device=ft["device"], amp=ft["amp"], checkpoint_dir=staging / "checkpoints",
                checkpoint_every=ft.get("checkpoint_every"), resume=resume,
                log_every=ft["log_every"], log_path=staging / "train_log.csv",
                seed=int(recipe.get("seed", 0)), progress=progress)
        ft_stats["world_size"] = get_world_size()
        if distributed:  # DDP syncs gradients, not BatchNorm running stats: take rank 0's,
            import torch.distributed as dist  # the ones it saves, so all ranks agree

            for buf in compressed.buffers():
                dist.broadcast(buf, 0)
        _log(f"[finetune] {ft_stats['steps']} steps, final loss {ft_stats['final_loss']}, "
             f"{ft_stats['images_per_s']:.1f} images/s", quiet)
        compressed = compressed.cpu().eval()
        stage("finetuned", compressed, comp_count, model)
    else:
        report["finetuned"] = None
    if ft_stats:  # paths relative to the run directory (staging is renamed at the end)
        ft_stats = {k: (os.path.relpath(v, staging) if isinstance(v, str)
                        and v.startswith(str(staging)) else v) for k, v in ft_stats.items()}
    report["finetune"] = ft_stats
    if not main:  # rank 0 writes the run; the others wait for it
        _barrier(distributed)
        return report
    _write_tensorboard(staging / "train_log.csv", staging / "tb", quiet)

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
        _log("[latency] timing the original and the compressed model", quiet)
        with Timer(timings, "latency"):
            report["latency"], report["layer_latency"] = _measure_latency(
                model, compressed, p, input_size, recipe, staging, report.get("onnx"))

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
    _barrier(distributed)
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
