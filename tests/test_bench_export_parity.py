"""tools/bench_export_parity.py end to end on one small case (the numbers it writes are what
BENCHMARKS.md reports; here only their presence and sense are checked)."""

from __future__ import annotations

import json

import pytest
import torch
from _tools import load_tool


def test_bench_export_parity_one_case(tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed "
                                           "(pip install 'compresscnn[runtimes]')")
    mod = load_tool("bench_export_parity")
    threads = torch.get_num_threads()
    try:
        rows = mod.main(["--models", "resnet18", "--methods", "svd", "--size", "32",
                         "--runtimes", "onnxruntime", "openvino", "--threads", "1",
                         "--json", str(tmp_path / "parity.json")])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "parity.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    (row,) = rows
    assert row["model"] == "resnet18" and row["method"] == "svd" and row["layers"] == 4
    assert row["folded"]["ops"]["BatchNormalization"] == 0
    assert row["folded"]["folded"] == {"batchnorms": 20, "gathers": 0}
    assert row["unfolded"]["folded"] == {"batchnorms": 0, "gathers": 0}
    for key in ("folded", "unfolded"):
        assert set(row[key]["runtimes"]) == {"onnxruntime", "openvino"}
        for got in row[key]["runtimes"].values():
            assert 0 <= got["max_abs_diff"] < 1e-3 and 0 <= got["rel_l2"] < 1e-4
    assert data["meta"]["input"] == [3, 32, 32]
