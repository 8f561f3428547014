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
