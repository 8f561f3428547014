"""SqueezeNet 1.1 (ImageNet, shared weights): each method at a global MAC budget, zero-shot.

Top-1 / top-5 on ../shared/data/imagenet-val500.zip (500 genuine validation images, fed
as-is at 224x224) and agreement with the uncompressed model's top-1 predictions.

    python tools/bench_squeezenet_methods.py --macs 0.667 --json results/squeezenet_methods.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from compresscnn.counting import count
from compresscnn.data import calibration_batches, make_loaders
from compresscnn.errors import CompressError
from compresscnn.evaluation import evaluate
from compresscnn.models import load_model
from compresscnn.recipe import FIT_THROUGH
from compresscnn.surgery import ALLOCATIONS, compress

SHARED = Path(os.environ.get("COMPRESSCNN_SHARED_DATA",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["tucker2", "cp", "spatial", "fire", "svd"])
    ap.add_argument("--macs", type=float, default=2 / 3)
    ap.add_argument("--calibrate", type=int, default=0, metavar="BATCHES",
                    help="data-aware: fit each layer to the original's output on this many "
                         "batches of 32 images of imagenet-train1000.zip (0: data-free)")
    ap.add_argument("--allocation", choices=ALLOCATIONS,
                    default="spectral", help="how the global budget spreads over layers "
                    "(sensitivity needs --calibrate)")
    ap.add_argument("--steps", type=int, default=300,
                    help="Adam steps per layer of the data-aware fit (with --calibrate)")
    ap.add_argument("--fit-through", choices=FIT_THROUGH,
                    default="activation",
                    help="data-aware fit of each layer's output, or of it after the ReLU "
                         "that follows (Zhang et al.'s nonlinear reconstruction)")
    ap.add_argument("--refit-dense", action="store_true",
                    help="data-aware: also refit the layers left dense after a replaced one")
    ap.add_argument("--svd-1x1", action="store_true",
                    help="also let the budget cut the 1x1 convs (classifier included) by SVD")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("torchvision:squeezenet1_1",
                       str(SHARED / "weights" / "imagenet-squeezenet1_1" / "squeezenet1_1.pth"))
    size = tuple(model.pretrained_cfg["input_size"])
    data = {"dataset": "imagenet", "root": str(SHARED / "imagenet-val500.zip"),
            "test_split": "val", "resize": None, "crop": None, "eval_batch_size": 100}
    _, test = make_loaders(data, model.pretrained_cfg, train=False)
    base = count(model, size)
    cal = None
    if args.calibrate:
        cal_cfg = {"dataset": "imagenet", "root": str(SHARED / "imagenet-train1000.zip"),
                   "train_split": "train", "resize": 256, "crop": 224, "seed": 0}
        cal = calibration_batches(cal_cfg, model.pretrained_cfg, args.calibrate, batch_size=32)
    rows = []
    r0 = evaluate(model, test, progress=False)
    rows.append({"method": "dense", **base, "macs_ratio": 1.0, "top1": r0["top1"],
                 "top5": r0["top5"], "agreement": 100.0})
    print(f"dense: top1 {r0['top1']:.1f} top5 {r0['top5']:.1f}", flush=True)
    for method in args.methods:
        # by default the classifier (a 1x1 conv to 1000 classes) stays dense: it is 1/4 of
        # the params; --svd-1x1 hands every 1x1 conv the method refuses to SVD
        rules = [{"match": "features.*", "method": method}]
        if args.svd_1x1:
            rules.append({"match": "*", "method": "svd"})
        t0 = time.time()
        try:
            m, p = compress(model, rules, size, target={"macs": args.macs}, calibration=cal,
                            reconstruct_steps=args.steps, fit_through=args.fit_through,
                            refit_dense=args.refit_dense, allocation=args.allocation)
        except CompressError as e:
            rows.append({"method": method, "error": str(e)})
            print(f"{method}: {e}", flush=True)
            continue
        secs = time.time() - t0
        c = count(m, size)
        r = evaluate(m, test, reference=model, progress=False)
        row = {"method": method, **c, "macs_ratio": base["macs"] / c["macs"],
               "params_ratio": base["params"] / c["params"], "top1": r["top1"],
               "top5": r["top5"], "agreement": r["agreement"],
               "layers": len(p.ranks()), "decompose_s": round(secs, 1)}
        rows.append(row)
        print(f"{method}: MACs x{row['macs_ratio']:.2f} top1 {r['top1']:.1f} top5 {r['top5']:.1f} "
              f"agreement {r['agreement']:.1f}", flush=True)
        _write(args, rows)
    _write(args, rows)


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    """The JSON after every method, so a stopped run keeps what it measured."""
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} "
            f"{os.cpu_count()} cores, torch threads {args.threads}", "target_macs": args.macs,
            "calibrate_batches": args.calibrate, "steps": args.steps,
            "fit_through": args.fit_through, "svd_1x1": args.svd_1x1,
            "refit_dense": args.refit_dense,
            "allocation": args.allocation}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
