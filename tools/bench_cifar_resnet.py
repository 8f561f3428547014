"""CIFAR-10 ResNet benchmark: each method at a MAC budget, zero-shot and after distillation.

For every configuration: load ``cifar:resnetN`` with the shared akamaster weights, compress
with a global MAC budget (or a fixed per-layer policy), evaluate zero-shot on the full
10,000-image CIFAR-10 JPEG test set, fine-tune for the given epochs on the JPEG train set
with distillation from the original (SGD 0.01 cosine, crop + flip, batch 128), evaluate
again. ``dense`` is the uncompressed model given the same fine-tuning, the fair reference.

    python tools/bench_cifar_resnet.py --model resnet20 --configs dense tucker2 cp spatial \
        --macs 0.5 --epochs 1 --json results/resnet20.json

Results are appended to the JSON file as they come (one object per configuration), so a
long run can be stopped and continued.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from compresscnn.counting import count
from compresscnn.data import calibration_batches, make_loaders
from compresscnn.evaluation import evaluate
from compresscnn.training import finetune
from compresscnn.models import load_model
from compresscnn.recipe import FIT_THROUGH
from compresscnn.surgery import ALLOCATIONS, compress

SHARED = Path(os.environ.get("COMPRESSCNN_SHARED_DATA",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
           "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}


def rules_for(method: str, uniform: float | None) -> list[dict]:
    """Every 3x3 conv of the residual stages; the stem and the classifier stay dense."""
    rule = {"match": "layer*.conv*", "method": method}
    if uniform is not None:
        rule["macs"] = uniform
    if method == "fire":
        rule.update({"pct3x3": 0.5})
    return [rule]


#: what identifies a row; an older row lacking a key was measured with the value given here
_LEGACY = {"alpha": None, "calibrate": 0, "allocation": "spectral"}
#: the data-aware settings, and the values rows from before each option was added had
_CALIBRATED = {"steps": 300, "fit_through": "layer", "refit_dense": False,
               "bn_recalibrate": True}
_SETTINGS = ("config", "model", "target_macs", "uniform", "epochs", *_LEGACY, *_CALIBRATED)


def _same_settings(old: dict, row: dict) -> bool:
    """Whether ``old`` (a row already in the JSON) was measured with ``row``'s settings."""
    legacy = {**_LEGACY, **(_CALIBRATED if old.get("calibrate") else
                            dict.fromkeys(_CALIBRATED))}
    return all(old.get(k, legacy.get(k)) == row[k] for k in _SETTINGS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=sorted(WEIGHTS))
    ap.add_argument("--configs", nargs="+", default=["dense", "tucker2", "cp", "spatial"])
    ap.add_argument("--macs", type=float, default=0.5, help="fraction of the model's MACs kept")
    ap.add_argument("--uniform", action="store_true",
                    help="uniform per-layer MAC fraction instead of the global budget")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--no-distill", action="store_true", help="plain cross-entropy fine-tuning")
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term")
    ap.add_argument("--calibrate", type=int, default=0, metavar="BATCHES",
                    help="data-aware: fit each layer to the original's output on this many "
                         "batches of 64 training images (0: data-free)")
    ap.add_argument("--steps", type=int, default=300,
                    help="Adam steps per layer of the data-aware fit (with --calibrate)")
    ap.add_argument("--fit-through", choices=FIT_THROUGH,
                    default="activation",
                    help="data-aware fit of the layer's output, or of it after the "
                         "BatchNorm (and ReLU) that follow")
    ap.add_argument("--bn-recalibrate", action="store_true",
                    help="data-aware: re-estimate BatchNorm statistics on the calibration "
                         "batches after the fit (before 2026-11-27's second session, the "
                         "default)")
    ap.add_argument("--refit-dense", action="store_true",
                    help="data-aware: also refit the layers left dense after a replaced one")
    ap.add_argument("--allocation", choices=ALLOCATIONS,
                    default="spectral", help="how the global budget spreads over layers "
                    "(sensitivity needs --calibrate)")
    ap.add_argument("--sensitivity", action="store_true", help="= --allocation sensitivity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    if args.sensitivity:
        args.allocation = "sensitivity"
    torch.set_num_threads(args.threads)

    data_cfg = {"dataset": "cifar10", "root": str(SHARED / "cifar10-jpg.zip"),
                "batch_size": 128, "eval_batch_size": 500, "augment": True,
                "test_subset": args.test_subset, "seed": args.seed}
    weights = SHARED / "weights" / "cifar10-resnet-akamaster" / WEIGHTS[args.model]
    original = load_model(f"cifar:{args.model}", str(weights)).eval()
    input_size = tuple(original.pretrained_cfg["input_size"])
    train_loader, test_loader = make_loaders(data_cfg, original.pretrained_cfg)
    base = count(original, input_size)
    results = json.loads(args.json.read_text()) if args.json.exists() else []

    for cfg in args.configs:
        torch.manual_seed(args.seed)
        t0 = time.time()
        row: dict = {"model": args.model, "config": cfg, "epochs": args.epochs,
                     "distill": not args.no_distill, "seed": args.seed,
                     "alpha": None if args.no_distill else args.alpha,
                     "target_macs": args.macs, "uniform": args.uniform,
                     "calibrate": args.calibrate,
                     "allocation": args.allocation}
        # the data-aware settings only apply (and are only recorded) with --calibrate
        row.update({k: getattr(args, k) if args.calibrate else None for k in _CALIBRATED})
        if cfg == "dense":
            model = copy.deepcopy(original)
            row.update(count(model, input_size))
        else:
            # --uniform: the same MAC fraction for every layer instead of the global budget
            rules = rules_for(cfg, args.macs if args.uniform else None)
            target = None if args.uniform else {"macs": args.macs}
            cal = None
            if args.calibrate:
                cal = calibration_batches(data_cfg, original.pretrained_cfg, args.calibrate,
                                          batch_size=64)
            model, p = compress(original, rules, input_size, target=target, calibration=cal,
                                reconstruct_steps=args.steps, fit_through=args.fit_through,
                                refit_dense=args.refit_dense,
                                bn_recalibrate=args.bn_recalibrate,
                                allocation=args.allocation)
            c = count(model, input_size)
            row.update(c)
            row["ranks"] = p.ranks()
            row["rel_error_mean"] = sum(r.rel_error or 0 for r in p.replacements
                                        if r.applied) / max(1, len(p.ranks()))
        row["macs_ratio"] = base["macs"] / row["macs"]
        row["params_ratio"] = base["params"] / row["params"]
        zs = evaluate(model, test_loader, reference=original, progress=False)
        row["zero_shot_top1"], row["zero_shot_agreement"] = zs["top1"], zs.get("agreement")
        print(f"{args.model} {cfg}: MACs x{row['macs_ratio']:.2f} zero-shot {zs['top1']:.2f}",
              flush=True)
        if args.epochs > 0:
            steps = args.max_steps
            stats = finetune(model, train_loader, teacher=None if args.no_distill else original,
                             epochs=max(1, int(round(args.epochs))), max_steps=steps,
                             lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                             distill={"enabled": not args.no_distill, "temperature": 4.0,
                                      "alpha": args.alpha},
                             device="cpu", seed=args.seed, progress=False)
            model.eval()
            ft = evaluate(model, test_loader, reference=original, progress=False)
            row["finetuned_top1"], row["finetuned_agreement"] = ft["top1"], ft.get("agreement")
            row["finetune_images_per_s"] = stats.get("images_per_s")
            print(f"{args.model} {cfg}: after fine-tuning {ft['top1']:.2f}", flush=True)
        row["seconds"] = round(time.time() - t0, 1)
        row["machine"] = f"{platform.machine()} {os.cpu_count()} cores, torch threads {args.threads}"
        row["date"] = time.strftime("%Y-%m-%d")
        results = [r for r in results if not _same_settings(r, row)]
        results.append(row)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
