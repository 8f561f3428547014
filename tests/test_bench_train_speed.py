"""tools/bench_train_speed.py end to end on tiny batches (the rates are not checked: speed
goals live in the benchmark's results, not in tests)."""

from __future__ import annotations

import json

import pytest
import torch
from _tools import load_tool


def test_bench_train_speed_interleaves_models_and_configs(tmp_path):
    mod = load_tool("bench_train_speed")
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--models", "resnet20", "resnet20_spatial", "--configs", "fp32",
                         "fp32_cl", "--batch", "4", "--steps", "3", "--rounds", "1",
                         "--threads", "1", "--json", str(tmp_path / "speed.json")]) == 0
        with pytest.raises(SystemExit):
            mod.main(["--models", "resnet20", "--configs", "fp64", "--json",
                      str(tmp_path / "x.json")])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["resnet20", "resnet20_spatial"]
    for r in rows:
        assert set(r) == {"model", "fp32", "fp32_cl"} and r["fp32"] > 0 and r["fp32_cl"] > 0


def test_bench_train_speed_profile_sums_self_time_by_category(tmp_path):
    mod = load_tool("bench_train_speed")
    assert mod.category("aten::convolution_backward") == "conv backward"
    assert mod.category("aten::mkldnn_convolution") == "conv forward"
    assert mod.category("aten::native_batch_norm_backward") == "batchnorm"
    assert mod.category("aten::threshold_backward") == "relu / add"
    assert mod.category("aten::_foreach_add_") == "optimizer"
    assert mod.category("aten::empty") == "other"
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--profile", "--models", "resnet20", "--configs", "fp32", "--batch",
                         "4", "--steps", "2", "--threads", "1", "--json",
                         str(tmp_path / "prof.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads((tmp_path / "prof.json").read_text())["profile"]
    assert (row["model"], row["config"]) == ("resnet20", "fp32")
    assert row["ms"]["conv forward"] > 0 and row["ms"]["conv backward"] > 0
    assert row["total_ms"] == pytest.approx(sum(row["ms"].values()))
