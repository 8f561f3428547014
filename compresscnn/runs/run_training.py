"""The training stage of a run: fine-tuning or training from scratch (with the Cuttlefish
switch, regularizers, a held-out split), its callbacks, warnings and TensorBoard log."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

# data, evaluation and report are called through their modules, so that a test (or a
# wrapper such as the DDP test's) can replace one of their functions for the whole run
from compresscnn.io import data as data_mod
from compresscnn.measure import evaluation
from compresscnn.core.decomposers import get_decomposer
from compresscnn.errors import DataError, RecipeError
from compresscnn.train.config import Finetune, Train, TrainConfig
from compresscnn.train.cuttlefish import StableRankMonitor, SwitchPoint, planned_layers
from compresscnn.train.scratch import FrobeniusDecay, SemiOrthogonal
from compresscnn.core.surgery import Plan
from compresscnn.train.loop import TrainRun, finetune
from compresscnn.util.common import get_world_size
from compresscnn.runs.run_inputs import (_data_cfg, _log, _rank)

log = logging.getLogger(__name__)


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
                  distributed: bool, input_size: tuple[int, ...],
                  curve: Callable[[nn.Module], float] | None = None
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
    kw = dict(pcfg=pcfg, progress=progress, distributed=distributed, curve=curve)
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
                                          "resumed_from_step", "curve")}
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
                 config: TrainConfig | None = None,
                 curve: Callable[[nn.Module], float] | None = None) -> dict[str, Any]:
    """Fine-tune (``section="finetune"``, distilled from ``teacher``) or train from scratch
    (``"train"``) with the recipe's section (or ``config``, one derived from it);
    :func:`finetune` scales the rate from ``lr_batch`` to the global batch. ``extra``: more
    training-loop callbacks; ``ckpt`` / ``log``: the checkpoint folder and CSV log (default
    ``checkpoints/``, ``train_log.csv`` in ``staging``); ``curve``: the score of the
    learning curve (``curve: true`` in the section), top-1 on the evaluation source."""
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
                                  section=section, curve=curve if cfg.curve else None))
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
