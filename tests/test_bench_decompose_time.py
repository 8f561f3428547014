"""tools/bench_decompose_time.py's budget mode: compress() at a global MAC target, timed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _tools import load_tool


def test_budgeted_rows_time_the_plan_and_each_layer(tmp_path: Path, monkeypatch) -> None:
    bench = load_tool("bench_decompose_time")
    out = tmp_path / "t.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_decompose_time.py", "--models", "resnet18", "--methods", "tucker2",
        "--target-macs", "0.5", "--json", str(out)])
    bench.main()
    data = json.loads(out.read_text())
    assert data["meta"]["target_macs"] == 0.5 and data["meta"]["match"] == "layer*.conv*"
    (row,) = data["rows"]
    assert row["model"] == "resnet18" and row["method"] == "tucker2"
    assert 0 < row["layers"] <= 16 and len(row["per_layer"]) == row["layers"]
    assert abs(row["macs_kept"] - 0.5) < 0.05  # of the whole model's MACs
    assert row["compress_seconds"] >= row["decompose_seconds"] > 0
    for layer in row["per_layer"]:
        assert layer["name"].startswith("layer") and layer["seconds"] >= 0
        assert 0.0 <= layer["rel_error"] < 1.0 and len(layer["rank"]) == 2
