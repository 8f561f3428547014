"""Plan, then apply: which layer, which method, which rank; then swap the modules.

``plan(model, rules, input_size, target)`` is pure: it traces the model once to learn each
layer's input size, matches rules (fnmatch globs over module names; the first rule that
matches a layer wins), chooses ranks (``compresscnn.core.ranks``) and prices every replacement
analytically. ``apply(model, plan)`` only swaps modules (dotted-path get/set, as timm's
``set_layer``). ``compress`` does both on a deep copy and leaves the input model untouched.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from functools import partial
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
from pydantic import ValidationError
from torch import nn

from compresscnn.fit.calibration import (distill_outputs, execution_order, following_ops,
                                         layer_sensitivity, recalibrate_bn, reconstruct_outputs)
from compresscnn.measure.counting import LayerInfo, count, trace_layers, check_supported
from compresscnn.core.decomposers import get_decomposer
from compresscnn.core.decomposers.base import Decomposer, check_weights, layer_cost, parse_options
from compresscnn.errors import DataError, RankError, RecipeError
from compresscnn.measure.latency import (LatencyConfig, ensure_not_slower, spread, time_candidates,
                                         time_modules)
from compresscnn.util.modules import (eval_mode, example_input, get_module, hooks, input_tensors,
                                      record_inputs, set_module, preserved)
from compresscnn.core.ranks import (BudgetItem, Candidate, Skip, allocate, candidates_for,
                                    data_spectra, measured_candidates, round_rank, select_rank,
                                    tail_error, rule_round_to)
from compresscnn.config import Where
from compresscnn.core.rules import (ALLOCATIONS, CALIBRATED_ALLOCATIONS, POLICY_KEYS as _RANK_KEYS,
                                    CompressConfig, PlanConfig)
from compresscnn.fit.config import FitConfig
from compresscnn.core.rules import rule_options, validate_compress, validate_rules, validate_target
from compresscnn.util.progress import track


@dataclass(frozen=True)
class Replacement:
    """One row of a plan: a layer and what happens to it. Rows are not edited: a step that
    measures or changes something (apply, the data-aware fit, the latency check) makes a new
    row with :func:`dataclasses.replace`."""

    name: str
    type: str
    shape: str
    method: str
    rank: list[int] | None
    options: dict[str, Any]
    policy: str
    params_before: int
    macs_before: int
    params_after: int
    macs_after: int
    rel_error: float | None = None     # estimated from spectra in plan, measured by apply
    skipped: str | None = None          # the reason a layer matched but is left dense
    skip: Skip | None = None            # the same reason as a kind (not in the report rows)
    rule: int = 0
    fit: dict[str, Any] = field(default_factory=dict)
    latency_before: float | None = None  # measured ms of the dense layer (objective latency)
    latency_after: float | None = None   # measured ms of the chosen decomposition
    calls: int = 1                       # calls in one forward pass (MACs count each)
    aliases: tuple[str, ...] = ()        # the other names of the same (shared) module

    @property
    def applied(self) -> bool:
        return self.skipped is None and self.rank is not None


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` decided, and what the later steps of :func:`compress` measured;
    each of those steps returns a new plan (``dataclasses.replace``), none edits one."""

    replacements: tuple[Replacement, ...]
    input_size: tuple[int, ...]
    total_params: int
    total_macs: int
    target: dict[str, float] | None = None
    #: runtime, threads, batch and measured whole-model ms when latency-aware planning ran
    latency: dict[str, Any] | None = None
    latency_config: Any = field(default=None, repr=False, compare=False)
    #: what :func:`compress` measured after apply: BatchNorm layers re-estimated, and the
    #: whole-model not-slower check of latency-aware planning
    bn_recalibrated: int = 0
    latency_check: dict[str, Any] | None = None
    #: solver, wall time, forward passes and the dense layers refitted, after a data-aware fit
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "replacements", tuple(self.replacements))

    @property
    def params_after(self) -> int:
        return self.total_params + sum(r.params_after - r.params_before
                                       for r in self.replacements if r.applied)

    @property
    def macs_after(self) -> int:
        return self.total_macs + sum(r.macs_after - r.macs_before
                                     for r in self.replacements if r.applied)

    def ranks(self) -> dict[str, list[int]]:
        """The exact per-layer ranks (what the resolved recipe stores)."""
        return {r.name: list(r.rank) for r in self.replacements if r.applied}

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows of the report's layer table (``skip`` is said by ``skipped``)."""
        rows = [asdict(r) for r in self.replacements]
        for row in rows:
            del row["skip"]
        return rows

    def summary(self) -> str:
        """A table a person reads (what ``--dry-run`` prints)."""
        timed = any(r.latency_before is not None for r in self.replacements)
        head = ["layer", "shape", "method", "rank", "policy", "params", "MACs", "est. err"]
        head += ["ms"] if timed else []
        rows = []
        for r in self.replacements:
            name = r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else "") + (
                f" x{r.calls}" if r.calls > 1 else "")
            if r.applied:
                rank = "x".join(str(x) for x in r.rank)
                p = f"{r.params_before:,} -> {r.params_after:,}"
                m = f"{r.macs_before:,} -> {r.macs_after:,}"
                e = f"{r.rel_error:.3f}" if r.rel_error is not None else "-"
                row = [name, r.shape, r.method, rank, r.policy, p, m, e]
                ms = (f"{r.latency_before:.3g} -> {r.latency_after:.3g}"
                      if r.latency_before is not None and r.latency_after is not None else "-")
            else:
                row = [name, r.shape, r.method, "-", f"skipped: {r.skipped}",
                       f"{r.params_before:,}", f"{r.macs_before:,}", "-"]
                ms = f"{r.latency_before:.3g}" if r.latency_before is not None else "-"
            rows.append(row + ([ms] if timed else []))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        pa, ma = self.params_after, self.macs_after
        out.append("")
        out.append(f"model params {self.total_params:,} -> {pa:,} "
                   f"({self.total_params / max(pa, 1):.2f}x fewer); "
                   f"MACs {self.total_macs:,} -> {ma:,} ({self.total_macs / max(ma, 1):.2f}x fewer)")
        lat = self.latency or {}
        if lat:
            line_ = (f"latency ({lat.get('runtime')}, {lat.get('threads')} thread(s), batch "
                     f"{lat.get('batch')}): {lat['layers_timed']} layers timed alone, "
                     f"{lat['layers_dense_ms']:.3g} ms dense -> {lat['layers_planned_ms']:.3g}"
                     f" ms planned")
            if lat.get("compressed_ms") is not None:
                line_ += (f"; measured {lat['original_ms']:.3g} -> {lat['compressed_ms']:.3g} ms"
                          f" ({lat['original_ms'] / lat['compressed_ms']:.2f}x)")
            out.append(line_)
        if self.target:
            (k, v), = self.target.items()
            if k == "latency":
                got = lat["layers_planned_ms"] / max(lat["layers_dense_ms"], 1e-12)
            else:
                got = (pa / self.total_params) if k == "params" else (ma / self.total_macs)
            out.append(f"target: keep {v:g} of {k}; planned {got:.3f}")
        return "\n".join(out)


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


def _plan_config(config: Any) -> PlanConfig:
    if isinstance(config, PlanConfig):
        return config
    try:
        return PlanConfig.model_validate({} if config is None else config,
                                         context={"where": Where("plan()")})
    except ValidationError as e:
        raise Where("plan()").error(e) from None


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
    cfg = _plan_config(config)
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

    reps: list[Replacement] = []
    items: dict[str, BudgetItem] = {}
    for name, info in track([(n, i) for n, i in layers.items() if n in owner], "layer",
                            label=lambda x: f"{x[0]}, {rules[owner[x[0]]]['method']}",
                            weight=lambda x: _work(x[1].module)):
        w = 1.0 if sensitivity is None else float(sensitivity.get(name, 1.0))
        rep, item = _select(name, info, owner[name], rules[owner[name]], target=target,
                            weight=w, lat_cfg=lat_cfg,
                            x=inputs[name] if name in timed else None,
                            probe=probes.get(name), gram=grams.get(name, (None, 0)))
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
    lat_cfg = LatencyConfig.from_any(latency)
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
        allocate(list(items.values()), key, budget, penalty=penalty)
    except RankError:  # the grid's cheapest ranks cost too much: ranks below them, if any
        tails = [it for it in items.values() if "tail" in it.meta]
        for it in tails:
            it.candidates += it.meta["tail"](below=it.candidates[-1].rank)
        if not tails:
            raise
        allocate(list(items.values()), key, budget, penalty=penalty)
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


# ---------------------------------------------------------------------------- apply


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
    for rep in track([r for r in plan_.replacements if r.applied], "decompose",
                     label=lambda r: f"{r.name}, {r.method} {'x'.join(map(str, r.rank))}",
                     weight=lambda r: r.params_before):
        layer = get_module(model, rep.name)
        dec = get_decomposer(rep.method)
        check_weights(layer, rep.name)
        t0 = time.perf_counter()
        new = dec.decompose(layer, tuple(rep.rank), **rep.options)
        info = getattr(new, "fit_info", None)
        if isinstance(info, dict):
            info["decompose_seconds"] = time.perf_counter() - t0
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
    cfg = _plan_config(config)
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
    if isinstance(config, FitConfig):
        return config
    try:
        return FitConfig.model_validate({} if config is None else config,
                                        context={"where": Where("refine()")})
    except ValidationError as e:
        raise Where("refine()").error(e) from None


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
