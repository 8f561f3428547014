"""Low-rank and int8 speed as ratios: runs a recipe with ``export.quantize`` through
``compresscnn run`` (the report times the dense and the compressed model, fp32 and int8,
against each other, interleaved, in each of ``report.runtimes``) and turns its latency rows
into the ratios that matter for deployment, per runtime and batch:

- ``compressed_fp32``: dense fp32 ÷ compressed fp32 (low-rank alone), and that ÷ the MAC ratio;
- ``dense_int8``: dense fp32 ÷ dense int8 (int8 alone);
- ``compressed_int8``: dense fp32 ÷ compressed int8 (both);
- ``int8_low_rank``: dense int8 ÷ compressed int8, and that ÷ the MAC ratio.

``--runs N`` repeats the run (each plans afresh) to show the spread; ``--set`` passes
overrides to every run (e.g. ``latency.runtime=openvino`` to plan on OpenVINO). The load
average before and after each run is recorded: on a shared machine read the ratios, not the
milliseconds.

    python tools/bench_deploy.py recipes/resnet18_imagenet_2x_int8_speed.yaml --json tools/results/resnet18_int8_speed_ort.json
    python tools/bench_deploy.py recipes/resnet18_imagenet_2x_int8_speed.yaml --set latency.runtime=openvino --json tools/results/resnet18_int8_speed_openvino.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ratios(report: dict) -> dict:
    """``{runtime: {batch: {...}}}`` from a run's report (see the module docstring)."""
    mac_ratio = report["plan"]["macs_before"] / report["plan"]["macs_after"]
    ms = {(r["model"], r["runtime"], r["batch"]): r["median_ms"] for r in report["latency"]}
    out: dict = {}
    for (model, rt, b) in ms:
        if model != "baseline":
            continue
        d32, c32 = ms[(model, rt, b)], ms.get(("compressed", rt, b))
        d8, c8 = ms.get(("baseline int8", rt, b)), ms.get(("compressed int8", rt, b))
        row = {"mac_ratio": mac_ratio, "ms": {"dense_fp32": d32, "compressed_fp32": c32,
                                              "dense_int8": d8, "compressed_int8": c8}}
        if c32:
            row["compressed_fp32"] = d32 / c32
            row["compressed_fp32_of_mac_ratio"] = d32 / c32 / mac_ratio
        if d8:
            row["dense_int8"] = d32 / d8
        if c8:
            row["compressed_int8"] = d32 / c8
        if d8 and c8:
            row["int8_low_rank"] = d8 / c8
            row["int8_low_rank_of_mac_ratio"] = d8 / c8 / mac_ratio
        out.setdefault(rt, {})[str(b)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for i in range(a.runs):
            out = Path(tmp) / f"run{i}"
            load_before = os.getloadavg()
            cmd = [sys.executable, "-m", "compresscnn", "run", str(a.recipe), "--out", str(out),
                   "--quiet", *[x for s in a.set for x in ("--set", s)]]
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            report = json.loads((out / "report.json").read_text())
            runs.append({"seconds": time.time() - t0, "load_before": load_before,
                         "load_after": os.getloadavg(), "ratios": ratios(report),
                         "latency_plan": report.get("latency_plan"),
                         "int8": {k: report["int8"].get(k) for k in
                                  ("bytes", "fp32_bytes", "mode", "parity")},
                         "latency": report["latency"]})
            print(json.dumps(runs[-1]["ratios"], indent=1), flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "recipe": str(a.recipe), "set": a.set,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip(),
           "cpu_count": os.cpu_count(), "runs": runs}
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
