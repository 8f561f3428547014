"""Every torchvision classification architecture and a dozen timm families: compress at a
MAC target (or refuse in one line), export ONNX, check onnxruntime parity at two batch sizes.

Random weights, one input size for all (3x224x224 by default), rules
``[{match: "*", method: M}]`` and ``target: {macs: F}`` through the public API
(``compresscnn.load_model``, ``compress``, ``count``, ``export_onnx``). Each model runs in a
child process of its own with a time limit and an address-space limit, so one slow or huge
architecture cannot stop the others; the JSON file is rewritten after every model, and
``--resume`` keeps the rows it already holds (except those that failed with an error, and
with ``--rerun-over-limit`` those that ran out of time or memory) and runs the rest.

    python tools/bench_zoo.py --method tucker2 --time-limit 300 --threads 1 \\
        --json tools/results/zoo_tucker2.json
    python tools/bench_zoo.py --table tools/results/zoo_tucker2.json   # BENCHMARKS.md rows

Each row: ``status`` (``ok``; ``refused``: the toolkit's one-line refusal; ``export
failed``; ``parity``: onnxruntime off by more than the export's tolerance; ``time limit``
and ``memory limit`` with the stage it was in; ``error``: anything else, one line), the
layers the plan took of the Conv2d/Linear layers it matched, the MAC ratio reached
(compressed / original, counted), seconds per stage, the ONNX exporter that wrote the file
(and why dynamo failed, when it fell back), and onnxruntime's max |difference| per batch
size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

#: a dozen timm families (the smallest member of each), CNNs of kinds torchvision lacks
TIMM = ("resnet18d", "efficientnet_b0", "mobilenetv3_large_100", "mobilenetv4_conv_small",
        "convnext_atto", "regnetx_002", "ghostnet_100", "rexnet_100", "dla34", "cspresnet50",
        "res2net50_14w_8s", "resnest14d", "repvgg_a0", "hrnet_w18_small", "mixnet_s",
        "lcnet_050", "dpn68", "xception41")


def default_models() -> list[str]:
    import torchvision

    tv = sorted(torchvision.models.list_models(module=torchvision.models))
    return [f"torchvision:{n}" for n in tv] + [f"timm:{n}" for n in TIMM]


def _stage(name: str) -> None:
    """Tell the parent which stage the child is in (the last one names a time-out)."""
    print(f"stage: {name}", file=sys.stderr, flush=True)


#: what a child's last line says when it ran out of the address space it was given
OUT_OF_MEMORY = ("MemoryError", "std::bad_alloc", "can't allocate memory")


def one(spec: str, method: str, macs: float, size: Sequence[int], threads: int,
        batches: Sequence[int]) -> dict[str, Any]:
    """One model, in this process: the row."""
    import torch

    import compresscnn as cc

    torch.set_num_threads(threads)
    size = tuple(int(s) for s in size)
    row: dict[str, Any] = {"model": spec, "method": method, "input": list(size),
                           "seconds": {}}
    t = time.perf_counter()
    _stage("load")
    torch.manual_seed(0)
    model = cc.load_model(spec, None).eval()
    base = cc.count(model, size)
    layers = cc.trace_layers(model, size)
    row.update(params=base["params"], macs=base["macs"], layers=len(layers))
    row["seconds"]["load"] = round(time.perf_counter() - t, 2)

    _stage("compress")
    t = time.perf_counter()
    try:
        new, plan = cc.compress(model, [{"match": "*", "method": method}], size,
                                target={"macs": macs})
    except cc.CompressError as e:
        row["seconds"]["compress"] = round(time.perf_counter() - t, 2)
        return {**row, "status": "refused", "why": " ".join(str(e).split())}
    row["seconds"]["compress"] = round(time.perf_counter() - t, 2)
    got = cc.count(new, size)
    row.update(taken=sum(1 for r in plan.replacements if r.applied),
               matched=len(plan.replacements), macs_after=got["macs"],
               params_after=got["params"], ratio=got["macs"] / base["macs"],
               planned_macs_after=plan.macs_after)

    _stage("export")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_zoo_") as tmp:
        try:
            res = cc.export_onnx(new, Path(tmp) / "model.onnx", size,
                                 {"check_batch": list(batches)})
        except RuntimeError as e:
            row["seconds"]["export"] = round(time.perf_counter() - t, 2)
            text = " ".join(str(e).split())
            status = ("parity" if "parity check failed" in text else "memory limit"
                      if any(m in text for m in OUT_OF_MEMORY) else "export failed")
            return {**row, "status": status, "why": text[:500]}
    row["seconds"]["export"] = round(time.perf_counter() - t, 2)
    row.update(status="ok", exporter=res["exporter"], fallback_reason=res["fallback_reason"],
               onnx_bytes=res["bytes"], max_abs_diff=res["max_abs_diff"],
               diffs=res["diffs"], atol=res["atol"])
    return row


def _limit_memory(gib: float) -> None:
    if gib > 0:
        n = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (n, n))


def run_child(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`one` in a child process, within ``args.time_limit`` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", spec, "--method", args.method,
           "--macs", str(args.macs), "--size", *map(str, args.size), "--threads",
           str(args.threads), "--batches", *map(str, args.batches)]
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryFile("w+") as err:
        try:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                 timeout=args.time_limit, env=env,
                                 preexec_fn=lambda: _limit_memory(args.memory_gib))
            timed_out = False
        except subprocess.TimeoutExpired:
            out, timed_out = None, True
        err.seek(0)
        log = err.read().strip().splitlines()
    wall = round(time.perf_counter() - t, 1)
    stages = [ln.split(": ", 1)[1] for ln in log if ln.startswith("stage: ")]
    base = {"model": spec, "method": args.method, "input": list(args.size), "wall_s": wall}
    if timed_out:
        return {**base, "status": "time limit",
                "why": f"over {args.time_limit:g} s, in {stages[-1] if stages else 'start-up'}"}
    try:
        row = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = [ln for ln in log if not ln.startswith("stage: ")]
        why = tail[-1] if tail else f"exit code {out.returncode}"
        if out.returncode < 0 or any(m in why for m in OUT_OF_MEMORY):
            why = f"out of memory (limit {args.memory_gib:g} GiB) in " \
                  f"{stages[-1] if stages else 'start-up'}: {why}"
            return {**base, "status": "memory limit", "why": why[:500]}
        return {**base, "status": "error", "why": why[:500]}
    return {**row, "wall_s": wall}


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
    import timm
    import torch
    import torchvision

    return {"date": datetime.date.today().isoformat(),
            "command": "python tools/bench_zoo.py " + " ".join(args.argv),
            "commit": _commit(), "rules": [{"match": "*", "method": args.method}],
            "target": {"macs": args.macs}, "input": list(args.size), "threads": args.threads,
            "time_limit_s": args.time_limit, "memory_gib": args.memory_gib,
            "batches": list(args.batches), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_at_start": os.getloadavg()[0],
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "timm": timm.__version__, "onnxruntime": onnxruntime.__version__}}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def table(data: dict[str, Any]) -> str:
    """The Markdown table of BENCHMARKS.md."""
    L = ["| model | MACs | status | layers taken | MACs kept | compress s | export s | "
         "exporter | onnxruntime max abs diff (batch " + ", ".join(
             map(str, data["meta"]["batches"])) + ") |",
         "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in data["rows"]:
        s = r.get("seconds", {})
        macs = f"{r['macs'] / 1e9:.2f} G" if "macs" in r else "—"
        if r["status"] == "ok":
            diffs = ", ".join(f"{float(v):.1e}" for v in r["diffs"].values())
            exporter = r["exporter"] + (" (dynamo failed)" if r.get("fallback_reason") else "")
            L.append(f"| {r['model']} | {macs} | ok | {r['taken']}/{r['matched']} | "
                     f"{r['ratio']:.3f} | {s.get('compress', 0):.1f} | "
                     f"{s.get('export', 0):.1f} | {exporter} | {diffs} |")
        else:
            why = r.get("why", "")
            why = (why[:157] + "...") if len(why) > 160 else why
            why = why.replace("|", "\\|")
            taken = f"{r['taken']}/{r['matched']}" if "taken" in r else "—"
            ratio = f"{r['ratio']:.3f}" if "ratio" in r else "—"
            comp = f"{s['compress']:.1f}" if "compress" in s else "—"
            L.append(f"| {r['model']} | {macs} | {r['status']}: {why} | {taken} | {ratio} | "
                     f"{comp} | — | — | — |")
    return "\n".join(L)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", help="specs (default: every torchvision "
                                                "classification model and the timm list)")
    ap.add_argument("--method", default="auto", help="the one rule's method (default auto)")
    ap.add_argument("--macs", type=float, default=0.5, help="MAC target (fraction kept)")
    ap.add_argument("--size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    ap.add_argument("--batches", type=int, nargs=2, default=[1, 3],
                    help="the batch sizes of the onnxruntime parity check")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per model")
    ap.add_argument("--memory-gib", type=float, default=10,
                    help="address-space limit per model (0: none)")
    ap.add_argument("--json", type=Path, help="results file (rewritten after each model)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows --json holds and run the other models (and again "
                         "those that failed with an error)")
    ap.add_argument("--rerun-over-limit", action="store_true",
                    help="with --resume, run again the models that ran out of time or memory")
    ap.add_argument("--table", type=Path, metavar="JSON", help="print the table of a results "
                                                                 "file and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = argv
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return []
    if args.one:
        row = one(args.one, args.method, args.macs, args.size, args.threads, args.batches)
        print(json.dumps(row))
        return [row]
    models = args.models or default_models()
    data = {"meta": _meta(args), "rows": []}
    if args.resume and args.json and args.json.is_file():
        rerun = {"error", "time limit", "memory limit"} if args.rerun_over_limit else {"error"}
        data["rows"] = [r for r in json.loads(args.json.read_text())["rows"]
                        if r["status"] not in rerun]
    done = {r["model"] for r in data["rows"]}
    for i, spec in enumerate(models, 1):
        if spec in done:
            continue
        row = {**run_child(spec, args), "date": data["meta"]["date"],
               "commit": data["meta"]["commit"]}
        data["rows"].append(row)
        order = {m: k for k, m in enumerate(models)}
        data["rows"].sort(key=lambda r: order.get(r["model"], len(order)))
        print(f"[{i}/{len(models)}] {spec}: {row['status']}"
              + (f", {row['ratio']:.3f} of the MACs" if "ratio" in row else "")
              + (f" ({row['why'][:160]})" if row.get("why") else "")
              + f", {row['wall_s']:.0f} s", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1) + "\n")
    return data["rows"]


if __name__ == "__main__":
    main()
