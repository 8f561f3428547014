"""Planning and fitting at ImageNet scale: ``compresscnn.compress`` timed on torchvision
ResNet-18 and ResNet-50 (random weights, 3x224x224) and on VGG-16's fc6 alone, this tree
interleaved with a baseline tree (an older commit's checkout) in one run.

Cases (``--cases``, default all):

* ``resnet18-cp``, ``resnet18-tucker2``, ``resnet18-auto`` (and ``resnet50-*``): data-free
  ``compress(model, [{"match": "*", "method": M}], (3, 224, 224), target={"macs": 0.5})``;
* ``resnet18-tucker2-data`` (and ``resnet50-``): the same with 256 calibration images
  (8 batches of 32, seeded Gaussian tensors: the fit's cost does not depend on the pixels);
* ``fc6-svd``: a model that is VGG-16's fc6 alone, ``Linear(25088, 4096)``, compressed with
  ``svd`` at ``target={"params": 0.5}``.

Each case runs in a fresh process (``--one``) with ``PYTHONPATH`` set to the tree it
measures, seeded the same in both; the baseline runs first and is stopped after
``--baseline-limit`` seconds (its time is then recorded as a lower bound, ``"> limit"``).
Per case the total seconds, the MACs (or parameters) kept and per layer the method, rank,
error and seconds the plan rows hold (``rel_error``: weight error; with calibration also
the output error after the fit).

    git worktree add /tmp/baseline 706b254
    python tools/bench_scale.py --baseline /tmp/baseline --threads 2 \\
        --json tools/results/bench_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = ["resnet18-cp", "resnet18-tucker2", "resnet18-auto", "resnet18-tucker2-data",
         "fc6-svd", "resnet50-cp", "resnet50-tucker2", "resnet50-auto",
         "resnet50-tucker2-data"]
#: the goal of each case, seconds on an idle 2-core CPU with 2 threads
GOALS = {"resnet18-cp": 30, "resnet18-tucker2": 30, "resnet18-auto": 30,
         "resnet18-tucker2-data": 60, "fc6-svd": 10, "resnet50-cp": 90,
         "resnet50-tucker2": 90, "resnet50-auto": 90, "resnet50-tucker2-data": 180}


def one(case: str, threads: int) -> dict:
    """Run one case in this process (the tree on ``sys.path``) and return its figures."""
    import torch
    from torch import nn

    import compresscnn as cc

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if case == "fc6-svd":
        model = nn.Sequential(nn.Linear(25088, 4096)).eval()
        rules, size, target, cal = [{"match": "*", "method": "svd"}], (25088,), \
            {"params": 0.5}, None
    else:
        arch, method, *data = case.split("-")
        model = cc.load_model(f"torchvision:{arch}", weights=None).eval()
        rules, size, target = [{"match": "*", "method": method}], (3, 224, 224), {"macs": 0.5}
        gen = torch.Generator().manual_seed(1)
        cal = [torch.randn(32, 3, 224, 224, generator=gen) for _ in range(8)] if data else None
    t0 = time.perf_counter()
    _, p = cc.compress(model, rules, size, target=target, calibration=cal)
    seconds = time.perf_counter() - t0
    key = next(iter(target))
    kept = (p.params_after / p.total_params) if key == "params" else p.macs_after / p.total_macs

    def num(v):
        return round(float(v), 5) if isinstance(v, (int, float)) and v is not None else v

    layers = [{"name": r.name, "method": r.method, "rank": r.rank, "rel_error": num(r.rel_error),
               **{k: num(r.fit[k]) for k in ("decompose_seconds", "iters", "output_error",
                                              "output_error_data_free", "fit_seconds")
                  if k in r.fit}}
              for r in p.replacements if r.applied]
    errs = [x["rel_error"] for x in layers if x["rel_error"] is not None]
    return {"seconds": round(seconds, 2), f"{key}_kept": round(kept, 4), "layers": len(layers),
            "mean_rel_error": round(sum(errs) / max(1, len(errs)), 5),
            "methods": {m: sum(x["method"] == m for x in layers)
                        for m in sorted({x["method"] for x in layers})},
            "per_layer": layers}


def run_case(case: str, tree: Path, threads: int, limit: float) -> dict:
    """``case`` in a subprocess on ``tree``; a result, or the limit it ran past."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", case,
           "--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit,
                             cwd=str(tree))
    except subprocess.TimeoutExpired:
        return {"seconds": f"> {limit:g}", "timed_out": True}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "wall": round(time.perf_counter() - t0, 1)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, help="a checkout of the commit to compare with")
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-limit", type=float, default=600.0,
                    help="seconds after which a baseline case is stopped")
    ap.add_argument("--limit", type=float, default=1800.0,
                    help="seconds after which a case of this tree is stopped")
    ap.add_argument("--note", default="", help="the machine's state, stored with the results")
    ap.add_argument("--json", type=Path, default=ROOT / "tools/results/bench_scale.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.threads)), flush=True)
        return
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit_of(ROOT), "baseline_commit": commit_of(args.baseline)
            if args.baseline else None, "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "baseline_limit_seconds": args.baseline_limit, "note": args.note,
            "command": " ".join(["python", "tools/bench_scale.py", *sys.argv[1:]])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        row = {"case": case, "goal_seconds": GOALS[case], "load_before": os.getloadavg()[0]}
        if args.baseline is not None:
            row["baseline"] = run_case(case, args.baseline.resolve(), args.threads,
                                       args.baseline_limit)
        row["new"] = run_case(case, ROOT, args.threads, args.limit)
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        brief = {k: (v.get("seconds"), v.get("mean_rel_error")) if isinstance(v, dict) else v
                 for k, v in row.items()}
        print(brief, flush=True)
        # after every case, so a long run stopped part-way keeps what it measured
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
