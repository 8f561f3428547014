"""Compress: the one orchestrator of sensitivity -> plan -> apply -> fit -> not-slower check.

``compress`` plans (:mod:`compresscnn.core.planning`; with ``allocation="sensitivity"`` on
layer sensitivities measured first), applies the plan to a deep copy
(:mod:`compresscnn.core.applying`), fits the replaced layers on calibration batches and
puts layers back until the result is not slower (``compresscnn.measure.latency``); the
input model is left untouched. The steps' names are importable from here too.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from compresscnn.core.applying import apply, measured, refine
from compresscnn.core.planning import Measured, plan, plan_config
from compresscnn.core.plans import Plan, Replacement
from compresscnn.core.ranks import Skip
from compresscnn.core.rules import (CALIBRATED_ALLOCATIONS, CompressConfig, PlanConfig,
                                    validate_compress)
from compresscnn.errors import RecipeError
from compresscnn.fit.calibration import layer_sensitivity
from compresscnn.measure.counting import check_supported
from compresscnn.measure.latency import ensure_not_slower
from compresscnn.util.modules import input_tensors, preserved

__all__ = ["compress", "plan_compression", "plan", "apply", "measured", "refine", "Plan",
           "Replacement", "Measured", "Skip"]


def plan_compression(model: nn.Module, rules: Sequence[dict[str, Any]],
                     input_size: Sequence[int], target: dict[str, float] | None = None,
                     calibration: Sequence[torch.Tensor] | None = None, *,
                     objective: str = "macs",
                     config: PlanConfig | dict[str, Any] | None = None) -> Plan:
    """The planning half of :func:`compress`: with ``allocation="sensitivity"`` the layers'
    effect on the output is measured on the first ``calibration`` batches, with
    ``allocation="output"`` each candidate's output error on the first batch; then
    :func:`plan` (``allocation="data_spectral"``: the second moments of the SVD layers'
    inputs on the first 4 batches). ``config``: a :class:`~compresscnn.core.rules.PlanConfig`
    (or a :class:`~compresscnn.core.rules.CompressConfig`, or a mapping). What
    ``compresscnn run --dry-run`` prints."""
    cfg = plan_config(config)
    with preserved(model):
        return _plan_compression(model, rules, input_size, target, calibration,
                                 objective=objective, config=cfg)


def _plan_compression(model: nn.Module, rules: Sequence[dict[str, Any]],
                      input_size: Sequence[int], target: dict[str, float] | None,
                      calibration: Sequence[torch.Tensor] | None, *, objective: str,
                      config: PlanConfig) -> Plan:
    allocation = config.allocation
    weights = None
    if allocation in CALIBRATED_ALLOCATIONS and not calibration:
        raise RecipeError(f"allocation: {allocation} needs calibration batches")
    if allocation == "sensitivity" and target:
        probe = plan(model, rules, input_size, target={"macs": 1.0})
        weights = layer_sensitivity(model, probe, calibration)
    return plan(model, rules, input_size, target=target, objective=objective, config=config,
                measured=Measured(
                    sensitivity=weights,
                    probe=input_tensors(calibration[:1])[0] if allocation == "output" else None,
                    batches=(input_tensors(calibration[:4]) if allocation == "data_spectral"
                             else None)))


def compress(model: nn.Module, rules: Sequence[dict[str, Any]], input_size: Sequence[int],
             target: dict[str, float] | None = None, *, objective: str = "macs",
             config: CompressConfig | dict[str, Any] | None = None,
             calibration: Iterable[torch.Tensor] | None = None,
             planned: Plan | None = None) -> tuple[nn.Module, Plan]:
    """Plan and apply ``rules`` on a copy of ``model``; the input model is left untouched
    (its weights, each submodule's train/eval mode, its hooks and ``requires_grad``).
    The one orchestrator: ``compresscnn run``, ``compare`` and the benchmarks all compress
    through it (sensitivity -> plan -> apply -> data-aware fit -> not-slower check).

    Returns ``(compressed_model, plan)``. Each rule is a dict with the keys it has under
    ``rules:`` in a recipe (``match``, ``method``, ``rank`` / ``energy`` / ``macs`` /
    ``params``, ``round_to``, method options). ``config`` is a
    :class:`~compresscnn.core.rules.CompressConfig` or a mapping of its keys:
    ``allocation`` and ``latency`` (:func:`plan`), ``fit`` (the recipe's ``calibration``
    keys, :class:`~compresscnn.fit.config.FitConfig`) and ``seed``. With ``calibration``
    (an iterable of input batches), each replaced layer is then fitted to the original
    layer's output (:func:`refine`, with ``config.fit``: ``reconstruct=False`` skips that
    fit, ``bn_recalibrate=True`` re-estimates BatchNorm statistics, ``distill`` then trains
    the whole compressed model on the same batches to reproduce the original's outputs,
    :func:`compresscnn.fit.calibration.distill_outputs`, its figures in
    ``plan.calibration["distill"]``; ``seed`` draws its batch order, flips and mixes).
    ``allocation="sensitivity"`` (with ``calibration`` and a ``target``)
    weighs each layer's error in the budget by its measured effect on the model's output
    (``compresscnn.fit.calibration.layer_sensitivity``) instead of the weight error alone;
    ``allocation="energy"`` keeps the product of the layers' retained energies highest.
    ``planned``: a plan from :func:`plan_compression` with the same arguments (it is not
    made again).

    ``objective="latency"`` (and/or ``target={"latency": f}``) plans on measured latency
    (see :func:`plan` and ``compresscnn.measure.latency``; ``config.latency`` configures the
    runtime), and the result is checked against the original on that runtime: layers are
    put back until the compressed model is not slower (``plan.latency`` holds the
    measurements).

    ``rules``, ``target`` and ``config`` may be dicts or the typed models
    (``compresscnn.core.rules.rule_model``, ``Target``, ``CompressConfig``); they are
    validated first, with the recipe's messages.
    """
    rules, target, cfg = validate_compress(rules, target, config)
    if objective not in ("macs", "latency"):
        raise RecipeError(f"compress(): objective: expected one of 'macs', 'latency', "
                          f"got {objective!r}")
    if calibration is not None:
        calibration = list(calibration)
    check_supported(model)
    fit = cfg.fit
    with preserved(model):  # the caller's model keeps its modes and requires_grad
        p = planned if planned is not None else plan_compression(
            model, rules, input_size, target, calibration, objective=objective, config=cfg)
        new = apply(copy.deepcopy(model), p)
        p = measured(p, new)
        if calibration is not None and (fit.reconstruct or fit.bn_recalibrate
                                        or fit.distill is not None):
            p = refine(model, new, p, calibration, fit, seed=cfg.seed)
        if p.latency_config is not None:
            p = ensure_not_slower(model, new, p, p.latency_config)
    return new, p
