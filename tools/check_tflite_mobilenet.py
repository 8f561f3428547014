"""A TFLite file loaded into PyTorch against the TFLite interpreter running the file itself.

Loads ``torchvision:mobilenet_v2`` with the shared ``mobilenet_v2_1.0_224_quant.tflite``
(``compresscnn.load_model``), scores it on the ImageNet validation images of
``../shared/data`` (the data pipeline of ``compresscnn run``), runs the same pixels through
the TFLite interpreter (``ai-edge-litert``, or ``tflite-runtime``; not a dependency of the
package: ``pip install ai-edge-litert`` for this check) and writes both top-1 / top-5 and
their agreement::

    python tools/check_tflite_mobilenet.py --json tools/results/mobilenet_v2_tflite_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from compresscnn import evaluate_predictions, load_model, make_loaders

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESSCNN_SHARED_DATA", ROOT.parent / "shared" / "data"))
FILE = "weights/imagenet-mobilenet-tflite/mobilenet_v2_1.0_224_quant.tflite"


def _interpreter(path: Path, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            return None
    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflite", type=Path, default=SHARED / FILE)
    ap.add_argument("--eval", type=Path, default=SHARED / "imagenet-val500.zip")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model("torchvision:mobilenet_v2", str(args.tflite))
    load_s = time.perf_counter() - t0
    cfg = model.pretrained_cfg
    _, loader = make_loaders({"dataset": "imagenet", "eval": {"root": str(args.eval)}}, cfg,
                             train=False)
    logits, labels, images = [], [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model(x))
            labels.append(y)
            images.append(x)
    logits_t, labels_t = torch.cat(logits), torch.cat(labels)
    row = {"tflite": str(args.tflite), "eval": str(args.eval), "n": int(labels_t.numel()),
           "load_s": round(load_s, 2),
           "pytorch": {k: v for k, v in evaluate_predictions(logits_t, labels_t).items()
                       if k in ("top1", "top5")}}
    it = _interpreter(args.tflite, args.threads)
    if it is None:
        row["interpreter"] = "not installed (pip install ai-edge-litert)"
    else:
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
        preds = []
        for x in images:  # back to the pixels the loader read: x = (q / 255 - mean) / std
            q = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
            for img in q.permute(0, 2, 3, 1).numpy():
                it.set_tensor(inp["index"], img[None].astype(inp["dtype"]))
                it.invoke()
                preds.append(it.get_tensor(out["index"])[0].astype(np.float32))
        tfl = torch.from_numpy(np.stack(preds))[:, 1:]  # drop class 0, "background"
        top5 = tfl.topk(5, 1).indices
        row["interpreter"] = {
            "top1": round(100 * float((tfl.argmax(1) == labels_t).float().mean()), 2),
            "top5": round(100 * float((top5 == labels_t[:, None]).any(1).float().mean()), 2),
            "agreement_with_pytorch": round(
                100 * float((tfl.argmax(1) == logits_t.argmax(1)).float().mean()), 2),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
