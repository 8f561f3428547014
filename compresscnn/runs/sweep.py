"""Run the jobs of a sweep file (:mod:`compresscnn.recipe.sweep`) as a user would: each job is
one ``compresscnn run RECIPE --set ...`` in its own process (resumed with ``--resume`` when an
interrupted run left a checkpoint), and its report is summarised into ``RESULTS/<job>.json``
(command, date, commit, machine, threads, accuracy, size, timings) as soon as it lands. Jobs
whose results file exists are skipped, so a sweep can be stopped and started again, or run
by several processes on disjoint ``jobs``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from compresscnn.errors import RecipeError
from compresscnn.recipe.sweep import Sweep, SweepJob
from compresscnn.util.common import atomic_write_text

__all__ = ["run_sweep", "summarise_report", "cpu_model"]


def cpu_model() -> str:
    """The CPU's model name and core count (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores"


def _commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def summarise_report(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run's ``report.json`` that a results table needs."""
    stats = report.get("finetune") or {}
    stage = report.get("trained") or report.get("finetuned") or {}
    zero = report.get("compressed") or {}
    base = report.get("baseline") or {}
    return {
        "model": report.get("model"), "top1": stage.get("top1"), "top5": stage.get("top5"),
        "agreement": stage.get("agreement"), "baseline_top1": base.get("top1"),
        "zero_shot_top1": zero.get("top1"), "zero_shot_agreement": zero.get("agreement"),
        "params": zero.get("params"), "macs": zero.get("macs"),
        "baseline_params": base.get("params"), "baseline_macs": base.get("macs"),
        "timings": report.get("timings"), "calibration": report.get("calibration"),
        "epochs": stats.get("epochs"), "train_seconds": stats.get("seconds"),
        "images_per_s": stats.get("images_per_s"), "amp": stats.get("amp"),
        "memory_format": stats.get("memory_format"),
        "resumed_from_step": stats.get("resumed_from_step"), "curve": stats.get("curve"),
        "latency": report.get("latency"), "onnx_bytes": (report.get("onnx") or {}).get("bytes"),
        "switch": report.get("switch"), "int8": _int8_summary(report.get("int8")),
    }


def _int8_summary(int8: dict[str, Any] | None) -> dict[str, Any] | None:
    """The int8 file's figures (``export.quantize``): its size beside the fp32 file's, its
    top-1 and agreement with the original, and its check against the fp32 file."""
    if not int8:
        return None
    return {k: int8.get(k) for k in ("bytes", "fp32_bytes", "mode", "per_channel", "top1",
                                     "top5", "agreement", "n", "parity")}


def _run_job(name: str, job: SweepJob, out_root: Path, root: Path, threads: int) -> dict:
    out = out_root / name
    cmd = job.command(out)
    resume = (out_root / f"{name}.partial" / "checkpoints" / "last.pt").is_file()
    extra = ["--resume"] if resume else (["--overwrite"] if out.exists() else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compresscnn", *cmd[1:], *extra], cwd=root, env=env,
                   check=True)
    report = json.loads((out / "report.json").read_text())
    return {"job": name, "command": " ".join(cmd), "date": time.strftime("%Y-%m-%d"),
            "commit": _commit(root), "machine": cpu_model(), "threads": str(threads),
            **summarise_report(report), "wall_seconds": time.perf_counter() - t0}


def run_sweep(sweep: Sweep, jobs: Sequence[str] | None = None, *, out: str | os.PathLike,
              results: str | os.PathLike, threads: int = 2,
              root: str | os.PathLike | None = None,
              say: Callable[[str], None] = print) -> list[str]:
    """Run ``jobs`` (default: all, in the file's order) of ``sweep``; returns the jobs that
    failed (the others still run). Run folders go to ``out/<job>``, summaries to
    ``results/<job>.json``; recipe paths are relative to ``root`` (default: the cwd)."""
    names = list(sweep.jobs) if jobs is None else list(jobs)
    unknown = [n for n in names if n not in sweep.jobs]
    if unknown:
        raise RecipeError(f"sweep: no job {unknown[0]!r} (the file has {len(sweep.jobs)}: "
                          f"{', '.join(list(sweep.jobs)[:5])}, ...)")
    base, res, out_root = Path(root or Path.cwd()), Path(results), Path(out)
    failed = []
    for i, name in enumerate(names, 1):
        dest = res / f"{name}.json"
        if dest.is_file():
            say(f"[{i}/{len(names)} {name}] done already ({dest})")
            continue
        say(f"[{i}/{len(names)} {name}] running: {' '.join(sweep.jobs[name].command())}")
        try:
            row = _run_job(name, sweep.jobs[name], out_root.resolve(), base, threads)
        except subprocess.CalledProcessError as exc:
            failed.append(name)
            say(f"[{i}/{len(names)} {name}] failed (exit {exc.returncode}); running it again "
                "resumes it")
            continue
        res.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest, json.dumps(row, indent=1) + "\n")
        say(f"[{i}/{len(names)} {name}] wrote {dest}")
    return failed
