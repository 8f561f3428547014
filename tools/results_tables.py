"""Print the Markdown tables of BENCHMARKS.md from the JSON files in tools/results/.

    python tools/results_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

R = Path(__file__).resolve().parent / "results"


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def cifar(files: list[str]) -> None:
    rows = []
    for f in files:
        p = R / f
        if p.exists():
            rows += json.loads(p.read_text())
    print("| model | method | calib. | fine-tune | MACs fewer | params fewer | zero-shot top-1 "
          "| agreement | after fine-tune top-1 | agreement | date |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    seen = set()
    for r in rows:
        key = (r["model"], r["config"], round(r["macs_ratio"], 3), r.get("calibrate"),
               r.get("epochs"), r.get("distill"), r.get("alpha", 0.9 if r.get("distill") else None),
               r.get("allocation", "spectral"), r.get("steps"))
        if key in seen:  # the same configuration measured again (same seed, same numbers)
            continue
        seen.add(key)
        ft = ("—" if not r.get("epochs") else
              f"{r['epochs']:g} ep " + ("KD α=%g" % r.get("alpha", 0.9) if r.get("distill") else "CE"))
        alloc = r.get("allocation", "spectral")
        calib = ("data-free" if not r.get("calibrate") or r["config"] == "dense" else (
            f"{r['calibrate']}" + (f", {r['steps']} steps" if r.get("steps", 300) != 300 else ""))
            ) + (f", {alloc}" if alloc != "spectral" else "")
        print(f"| {r['model']} | {r['config']} | {calib} | {ft} "
              f"| {r['macs_ratio']:.2f}× | {r['params_ratio']:.2f}× | {_f(r['zero_shot_top1'])} "
              f"| {_f(r.get('zero_shot_agreement'))} | {_f(r.get('finetuned_top1'))} "
              f"| {_f(r.get('finetuned_agreement'))} | {r['date']} |")


def _load(f: str) -> dict | None:
    """A results file with its meta line printed, or None when it was not produced."""
    p = R / f
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    print(f"\n`{f}`: {d['meta']}\n")
    return d


def squeeze(f: str) -> None:
    d = _load(f)
    if d is None:
        return
    print("| method | MACs fewer | params fewer | top-1 | top-5 | agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in d["rows"]:
        if "error" in r:
            print(f"| {r['method']} | {r['error']} | | | | |")
            continue
        print(f"| {r['method']} | {r['macs_ratio']:.2f}× | {_f(r.get('params_ratio', 1.0))}× "
              f"| {r['top1']:.1f} | {r['top5']:.1f} | {r['agreement']:.1f} |")


def decompose_time(f: str) -> None:
    d = _load(f)
    if d is None:
        return
    print("| model | method | convs decomposed | seconds | mean rel. error |")
    print("|---|---|---:|---:|---:|")
    for r in d["rows"]:
        print(f"| {r['model']} | {r['method']} | {r['layers']} of {r['of_convs']} "
              f"| {r['seconds']:.2f} | {r['mean_rel_error']:.3f} |")


def export_parity(f: str) -> None:
    d = _load(f)
    if d is None:
        return
    rts = ("onnxruntime", "openvino", "opencv")

    def cell(v: dict) -> str:
        return "error" if "error" in v else f"{v['max_abs_diff']:.1e} ({v['rel_l2']:.0e})"
    print("| model | method | layers | MACs kept | folded BN / reorders | onnxruntime "
          "| OpenVINO | OpenCV DNN | unfolded: onnxruntime | unfolded: OpenVINO "
          "| unfolded: OpenCV DNN |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in d["rows"]:
        fo = r["folded"]["folded"]
        cells = [cell(r[k]["runtimes"][rt]) for k in ("folded", "unfolded") if k in r
                 for rt in rts if rt in r[k]["runtimes"]]
        print(f"| {r['model']} | {r['method']} | {r['layers']} | {r['macs_ratio']:.2f} "
              f"| {fo['batchnorms']} / {fo['gathers']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    cifar(["resnet20_tucker2_issue2.json", "resnet20_methods_macs0.5.json",
           "resnet20_plain_ce.json", "resnet20_methods_macs0.5_dataaware.json",
           "resnet56_methods_macs0.5_zeroshot.json", "resnet20_dataaware_ce.json",
           "resnet20_methods_macs0.5_sensitivity.json",
           "resnet56_methods_macs0.5_dataaware_kd.json", "resnet56_fire_dataaware_kd.json",
           "resnet20_methods_macs0.5_energy.json",
           "resnet56_methods_macs0.5_dataaware.json"])
    squeeze("squeezenet1_1_methods_macs0.667.json")
    squeeze("squeezenet1_1_methods_macs0.667_dataaware.json")
    decompose_time("decompose_time.json")
    export_parity("export_parity.json")
