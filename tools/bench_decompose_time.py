"""Time to decompose every convolution of VGG-16 and ResNet-50, per method.

Random weights (time does not depend on the values much; CP-ALS iterations may), one
thread, rank about C/4: Tucker-2 (C_in/4, C_out/4), every other method min(C_in, C_out)/4
(CP's R, spatial's R, Fire's squeeze width), with the relative reconstruction error of each
layer averaged.

    python tools/bench_decompose_time.py --json results/decompose_time.json
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

from compresscnn.decomposers import get_decomposer


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
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
