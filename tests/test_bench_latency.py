"""tools/bench_latency.py end to end on a tiny input (the numbers are not checked: speed goals
live in the benchmark's results, not in tests)."""

from __future__ import annotations

import json

import torch
from _tools import TOOLS, load_tool


def test_bench_latency_runs_every_plan(tmp_path):
    mod = load_tool("bench_latency")
    threads = torch.get_num_threads()
    try:
        rows = mod.main(["--models", "resnet18", "--size", "32", "--macs", "0.5",
                         "--batches", "1", "--threads", "1", "--rounds", "1",
                         "--plan-rounds", "1", "--json", str(tmp_path / "lat.json")])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "lat.json").read_text())
    assert [r["plan"] for r in data["rows"]] == ["uniform", "macs", "latency"] == \
        [r["plan"] for r in rows]
    for r in rows:
        assert r["original_ms"] > 0 and r["compressed_ms"] > 0 and r["macs_ratio"] > 1.0
    assert abs(rows[1]["macs_ratio"] - 2.0) < 0.1
    assert all(r["round_to"] == 8 for r in rows)
    for r in rows:  # the optimised graphs' op counts (e.g. layout reorders) are kept
        assert sum(v for k, v in r["ort_ops"].items() if "Conv" in k) > \
            sum(v for k, v in r["original_ort_ops"].items() if "Conv" in k) > 0
    lat = rows[2]["latency_plan"]
    assert lat["runtime"] == "onnxruntime" and lat["compressed_ms"] <= lat["original_ms"]


def test_bench_latency_plans_a_shipped_recipe(tmp_path):
    mod = load_tool("bench_latency")
    threads = torch.get_num_threads()
    recipe = TOOLS.parent / "recipes" / "resnet18_imagenet_2x_batch1.yaml"
    try:
        rows = mod.main(["--recipe", str(recipe), "--size", "32", "--rounds", "1",
                         "--per-round", "1", "--json", str(tmp_path / "lat.json")])
    finally:
        torch.set_num_threads(threads)
    (row,) = rows
    assert row["plan"] == "recipe" and row["batch"] == 1 and row["threads"] == 2
    assert row["round_to"] == [8] and row["latency_plan"]["runtime"] == "onnxruntime"
    assert row["macs_ratio"] > 1.0 and row["compressed_ms"] > 0
    assert all(r % 8 == 0 for rank in row["ranks"].values() for r in rank)
