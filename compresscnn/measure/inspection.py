"""``compresscnn inspect MODEL``: what a user needs to write a recipe.

One row per Conv2d/Linear: its name (the string rules match), shape, params, MACs, which
methods can take it (or why not), and the ranks that keep given fractions of the spectral
energy for the method a recipe would most likely use on it (tucker2 for convolutions,
spatial for depthwise ones, svd for fully connected layers).

Then what fits the model (:func:`fit_report`, also printed by ``run --dry-run``): the share
of the MACs each kind of layer holds (spatial k x k convs, pointwise 1x1 convs, grouped and
depthwise convs, Linear layers), which methods can take each kind and at most how much of
the model's MACs each method can remove, the layers that hold MACs but that no method takes
(ConvTranspose2d, Conv1d, Conv3d, attention products...), and a recommended rule set.
Everything there is counted (one forward pass under ``FlopCounterMode``, every call of a
layer included) or analytic (the decomposers' ``cost``): nothing is decomposed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compresscnn.measure.counting import count, trace_layers
from compresscnn.core.decomposers import get_decomposer, list_decomposers
from compresscnn.core.decomposers.base import layer_cost
from compresscnn.errors import CompressError
from compresscnn.io.models import load_model
from compresscnn.core.ranks import energy_rank
from compresscnn.util.modules import eval_mode
from compresscnn.util.progress import bar


def _default_method(mod: nn.Module) -> str | None:
    for m in ("tucker2", "spatial", "svd"):
        if m in list_decomposers() and get_decomposer(m).supports(mod) is None:
            return m
    return None


def inspect_rows(model: nn.Module, input_size: Sequence[int],
                 energies: Sequence[float] = (0.9, 0.95, 0.99)) -> list[dict]:
    rows = []
    layers = trace_layers(model, input_size)
    progress = bar(len(layers), "inspect: spectra", unit="layer")
    for name, info in layers.items():
        if progress is not None:
            progress.update(1)
        mod = info.module
        params, macs = layer_cost(mod, info.in_hw)
        methods = [m for m in list_decomposers()  # not auto: it chooses among these
                   if not get_decomposer(m).chooses and get_decomposer(m).supports(mod) is None]
        default = _default_method(mod)
        cands = {}
        if default is not None:
            dec = get_decomposer(default)
            spectra = dec.spectra(mod)
            for e in energies:
                cands[e] = [energy_rank(s, e) for s in spectra]
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            shape = (f"{mod.in_channels}->{mod.out_channels} {kh}x{kw} s{tuple(mod.stride)} "
                     f"d{tuple(mod.dilation)} g{mod.groups}")
        else:
            shape = f"{mod.in_features}->{mod.out_features}"
        rows.append({"name": name, "type": info.type, "shape": shape,
                     "in": list(info.in_shape), "out": list(info.out_shape),
                     "params": params, "macs": macs, "methods": methods,
                     "default": default, "energy_ranks": cands})
    if progress is not None:
        progress.close()
    return rows


def inspect_model(spec: str, weights: str | None = None,
                  input_size: Sequence[int] | None = None,
                  energies: Sequence[float] = (0.9, 0.95, 0.99)) -> str:
    """The per-layer table as text."""
    model = load_model(spec, weights).eval()
    if input_size is None:
        input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
    if input_size is None:
        raise CompressError("--input-size: the model has no default input size; give C H W")
    rows = inspect_rows(model, input_size, energies)
    total = count(model, input_size)
    head = ["layer", "type", "shape", "in", "params", "MACs", "%MACs", "methods"] + \
        [f"rank@{e:g}" for e in energies]
    table = []
    for r in rows:
        ranks = [("x".join(map(str, r["energy_ranks"][e])) + f" ({r['default']})")
                 if e in r["energy_ranks"] else "-" for e in energies]
        table.append([r["name"], r["type"], r["shape"], "x".join(map(str, r["in"])),
                      f"{r['params']:,}", f"{r['macs']:,}",
                      f"{100 * r['macs'] / max(total['macs'], 1):.1f}",
                      ",".join(r["methods"]) or "-"] + ranks)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = [f"{spec}  input {tuple(input_size)}  params {total['params']:,}  "
             f"MACs {total['macs']:,}", fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(t) for t in table]
    return "\n".join(lines) + "\n\n" + fit_text(fit_report(model, input_size))


# --------------------------------------------------------------------------- what fits

#: the kinds of layer the methods tell apart, in the order they are listed
KINDS = ("spatial kxk", "pointwise 1x1", "grouped", "depthwise", "linear")
#: the method recommended for each kind (cheap to plan, exact at full rank): SVD for the
#: matrices (a 1x1 conv is one), Tucker-2 for the k x k and grouped convs, spatial for the
#: depthwise ones (the only method that takes them)
PREFERRED = {"pointwise 1x1": "svd", "linear": "svd", "spatial kxk": "tucker2",
             "grouped": "tucker2", "depthwise": "spatial"}
#: a kind holding less than this share of the MACs gets no rule of its own
MIN_SHARE = 0.01


def layer_kind(mod: nn.Module) -> str:
    """``spatial kxk``, ``pointwise 1x1``, ``grouped``, ``depthwise`` or ``linear``."""
    if isinstance(mod, nn.Linear):
        return "linear"
    if mod.groups > 1:
        return "depthwise" if mod.in_channels // mod.groups == 1 else "grouped"
    return "pointwise 1x1" if tuple(mod.kernel_size) == (1, 1) else "spatial kxk"


@torch.no_grad()
def _module_macs(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """MACs of every module (its own and its children's, every call counted) for one
    input, by module name (``""``: the whole model)."""
    p = next(model.parameters(), None)
    x = torch.zeros((1, *input_size), dtype=p.dtype if p is not None and p.is_floating_point()
                    else torch.float32, device=p.device if p is not None else "cpu")
    with eval_mode(model), FlopCounterMode(display=False) as fc:
        model(x)
    root = type(model).__name__
    flops = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    out = {"": int(flops.get("Global", 0) // 2)}
    for name, _ in model.named_modules():
        if name:
            out[name] = int(flops.get(f"{root}.{name}", 0) // 2)
    return out


def _own_macs(model: nn.Module, macs: dict[str, int]) -> dict[str, int]:
    """MACs a module computes itself, not in its children (functional ops in ``forward``:
    attention products, a ConvTranspose2d's convolution...)."""
    own = {}
    for name, mod in model.named_modules():
        children = sum(macs.get(f"{name}.{c}" if name else c, 0)
                       for c, _ in mod.named_children())
        own[name] = max(0, macs.get(name, 0) - children)
    return own


def fit_report(model: nn.Module, input_size: Sequence[int]) -> dict[str, Any]:
    """Which methods can take how much of ``model``'s MACs, for one input of ``input_size``.

    Returns ``{"macs", "kinds": {kind: {"layers", "macs", "share", "methods"}},
    "methods": {method: {"layers", "share" (of the MACs it can take), "removable" (share
    of the model's MACs it removes with every layer it takes at rank 1)}},
    "not_taken": [{"type", "layers", "macs", "share"}] (MACs in modules no method takes,
    by type), "removable" (the most any rule set can remove: each layer by its best
    method at rank 1), "rules" (the recommended rule set), "why" (one line per rule)}``.
    """
    input_size = tuple(int(s) for s in input_size)
    layers = trace_layers(model, input_size)
    macs = _module_macs(model, input_size)
    total = max(macs[""], 1)
    methods = [m for m in list_decomposers() if not get_decomposer(m).chooses]
    kinds: dict[str, dict[str, Any]] = {k: {"layers": 0, "macs": 0, "methods": set()}
                                        for k in KINDS}
    by_method = {m: {"layers": 0, "macs": 0, "saved": 0} for m in methods}
    best_saved = 0
    for name, info in layers.items():
        mod, m0 = info.module, macs.get(name, 0)
        k = kinds[layer_kind(mod)]
        k["layers"] += 1
        k["macs"] += m0
        dense = layer_cost(mod, info.in_hw)[1]
        best = 0
        for m in methods:
            dec = get_decomposer(m)
            if dec.supports(mod) is not None:
                continue
            k["methods"].add(m)
            low = dec.cost(mod, dec.scale_rank(mod, 1e-9), info.in_hw)[1]
            saved = int(m0 * max(0.0, 1 - low / dense)) if dense else 0
            by_method[m]["layers"] += 1
            by_method[m]["macs"] += m0
            by_method[m]["saved"] += saved
            best = max(best, saved)
        best_saved += best
    own = _own_macs(model, macs)
    not_taken: dict[str, dict[str, Any]] = defaultdict(lambda: {"layers": 0, "macs": 0})
    for name, mod in model.named_modules():
        if name in layers or own.get(name, 0) == 0:
            continue
        entry = not_taken[type(mod).__name__ if name else f"{type(mod).__name__} (forward)"]
        entry["layers"] += 1
        entry["macs"] += own[name]
    report = {
        "macs": macs[""], "input_size": list(input_size),
        "kinds": {k: {"layers": v["layers"], "macs": v["macs"], "share": v["macs"] / total,
                      "methods": [m for m in methods if m in v["methods"]]}
                  for k, v in kinds.items()},
        "methods": {m: {"layers": v["layers"], "share": v["macs"] / total,
                        "removable": v["saved"] / total} for m, v in by_method.items()},
        "not_taken": sorted(({"type": t, **v, "share": v["macs"] / total}
                             for t, v in not_taken.items()), key=lambda e: -e["macs"]),
        "removable": best_saved / total,
    }
    report["rules"], report["why"] = _recommend(report)
    return report


def _recommend(report: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """One ``match: "*"`` rule per method, in an order that sends each kind of layer to its
    preferred method (a layer goes to the first rule whose method takes it)."""
    chosen: dict[str, list[str]] = {}
    for kind, k in report["kinds"].items():
        if k["share"] < MIN_SHARE or not k["methods"]:
            continue
        m = PREFERRED[kind] if PREFERRED[kind] in k["methods"] else k["methods"][0]
        if m == "spatial" and kind == "depthwise" and \
                report["methods"]["spatial"]["removable"] < MIN_SHARE / 10:
            continue  # spatial cannot shrink these (strided 3x3 depthwise convs)
        chosen.setdefault(m, []).append(kind)
    order = [m for m in ("svd", "tucker2", "spatial", "cp", "fire") if m in chosen]
    order += [m for m in chosen if m not in order]
    rules = [{"match": "*", "method": m} for m in order]
    why = [f"{m}: {', '.join(chosen[m])} "
           f"({100 * sum(report['kinds'][k]['share'] for k in chosen[m]):.1f}% of the MACs)"
           for m in order]
    return rules, why


def fit_text(report: dict[str, Any]) -> str:
    """:func:`fit_report` as the lines ``inspect`` and ``run --dry-run`` print."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    L = [f"What fits this model ({report['macs']:,} MACs for one "
         f"{'x'.join(map(str, report['input_size']))} input):"]
    rows = [("layers", "count", "MACs", "methods that take them")]
    rows += [(k, str(v["layers"]), pct(v["share"]), ", ".join(v["methods"]) or "none")
             for k, v in report["kinds"].items() if v["layers"]]
    rows += [(f"not taken: {e['type']}", str(e["layers"]), pct(e["share"]), "none")
             for e in report["not_taken"] if e["share"] >= 0.0005]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    L += ["  " + f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in rows]
    L.append("  method: the MACs it can take, and the most it can remove (every layer it takes "
             "at rank 1)")
    for m, v in report["methods"].items():
        if v["layers"]:
            L.append(f"    {m}: takes {pct(v['share'])} in {v['layers']} layers, removes at "
                     f"most {pct(v['removable'])}")
    L.append(f"  at most {pct(report['removable'])} of the MACs can be removed "
             f"(target: {{macs: f}} needs f >= {1 - report['removable']:.2f})")
    if report["rules"]:
        L.append("  recommended rules (each layer goes to the first rule whose method takes "
                 "it; `method: auto` measures cp, spatial, tucker2 and svd per layer instead, "
                 "slower):")
        L.append("    rules:")
        for r, why in zip(report["rules"], report["why"]):
            L.append(f"      - {{match: \"*\", method: {r['method']}}}   # {why}")
    else:
        L.append("  no method takes a layer of this model")
    return "\n".join(L)
