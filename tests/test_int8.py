"""Static int8 (QDQ) export and scoring an ONNX file with evaluate()."""

from __future__ import annotations

import onnx
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compresscnn.measure.evaluation import evaluate
from compresscnn.io.export import OnnxModule, export_onnx, quantize_onnx_static


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4)).eval()


def test_static_int8_is_smaller_runs_and_agrees(tmp_path):
    net = _net()
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "q.onnx"
    export_onnx(net, fp32, (3, 16, 16))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
    size = quantize_onnx_static(fp32, int8, batches)
    assert size == int8.stat().st_size and size < fp32.stat().st_size
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = torch.randn(32, 3, 16, 16, generator=g)
    loader = DataLoader(TensorDataset(x, net(x).argmax(1)), batch_size=16)
    r32 = evaluate(OnnxModule(fp32), loader, reference=net, progress=False)
    r8 = evaluate(OnnxModule(int8), loader, reference=net, progress=False)
    assert r32["top1"] == 100.0 and r32["agreement"] == 100.0
    assert r8["agreement"] >= 75.0  # 8-bit noise flips a few close calls at most
