"""Time to decompose every convolution of VGG-16 and ResNet-50, per method.

Random weights (time does not depend on the values much; CP-ALS iterations may), one
thread, rank about C/4: Tucker-2 (C_in/4, C_out/4), every other method min(C_in, C_out)/4
(CP's R, spatial's R, Fire's squeeze width), with the relative reconstruction error of each
layer averaged.

    python tools/bench_decompose_time.py --json results/decompose_time.json

With ``--target-macs F``: the whole of ``compresscnn.compress`` (plan at a global MAC
budget, then every decomposition) on the convolutions ``--match`` selects, as a recipe's
``rules: [{match: ..., method: ...}]`` with ``target: {macs: F}`` runs it; the plan's and
the decompositions' seconds, and per layer its rank, seconds and relative error:

    python tools/bench_decompose_time.py --models resnet18 --methods cp --target-macs 0.5 \
        --threads 2 --json tools/results/decompose_time_resnet18_cp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from compresscnn import compress, get_decomposer, plan


def quarter_rank(dec, m: nn.Conv2d, fraction: float) -> tuple[int, ...]:
    """Rank ~ fraction * channels, clipped to the method's maximum."""
    full = dec.max_rank(m)
    if dec.name == "tucker2":
        want = (m.in_channels // m.groups, m.out_channels // m.groups)
    else:
        want = (min(m.in_channels, m.out_channels),)
    return tuple(max(1, min(f, int(w * fraction))) for w, f in zip(want, full))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    ap.add_argument("--methods", nargs="+", default=["tucker2", "cp", "spatial", "fire"])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-macs", type=float, default=None,
                    help="compress at this global MAC budget instead (see the module doc)")
    ap.add_argument("--match", default="layer*.conv*",
                    help="with --target-macs: the layers the rule takes (default: the 3x3 "
                         "convs of torchvision's ResNet blocks)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.target_macs is not None:
        return budgeted(args)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        for method in args.methods:
            dec = get_decomposer(method)
            taken = [(n, m) for n, m in convs if dec.supports(m) is None]
            errs = []
            t0 = time.perf_counter()
            for _, m in taken:
                new = dec.decompose(m, quarter_rank(dec, m, args.fraction))
                errs.append(float(new.fit_info["rel_error"]))
            secs = time.perf_counter() - t0
            row = {"model": name, "method": method, "layers": len(taken),
                   "of_convs": len(convs), "seconds": round(secs, 2),
                   "mean_rel_error": round(sum(errs) / max(1, len(errs)), 4)}
            rows.append(row)
            print(row, flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} "
            f"{os.cpu_count()} cores, torch threads {args.threads}", "fraction": args.fraction}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def budgeted(args: argparse.Namespace) -> None:
    """``compress`` at ``--target-macs`` per model and method: planning and the rest of the
    call (given that plan) timed apart, per-layer rows."""
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        for method in args.methods:
            rules = [{"match": args.match, "method": method}]
            target = {"macs": args.target_macs}
            t0 = time.perf_counter()
            planned = plan(model, rules, (3, 224, 224), target)
            t_plan = time.perf_counter() - t0
            _, p = compress(model, rules, (3, 224, 224), target, planned=planned)
            total = time.perf_counter() - t0
            layers = [{"name": r.name, "rank": r.rank, "rel_error": round(r.rel_error, 4),
                       "seconds": round(r.fit.get("decompose_seconds", float("nan")), 3),
                       "iters": r.fit.get("iters")}
                      for r in p.replacements if r.applied]
            row = {"model": name, "method": method, "target_macs": args.target_macs,
                   "macs_kept": round(p.macs_after / p.total_macs, 4),
                   "layers": len(layers), "compress_seconds": round(total, 2),
                   "plan_seconds": round(t_plan, 2),
                   "decompose_seconds": round(sum(x["seconds"] for x in layers), 2),
                   "mean_rel_error": round(sum(x["rel_error"] for x in layers)
                                           / max(1, len(layers)), 4),
                   "per_layer": layers}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "per_layer"}, flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} "
            f"{os.cpu_count()} cores, torch threads {args.threads}",
            "target_macs": args.target_macs, "match": args.match}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
