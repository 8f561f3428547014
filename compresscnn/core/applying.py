"""Apply a plan and fit what it made: ``apply(model, plan)`` swaps each planned layer for
its decomposition (dotted-path get/set, as timm's ``set_layer``), :func:`measured` reads
each decomposition's fit back into the plan, and :func:`refine` fits the replaced layers to
the original's outputs on calibration batches (``compresscnn.fit.calibration``).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.core.decomposers.base import check_weights
from compresscnn.core.plans import Plan, Replacement
from compresscnn.errors import DataError, RecipeError
from compresscnn.fit.calibration import (distill_outputs, execution_order, following_ops,
                                         recalibrate_bn, reconstruct_outputs)
from compresscnn.fit.config import FitConfig
from compresscnn.measure.counting import check_supported
from compresscnn.util.modules import get_module, input_tensors, parallel_iter, set_module
from compresscnn.util.progress import track

__all__ = ["apply", "measured", "refine"]


@torch.no_grad()
def apply(model: nn.Module, plan_: Plan) -> nn.Module:
    """Swap every planned layer of ``model`` (in place) for its decomposition; return it.
    A module registered under several names is decomposed once and the decomposition is
    put under every one of them, so that it stays shared.

    The plan is not changed: :func:`measured` reads each decomposition's fit back (with the
    seconds it took, ``decompose_seconds``).
    """
    check_supported(model)
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    reps = [r for r in plan_.replacements if r.applied]
    layers = {r.name: get_module(model, r.name) for r in reps}
    for rep in reps:
        check_weights(layers[rep.name], rep.name)

    def decompose(rep: Replacement) -> nn.Module:
        t0 = time.perf_counter()
        new = get_decomposer(rep.method).decompose(layers[rep.name], tuple(rep.rank),
                                                   **rep.options)
        info = getattr(new, "fit_info", None)
        if isinstance(info, dict):
            info["decompose_seconds"] = time.perf_counter() - t0
        return new

    # the decompositions that run on one thread anyway go side by side, after the others
    one = {r.name: get_decomposer(r.method).one_thread(layers[r.name], tuple(r.rank),
                                                       **r.options) for r in reps}
    alone, paired = [r for r in reps if not one[r.name]], [r for r in reps if one[r.name]]
    # the largest problems first (kernel size x rank: what ALS's sweeps grow with)
    done = itertools.chain((decompose(r) for r in alone), parallel_iter(
        decompose, paired, cost=lambda r: layers[r.name].weight.numel() * math.prod(r.rank)))
    for rep in track(alone + paired, "decompose",
                     label=lambda r: f"{r.name}, {r.method} {'x'.join(map(str, r.rank))}",
                     weight=lambda r: r.params_before):
        layer = layers[rep.name]
        new = next(done)
        new.train(layer.training)
        for name in names.get(id(layer), [rep.name]):  # decomposed once, shared as before
            set_module(model, name, new)
    return model


def measured(plan_: Plan, model: nn.Module) -> Plan:
    """``plan_`` with each applied row's measured decomposition fit (the ``fit_info`` that
    :func:`apply` left on its module in ``model``): ``fit``, and ``rel_error`` when the
    decomposition measured one."""
    rows = []
    for rep in plan_.replacements:
        if rep.applied:
            fit = dict(getattr(get_module(model, rep.name), "fit_info", {}) or {})
            rel = float(fit["rel_error"]) if "rel_error" in fit else rep.rel_error
            rep = replace(rep, fit=fit, rel_error=rel)
        rows.append(rep)
    return replace(plan_, replacements=tuple(rows))


def refine(original: nn.Module, compressed: nn.Module, plan_: Plan,
           calibration: Iterable[Any], config: FitConfig | dict[str, Any] | None = None, *,
           seed: int = 0) -> Plan:
    """Data-aware step after ``apply``: fit each replaced layer to the original's output
    and/or re-estimate BatchNorm statistics on ``calibration`` batches (tensors, or
    ``(input, label)`` pairs), as ``config`` says (a
    :class:`~compresscnn.fit.config.FitConfig` or a mapping of its keys). ``reconstruct``
    fits the layers. ``fit_through``: ``"layer"`` fits the layer's own output;
    ``"bn"`` / ``"activation"`` fit it after the BatchNorm / BatchNorm and ReLU that alone
    consume it (:func:`~compresscnn.fit.calibration.following_ops`). ``refit_dense``: the
    Conv2d/Linear layers left dense that run after a replaced one are fitted the same way,
    in execution order (they see the compressed model's inputs and can absorb part of the
    error before them). ``bn_recalibrate`` re-estimates BatchNorm statistics on the same
    batches; off by default, since after the fit the original statistics are the right
    ones and a few batches' estimate is noisier (ResNet-20, CP at 2x: 80.51 zero-shot
    without, 78.78 with; BENCHMARKS.md). ``solver``: ``"closed_form"`` (least squares,
    iterating only through a ReLU) or ``"adam"`` (``steps`` Adam steps at ``lr`` per layer,
    the earlier fit); see :mod:`compresscnn.fit.response`. ``distill``: afterwards, end-to-end
    distillation on the same batches (:class:`~compresscnn.fit.config.CalibrationDistill`; ``seed`` draws its batch order, flips and mixes; the batches its ``holdout`` keeps
    out are kept out of the fit and of the BatchNorm estimate too). Returns a new plan: the
    measured output errors and each layer's fit time added to its row's ``fit``, the solver, total time and forward passes in ``calibration`` (and the
    distillation's figures in ``calibration["distill"]``), and the number of BatchNorm
    layers re-estimated in ``bn_recalibrated``."""
    cfg = _fit_config(config)
    distill = cfg.distill
    batches = input_tensors(calibration)
    for i, b in enumerate(batches):
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise DataError(f"calibration batch {i}: holds NaN or Inf values")
    # batches held out to score the distillation are held out of the fit too, so the score
    # of "no distillation" (pass 0) is measured on images nothing was fitted to
    held = distill.holdout if distill is not None else 0
    if held and held >= len(batches):
        raise RecipeError(f"distill.holdout: {held} leaves none of the {len(batches)} "
                          "calibration batches to fit and distil on")
    all_batches, batches = batches, batches[:len(batches) - held]
    if cfg.reconstruct:
        plan_ = _reconstruct(original, compressed, plan_, batches, cfg)
    n = recalibrate_bn(compressed, batches) if cfg.bn_recalibrate else 0
    if distill is not None and batches:
        stats = distill_outputs(original, compressed, all_batches, distill,
                                layers=list(plan_.ranks()), seed=int(seed))
        plan_ = replace(plan_, calibration={**(plan_.calibration or {}), "distill": stats})
    compressed.eval()
    return replace(plan_, bn_recalibrated=n)


def _fit_config(config: Any) -> FitConfig:
    return FitConfig.coerce(config, "refine()")


def _reconstruct(original: nn.Module, compressed: nn.Module, plan_: Plan,
                 batches: list[torch.Tensor], cfg: FitConfig) -> Plan:
    """The layer-wise fit of :func:`refine`: each replaced layer (and with ``refit_dense``
    each dense one after it) fitted to the original's output; the errors into the plan."""
    tails = following_ops(original, cfg.fit_through)
    # a layer applied more than once per forward pass has no one output to fit: it
    # keeps its data-free decomposition
    names = [r.name for r in plan_.replacements if r.applied and r.calls == 1]
    if cfg.refit_dense and names and batches:
        order = execution_order(original, batches[0][:1], (nn.Conv2d, nn.Linear))
        first = min((order.index(n) for n in names if n in order), default=len(order))
        names += [n for n in order[first:] if n not in names and any(
            p.requires_grad for p in get_module(compressed, n).parameters())]
        names.sort(key=lambda n: order.index(n) if n in order else -1)
    done = reconstruct_outputs(original, compressed, names, batches, solver=cfg.solver,
                               steps=cfg.steps, lr=cfg.lr, tails=tails)
    fits = {name: {"output_error_data_free": f["before"], "output_error": f["after"],
                   "fit_seconds": f["seconds"], "fit_solver": f["solver"],
                   "fit_iters": f["iters"]} for name, f in done.layers.items()}
    rows = tuple(replace(rep, fit={**rep.fit, **fits[rep.name]}) if rep.name in fits
                 else rep for rep in plan_.replacements)
    names = {rep.name for rep in rows}
    return replace(plan_, replacements=rows, calibration={
        **done.summary(), "dense_refitted": {n: f for n, f in fits.items()
                                             if n not in names}})
