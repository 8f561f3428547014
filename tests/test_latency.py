"""Latency-aware planning: skeletons, timing, the not-slower guarantee (issue 5).

The planning logic is tested with an injected timer (deterministic); the real runtimes are
smoke-tested for plausible numbers only: speed goals live in tools/bench_latency.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresscnn.measure.counting import count
from compresscnn.core.decomposers import get_decomposer
from compresscnn.errors import RankError, RecipeError
from compresscnn.measure.latency import LatencyConfig, spread, time_modules
from compresscnn.util.modules import record_inputs
from compresscnn.recipe.schema import validate
from compresscnn.core.planning import plan
from compresscnn.core.surgery import compress


@pytest.mark.parametrize("method,layer,rank", [
    ("tucker2", nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), (4, 6)),
    ("cp", nn.Conv2d(16, 32, (3, 5), padding=(1, 2)), (7,)),
    ("spatial", nn.Conv2d(16, 16, 3, padding=1, groups=16), (2,)),
    ("spatial", nn.Conv2d(16, 24, 5, padding="same", dilation=2, bias=False), (9,)),
    ("svd", nn.Linear(20, 30), (5,)),
    ("svd", nn.Conv2d(20, 30, 1, stride=2), (5,)),
    ("fire", nn.Conv2d(16, 32, 3, padding=1), (8,)),
])
def test_skeleton_has_the_decomposition_structure(method, layer, rank):
    dec = get_decomposer(method)
    a, b = dec.decompose(layer, rank), dec.skeleton(layer, rank)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    x = torch.randn(2, 20) if isinstance(layer, nn.Linear) else \
        torch.randn(2, layer.in_channels, 11, 9)
    assert a(x).shape == b(x).shape


def _macs_timer(overhead_ms: float = 0.05):
    """A deterministic 'runtime': 1 ms per 1e6 MACs plus a launch overhead per conv."""
    def timer(module: nn.Module, x: torch.Tensor) -> float:
        macs = count(module, tuple(x.shape[1:]))["macs"] * x.shape[0]
        convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())
        return macs / 1e6 + overhead_ms * convs
    return timer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1)).eval()


def test_layer_with_no_faster_candidate_stays_dense_with_the_reason():
    cfg = {"timer": _macs_timer(overhead_ms=0.5)}
    p = plan(_net(), [{"match": ["2", "8"], "method": "tucker2", "rank": 0.5,
                       "objective": "latency"}], (3, 16, 16), config={"latency": cfg})
    rows = {r.name: r for r in p.replacements}
    assert rows["2"].applied and rows["2"].latency_after < rows["2"].latency_before
    # 4->4 channels: the three-conv chain pays 3 launches for almost no MACs saved
    assert not rows["8"].applied
    assert "not faster on onnxruntime" in rows["8"].skipped
    assert "ms" in p.summary()


def test_objective_latency_drops_candidates_slower_than_dense_under_a_mac_budget():
    timer = _macs_timer(overhead_ms=0.02)
    p = plan(_net(), [{"match": "*", "method": "tucker2", "exclude": "0"}], (3, 16, 16), target={"macs": 0.6}, objective="latency", config={"latency": {"timer": timer}})
    for r in p.replacements:
        assert r.latency_before is not None
        if r.applied:
            assert r.latency_after < r.latency_before * (1 - 0.03)
    assert p.macs_after <= 0.6 * p.total_macs


def test_latency_target_is_met_on_the_summed_layer_latencies():
    timer = _macs_timer(overhead_ms=0.02)
    p = plan(_net(), [{"match": "*", "method": "tucker2", "exclude": "0"}], (3, 16, 16), target={"latency": 0.6}, config={"latency": {"timer": timer}})
    lat = p.latency
    assert lat["layers_timed"] == 5          # every conv, the untouched stem included
    assert lat["layers_planned_ms"] <= 0.6 * lat["layers_dense_ms"] + 1e-9
    assert lat["layers_planned_ms"] >= 0.5 * lat["layers_dense_ms"]
    assert "keep 0.6 of latency" in p.summary()


def test_unreachable_latency_target_is_a_one_line_rank_error():
    with pytest.raises(RankError, match="latency target cannot be reached|cannot be reached"):
        plan(_net(), [{"match": "8", "method": "tucker2"}], (3, 16, 16), target={"latency": 0.1}, config={"latency": {"timer": _macs_timer()}})


def test_mac_target_out_of_reach_after_latency_pruning_names_the_slow_layers():
    """Every candidate slower than its dense layer (an int8 runtime where a chain of three
    convs costs more than one): the MAC target cannot be reached, and the error says why."""
    slow = _macs_timer(overhead_ms=50.0)
    with pytest.raises(RankError) as e:
        plan(_net(), [{"match": "*", "method": "tucker2", "exclude": "0"}], (3, 16, 16),
             target={"macs": 0.5}, objective="latency", config={"latency": {"timer": slow}})
    msg = str(e.value)
    assert "\n" not in msg
    assert "with objective latency" in msg and "of the 4 layers" in msg
    assert "faster than the dense layer on onnxruntime (fp32, batch 1" in msg


def test_compressed_model_slower_than_original_gets_its_layers_put_back():
    calls = {"n": 0}

    def timer(module: nn.Module, x: torch.Tensor) -> float:
        calls["n"] += 1
        # layers: decompositions look faster; whole models: more convs is slower
        convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
        if isinstance(module, nn.Conv2d):
            return 10.0
        if isinstance(module, nn.Sequential) and len(module) == 3 and \
                all(isinstance(m, nn.Conv2d) for m in module):
            return 1.0
        return float(convs)

    net = _net()
    new, p = compress(net, [{"match": ["2", "4"], "method": "tucker2", "rank": 0.5,
                             "objective": "latency"}], (3, 16, 16), config={"latency": {"timer": timer}})
    assert p.latency["compressed_ms"] <= p.latency["original_ms"]
    assert sorted(p.latency["reverted"]) == ["2", "4"]
    assert all(isinstance(m, nn.Conv2d) for m in new if not isinstance(m, nn.ReLU))
    assert all("put back" in r.skipped for r in p.replacements)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(new(x), net(x))


def test_real_runtimes_time_and_record_inputs():
    net = _net()
    x = torch.randn(1, 3, 16, 16)
    ins = record_inputs(net, ["2", "8"], x)
    assert ins["2"].shape == (1, 64, 16, 16) and ins["8"].shape == (1, 4, 16, 16)
    for runtime in ("onnxruntime", "torch"):
        cfg = LatencyConfig(runtime=runtime, rounds=2, per_round=2, warmup=1)
        t = time_modules([net[2]], ins["2"], cfg)
        assert len(t) == 1 and 0 < t[0] < 5_000


def test_compress_with_real_onnxruntime_is_never_slower():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU()).eval()
    new, p = compress(net, [{"match": "2", "method": "tucker2"}], (3, 24, 24), target={"macs": 0.5}, objective="latency", config={"latency": {"rounds": 3, "per_round": 2, "max_candidates": 4}})
    assert p.latency["compressed_ms"] <= p.latency["original_ms"]
    assert p.latency["runtime"] == "onnxruntime"


def test_spread_picks_evenly_and_keeps_the_ends():
    assert spread(5, 8) == [1, 2, 3, 4]
    s = spread(49, 5)
    assert s[0] == 1 and s[-1] == 48 and len(s) == 5


def test_latency_config_and_recipe_schema_errors():
    with pytest.raises(RecipeError, match="latency.runtime"):
        LatencyConfig(runtime="tflite")
    with pytest.raises(RecipeError, match="unknown key"):
        LatencyConfig.from_any({"runtim": "torch"})
    base = {"model": {"spec": "fmnist:cnn"}, "finetune": {"enabled": False},
            "evaluate": {"baseline": False, "zero_shot": False},
            "rules": [{"match": "*", "method": "tucker2", "objective": "latency"}],
            "target": {"latency": 0.5}}
    r = validate(base)
    assert r["target"] == {"latency": 0.5} and r["latency"]["runtime"] == "onnxruntime"
    with pytest.raises(RecipeError, match="objective"):
        validate({**base, "rules": [{"match": "*", "method": "tucker2", "objective": "speed"}]})
    with pytest.raises(RecipeError, match="runtime"):
        validate({**base, "latency": {"runtime": "tensorrt"}})


def test_recipe_run_with_a_latency_target(tmp_path, capsys):
    """The CLI path: a latency target plans on onnxruntime timings, the run directory's
    recipe.yaml holds exact ranks, and the report holds the whole-model check."""
    import json

    from compresscnn.cli import main
    from compresscnn.runs.loading import load_compressed

    recipe = tmp_path / "lat.yaml"
    recipe.write_text(
        "model: {spec: 'fmnist:cnn'}\n"
        "rules:\n  - {match: ['conv2', 'conv3'], method: tucker2, objective: latency}\n"
        "  - {match: fc1, method: svd, objective: latency}\n"
        "target: {latency: 0.8}\n"
        "latency: {rounds: 3, max_candidates: 4}\n"
        "finetune: {enabled: false}\n"
        "evaluate: {baseline: false, zero_shot: false}\n"
        "report: {latency: true, latency_batch: [1, 2], plots: false}\n")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    lat = rep["latency_plan"]
    assert lat["runtime"] == "onnxruntime" and lat["compressed_ms"] <= lat["original_ms"]
    runtimes = {(r["model"], r["runtime"], r["batch"]) for r in rep["latency"]}
    assert runtimes == {(m, rt, b) for m in ("baseline", "compressed")
                        for rt in ("torch", "onnxruntime") for b in (1, 2)}
    layers = {(r["layer"], r["runtime"]) for r in rep["layer_latency"]}
    applied = [r["name"] for r in rep["layers"] if r["skipped"] is None]
    assert layers == {(n, rt) for n in applied for rt in ("torch", "onnxruntime")}
    assert "Per layer: dense vs decomposed" in (out / "report.md").read_text()
    model = load_compressed(out)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torch_bf16_runtime_times_a_channels_last_copy_and_leaves_the_module():
    from compresscnn.measure.timing import RUNTIMES, module_runner

    assert "torch_bf16" in RUNTIMES
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 10, 10)
    out = module_runner(m, x, "torch_bf16", 1)()
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 8, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert m[0].weight.is_contiguous()  # the caller's module untouched
    with torch.no_grad():
        torch.testing.assert_close(out.float(), m(x), atol=0.1, rtol=0.05)


def test_ort_optimized_ops_counts_the_convs_outside_the_blocked_layout():
    from _tools import load_tool

    tool = load_tool("bench_latency")
    onnx_bytes, ort_optimized_ops = tool.onnx_bytes, tool.ort_optimized_ops

    class Bottleneck(nn.Module):  # a Tucker-2 chain with a residual, as in ResNet
        def __init__(self, mid):
            super().__init__()
            self.a, self.b = nn.Conv2d(64, mid, 1), nn.Conv2d(mid, mid, 3, padding=1)
            self.c = nn.Conv2d(mid, 64, 1)

        def forward(self, x):
            return torch.relu(self.c(self.b(self.a(x))) + x)

    def ops(mid):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64),
                            Bottleneck(mid), Bottleneck(mid)).eval()
        return ort_optimized_ops(onnx_bytes(net, torch.randn(1, 64, 16, 16)))

    def unblocked(o):
        return o.get("Conv", 0) + o.get("com.microsoft.FusedConv", 0)

    blocked, odd = ops(32), ops(34)
    assert sum(v for k, v in blocked.items() if k.endswith("Conv")) == 7
    assert not any("BatchNormalization" in k for k in blocked)  # folded into the conv
    if blocked.get("com.microsoft.nchwc.Conv"):  # a CPU where onnxruntime blocks convs
        # onnxruntime 1.32 pads multiples of 4 to its block; 34 channels fall out of it
        assert unblocked(blocked) == 0 and unblocked(odd) > 0
