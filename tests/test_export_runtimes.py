"""Every method's export runs alike in onnxruntime, OpenVINO and OpenCV DNN, on torchvision
models with residual (ResNet-18), depthwise (MobileNetV2) and Fire (SqueezeNet 1.1)
structures; random weights and BatchNorm statistics, 3x64x64 inputs."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
import yaml

import compresscnn as cc
import compresscnn.io.export as ex
from compresscnn.cli import main
from compresscnn.errors import CompressError
from compresscnn.io.export import export_onnx, verify_onnx

from test_folding import random_bn

SHAPE = (3, 64, 64)
MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "opencv": "cv2"}

#: "<torchvision model>-<the methods the plan applies>" -> (model, rules, target)
CASES = {
    "resnet18-tucker2-cp-spatial-svd": ("resnet18", [
        {"match": "layer1.0.conv*", "method": "tucker2", "rank": 0.5},
        {"match": "layer1.1.conv1", "method": "cp", "rank": 16},
        {"match": ["layer1.1.conv2", "layer2.*.conv*"], "method": "spatial", "rank": 0.5},
        {"match": ["layer*.downsample.0", "fc"], "method": "svd", "rank": 0.5}], None),
    "resnet18-fire": ("resnet18", [{"match": "layer*.conv*", "method": "fire"}],
                      {"macs": 0.6}),
    "mobilenet_v2-fire-spatial-svd": ("mobilenet_v2", [
        {"match": "features.0.0", "method": "fire", "rank": 0.5},
        {"match": "features.*.conv.*.0", "method": "spatial", "rank": 0.5},  # depthwise
        {"match": ["features.*.conv.1", "features.*.conv.2", "classifier.1"], "method": "svd",
         "rank": 0.5}], None),
    "squeezenet1_1-fire": ("squeezenet1_1", [{"match": "features.*.expand3x3",
                                              "method": "fire", "rank": 0.5}], None),
    "squeezenet1_1-tucker2-cp-spatial-svd": ("squeezenet1_1", [
        {"match": ["features.3.expand3x3", "features.4.expand3x3"], "method": "tucker2",
         "rank": 0.5},
        {"match": "features.6.expand3x3", "method": "cp", "rank": 16},
        {"match": "features.*.expand3x3", "method": "spatial", "rank": 0.5},
        {"match": ["features.*.squeeze", "classifier.1"], "method": "svd", "rank": 0.5}],
        None),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Compress and export each case once: ``{case: (model, onnx path)}``."""
    cache: dict[str, tuple[torch.nn.Module, Path]] = {}
    folder = tmp_path_factory.mktemp("exports")

    def get(case: str) -> tuple[torch.nn.Module, Path]:
        if case not in cache:
            arch, rules, target = CASES[case]
            torch.manual_seed(0)
            base = random_bn(getattr(torchvision.models, arch)(num_classes=10))
            model, plan = cc.compress(base, rules, SHAPE, target=target)
            methods = {r.method for r in plan.replacements if r.applied}
            assert methods == set(case.split("-")[1:])
            path = folder / f"{case}.onnx"
            export_onnx(model, path, SHAPE)
            cache[case] = model.eval(), path
        return cache[case]
    return get


def _runtime(name: str) -> None:
    pytest.importorskip(MODULES[name], reason=f"{name} is not installed "
                                              f"(pip install 'compresscnn[runtimes]')")


@pytest.mark.parametrize("runtime", list(MODULES))
@pytest.mark.parametrize("case", list(CASES))
def test_runtime_parity(exported, case, runtime):
    _runtime(runtime)
    model, path = exported(case)
    got = verify_onnx(model, path, SHAPE, [runtime], batches=(1, 3))[runtime]
    assert got["max_abs_diff"] < 1e-4, got
    assert got["rel_l2"] < 1e-5, got


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _reaches_plain_conv(node: onnx.NodeProto, users) -> bool:
    """Whether ``node``'s output reaches a groups=1 Conv through Relu/Clip only."""
    for user in users.get(node.output[0], []):
        if user.op_type in ("Relu", "Clip") and _reaches_plain_conv(user, users):
            return True
        groups = [a.i for a in user.attribute if a.name == "group"] or [1]
        if user.op_type == "Conv" and groups[0] == 1:
            return True
    return False


@pytest.mark.parametrize("case", list(CASES))
def test_graph_has_no_standalone_batchnorm(exported, case):
    _, path = exported(case)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops
    users = _consumers(graph)
    # the pattern OpenVINO 2026.4 computes with the inverse permutation
    assert not any(n.op_type == "Gather" and _reaches_plain_conv(n, users) for n in graph.node)
    if case == "resnet18-fire":  # the 8 reorders before a residual sum stay
        assert ops.count("Gather") == 8 and ops.count("Concat") == 16


def test_missing_or_unknown_runtime_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    real = ex.importlib.util.find_spec
    monkeypatch.setattr(ex.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(CompressError, match=r"^export\.verify: openvino needs the package "
                                            r"'openvino', which is not installed"):
        export_onnx(net, tmp_path / "m.onnx", (3, 8, 8), {"verify": ["openvino"]})
    with pytest.raises(CompressError, match=r"verify\[0\]: expected one of 'onnxruntime', "
                                            r"'openvino', 'opencv', got 'tensorrt'"):
        export_onnx(net, tmp_path / "m.onnx", (3, 8, 8), {"verify": ["tensorrt"]})
    assert list(tmp_path.iterdir()) == []


def test_a_runtime_that_disagrees_fails_the_export(tmp_path, monkeypatch):
    net = random_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    real = ex._RUNNERS["onnxruntime"]

    def off_by_half(path):
        run = real(path)
        return lambda x: [y + 0.5 for y in run(x)]

    monkeypatch.setitem(ex._RUNNERS, "onnxruntime", off_by_half)
    with pytest.raises(RuntimeError, match=r"max \|onnxruntime - torch\| = 0\.5 > \S+ \(atol 0\.001 x "):
        export_onnx(net, tmp_path / "m.onnx", (3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_recipe_export_verify_records_each_runtime(tmp_path):
    for name in ("openvino", "opencv"):
        _runtime(name)
    recipe = {"model": {"spec": "cifar:resnet20"},
              "rules": [{"match": "layer*.conv1", "method": "fire", "rank": 0.5}],
              "finetune": {"enabled": False},
              "evaluate": {"baseline": False, "zero_shot": False},
              "export": {"verify": ["onnxruntime", "openvino", "opencv"], "atol": 1e-4},
              "report": {"latency": False, "plots": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())["onnx"]
    assert set(rep["verify"]) == {"onnxruntime", "openvino", "opencv"}
    for got in rep["verify"].values():
        assert got["max_abs_diff"] < 1e-4 and got["rel_l2"] < 1e-5
        assert set(got["diffs"]) == {"1", "3"}
    assert rep["folded"]["batchnorms"] == 19 and rep["folded"]["gathers"] == 9
    md = (out / "report.md").read_text()
    assert "Runtimes, max abs diff against PyTorch (relative L2 error): onnxruntime " in md
    assert ", openvino " in md and ", opencv " in md
