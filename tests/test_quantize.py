"""int8 as a stage of the run (`export.quantize`) and in the Python API
(`compresscnn.quantize_onnx`): calibrated on training images only, checked against its fp32
source, scored and timed beside it; and the OpenVINO latency backend."""

from __future__ import annotations

import importlib.util
import io
import json
import textwrap
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import compresscnn as cc
from compresscnn.cli import main
from compresscnn.io.data import CIFAR10_CLASSES
from compresscnn.errors import CompressError
from compresscnn.io.export import QuantizeError

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def _zip(path: Path, folders: list[str], size: int = 32, per: int = 4) -> Path:
    rng = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(path, "w") as zf:
        for folder in folders:
            for i in range(per):
                arr = torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr.numpy()).save(buf, format="PNG")
                zf.writestr(f"{folder}/{i}.png", buf.getvalue())
    return path


def _cifar_zip(tmp_path: Path) -> Path:
    return _zip(tmp_path / "c.zip", [f"{s}/{c}" for s in ("train", "test")
                                     for c in CIFAR10_CLASSES[:2]])


def _recipe(tmp_path: Path, data: str, quantize: str = "{batches: 2, batch_size: 4}",
            report: str = "{latency: false, plots: false}") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        model: {{spec: "cifar:resnet20"}}
        data: {data}
        rules: [{{match: "layer3.*.conv2", method: tucker2, rank: 16}}]
        finetune: {{enabled: false}}
        export: {{quantize: {quantize}}}
        report: {report}
        """))
    return p


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4)).eval()


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.mark.slow
def test_run_writes_scores_and_times_the_int8_file(tmp_path, capsys):
    z = _cifar_zip(tmp_path)
    r = _recipe(tmp_path, f"{{dataset: cifar10, root: {z}, eval_batch_size: 4}}",
                report="{latency: true, latency_batch: [1], runtimes: [onnxruntime], "
                       "plots: true}")
    out = tmp_path / "run"
    assert main(["run", str(r), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    q = rep["int8"]
    assert q["path"] == "model.int8.onnx" and (out / q["path"]).stat().st_size == q["bytes"]
    assert q["bytes"] < 0.4 * rep["onnx"]["bytes"] == 0.4 * q["fp32_bytes"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= {
        n.op_type for n in onnx.load(str(out / q["path"])).graph.node}
    # calibrated and checked on the 4 x 2 training images, scored on the 8 test images
    assert q["parity"]["images"] == 8 and q["parity"]["rel_error"] <= 0.35
    assert q["n"] == 8 and q["top1"] is not None and q["agreement"] is not None
    timed = {(row["model"], row["runtime"]) for row in rep["latency"]}
    assert timed == {(m, "onnxruntime") for m in ("baseline", "compressed", "baseline int8",
                                                  "compressed int8")}
    md = (out / "report.md").read_text()
    assert "## int8" in md and "| compressed int8 | `model.int8.onnx`" in md
    assert (out / "latency.png").stat().st_size > 0


@pytest.mark.parametrize("data, what", [
    # no data section: nothing to calibrate on
    ("null", "export.quantize: needs calibration images"),
    # one archive without split folders serves calibration and evaluation: refused even
    # when fine-tuning and calibration on them are allowed
    ("{dataset: cifar10, root: FLAT, allow_eval_overlap: true}",
     "shares 8 images with data.eval: int8 is never calibrated on the images accuracy is"),
])
def test_quantize_refuses_without_training_images(tmp_path, capsys, data, what):
    flat = _zip(tmp_path / "flat.zip", list(CIFAR10_CLASSES[:2]))
    r = _recipe(tmp_path, data.replace("FLAT", str(flat)))
    out = tmp_path / "run"
    args = ["run", str(r), "--out", str(out), "--quiet"]
    if data == "null":
        args += ["--set", "evaluate.baseline=false", "--set", "evaluate.zero_shot=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0], err
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_quantize_refuses_a_runtime_that_is_not_installed(tmp_path, capsys, monkeypatch):
    z = _cifar_zip(tmp_path)
    r = _recipe(tmp_path, f"{{dataset: cifar10, root: {z}}}",
                report="{latency: true, runtimes: [onnxruntime, openvino], plots: false}")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    out = tmp_path / "run"
    assert main(["run", str(r), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "report.runtimes: openvino needs the package 'openvino', which is not installed "
        "(pip install 'compresscnn[runtimes]')"), err
    assert not out.exists()
    with pytest.raises(CompressError, match=r"^latency\.runtime: openvino needs the package"):
        cc.compress(_net(), [{"match": "2", "method": "tucker2", "rank": 4}], (3, 16, 16), objective="latency", config={"latency": {"runtime": "openvino"}})


def test_quantize_onnx_api_checks_against_the_fp32_file(tmp_path):
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "q.onnx"
    cc.export_onnx(_net(), fp32, (3, 16, 16))
    res = cc.quantize_onnx(fp32, int8, _batches())
    assert res["bytes"] == int8.stat().st_size < res["fp32_bytes"]
    assert res["mode"] == "static" and res["per_channel"] is True
    assert res["parity"]["images"] == 24 and 0 < res["parity"]["rel_error"] < 0.35
    assert res["parity"]["agreement"] >= 75.0
    dyn = cc.quantize_onnx(fp32, tmp_path / "d.onnx", _batches(1), mode="dynamic")
    assert dyn["mode"] == "dynamic" and dyn["parity"]["images"] == 8
    # beyond the bound: a one-line error, and no file left
    with pytest.raises(QuantizeError, match=r"^quantize: the int8 file differs from m\.onnx "
                                            r"by [0-9.e-]+ .* > max_rel_error 1e-06$"):
        cc.quantize_onnx(fp32, tmp_path / "bad.onnx", _batches(), max_rel_error=1e-6)
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(QuantizeError, match="needs calibration images"):
        cc.quantize_onnx(fp32, tmp_path / "none.onnx", [])
    assert not (tmp_path / "none.onnx").exists()


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (the runtimes extra)")
def test_openvino_times_fp32_and_int8_files_and_plans(tmp_path):
    from compresscnn.measure.evaluation import measure_latencies

    fp32, int8 = tmp_path / "m.onnx", tmp_path / "q.onnx"
    cc.export_onnx(_net(), fp32, (3, 16, 16))
    cc.quantize_onnx(fp32, int8, _batches())
    res = measure_latencies({"fp32": fp32, "int8": int8}, (3, 16, 16), runtime="openvino",
                            repeats=2, warmup=1)
    assert set(res) == {"fp32", "int8"}
    assert all(r["runtime"] == "openvino" and r["median_ms"] > 0 for r in res.values())
    # a fixed rank: which ranks a MAC target leaves depends on how fast each one times here
    _, p = cc.compress(_net(), [{"match": "2", "method": "tucker2", "rank": [8, 8]}], (3, 16, 16), objective="latency", config={"latency": {"runtime": "openvino", "rounds": 1}})
    assert p.latency["runtime"] == "openvino"
    assert all(r.latency_before is not None for r in p.replacements)


def test_latency_planning_rounds_ranks_to_the_runtime_multiple():
    from compresscnn.measure.latency import LatencyConfig, ROUND_TO

    times = {}

    def timer(m, x):  # any decomposition is faster than the dense layer
        return 1.0 if isinstance(m, nn.Conv2d) else 0.5

    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3))
    for rt in ("onnxruntime", "torch"):
        cfg = LatencyConfig(runtime=rt, timer=timer)
        assert cfg.round_to == ROUND_TO[rt]
        p = cc.plan(net, [{"match": "2", "method": "tucker2", "macs": 0.3}], (3, 16, 16), objective="latency", config={"latency": cfg})
        times[rt] = p.replacements[0].rank
        assert all(r % cfg.round_to == 0 for r in p.replacements[0].rank)
    # a rule's own round_to wins
    p = cc.plan(net, [{"match": "2", "method": "tucker2", "macs": 0.3, "round_to": 1}], (3, 16, 16), objective="latency", config={"latency": LatencyConfig(timer=timer)})
    assert any(r % 8 for r in p.replacements[0].rank)


@pytest.mark.parametrize("runtime", ["onnxruntime"] + (["openvino"] if HAS_OPENVINO else []))
def test_int8_deployments_plan_on_int8_timings(runtime):
    """A model that will ship as a static int8 file has its candidates timed as int8 files:
    the timed graphs hold QuantizeLinear/DequantizeLinear pairs."""
    from compresscnn.measure.latency import LatencyConfig, time_modules
    from compresscnn.runs.run_inputs import _latency_cfg
    from compresscnn.measure.timing import int8_bytes, onnx_bytes

    x = torch.randn(1, 3, 16, 16)
    q = onnx.load_from_string(int8_bytes(onnx_bytes(_net(), x), x))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    cfg = LatencyConfig(runtime=runtime, precision="int8", rounds=1, per_round=1, warmup=0)
    (ms,) = time_modules([_net()], x, cfg)
    assert ms > 0
    with pytest.raises(CompressError, match="latency.precision: expected one of 'fp32', 'int8', got 'int4'"):
        LatencyConfig(precision="int4")
    recipe = {"latency": {"runtime": runtime}, "export": {"quantize": {"mode": "static"}}}
    assert _latency_cfg(recipe)["precision"] == "int8"
    assert "precision" not in _latency_cfg({**recipe, "export": {"quantize": None}})
    assert "precision" not in _latency_cfg({"latency": {"runtime": "torch"},
                                            "export": recipe["export"]})


def test_dense_model_quantized_is_a_recipe(tmp_path):
    """``rules: []`` with ``export.quantize`` (no target, no calibration): the dense model
    exported and quantized, the reference row of low-rank + int8; without the stage an empty
    rule list is still refused."""
    z = _cifar_zip(tmp_path)
    r = _recipe(tmp_path, f"{{dataset: cifar10, root: {z}}}")
    rec = cc.load_recipe(r, ["rules=[]"])
    assert rec["rules"] == [] and rec["export"]["quantize"]["batches"] == 2
    with pytest.raises(CompressError, match="expected at least one rule"):
        cc.load_recipe(r, ["rules=[]", "export.quantize=null"])
