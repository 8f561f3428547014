"""Sweep files: every shipped sweep validates through the recipe schema; a bad job is named
in a one-line error; the runner writes one summary per job, skips finished jobs and resumes
interrupted ones (the ``compresscnn run`` process replaced by a stub)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import compresscnn as cc
from compresscnn.errors import RecipeError
from compresscnn.recipe.schema import load_recipe

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_validate(path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = cc.load_sweep(path)
    assert sweep.jobs
    for job in sweep.jobs.values():  # each job's command line is the same recipe again
        cmd = job.command()
        assert cmd[3::2] == ["--set"] * len(job.set)
        sets = cmd[4::2]
        assert load_recipe(job.recipe, sets) == load_recipe(job.recipe, job.overrides())


def test_overrides_round_trip_yaml_values():
    job = cc.load_sweep.__globals__["SweepJob"](
        recipe="r.yaml", set={"rules": [{"match": "features.*", "method": "cp"}],
                              "target": None, "calibration.distill": {"epochs": 3}})
    assert job.overrides() == ["rules=[{match: features.*, method: cp}]", "target=null",
                               "calibration.distill={epochs: 3}"]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, words", [
    ("jobs:\n  a:\n    recipe: recipes/resnet20_cifar10_3x.yaml\n"
     "    set: {finetune.epochz: 3}\n", ["job a", "epochz"]),
    ("jobs:\n  a:\n    recipe: recipes/nothere.yaml\n", ["job a", "nothere"]),
    ("jobs:\n  a:\n    recipe: recipes/demo.yaml\n    sett: {}\n", ["jobs.a.sett"]),
    ("jobs:\n  a/b:\n    recipe: recipes/demo.yaml\n", ["a/b"]),
    ("jobs: {}\n", ["jobs"]),
    ("jobs:\n  a:\n    recipe: recipes/demo.yaml\n  a:\n    recipe: recipes/demo.yaml\n",
     ["duplicate"]),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, monkeypatch, text, words):
    monkeypatch.chdir(REPO)
    with pytest.raises(RecipeError) as e:
        cc.load_sweep(_write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_cli_refuses_a_bad_sweep_with_exit_2(tmp_path):
    p = _write(tmp_path, "jobs:\n  a:\n    recipe: recipes/demo.yaml\n    set: {seed: x}\n")
    r = subprocess.run([sys.executable, "-m", "compresscnn", "sweep", str(p), "--list"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "job a" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_sweep_writes_skips_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = cc.load_sweep(_write(tmp_path, (
        "jobs:\n  one:\n    recipe: recipes/demo.yaml\n    set: {seed: 1}\n"
        "  two:\n    recipe: recipes/demo.yaml\n    set: {seed: 2}\n")))
    out, res = tmp_path / "runs", tmp_path / "results"
    (out / "two.partial" / "checkpoints").mkdir(parents=True)
    (out / "two.partial" / "checkpoints" / "last.pt").write_bytes(b"x")
    calls = []

    def fake_run(cmd, **kw):
        if cmd[0] == "git":
            return subprocess.CompletedProcess(cmd, 0, "abc1234\n", "")
        calls.append(cmd)
        run_dir = Path(cmd[cmd.index("--out") + 1])
        if "seed=1" in cmd and len([c for c in calls if "seed=1" in c]) == 1:
            raise subprocess.CalledProcessError(3, cmd)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "report.json").write_text(json.dumps(
            {"model": "m", "baseline": {"top1": 90.0}, "compressed": {"top1": 80.0}}))

    import compresscnn.runs.sweep as rs
    monkeypatch.setattr(rs.subprocess, "run", fake_run)
    lines: list[str] = []
    assert cc.run_sweep(sweep, out=out, results=res, threads=1, say=lines.append) == ["one"]
    assert "--resume" in calls[1] and not (res / "one.json").exists()
    row = json.loads((res / "two.json").read_text())
    assert row["zero_shot_top1"] == 80.0 and row["command"].startswith("compresscnn run")
    assert row["threads"] == "1" and row["commit"] == "abc1234"
    assert cc.run_sweep(sweep, out=out, results=res, threads=1, say=lines.append) == []
    assert len(calls) == 3 and (res / "one.json").is_file()  # two was skipped
    assert any("done already" in x for x in lines)
    with pytest.raises(RecipeError, match="no job 'three'"):
        cc.run_sweep(sweep, ["three"], out=out, results=res)


def test_summary_carries_the_int8_figures():
    from compresscnn.runs.sweep import summarise_report

    report = {"compressed": {"top1": 50.0, "params": 10}, "onnx": {"bytes": 400},
              "int8": {"bytes": 100, "fp32_bytes": 400, "mode": "static", "per_channel": True,
                       "top1": 49.0, "top5": 70.0, "agreement": 90.0, "n": 500,
                       "parity": {"rel_error": 0.1}, "path": "model.int8.onnx"}}
    s = summarise_report(report)
    assert s["int8"]["bytes"] == 100 and s["int8"]["top1"] == 49.0
    assert s["int8"]["parity"] == {"rel_error": 0.1} and "path" not in s["int8"]
    assert summarise_report({"compressed": {}})["int8"] is None
