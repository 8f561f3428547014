"""Kill a fine-tuning run with SIGKILL mid-epoch, ``--resume`` it, and compare with a run that
was never interrupted: same weights (allclose, atol 1e-6), same metrics, same per-step losses.
A changed recipe is not resumed. Also the output-directory rules: a run never replaces a
directory it did not write, nor the input weights."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compresscnn.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST (dataset-fashion-mnist) not installed")

# 320 training images in batches of 32: 10 steps an epoch; 60 steps = 6 epochs. A checkpoint
# every 4 steps and at each epoch end; the CSV gets a row every step.
RECIPE = """\
name: resume
seed: 3
model: {spec: "fmnist:cnn", weights: DEFAULT}
data: {dataset: fashion_mnist, root: %s, train_subset: 320, test_subset: 200,
       batch_size: 32, eval_batch_size: 100, augment: true}
rules:
  - {match: ["conv2", "conv3"], method: tucker2, rank: 0.35}
  - {match: fc1, method: svd, rank: 0.25}
finetune: {epochs: 1, max_steps: 60, lr: 0.02, checkpoint_every: 4, log_every: 1}
evaluate: {baseline: false, zero_shot: false}
export: {onnx: false}
report: {latency: false, plots: false}
""" % FMNIST


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compresscnn", "run", str(recipe), "--out", str(out),
            "--quiet", *extra]


def _steps(csv_path: Path) -> list[int]:
    try:
        rows = csv_path.read_text().splitlines()[1:]
    except OSError:
        return []
    return [int(r.split(",")[0]) for r in rows if r.split(",")[0].isdigit()]


def _losses(csv_path: Path) -> list[tuple[str, ...]]:
    with csv_path.open(newline="") as f:
        return [(r["step"], r["epoch"], r["loss"], r["kd_loss"], r["ce_loss"], r["lr"])
                for r in csv.DictReader(f)]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    ref, run = tmp_path / "ref", tmp_path / "run"
    partial = tmp_path / "run.partial"

    # the run to interrupt: SIGKILL once a mid-epoch checkpoint exists and the CSV shows
    # steps done after it (those are lost and redone on resume)
    proc = subprocess.Popen(_cmd(recipe, run), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            steps = _steps(partial / "train_log.csv")
            if (partial / "checkpoints" / "last.pt").is_file() and steps and steps[-1] >= 13:
                proc.send_signal(signal.SIGKILL)
                killed_at = steps[-1]
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read()!r}"
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < 60
    assert not run.exists(), "a killed run must not look finished"
    ck = torch.load(partial / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < ck["step"] < 60

    # a changed recipe is not resumed (the weights would not be what its recipe.yaml says),
    # and a rerun without --resume does not throw the interrupted run away
    kept = {p: p.stat().st_mtime_ns for p in partial.rglob("*")}
    base = ["run", str(recipe), "--out", str(run), "--quiet"]
    for extra, says in ((["--resume", "--set", "finetune.lr=0.5"], "finetune.lr (0.02 -> 0.5)"),
                        (["--resume", "--set", "seed=4"], "seed (3 -> 4)"),
                        ([], "use --resume or --overwrite")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert {p: p.stat().st_mtime_ns for p in partial.rglob("*")} == kept

    # resume it; meanwhile nothing else: then the uninterrupted reference
    r = subprocess.run(_cmd(recipe, run, "--resume"), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    r = subprocess.run(_cmd(recipe, ref), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr

    a, b = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-6, rtol=0), k
    ra = json.loads((run / "report.json").read_text())
    rb = json.loads((ref / "report.json").read_text())
    assert ra["finetune"]["resumed_from_step"] == ck["step"]
    assert rb["finetune"]["resumed_from_step"] is None
    assert ra["finetune"]["steps"] == rb["finetune"]["steps"] == 60
    for key in ("top1", "top5", "agreement", "n"):
        assert ra["finetuned"][key] == rb["finetuned"][key], key
    assert ra["finetuned"]["loss"] == pytest.approx(rb["finetuned"]["loss"], abs=1e-6)
    # the per-step log: one row per step, the redone steps not duplicated, same losses
    la, lb = _losses(run / "train_log.csv"), _losses(ref / "train_log.csv")
    assert [int(x[0]) for x in la] == list(range(1, 61))
    assert la == lb


def _run_args(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(recipe), "--out", str(out), "--quiet",
            "--set", "finetune.enabled=false", "--set", "evaluate.baseline=false",
            "--set", "evaluate.zero_shot=false", *extra]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compresscnn: error:"), err
    return err[0]


def test_overwrite_only_replaces_run_directories(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    assert main(_run_args(recipe, notes, "--overwrite")) == 2
    assert "not a compresscnn run directory" in _one_error(capsys)
    assert (notes / "thesis.tex").read_text() == "precious"

    out = tmp_path / "out"
    assert main(_run_args(recipe, out)) == 0
    assert main(_run_args(recipe, out)) == 2
    assert "already exists" in _one_error(capsys)
    (out / "marker").write_text("old")
    assert main(_run_args(recipe, out, "--overwrite")) == 0
    assert not (out / "marker").exists() and (out / "report.json").is_file()


def test_never_writes_over_the_input_weights(tmp_path, capsys):
    from compresscnn.io.models import load_model

    # the weights live in a previous run's directory, which --overwrite would replace
    prev = tmp_path / "prev"
    prev.mkdir()
    state = {k: v.contiguous() for k, v in load_model("fmnist:cnn", "DEFAULT").state_dict().items()}
    save_file(state, str(prev / "model.safetensors"))
    (prev / "report.json").write_text("{}")
    before = (prev / "model.safetensors").read_bytes()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("weights: DEFAULT", f"weights: {prev / 'model.safetensors'}"))
    assert main(_run_args(recipe, prev, "--overwrite")) == 2
    err = _one_error(capsys)
    assert "model.weights" in err and "is inside the output" in err, err
    assert (prev / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "prev.partial").exists()


def test_logs_progress_and_tensorboard(tmp_path, capsys, monkeypatch):
    """Not a TTY: no progress bars, a few stage lines; ``--quiet``: nothing. The per-step
    CSV lands in the run directory; TensorBoard scalars only when asked for and installed."""
    import types

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("max_steps: 60", "max_steps: 3"))
    scalars: list[tuple[str, float, int]] = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir: str) -> None:
            Path(log_dir).mkdir(parents=True)
            (Path(log_dir) / "events.fake").write_text("")

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setenv("COMPRESSCNN_TENSORBOARD", "1")
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    err = cap.err
    assert "\r" not in err and "it/s" not in err  # no tqdm bar when stderr is no TTY
    for line in ("[finetune] 3 steps", "[evaluate_finetuned] top1"):
        assert line in err
    assert "wrote " in cap.out  # results (the plan, the run directory) on stdout
    assert len(err.splitlines()) < 20
    run = tmp_path / "a"
    assert [int(r.split(",")[0]) for r in (run / "train_log.csv").read_text().splitlines()[1:]] \
        == [1, 2, 3]
    assert (run / "tb" / "events.fake").is_file()
    assert sorted({s for _, _, s in scalars}) == [1, 2, 3]
    assert {t for t, _, _ in scalars} >= {"finetune/loss", "finetune/lr"}
    rep = json.loads((run / "report.json").read_text())
    assert rep["finetune"]["log_csv"] == "train_log.csv"
    assert rep["finetune"]["checkpoint"] == "checkpoints/last.pt"

    monkeypatch.delenv("COMPRESSCNN_TENSORBOARD")
    assert main(["run", str(recipe), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "b" / "tb").exists()
