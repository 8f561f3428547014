"""ONNX export: dynamic batch, parity, a single self-contained file, atomic writes."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compresscnn.io.export import export_onnx, quantize_onnx_dynamic


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, (3, 1), stride=(2, 1), padding=(1, 0)),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    # non-trivial BN statistics so that eval mode matters
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.train()  # export must switch to eval itself and restore the mode


def test_export_dynamic_batch_parity_single_file(tmp_path):
    net = _tiny_net()
    out = tmp_path / "sub" / "model.onnx"
    info = export_onnx(net, out, (3, 16, 16), {"check_batch": [1, 3], "atol": 1e-4})

    assert net.training, "caller's train/eval mode must be restored"
    assert out.is_file()
    assert info["path"] == str(out)
    assert info["bytes"] == out.stat().st_size > 0
    assert info["max_abs_diff"] < 1e-4
    assert set(info["diffs"]) == {"1", "3"}
    assert info["opset"] == 18
    assert info["exporter"] in ("dynamo", "torchscript")
    # single self-contained file, no temp files left behind
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    m = onnx.load(str(out), load_external_data=False)
    onnx.checker.check_model(m)
    assert not any(init.external_data for init in m.graph.initializer)
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch dimension must be symbolic"

    # the file runs at a batch size never used during export or checking
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = net.eval()(x)
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(got, ref, atol=1e-4)


def test_export_strips_debug_metadata_by_default(tmp_path):
    """The dynamo exporter writes each node's stack trace and module scope, and the
    intermediate shapes: debugging only. `strip` (the default) drops them; the file is
    smaller and computes the same."""
    net = _tiny_net().eval()
    kept = export_onnx(net, tmp_path / "kept.onnx", (3, 16, 16), {"strip": False})
    if kept["exporter"] != "dynamo":
        pytest.skip(f"dynamo export failed here: {kept['fallback_reason']}")
    lean = export_onnx(net, tmp_path / "lean.onnx", (3, 16, 16))
    a = onnx.load(str(tmp_path / "kept.onnx"))
    b = onnx.load(str(tmp_path / "lean.onnx"))
    assert any(n.metadata_props for n in a.graph.node)
    assert not any(n.metadata_props or n.doc_string for n in b.graph.node)
    assert not b.graph.value_info
    assert lean["bytes"] < kept["bytes"]
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert lean["max_abs_diff"] == kept["max_abs_diff"]


def test_export_parity_failure_leaves_nothing(tmp_path, monkeypatch):
    net = _tiny_net()
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")  # an existing file must survive a failed export untouched
    import compresscnn.io.export as ex

    monkeypatch.setattr(ex, "verify_onnx", lambda *a, **k: {"onnxruntime": {
        "max_abs_diff": 0.5, "rel_l2": 0.1, "max_abs_output": 0.9,
        "diffs": {"1": 0.5, "3": 0.25}}})
    with pytest.raises(RuntimeError, match=r"0\.5 > 0\.001 \(atol 0\.001 x output scale 1;"):
        export_onnx(net, out, (3, 8, 8))
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_parity_tolerance_scales_with_large_outputs(tmp_path, monkeypatch):
    """An untrained deep net's logits reach hundreds: float32 rounding differences between
    runtimes grow with them, so the tolerance is relative there (absolute within [-1, 1])."""
    import compresscnn.io.export as ex

    assert ex.parity_limit(1e-3, 0.2) == 1e-3
    assert ex.parity_limit(1e-3, 300.0) == pytest.approx(0.3)
    assert ex.parity_limit(1e-3, float("nan")) != ex.parity_limit(1e-3, float("nan"))
    res = {"max_abs_diff": 0.0137, "rel_l2": 1e-7, "max_abs_output": 300.0, "diffs": {"1": 0.0137}}
    monkeypatch.setattr(ex, "verify_onnx", lambda *a, **k: {"onnxruntime": res})
    info = export_onnx(_tiny_net(), tmp_path / "big.onnx", (3, 8, 8))
    assert info["max_abs_diff"] == 0.0137
    res.update(max_abs_diff=0.5)
    with pytest.raises(RuntimeError, match=r"0\.5 > 0\.3 \(atol 0\.001 x output scale 300;"):
        export_onnx(_tiny_net(), tmp_path / "big2.onnx", (3, 8, 8))
    assert not (tmp_path / "big2.onnx").exists()


def test_verify_onnx_reports_the_output_scale(tmp_path):
    from compresscnn.io.export import verify_onnx

    net = _tiny_net()
    path = tmp_path / "m.onnx"
    export_onnx(net, path, (3, 8, 8))
    got = verify_onnx(net, path, (3, 8, 8), ["onnxruntime"], batches=(2,), seed=5)["onnxruntime"]
    with torch.no_grad():
        ref = net(torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5)))
    assert got["max_abs_output"] == pytest.approx(float(ref.abs().max()), rel=1e-6)


def test_export_falls_back_to_legacy_exporter(tmp_path, monkeypatch):
    import compresscnn.io.onnx_writer as ow

    def boom(*a, **k):
        raise RuntimeError("cannot trace\nmore lines")

    monkeypatch.setattr(ow, "export_dynamo", boom)
    info = export_onnx(_tiny_net(), tmp_path / "m.onnx", (3, 8, 8), {"atol": 1e-4})
    assert info["exporter"] == "torchscript"
    assert info["fallback_reason"] == "RuntimeError: cannot trace"
    assert info["max_abs_diff"] < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_quantize_dynamic(tmp_path):
    src = tmp_path / "m.onnx"
    export_onnx(_tiny_net(), src, (3, 8, 8))
    nbytes = quantize_onnx_dynamic(src, tmp_path / "q.onnx")
    assert nbytes == (tmp_path / "q.onnx").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx"]
