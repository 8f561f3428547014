"""Static int8 (onnxruntime QDQ) against fp32 ONNX for a recipe's model: the paper's
"SqueezeNet + 8-bit" row measured. The model, its weights and its data come from the
recipe (the user's path: ``compresscnn.recipe.schema.load_recipe``, ``compresscnn.load_model``,
``compresscnn.io.data``); the fp32 file is ``compresscnn.export_onnx``'s, the int8 one
``compresscnn.io.export.quantize_onnx_static`` calibrated on the recipe's calibration batches
(training images, never the evaluated ones); both are scored by ``compresscnn.evaluate`` on
the recipe's eval source, with agreement against the PyTorch model.

    python tools/bench_int8.py recipes/squeezenet1_1_val500.yaml --calibrate 16 --json tools/results/squeezenet1_1_int8.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import compresscnn as cc
from compresscnn.io import data as data_mod
from compresscnn.measure.evaluation import evaluate
from compresscnn.io.export import OnnxModule, quantize_onnx_static
from compresscnn.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--calibrate", type=int, default=16, help="calibration batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipe = load_recipe(a.recipe)
    model = cc.load_model(recipe["model"]["spec"], recipe["model"]["weights"]).eval()
    size = tuple(recipe["model"]["input_size"] or model.pretrained_cfg["input_size"])
    pcfg = {**model.pretrained_cfg, "input_size": size}
    cfg = {**recipe["data"], "seed": int(recipe["seed"])}
    _, test = data_mod.make_loaders(cfg, pcfg, train=False, test=True)
    batches = data_mod.calibration_batches(cfg, pcfg, a.calibrate,
                                           batch_size=recipe["calibration"]["batch_size"])
    rows = {"pytorch": evaluate(model, test, progress=False)}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx = cc.export_onnx(model, fp32, size)
        int8_bytes = quantize_onnx_static(fp32, int8, batches)
        for key, path in (("onnx_fp32", fp32), ("onnx_int8", int8)):
            rows[key] = evaluate(OnnxModule(path, a.threads), test, reference=model,
                                 progress=False)
    out = {"date": time.strftime("%Y-%m-%d"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip(),
           "recipe": str(a.recipe), "calibration_images": sum(len(b) for b in batches),
           "fp32_bytes": onnx["bytes"], "int8_bytes": int8_bytes,
           "size_ratio": onnx["bytes"] / int8_bytes,
           **{f"{k}_{m}": r.get(m) for k, r in rows.items()
              for m in ("top1", "top5", "agreement", "n")}}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
