"""Plan: which layer, which method, which rank, priced before anything is decomposed.

``plan(model, rules, input_size, target)`` is pure: it traces the model once to learn each
layer's input size, matches rules (fnmatch globs over module names; the first rule that
matches a layer and whose method takes it wins), chooses ranks (``compresscnn.core.ranks``)
and prices every replacement analytically. A rule without a rank policy leaves its layers
to the whole-model budget of ``target``, shared among them by :func:`_allocate`; with
``objective="latency"`` each layer's candidates are timed on the target runtime first
(``compresscnn.measure.latency``).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.core.decomposers.base import Decomposer, check_weights, layer_cost, parse_options
from compresscnn.core.plans import Plan, Replacement
from compresscnn.core.ranks import (BudgetItem, Candidate, Skip, allocate, candidates_for,
                                    data_spectra, measured_candidates, round_rank, rule_round_to,
                                    select_rank, tail_error)
from compresscnn.core.rules import (ALLOCATIONS, POLICY_KEYS as _RANK_KEYS, PlanConfig,
                                    rule_options, validate_rules, validate_target)
from compresscnn.errors import RankError, RecipeError
from compresscnn.measure.counting import LayerInfo, count, trace_layers
from compresscnn.measure.latency import (LatencyConfig, latency_config, spread, time_candidates,
                                         time_modules)
from compresscnn.util.modules import (eval_mode, example_input, hooks, parallel_iter,
                                      record_inputs)
from compresscnn.util.progress import track

__all__ = ["Measured", "plan", "plan_config", "TAIL_HALVINGS"]


# ---------------------------------------------------------------------------- helpers


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def _shape(mod: nn.Module) -> str:
    if isinstance(mod, nn.Conv2d):
        kh, kw = mod.kernel_size
        g = f"/g{mod.groups}" if mod.groups > 1 else ""
        return f"{mod.in_channels}->{mod.out_channels} {kh}x{kw}{g} s{mod.stride[0]}"
    if isinstance(mod, nn.Linear):
        return f"{mod.in_features}->{mod.out_features}"
    return type(mod).__name__


def _validate(rules: Sequence[dict[str, Any]], target: Any
              ) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
    """Rules and target from the Python API, checked by the code that checks recipes."""
    target = validate_target(target, source="compress()")
    return validate_rules(rules, source="compress()", target=target), target


def _method_options(rule: dict[str, Any]) -> dict[str, Any]:
    return dict(rule_options(rule))


def _match(rules: list[dict[str, Any]], layers: dict[str, LayerInfo]) -> dict[str, int]:
    """layer name -> index of the rule that decides it.

    That is the first rule that matches the layer and whose method can take it, so
    ``[{match: "*", method: tucker2}, {match: "*", method: spatial}]`` sends depthwise convs
    (which Tucker-2 cannot take) to the second rule. A layer that every matching rule's
    method refuses goes to the first matching rule, which records the refusal as the
    reason it is skipped. A rule matching nothing is an error, and so is one whose method
    takes none of the layer types it matches (``svd`` on a pattern of 3x3 convs only is a
    skip with a reason; ``tucker2`` on Linear layers only is an error).
    """
    owner: dict[str, int] = {}
    fallback: dict[str, int] = {}
    def names(n: str) -> tuple[str, ...]:  # a shared module answers to each of its names
        return (n, *layers[n].aliases)

    for i, rule in enumerate(rules):
        pats, excl = _as_list(rule["match"]), _as_list(rule.get("exclude"))
        hits = [n for n in layers
                if any(fnmatch.fnmatchcase(a, p) for a in names(n) for p in pats)
                and not any(fnmatch.fnmatchcase(a, p) for a in names(n) for p in excl)]
        if not hits:
            some = ", ".join(list(layers)[:6])
            raise RecipeError(f"rules[{i}].match: {pats!r} matches no Conv2d/Linear layer "
                              f"of the model (layers are named like: {some}, ...)")
        dec = get_decomposer(rule["method"])
        typed = [n for n in hits if isinstance(layers[n].module, dec.layer_types)]
        if not typed:
            kinds = "/".join(t.__name__ for t in dec.layer_types)
            got = sorted({layers[n].type for n in hits})
            raise RecipeError(f"rules[{i}].method: {rule['method']} takes {kinds} layers, but "
                              f"{pats!r} matches only {'/'.join(got)} layers")
        for n in typed:
            fallback.setdefault(n, i)
            if n not in owner and dec.supports(layers[n].module) is None:
                owner[n] = i
    for n, i in fallback.items():
        owner.setdefault(n, i)
    return owner


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Measured:
    """What :func:`plan_compression` measured on calibration batches for :func:`plan`:
    ``sensitivity`` (layer name -> weight of its error), ``probe`` (a batch of inputs whose
    layer outputs score candidates) and ``batches`` (whose second moments weigh spectra)."""

    sensitivity: dict[str, float] | None = None
    probe: torch.Tensor | None = None
    batches: Sequence[torch.Tensor] | None = None


def plan_config(config: Any) -> PlanConfig:
    """``config`` (a :class:`PlanConfig`, a mapping of its keys or None) as a :class:`PlanConfig`."""
    return PlanConfig.coerce(config, "plan()")


def plan(model: nn.Module, rules: Sequence[dict[str, Any]], input_size: Sequence[int],
         target: dict[str, float] | None = None, *, objective: str = "macs",
         config: PlanConfig | dict[str, Any] | None = None,
         measured: Measured = Measured()) -> Plan:
    """Decide, for every layer a rule matches, the method and the exact rank.

    ``target`` ({"macs": f}, {"params": f} or {"latency": f}) is a whole-model budget: the
    layers of rules without a rank policy share it (``compresscnn.core.ranks.allocate``).
    ``config`` (:class:`~compresscnn.core.rules.PlanConfig` or its mapping) holds
    ``allocation`` and ``latency``. ``measured.sensitivity`` (layer name -> weight) scales
    each layer's error in that allocation.
    ``allocation``: ``"spectral"`` (default) minimises the summed squared relative errors,
    ``"energy"`` maximises the product of the energies kept (Zhang et al. 2015), and
    ``"sensitivity"`` is ``"spectral"`` with ``sensitivity`` weights (``compress`` measures
    them from calibration batches), and ``"output"`` is ``"spectral"`` on errors measured on
    the layers' outputs: every budgeted layer's candidates (``measured_candidates``, as
    ``method: auto`` builds them) are decomposed and each is scored by its relative output
    error on the inputs that layer receives when the model runs on ``measured.probe`` (a batch of
    calibration inputs), instead of by its weight error; ``"data_spectral"`` is
    ``"spectral"`` with each ``svd`` layer's spectrum taken in the metric of its inputs'
    second moments on the ``measured.batches`` (:func:`~compresscnn.core.ranks.data_spectra`:
    the error of the best rank-r fit of its outputs, from one pass, nothing decomposed).

    ``objective="latency"`` (or a rule's own ``objective: latency``, or a latency target)
    times each layer's dense form and candidate decompositions on the runtime ``latency``
    describes (a :class:`compresscnn.measure.latency.LatencyConfig` or its dict; default
    onnxruntime, 1 thread, batch 1) and keeps only candidates measurably faster than the
    dense layer: a layer where none is stays dense (see ``compresscnn.measure.latency``).
    """
    rules, target = _validate(rules, target)
    cfg = plan_config(config)
    allocation, latency = cfg.allocation, cfg.latency
    probe, calibration, sensitivity = measured.probe, measured.batches, measured.sensitivity
    if allocation not in ALLOCATIONS:
        raise RecipeError(f"allocation: {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if objective not in ("macs", "latency"):
        raise RecipeError(f"objective: {objective!r} is not one of macs, latency")
    if allocation == "output" and target and probe is None:
        raise RecipeError("allocation: output needs calibration batches (each candidate's "
                          "error is measured on the layer's output for them)")
    input_size = tuple(int(x) for x in input_size)
    layers = trace_layers(model, input_size)
    totals = count(model, input_size)
    owner = _match(rules, layers)
    probes = (record_inputs(model, list(owner), probe)
              if allocation == "output" and target else {})
    if allocation == "data_spectral" and target and not calibration:
        raise RecipeError("allocation: data_spectral needs calibration batches (the second "
                          "moments of each layer's inputs are measured on them)")
    grams = (_input_grams(model, [n for n, i in owner.items() if rules[i]["method"] == "svd"],
                          calibration or [])
             if allocation == "data_spectral" and target else {})
    tkey = next(iter(target)) if target else None
    timed = [n for n, i in owner.items()
             if tkey == "latency" or (rules[i].get("objective") or objective) == "latency"]
    lat_cfg, inputs = _latency_inputs(model, layers, timed, tkey, input_size, latency)

    def select(x: tuple[str, LayerInfo]) -> tuple[Replacement, BudgetItem | None]:
        name, info = x
        w = 1.0 if sensitivity is None else float(sensitivity.get(name, 1.0))
        return _select(name, info, owner[name], rules[owner[name]], target=target,
                       weight=w, lat_cfg=lat_cfg, x=inputs[name] if name in timed else None,
                       probe=probes.get(name), gram=grams.get(name, (None, 0)))

    todo = [(n, i) for n, i in layers.items() if n in owner]
    reps: list[Replacement] = []
    items: dict[str, BudgetItem] = {}
    # the layers' candidates are independent: side by side, each on one intra-op thread,
    # except where layers are timed (a latency measured beside other work is not its own)
    with contextlib.closing(parallel_iter(select, todo, workers=1 if timed else None)) as got:
        for (name, _), (rep, item) in zip(track(todo, "layer", label=lambda x: (
                f"{x[0]}, {rules[owner[x[0]]]['method']}"), weight=lambda x: _work(
                x[1].module)), got):
            reps.append(rep)
            if item is not None:
                items[name] = item
    layer_ms = _layer_times(reps, layers, inputs, lat_cfg, tkey)
    if target:
        reps = _allocate(target, totals, reps, items, layer_ms, allocation, lat_cfg)
    return Plan(reps, input_size, totals["params"], totals["macs"],
                dict(target) if target else None, latency=_latency_info(reps, layer_ms, lat_cfg),
                latency_config=lat_cfg)


def _input_grams(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]
                 ) -> dict[str, tuple[torch.Tensor, int]]:
    """The second moment ``E[x x^T]`` of the inputs each named Linear / 1x1 Conv2d applies
    its weight to (a 1x1 conv's strided positions) over ``batches``, and the number of input
    vectors it is the mean of (float64, one forward pass each, nothing stored but the
    in x in sums)."""
    mods = dict(model.named_modules())
    sums: dict[str, list[Any]] = {}

    def add(name: str, mod: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        if isinstance(mod, nn.Conv2d):
            if tuple(mod.kernel_size) != (1, 1) or mod.groups != 1 or any(mod.padding):
                return
            x = x[:, :, ::mod.stride[0], ::mod.stride[1]].transpose(0, 1).reshape(x.shape[1], -1)
        elif isinstance(mod, nn.Linear):
            x = x.reshape(-1, x.shape[-1]).T
        else:
            return
        x = x.double()
        acc = sums.setdefault(name, [torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64),
                                     0])
        acc[0] += x @ x.T
        acc[1] += x.shape[1]

    with hooks([(n, mods[n]) for n in names], add, pre=True), eval_mode(model), \
            torch.inference_mode():
        for xb in batches:
            model(xb)
    return {n: (g / max(k, 1), k) for n, (g, k) in sums.items()}


def _work(layer: nn.Module) -> float:
    """How the planning work on a layer grows (the products of its unfoldings: the weight's
    size times its wider channel count), to spread the estimate of the time left."""
    w = layer.weight
    return float(w.numel() * max(w.shape[0], w.shape[1]))


def _latency_inputs(model: nn.Module, layers: dict[str, LayerInfo], timed: list[str],
                    tkey: str | None, input_size: tuple[int, ...], latency: Any
                    ) -> tuple[LatencyConfig | None, dict[str, torch.Tensor]]:
    """The latency configuration and the input each layer to time receives (none when no
    layer is timed)."""
    if not timed:
        return None, {}
    lat_cfg = latency_config(latency)
    x_lat = example_input(input_size, lat_cfg.batch)
    # a latency target is a fraction of the summed latency of every Conv2d/Linear
    return lat_cfg, record_inputs(model, list(layers) if tkey == "latency" else timed, x_lat)


def _select(name: str, info: LayerInfo, i: int, rule: dict[str, Any], *,
            target: dict[str, float] | None, weight: float, lat_cfg: LatencyConfig | None,
            x: torch.Tensor | None, probe: torch.Tensor | None = None,
            gram: tuple[torch.Tensor | None, int] = (None, 0)
            ) -> tuple[Replacement, BudgetItem | None]:
    """One layer's row: refused by its method, ranked by its rule's policy (and, when timed
    on ``x``, kept dense unless faster), or left to the budget (its :class:`BudgetItem`;
    with ``probe``, the layer's inputs, its candidates decomposed and scored on them)."""
    dec = get_decomposer(rule["method"])
    opts = _method_options(rule)
    p0, m0 = layer_cost(info.module, info.in_hw)
    m0 *= info.tokens
    rep = Replacement(name, info.type, _shape(info.module), rule["method"], None, opts, "",
                      p0, m0, p0, m0, rule=i, calls=info.calls, aliases=tuple(info.aliases))
    reason = dec.supports(info.module)
    if reason is None and info.varying:
        reason = (f"called {info.calls} times on inputs of different shapes in one forward "
                  f"pass; its decomposition is priced at one shape, so it stays dense")
    if reason is not None:
        return replace(rep, skipped=reason, skip=Skip.REFUSED), None
    check_weights(info.module, f"rules[{i}] ({name})")
    if dec.chooses:
        return _select_mixed(name, info, i, rule, rep, dec, opts, target=target, weight=weight,
                             lat_cfg=lat_cfg, x=x, probe=probe)
    if not any(rule.get(k) is not None for k in _RANK_KEYS):
        if not target:
            raise RecipeError(f"rules[{i}]: no rank, energy, macs or params given and no "
                              f"global target to choose ranks")
        round_to = rule_round_to(rule, lat_cfg.round_to if x is not None else None)
        spectra = data_spectra(dec, info.module, *gram)
        cands = (candidates_for(dec, info.module, info.in_hw, opts, round_to=round_to,
                                tokens=info.tokens, spectra=spectra)
                 if probe is None else
                 [Candidate(None, p0, m0, 0.0), *measured_candidates(
                     dec, info.module, info.in_hw, opts, round_to=round_to,
                     tokens=info.tokens, probe=probe)])
        if x is not None:
            cands, dense_ms = _timed_candidates(dec, info.module, cands, opts, x, lat_cfg)
            rep = replace(rep, latency_before=dense_ms, latency_after=dense_ms)
            return rep, BudgetItem(name, cands, weight=weight)
        # below the grid's cheapest rank, for a target the grid cannot reach
        tail = partial(_tail_candidates, dec, info.module, info.in_hw, opts, round_to=round_to,
                       tokens=info.tokens, spectra=spectra)
        return rep, BudgetItem(name, cands, weight=weight,
                               meta={} if probe is not None else {"tail": tail})
    if x is not None and rule.get("round_to") is None:
        rule = {**rule, "round_to": lat_cfg.round_to}
    try:
        r, how = select_rank(dec, info.module, rule, info.in_hw, opts)
    except RankError as e:  # name the rule and the layer, not only the layer's shape
        raise RankError(f"rules[{i}] ({name}): {e}") from None
    p1, m1 = dec.cost(info.module, r, info.in_hw, **opts)
    rep = replace(rep, rank=list(r), policy=how, params_after=p1, macs_after=m1 * info.tokens,
                  rel_error=tail_error(dec.spectra(info.module, **opts), r))
    if x is None:
        return rep, None
    dense_ms, (ms,) = time_candidates(dec, info.module, [r], opts, x, lat_cfg)
    rep = replace(rep, latency_before=dense_ms, latency_after=ms)
    if ms >= dense_ms * (1.0 - lat_cfg.margin):
        rep = replace(rep, skip=Skip.NOT_FASTER,
                      skipped=f"not faster on {lat_cfg.runtime}: {ms:.3g} ms vs "
                              f"{dense_ms:.3g} ms dense")
    return rep, None


def _select_mixed(name: str, info: LayerInfo, i: int, rule: dict[str, Any], rep: Replacement,
                  dec: Decomposer, opts: dict[str, Any], *, target: dict[str, float] | None,
                  weight: float, lat_cfg: LatencyConfig | None, x: torch.Tensor | None,
                  probe: torch.Tensor | None = None) -> tuple[Replacement, BudgetItem | None]:
    """``method: auto``: every member method's candidates, decomposed and their errors
    measured (:func:`~compresscnn.core.ranks.measured_candidates`; when timed on ``x``, only
    those faster than the dense layer). A global target chooses among them (the row's
    :class:`BudgetItem`); a ``macs``/``params`` policy takes the lowest error within it."""
    o = parse_options(dec, opts)
    round_to = rule_round_to(rule, lat_cfg.round_to if x is not None else None)
    cands = [Candidate(None, rep.params_before, rep.macs_before, 0.0)]
    for m in dec.members(info.module, **opts):
        mine = measured_candidates(m, info.module, info.in_hw, {}, round_to=round_to,
                                   steps=o.ranks, tokens=info.tokens, probe=probe)
        if x is not None:
            mine, dense_ms = _timed_candidates(m, info.module, [cands[0], *mine], {}, x,
                                               lat_cfg)
            mine = mine[1:]
            rep = replace(rep, latency_before=dense_ms, latency_after=dense_ms)
        cands += mine
    key = "macs" if rule.get("macs") is not None else "params"
    if rule.get(key) is None:
        if not target:
            raise RecipeError(f"rules[{i}]: method auto needs a macs or params policy or a "
                              f"global target")
        return rep, BudgetItem(name, cands, weight=weight)
    frac = float(rule[key])
    fits = [c for c in cands[1:] if getattr(c, key) <= frac * getattr(rep, f"{key}_before")]
    if not fits:
        if x is not None:
            return replace(rep, skip=Skip.NOT_FASTER, skipped=(
                f"no candidate within {key} {frac:g} is faster than the dense layer on "
                f"{lat_cfg.runtime}")), None
        raise RankError(f"rules[{i}] ({name}): no candidate of {', '.join(o.methods)} keeps "
                        f"at most {frac:g} of its {key}")
    return _chosen(replace(rep, policy=f"{key} {frac:g}"), min(fits, key=lambda c: c.error)
                   ), None


def _chosen(rep: Replacement, c: Candidate) -> Replacement:
    """``rep`` decomposed as candidate ``c`` says (its method, when it names one)."""
    if c.method is not None and c.method != rep.method:
        rep = replace(rep, method=c.method, options={})
    return replace(rep, rank=list(c.rank), params_after=c.params, macs_after=c.macs,
                   rel_error=c.error, latency_after=c.latency)


def _layer_times(reps: Sequence[Replacement], layers: dict[str, LayerInfo],
                 inputs: dict[str, torch.Tensor], lat_cfg: LatencyConfig | None,
                 tkey: str | None) -> dict[str, float]:
    """Measured dense ms of every timed layer (with a latency target, of every layer)."""
    if lat_cfg is None:
        return {}
    layer_ms = {r.name: r.latency_before for r in reps if r.latency_before is not None}
    if tkey == "latency":  # the layers no rule decomposes count at their dense time
        for name in layers:
            if name not in layer_ms:
                layer_ms[name] = time_modules([copy.deepcopy(layers[name].module)],
                                              inputs[name], lat_cfg)[0]
    return layer_ms


#: how far below the candidate grid's cheapest rank (1/48 of full) a budget may go when
#: the grid cannot reach it: halvings, down to rank 1
TAIL_HALVINGS = 10


def _tail_candidates(dec: Decomposer, layer: nn.Module, in_hw: tuple[int, int] | None,
                     opts: dict[str, Any], *, round_to: int, tokens: int,
                     spectra: list[torch.Tensor] | None, below: Any) -> list[Candidate]:
    """Candidates cheaper than ``below`` (the grid's cheapest rank), the rank halved each
    time: a params target of a few percent (AlexNet at SqueezeNet's size) needs them."""
    full = dec.max_rank(layer, **opts)
    spectra = dec.spectra(layer, **opts) if spectra is None else spectra
    seen, out = {tuple(below)}, []
    for k in range(1, TAIL_HALVINGS + 1):
        r = round_rank(dec.scale_rank(layer, 1.0 / (48 * 2 ** k), **opts), full, round_to)
        if tuple(r) in seen:
            continue
        seen.add(tuple(r))
        p, m = dec.cost(layer, r, in_hw, **opts)
        out.append(Candidate(r, p, m * tokens, tail_error(spectra, r)))
    return out


def _allocate(target: dict[str, float], totals: dict[str, int], reps: list[Replacement],
              items: dict[str, BudgetItem], layer_ms: dict[str, float], allocation: str,
              lat_cfg: LatencyConfig | None) -> list[Replacement]:
    """Share the whole-model budget among the budgeted layers (``items``); the rows with the
    ranks chosen, or kept dense."""
    (key, frac), = target.items()
    if key == "latency":
        total: float = sum(layer_ms.values())
        fmt = lambda v: f"{v:.3g} ms"  # noqa: E731
    else:
        total = totals[key]
        fmt = lambda v: f"{int(v):,} {key}"  # noqa: E731
    fixed = total
    for rep in reps:
        if rep.applied:
            fixed += getattr(rep, f"{key}_after") - getattr(rep, f"{key}_before")
        elif rep.name in items:
            fixed -= getattr(rep, f"{key}_before")
    allowed = frac * total if key == "latency" else int(frac * total)
    budget = allowed - fixed
    if budget <= 0:
        raise RankError(f"target {key} {frac:g} cannot be reached: the layers the budget "
                        f"cannot touch (matched by no budgeted rule, or refused by its "
                        f"method) already need {fmt(fixed)} of the {fmt(allowed)} allowed")
    penalty = "log_energy" if allocation == "energy" else "squared"
    try:
        try:
            allocate(list(items.values()), key, budget, penalty=penalty)
        except RankError:  # the grid's cheapest ranks cost too much: ranks below them, if any
            tails = [it for it in items.values() if "tail" in it.meta]
            for it in tails:
                it.candidates += it.meta["tail"](below=it.candidates[-1].rank)
            if not tails:
                raise
            allocate(list(items.values()), key, budget, penalty=penalty)
    except RankError as e:
        raise _latency_reason(e, items, lat_cfg) from None
    out = []
    for rep in reps:
        item = items.get(rep.name)
        if item is None:
            out.append(rep)
            continue
        c = item.candidates[item.choice]
        rep = replace(rep, policy=f"budget {key} {frac:g}")
        if c.rank is not None:
            out.append(_chosen(rep, c))
        elif len(item.candidates) == 1 and lat_cfg is not None and rep.latency_before is not None:
            out.append(replace(rep, skip=Skip.NOT_FASTER, skipped=(
                f"no candidate rank is faster than the dense layer on {lat_cfg.runtime}")))
        else:
            out.append(replace(rep, skip=Skip.BUDGET, skipped="kept dense by the budget"))
    return out


def _latency_reason(err: RankError, items: dict[str, BudgetItem],
                    lat_cfg: LatencyConfig | None) -> RankError:
    """``err`` (a target out of reach) with what a latency objective adds to it: the layers
    none of whose candidate ranks was timed faster than the dense layer, which stay dense."""
    slow = [name for name, it in items.items() if len(it.candidates) == 1]
    if lat_cfg is None or not slow:
        return err
    return RankError(
        f"{err}: with objective latency, {len(slow)} of the {len(items)} layers (e.g. "
        f"{slow[0]}) have no candidate rank at least {lat_cfg.margin:g} faster than the dense "
        f"layer on {lat_cfg.runtime} ({lat_cfg.precision}, batch {lat_cfg.batch}, "
        f"{lat_cfg.threads} threads) and stay dense; loosen the target, or plan for another "
        f"runtime or precision")


def _latency_info(reps: Sequence[Replacement], layer_ms: dict[str, float],
                  lat_cfg: LatencyConfig | None) -> dict[str, Any] | None:
    """What the plan's latency line reports: the layers timed, dense and planned ms."""
    if lat_cfg is None:
        return None
    delta = sum((r.latency_after - r.latency_before) for r in reps
                if r.applied and r.latency_before is not None and r.latency_after is not None)
    dense_ms = sum(layer_ms.values())
    return {**lat_cfg.describe(), "layers_timed": len(layer_ms),
            "layers_dense_ms": dense_ms, "layers_planned_ms": dense_ms + delta}


def _timed_candidates(dec, layer: nn.Module, cands: list, opts: dict[str, Any],
                      x: torch.Tensor, cfg) -> tuple[list, float]:
    """Time the dense layer and up to ``cfg.max_candidates`` of its candidate ranks; keep
    dense plus the candidates at least ``cfg.margin`` faster than it. Returns the kept
    candidates and the dense layer's ms."""
    pick = [cands[j] for j in spread(len(cands), cfg.max_candidates)]
    dense_ms, times = time_candidates(dec, layer, [c.rank for c in pick], opts, x, cfg)
    cands[0].latency = dense_ms
    kept = [cands[0]]
    for c, t in zip(pick, times):
        c.latency = t
        if t < dense_ms * (1.0 - cfg.margin):
            kept.append(c)
    return kept, dense_ms
