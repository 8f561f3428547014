"""Export parity: every method's ONNX file run in onnxruntime, OpenVINO and OpenCV DNN.

For each model and method: compress (``compresscnn.compress``), export
(``compresscnn.export_onnx``: BatchNorm and Fire reorders folded, the default) and export
again without folding; each file is run in every runtime (CPU, float32) on the same random
inputs as PyTorch (``compresscnn.io.export.verify_onnx``, batches 1 and 3). Random weights,
except SqueezeNet 1.1's shared ImageNet weights when ../shared/data has them; BatchNorm
statistics re-estimated on random inputs so that they are not the identity.

    python tools/bench_export_parity.py --threads 1 --json tools/results/export_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import onnx
import torch

import compresscnn as cc
from compresscnn import CompressError, recalibrate_bn, verify_onnx

#: the runtimes ``verify_onnx`` runs a file in (the ``export.verify`` recipe key's choices)
RUNTIMES = ("onnxruntime", "openvino", "opencv")


def collect_versions() -> dict[str, str | None]:
    """Installed versions of the packages the parity depends on."""
    out: dict[str, str | None] = {}
    for pkg in ("torch", "onnx", "onnxruntime", "openvino", "opencv-python-headless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out

SHARED = Path(os.environ.get("COMPRESSCNN_SHARED_DATA",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SQUEEZENET = SHARED / "weights" / "imagenet-squeezenet1_1" / "squeezenet1_1.pth"
METHODS = ("tucker2", "cp", "spatial", "svd", "fire")
MACS = {"macs": 0.6}

#: model -> method -> (rules, target); a method takes only the layers it can
PLANS = {
    "resnet18": {
        **{m: ([{"match": "layer*.conv*", "method": m}], MACS)
           for m in ("tucker2", "cp", "spatial", "fire")},
        "svd": ([{"match": ["layer*.downsample.0", "fc"], "method": "svd", "rank": 0.5}],
                None)},
    "mobilenet_v2": {  # spatial takes the depthwise convs; svd the pointwise ones
        "spatial": ([{"match": "features.*", "method": "spatial", "rank": 0.5}], None),
        "svd": ([{"match": ["features.*", "classifier.1"], "method": "svd", "rank": 0.5}],
                None)},
    "squeezenet1_1": {
        **{m: ([{"match": "features.*", "method": m}], MACS)
           for m in ("tucker2", "cp", "spatial", "fire")},
        "svd": ([{"match": ["features.*", "classifier.1"], "method": "svd", "rank": 0.5}],
                None)},
}


def _model(name: str, size: tuple[int, ...]) -> tuple[torch.nn.Module, str]:
    weights = str(SQUEEZENET) if name == "squeezenet1_1" and SQUEEZENET.is_file() else None
    torch.manual_seed(0)
    model = cc.load_model(f"torchvision:{name}", weights)
    recalibrate_bn(model, [torch.randn(8, *size) for _ in range(4)])
    return model.eval(), weights or "random"


def _ops(path: Path) -> dict[str, int]:
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {k: ops.get(k, 0) for k in ("BatchNormalization", "Gather", "Concat")}


def _check(model: torch.nn.Module, path: Path, size: tuple[int, ...],
           runtimes: list[str]) -> dict[str, dict]:
    out = {}
    for rt in runtimes:
        try:
            got = verify_onnx(model, path, size, [rt])[rt]
            out[rt] = {"max_abs_diff": got["max_abs_diff"], "rel_l2": got["rel_l2"]}
        except (CompressError, RuntimeError) as e:  # a runtime that cannot run the file
            out[rt] = {"error": str(e)}
    return out


def run_case(name: str, method: str, size: tuple[int, ...], runtimes: list[str],
             unfolded: bool, folder: Path) -> dict:
    base, weights = _model(name, size)
    rules, target = PLANS[name][method]
    small, plan = cc.compress(base, rules, size, target=target)
    row = {"model": name, "method": method, "weights": weights,
           "layers": sum(r.applied for r in plan.replacements),
           "macs_ratio": round(plan.macs_after / plan.total_macs, 4)}
    for fold in (True, False) if unfolded else (True,):
        path = folder / f"{name}_{method}_{int(fold)}.onnx"
        info = cc.export_onnx(small, path, size, {"fold": fold})
        row["folded" if fold else "unfolded"] = {
            "folded": info["folded"], "ops": _ops(path),
            "runtimes": _check(small.eval(), path, size, runtimes)}
    return row


def _fmt(r: dict) -> str:
    return r["error"][:40] if "error" in r else f"{r['max_abs_diff']:.1e} / {r['rel_l2']:.1e}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--no-unfolded", action="store_true",
                    help="skip the second export without folding")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = (3, args.size, args.size)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="export-parity-") as tmp:
        for name in args.models:
            for method in [m for m in args.methods if m in PLANS[name]]:
                row = run_case(name, method, size, args.runtimes, not args.no_unfolded,
                               Path(tmp))
                rows.append(row)
                print(f"{name} {method} ({row['layers']} layers): " + "  ".join(
                    f"{k} {rt} {_fmt(v)}" for k in ("folded", "unfolded") if k in row
                    for rt, v in row[k]["runtimes"].items()), flush=True)
                _write(args, rows)
    return rows


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    """The JSON after every case, so a stopped run keeps what it measured."""
    versions = collect_versions()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} "
            f"{os.cpu_count()} cores, torch threads {args.threads}",
            "input": [3, args.size, args.size], "batches": [1, 3],
            "versions": {k: versions.get(k) for k in ("torch", "onnx", "onnxruntime",
                                                      "openvino", "opencv-python-headless")}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
