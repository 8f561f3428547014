"""Output folders (compresscnn.runs.rundir): an ``--overwrite`` killed at any point leaves a
complete run at the final path; a lock refuses a second run and is taken over from a dead
one; a run resumes only with the recipe it started with; outputs follow the umask; a full
disk is named. The refusals themselves are cases of tests/test_hostile.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import yaml

from compresscnn.runs import rundir as rundir
from compresscnn.cli import main
from compresscnn.runs.rundir import MARKER, RunDir

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
STUB = {"model": {"weights": None}, "seed": 0}


def _files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if p.name != MARKER}


def _make_run(out: Path, files: dict[str, str], overwrite: bool = False) -> RunDir:
    """A prepared run holding ``files`` in its staging folder (the lock held)."""
    rd = RunDir(out)
    staging = rd.prepare(STUB, overwrite=overwrite)
    for name, text in files.items():
        (staging / name).write_text(text)
    return rd


def _die_at(n: int) -> None:
    """In a forked child: SIGKILL this process at its ``n``-th rename, replace, unlink, rmdir
    or exchange (the steps of putting a run in place, file by file inside rmtree)."""
    calls = [0]

    def hook(real):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return wrapped
    for name in ("rename", "replace", "unlink", "rmdir"):
        setattr(os, name, hook(getattr(os, name)))
    rundir._exchange = hook(rundir._exchange)


def _killed_at(n: int, fn: Callable[[], None]) -> bool:
    """Run ``fn`` in a forked child that dies at its ``n``-th file operation (:func:`_die_at`);
    True if it was killed before ``fn`` returned."""
    pid = os.fork()
    if pid == 0:  # the child: only file operations, then _exit
        try:
            _die_at(n)
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


OLD = {"weights.bin": "old", "report.json": "old"}
NEW = {"weights.bin": "new", "log.csv": "new"}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_killed_at_every_step_leaves_a_complete_run(tmp_path, exchange):
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if exchange and not rundir._exchange(probe_a, probe_b):
        pytest.skip("this file system cannot exchange two paths atomically")
    steps = 0
    for n in range(1, 100):
        out = tmp_path / f"run{n}"
        old = _make_run(out, OLD)
        old.commit()
        old.release()
        new = _make_run(out, NEW, overwrite=True)
        with mock.patch.object(rundir, "_exchange", rundir._exchange if exchange
                               else (lambda a, b: False)):
            killed = _killed_at(n, new.commit)
        new.release()
        if exchange:  # at every instant a complete run is at the final path
            assert _files(out) in (OLD, NEW), n
        # the next run finds a complete run and nothing half-done beside it
        nxt = RunDir(out)
        nxt.prepare(STUB, overwrite=True)
        assert _files(out) in (OLD, NEW), n
        assert not nxt.trash.exists() and _files(nxt.staging) == {}
        nxt.abandon()
        nxt.release()
        assert sorted(p.name for p in tmp_path.glob(f"run{n}*")) == [f"run{n}"]
        if not killed:
            assert _files(out) == NEW
            steps = n - 1
            break
    assert steps >= 4  # marker, exchange/renames and the old run's files were all hit


def _plain_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"spec": "fmnist:cnn", "weights": "DEFAULT"},
        "rules": [{"match": "fc1", "method": "svd", "rank": 8}],
        "finetune": {"enabled": False}, "evaluate": {"baseline": False, "zero_shot": False},
        "export": {"onnx": False}, "report": {"latency": False, "plots": False}}))
    return recipe


def test_run_with_overwrite_killed_while_replacing(tmp_path):
    """``compresscnn run --overwrite``, SIGKILLed at each file operation after its report
    is written (while it puts the new run in place): the final path always holds a complete
    run, never a half-deleted old one."""
    import compresscnn.runs.pipeline as pipeline
    import compresscnn.runs.report as report

    recipe, template = _plain_recipe(tmp_path), tmp_path / "template"
    assert main(["run", str(recipe), "--out", str(template), "--quiet"]) == 0
    complete = sorted(p.name for p in template.iterdir())
    parent, real_write = os.getpid(), report.write_report

    for n in range(1, 60):
        out = tmp_path / f"out{n}"
        shutil.copytree(template, out)
        killed = []

        def write_then_fork(*a, **k):
            real_write(*a, **k)
            pid = os.fork()
            if pid == 0:  # the child finishes the run; it dies at its n-th operation
                _die_at(n)
                return
            _, status = os.waitpid(pid, 0)
            killed.append(os.WIFSIGNALED(status))
            raise KeyboardInterrupt  # the parent stops here; the child did the rest

        def exit_child(msg, quiet):
            if os.getpid() != parent and msg.startswith("wrote "):
                os._exit(0)
        try:
            with mock.patch.object(report, "write_report", write_then_fork), \
                    mock.patch.object(pipeline, "_log", exit_child), \
                    mock.patch("compresscnn.runs.rundir.RunDir.abandon", lambda self: None):
                main(["run", str(recipe), "--out", str(out), "--quiet", "--overwrite"])
        finally:
            if os.getpid() != parent:
                os._exit(1)
        assert sorted(p.name for p in out.iterdir()) == complete, n
        assert json.loads((out / "report.json").read_text())["plan"]
        if not killed[0]:
            break
    assert n >= 4, n
    print("overwrite steps", n)


def test_second_run_refused_and_dead_lock_taken_over(tmp_path, capsys):
    """A real second process holds the lock: the run is refused and nothing is touched;
    once that process is SIGKILLed, its lock file (dead PID) is taken over."""
    recipe, out = _plain_recipe(tmp_path), tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from compresscnn.runs.rundir import RunDir
            RunDir({str(out)!r}).acquire()
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["run", str(recipe), "--out", str(out), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another run is writing it" in err[0], err
        assert f"pid {holder.pid}" in err[0]
        assert not out.exists() and not (tmp_path / "out.partial").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        assert json.loads((tmp_path / "out.lock").read_text())["pid"] == holder.pid
        assert main(args) == 0
        assert (out / MARKER).is_file() and not (tmp_path / "out.lock").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def _train_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 1, "model": {"spec": "fmnist:cnn", "weights": "DEFAULT"},
        "data": {"dataset": "fashion_mnist", "root": str(FMNIST), "train_subset": 64,
                 "test_subset": 50, "batch_size": 32, "eval_batch_size": 50},
        "rules": [{"match": ["conv2", "conv3"], "method": "tucker2", "rank": 0.35}],
        "finetune": {"max_steps": 3, "checkpoint_every": 1, "log_every": 1},
        "evaluate": {"baseline": False, "zero_shot": False},
        "export": {"onnx": True}, "report": {"latency": False, "plots": True}}))
    return recipe


@needs_fmnist
def test_resume_only_with_the_same_recipe_and_modes_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        _resume_same_recipe(tmp_path, capsys)
    finally:
        os.umask(old)


def _resume_same_recipe(tmp_path: Path, capsys) -> None:
    recipe, out = _train_recipe(tmp_path), tmp_path / "out"
    args = ["run", str(recipe), "--out", str(out), "--quiet"]
    with mock.patch("compresscnn.runs.report.write_report", side_effect=KeyboardInterrupt):
        assert main(args) == 130  # interrupted after fine-tuning: the checkpoint stays
    partial = tmp_path / "out.partial"
    assert (partial / "checkpoints" / "last.pt").is_file()
    capsys.readouterr()

    assert main(args) == 2  # a plain rerun would lose it
    assert "use --resume or --overwrite" in capsys.readouterr().err
    assert main([*args, "--resume", "--set", "finetune.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "finetune.lr (0.01 -> 0.5)" in err and len(err.strip().splitlines()) == 1
    # keys that cannot change the weights may change
    assert main([*args, "--resume", "--set", "finetune.log_every=2",
                 "--set", "report.plots=false", "--set", "evaluate.max_batches=1"]) == 0
    assert json.loads((out / "report.json").read_text())["finetune"]["resumed_from_step"] == 3
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o750 if p.is_dir() else 0o640), (p, oct(mode))


@needs_fmnist
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_on_a_real_file_system(tmp_path, capsys):
    """A 2 MB tmpfs holds one checkpoint (1.4 MB) but not the next one beside it: the run
    stops with "no space left on", keeps the checkpoint, and resumes once there is room."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        recipe, out = _train_recipe(tmp_path), mnt / "out"
        args = ["run", str(recipe), "--out", str(out), "--quiet", "--set", "export.onnx=false",
                "--set", "report.plots=false"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"no space left on {mnt}/out.partial/checkpoints" in err[0]
        assert "rerun with --resume" in err[0]
        assert (mnt / "out.partial" / "checkpoints" / "last.pt").is_file()
        assert not (mnt / "out.lock").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        assert main([*args, "--resume"]) == 0
        assert (out / "model.safetensors").is_file()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
