"""SqueezeNet 1.1 (ImageNet, shared weights): each method at a global MAC budget, zero-shot.

A loop over the shipped recipe ``recipes/squeezenet1_1_val500.yaml`` (calibration on the
1,000 training images, top-1 / top-5 and agreement with the original on the 500 validation
images): for every method this runs ``compresscnn run RECIPE --set rules.0.method=M --set
...`` (the command of each row is kept with it) and writes the summaries to the JSON file.

    python tools/bench_squeezenet_methods.py --methods tucker2 cp spatial --macs 0.667 \\
        --json tools/results/squeezenet1_1_methods.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from run_experiments import add_compress_options, compress_overrides, run_recipe

RECIPE = "recipes/squeezenet1_1_val500.yaml"


def overrides(args: argparse.Namespace, method: str) -> list[str]:
    """The ``--set`` overrides of one row."""
    rules = f"rules.0.method={method}"
    if args.svd_1x1:  # the 1x1 convs the method refuses (classifier included) get SVD
        rules = f'rules=[{{match: "features.*", method: {method}}}, {{match: "*", method: svd}}]'
    return [rules, f"target.macs={args.macs}", *compress_overrides(args)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["tucker2", "cp", "spatial", "fire"])
    ap.add_argument("--macs", type=float, default=0.667)
    ap.add_argument("--svd-1x1", action="store_true",
                    help="also let the budget cut the 1x1 convs (classifier included) by SVD")
    add_compress_options(ap, "bench_squeezenet")
    args = ap.parse_args(argv)
    rows = []
    for method in args.methods:
        sets = overrides(args, method)
        job = f"squeezenet1_1_{method}_macs{args.macs:g}_cal{args.calibrate}"
        rows.append({"method": method, "sets": sets,
                     **run_recipe(job, RECIPE, sets, args.out, args.threads)})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        r = rows[-1]
        print(f"{method}: top1 {r['zero_shot_top1']} agreement {r['zero_shot_agreement']}",
              flush=True)


if __name__ == "__main__":
    main()
