"""tools/bench_zoo.py on two small torchvision models at a small input (64x64): each
compressed at the MAC target (or refused in one line), exported and checked in onnxruntime
at two batch sizes, and the table of BENCHMARKS.md printed from the results file."""

from __future__ import annotations

import json

from _tools import load_tool


def test_bench_zoo_two_models(tmp_path, capsys):
    mod = load_tool("bench_zoo")
    out = tmp_path / "zoo.json"
    rows = mod.main(["--models", "torchvision:squeezenet1_1", "torchvision:mobilenet_v3_small",
                     "--method", "tucker2", "--size", "3", "64", "64", "--time-limit", "600",
                     "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == [r["model"] for r in rows]
    assert data["meta"]["rules"] == [{"match": "*", "method": "tucker2"}]
    assert data["meta"]["input"] == [3, 64, 64] and data["meta"]["batches"] == [1, 3]
    for r in rows:
        assert r["status"] == "ok", r
        assert 0.45 <= r["ratio"] <= 0.5 and r["macs_after"] == r["planned_macs_after"]
        assert 0 < r["taken"] <= r["matched"] <= r["layers"]
        assert set(r["diffs"]) == {"1", "3"} and r["max_abs_diff"] < 1e-3
        assert r["exporter"] in ("dynamo", "torchscript")
    capsys.readouterr()
    mod.main(["--table", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model |") and len(table) == 2 + len(rows)
    assert "| torchvision:squeezenet1_1 |" in table[2] and "| ok |" in table[2]


def test_bench_zoo_refusal_is_one_line():
    import torch

    mod = load_tool("bench_zoo")
    threads = torch.get_num_threads()
    try:  # svd takes only the 1x1 convs of SqueezeNet (40% of the MACs): 0.5 is out of reach
        row = mod.one("torchvision:squeezenet1_1", "svd", 0.5, (3, 32, 32), 1, (1, 3))
    finally:
        torch.set_num_threads(threads)
    assert row["status"] == "refused" and "\n" not in row["why"]
    assert "cannot be reached" in row["why"]


def test_bench_zoo_resume_keeps_rows_over_the_limit_unless_asked(tmp_path, monkeypatch):
    mod = load_tool("bench_zoo")
    out = tmp_path / "zoo.json"
    held = [{"model": m, "status": s, "wall_s": 1.0}
            for m, s in (("a", "ok"), ("b", "time limit"), ("c", "error"), ("e", "memory limit"))]
    out.write_text(json.dumps({"meta": {}, "rows": held}))
    ran = []
    monkeypatch.setattr(mod, "run_child", lambda spec, args: ran.append(spec) or
                        {"model": spec, "status": "ok", "wall_s": 2.0})
    models = ["--models", "a", "b", "c", "d", "e", "--json", str(out), "--resume"]
    rows = mod.main(models)
    assert ran == ["c", "d"] and [r["model"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert rows[1]["status"] == "time limit" and rows[4]["status"] == "memory limit"
    ran.clear()
    mod.main(models + ["--rerun-over-limit"])
    assert ran == ["b", "e"]


def test_bench_zoo_a_child_out_of_memory_is_a_memory_limit(monkeypatch):
    import argparse
    import subprocess

    mod = load_tool("bench_zoo")
    last = ("RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 26214400 bytes.")

    def child(cmd, stdout, stderr, **kw):
        stderr.write("stage: load\nTraceback (most recent call last):\n" + last + "\n")
        stderr.flush()
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=None)

    monkeypatch.setattr(mod.subprocess, "run", child)
    args = argparse.Namespace(method="auto", macs=0.5, size=[3, 32, 32], threads=1,
                              batches=[1, 3], time_limit=10.0, memory_gib=8.0)
    row = mod.run_child("torchvision:vit_h_14", args)
    assert row["status"] == "memory limit"
    assert row["why"].startswith("out of memory (limit 8 GiB) in load: RuntimeError")
