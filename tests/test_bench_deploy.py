"""tools/bench_deploy.py turns a run's latency rows into the deployment ratios."""

from __future__ import annotations

import pytest

from _tools import load_tool


def test_ratios_of_dense_and_compressed_fp32_and_int8():
    bench = load_tool("bench_deploy")
    rows = [{"model": m, "runtime": rt, "batch": 1, "median_ms": ms}
            for rt, scale in (("onnxruntime", 1.0), ("openvino", 2.0))
            for m, ms in (("baseline", 40.0 * scale), ("compressed", 25.0 * scale),
                          ("baseline int8", 16.0 * scale), ("compressed int8", 10.0 * scale))]
    rep = {"plan": {"macs_before": 200, "macs_after": 100}, "latency": rows}
    r = bench.ratios(rep)
    for rt in ("onnxruntime", "openvino"):
        row = r[rt]["1"]
        assert row["mac_ratio"] == 2.0
        assert row["compressed_fp32"] == pytest.approx(1.6)
        assert row["compressed_fp32_of_mac_ratio"] == pytest.approx(0.8)
        assert row["dense_int8"] == pytest.approx(2.5)
        assert row["compressed_int8"] == pytest.approx(4.0)
        assert row["int8_low_rank_of_mac_ratio"] == pytest.approx(0.8)
    # a run without int8 files: the fp32 ratio only
    only = bench.ratios({**rep, "latency": [x for x in rows if "int8" not in x["model"]]})
    assert "compressed_int8" not in only["onnxruntime"]["1"]
    assert only["onnxruntime"]["1"]["compressed_fp32"] == pytest.approx(1.6)
