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


class _TwinBiases(nn.Module):
    """Two convs with equal (zero) biases: the TorchScript exporter writes one initializer
    and an Identity node for the second."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        for c in (self.a, self.b):
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _conv_inputs_are_constants(model: onnx.ModelProto) -> bool:
    """Every Conv's weight and bias come from a DequantizeLinear of an initializer."""
    inits = {t.name for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        for name in node.input[1:]:
            src = made_by.get(name)
            if src is None or src.op_type != "DequantizeLinear" or src.input[0] not in inits:
                return False
    return True


def test_int8_timing_file_quantizes_shared_biases_offline():
    """The timing file of a model whose biases the exporter shared (an Identity node) is
    quantized as the deployment file is: weights and biases as int8/int32 constants, no
    Identity left, and no conv left in float between Quantize/Dequantize pairs."""
    from compresscnn.measure.timing import int8_bytes, onnx_bytes

    x = torch.randn(1, 3, 16, 16)
    fp32 = onnx.load_from_string(onnx_bytes(_TwinBiases().eval(), x))
    assert any(n.op_type == "Identity" for n in fp32.graph.node)  # what the fix is for
    q = onnx.load_from_string(int8_bytes(fp32.SerializeToString(), x))
    assert not any(n.op_type == "Identity" for n in q.graph.node)
    assert _conv_inputs_are_constants(q)


def test_inline_initializer_identities_keeps_the_graph_output_and_counts():
    from compresscnn.io.onnx_int8 import inline_initializer_identities
    from compresscnn.measure.timing import onnx_bytes

    x = torch.randn(1, 3, 8, 8)
    m = onnx.load_from_string(onnx_bytes(_TwinBiases().eval(), x))
    n_before = len(m.graph.node)
    assert inline_initializer_identities(m) == 1
    assert len(m.graph.node) == n_before - 1
    onnx.checker.check_model(m)
    assert inline_initializer_identities(m) == 0
