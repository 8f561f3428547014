"""CIFAR-10 ResNet benchmark: each method at a MAC budget, zero-shot and after fine-tuning.

A loop over the shipped recipe ``recipes/resnet{20,56}_cifar10_2x.yaml``: for every method
this runs ``compresscnn run RECIPE --set rules.0.method=M --set ...`` (the options below
become ``--set`` overrides; the command of each row is kept with it) and appends the run
report's summary to the JSON file, so a stopped loop can be started again.

    python tools/bench_cifar_resnet.py --model resnet20 --configs tucker2 cp spatial \\
        --macs 0.5 --epochs 1 --json tools/results/resnet20.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from run_experiments import add_compress_options, compress_overrides, run_recipe

RECIPES = {"resnet20": "recipes/resnet20_cifar10_2x.yaml",
           "resnet56": "recipes/resnet56_cifar10_2x.yaml"}
METHODS = ("tucker2", "cp", "spatial", "fire")


def overrides(args: argparse.Namespace, method: str) -> list[str]:
    """The ``--set`` overrides of one row."""
    sets = [f"rules.0.method={method}"]
    if args.uniform:  # the same MAC fraction in every layer instead of the global budget
        sets += [f"rules.0.macs={args.macs}", "target=null"]
    else:
        sets += [f"target.macs={args.macs}"]
    sets += compress_overrides(args)
    if args.epochs:
        sets += [f"finetune.epochs={args.epochs}",
                 f"finetune.distill.enabled={str(args.distill).lower()}"]
    else:
        sets += ["finetune.enabled=false"]
    return sets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=sorted(RECIPES))
    ap.add_argument("--configs", nargs="+", default=["tucker2", "cp", "spatial"],
                    choices=METHODS)
    ap.add_argument("--macs", type=float, default=0.5, help="fraction of the model's MACs kept")
    ap.add_argument("--uniform", action="store_true",
                    help="uniform per-layer MAC fraction instead of the global budget")
    ap.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0: zero-shot)")
    ap.add_argument("--distill", action="store_true", help="distil from the original")
    add_compress_options(ap, "bench_cifar_resnet")
    args = ap.parse_args(argv)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    for method in args.configs:
        sets = overrides(args, method)
        job = f"{args.model}_{method}_macs{args.macs:g}_e{args.epochs}_cal{args.calibrate}"
        row = {"config": method, "sets": sets,
               **run_recipe(job, RECIPES[args.model], sets, args.out, args.threads)}
        rows = [r for r in rows if r.get("sets") != sets] + [row]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{args.model} {method}: zero-shot {row['zero_shot_top1']}, "
              f"after fine-tuning {row['top1']}", flush=True)


if __name__ == "__main__":
    main()
