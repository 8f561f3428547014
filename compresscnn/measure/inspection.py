"""``compresscnn inspect MODEL``: what a user needs to write a recipe.

One row per Conv2d/Linear: its name (the string rules match), shape, params, MACs, which
methods can take it (or why not), and the ranks that keep given fractions of the spectral
energy for the method a recipe would most likely use on it (tucker2 for convolutions,
spatial for depthwise ones, svd for fully connected layers).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from compresscnn.measure.counting import count, trace_layers
from compresscnn.core.decomposers import get_decomposer, list_decomposers
from compresscnn.core.decomposers.base import layer_cost
from compresscnn.errors import CompressError
from compresscnn.io.models import load_model
from compresscnn.core.ranks import energy_rank


def _default_method(mod: nn.Module) -> str | None:
    for m in ("tucker2", "spatial", "svd"):
        if m in list_decomposers() and get_decomposer(m).supports(mod) is None:
            return m
    return None


def inspect_rows(model: nn.Module, input_size: Sequence[int],
                 energies: Sequence[float] = (0.9, 0.95, 0.99)) -> list[dict]:
    rows = []
    for name, info in trace_layers(model, input_size).items():
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
    return "\n".join(lines)
