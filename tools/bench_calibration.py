"""Data-aware compression: the closed-form fit against the iterative (Adam) one, one run.

``compresscnn.compress`` on the same model, rules, MAC budget and calibration batches:
data-free (``none``, first: it also pays for what the first call imports), then once per
solver; records the wall time of the whole ``compress`` call, the fit's own time and
forward passes (``plan.calibration``), and the zero-shot result: top-1 on the
10,000 CIFAR-10 JPEG test images (``cifar:resnetN``, CP on every residual 3x3 conv, 2x
fewer MACs) or top-1 and agreement with the original on imagenet-val500 (SqueezeNet 1.1, CP
on ``features.*``, 1.5x fewer MACs, fit of the raw output with ``refit_dense``).

    python tools/bench_calibration.py --model resnet20 --solvers none adam closed_form \
        --json tools/results/calibration_solvers.json

Rows are replaced by (model, solver, batches, batch size, threads) in the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from compresscnn import compress, load_model
from compresscnn.measure.evaluation import evaluate
from compresscnn.io.data import calibration_batches, make_loaders
from compresscnn.recipe.schema import SOLVERS

SHARED = Path(os.environ.get("COMPRESSCNN_SHARED_DATA",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
CIFAR = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def setup(name: str, n_batches: int, batch_size: int) -> dict:
    """Model, rules, budget, fit options, calibration batches and test loader."""
    if name in CIFAR:
        model = load_model(f"cifar:{name}",
                           str(SHARED / "weights" / "cifar10-resnet-akamaster" / CIFAR[name]))
        data = {"dataset": "cifar10", "root": str(SHARED / "cifar10-jpg.zip"),
                "eval_batch_size": 500, "augment": False, "seed": 0}
        cal, test_data = data, data
        rules, macs, opts = [{"match": "layer*.conv*", "method": "cp"}], 0.5, {}
    else:
        model = load_model("torchvision:squeezenet1_1", str(
            SHARED / "weights" / "imagenet-squeezenet1_1" / "squeezenet1_1.pth"))
        cal = {"dataset": "imagenet", "root": str(SHARED / "imagenet-train1000.zip"),
               "train_split": "train", "resize": 256, "crop": 224, "seed": 0}
        test_data = {"dataset": "imagenet", "root": str(SHARED / "imagenet-val500.zip"),
                     "test_split": "val", "resize": None, "crop": None,
                     "eval_batch_size": 100}
        rules, macs = [{"match": "features.*", "method": "cp"}], 2 / 3
        opts = {"fit_through": "layer", "refit_dense": True}
    model.eval()
    _, test = make_loaders(test_data, model.pretrained_cfg, train=False)
    batches = calibration_batches(cal, model.pretrained_cfg, n_batches, batch_size=batch_size)
    return {"model": model, "rules": rules, "macs": macs, "opts": opts, "batches": batches,
            "test": test, "size": tuple(model.pretrained_cfg["input_size"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=[*CIFAR, "squeezenet1_1"])
    ap.add_argument("--solvers", nargs="+", default=["none", "adam", "closed_form"],
                    choices=["none", *SOLVERS],
                    help="none: data-free (run it first)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = setup(args.model, args.batches, args.batch_size)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    for solver in args.solvers:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        cal = None if solver == "none" else s["batches"]
        new, p = compress(s["model"], s["rules"], s["size"], target={"macs": s["macs"]},
                          calibration=cal, config={"fit": {
                              "solver": "closed_form" if cal is None else solver,
                              **s["opts"]}})
        seconds = time.perf_counter() - t0
        fit = p.calibration or {"seconds": 0.0, "forward_passes": 0}
        r = evaluate(new, s["test"], reference=s["model"], progress=False)
        row = {"model": args.model, "solver": solver, "batches": args.batches,
               "batch_size": args.batch_size, "threads": args.threads,
               "target_macs": s["macs"], **s["opts"],
               "macs_ratio": p.total_macs / p.macs_after, "compress_s": round(seconds, 1),
               "fit_s": round(fit["seconds"], 1), "forward_passes": fit["forward_passes"],
               "top1": r["top1"], "agreement": r.get("agreement"),
               "layers": {rep.name: {k: rep.fit.get(k) for k in (
                   "output_error_data_free", "output_error", "fit_seconds", "fit_iters")}
                   for rep in p.replacements if rep.applied},
               "date": time.strftime("%Y-%m-%d"), "commit": commit,
               "machine": f"{platform.machine()} {os.cpu_count()} cores"}
        print(f"{args.model} {solver}: compress {seconds:.1f} s (fit {row['fit_s']} s, "
              f"{row['forward_passes']} passes), top-1 {r['top1']:.2f}, agreement "
              f"{r.get('agreement')}", flush=True)
        key = ("model", "solver", "batches", "batch_size", "threads")
        rows = [x for x in rows if any(x.get(k) != row[k] for k in key)] + [row]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
