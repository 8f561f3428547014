"""CLI conventions: --version, -v/--quiet, progress off a terminal, stage lines in execution
order, the plan on stdout, and a Ctrl-C message that says how to resume."""

from __future__ import annotations

import io
import re
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import compresscnn
from compresscnn.util import progress as progress
from compresscnn.cli import main
from compresscnn.io.data import CIFAR10_CLASSES


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    """cifar:resnet20 (random init) on 4 train + 4 test 32x32 images, with calibration,
    two fine-tuning steps and the ONNX export."""
    d = tmp_path_factory.mktemp("tiny")
    rng = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(d / "c.zip", "w") as zf:
        for split in ("train", "test"):
            for c in CIFAR10_CLASSES[:2]:
                for i in range(2):
                    arr = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(arr.numpy()).save(buf, format="PNG")
                    zf.writestr(f"{split}/{c}/{i}.png", buf.getvalue())
    r = d / "r.yaml"
    r.write_text(f"""\
model: {{spec: "cifar:resnet20"}}
data: {{dataset: cifar10, root: {d / 'c.zip'}, batch_size: 4, eval_batch_size: 1}}
calibration: {{batches: 1, batch_size: 4, steps: 40}}
rules: [{{match: "layer1.*.conv*", method: tucker2, rank: 4}}]
finetune: {{max_steps: 2, lr: 0.001}}
report: {{latency: false, plots: false}}
""")
    return r


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"compresscnn {compresscnn.__version__}"


def test_verbose_and_quiet_flags(tiny_recipe: Path, capsys) -> None:
    for argv in (["-v", "run", str(tiny_recipe), "--dry-run"],
                 ["run", str(tiny_recipe), "--dry-run", "--verbose"],
                 ["--quiet", "run", str(tiny_recipe), "--dry-run"]):
        assert main(argv) == 0, argv
    capsys.readouterr()
    assert main(["-v", "run", str(tiny_recipe), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^\[plan\] done in ", err, re.M)  # -v: how long every stage took
    assert main(["--quiet", "run", str(tiny_recipe), "--dry-run"]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as info:
        main(["-v", "run", str(tiny_recipe), "--dry-run", "--quiet"])
    assert info.value.code == 2


STAGES = ["load_model", "plan", "load_data", "evaluate_baseline", "compress",
          "evaluate_compressed", "finetune", "evaluate_finetuned", "export_onnx"]


def test_stage_lines_plan_and_progress(tiny_recipe: Path, tmp_path: Path, capsys,
                                       monkeypatch) -> None:
    """Off a terminal (pytest's captured stderr), long stages still print a line at least
    every progress.INTERVAL seconds; each stage announces itself when it starts, so the lines
    come in execution order; the plan goes to stdout as in a dry run."""
    monkeypatch.setattr(progress, "INTERVAL", 0.05)
    import compresscnn.measure.evaluation as E

    real = E.evaluate

    def slow_evaluate(model, loader, **kw):  # make each batch outlast the interval
        class Slow:
            def __init__(self, inner):
                self.inner, self.dataset = inner, inner.dataset

            def __len__(self):
                return len(self.inner)

            def __iter__(self):
                for b in self.inner:
                    time.sleep(0.06)
                    yield b
        return real(model, Slow(loader), **kw)

    monkeypatch.setattr(E, "evaluate", slow_evaluate)
    out = tmp_path / "run"
    assert main(["run", str(tiny_recipe), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "layer1.0.conv1" in cap.out and "MACs" in cap.out  # the plan, on stdout
    assert f"wrote {out}" in cap.out
    tags = re.findall(r"^\[(\w+)\]", cap.err, re.M)
    first = [t for t in dict.fromkeys(tags) if t != "eval"]  # eval: the evaluations' progress
    assert first == STAGES, first
    assert re.search(r"^\[eval\] \d+/4 batches \(\d+%\), ", cap.err, re.M)  # line fallback
    # the timings table of report.md lists the stages in the same order
    md = (out / "report.md").read_text()
    rows = re.findall(r"^\| (\w+) \| [\d.]+ \|$", md, re.M)
    assert [r for r in rows if r in STAGES] == STAGES


def test_heartbeat_in_a_silent_stage(monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "INTERVAL", 0.05)
    timings: dict[str, float] = {}
    with progress.timed(timings, "calibrate", "8 batches"):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[calibrate] 8 batches"
    assert sum(line.startswith("[calibrate] still running, ") for line in err) >= 2
    assert err[-1].startswith("[calibrate] done in ") and timings["calibrate"] >= 0.3
    with progress.timed(timings, "plan", quiet=True):
        time.sleep(0.2)
    assert capsys.readouterr().err == ""


def test_ctrl_c_says_how_to_resume(tiny_recipe: Path, tmp_path: Path, capsys,
                                   monkeypatch) -> None:
    import compresscnn.runs.pipeline as P

    out = tmp_path / "run"

    def interrupted(recipe, *, out, **kw):
        ck = Path(str(out) + ".partial") / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "last.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "run", interrupted)
    argv = ["run", str(tiny_recipe), "--out", str(out), "--set", "finetune.lr=0.002"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert err[0].endswith(f"run: compresscnn run {tiny_recipe} --out {out} --set "
                           f"finetune.lr=0.002 --resume")

    def early(recipe, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "run", early)
    assert main(["run", str(tiny_recipe), "--out", str(tmp_path / "other")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to resume" in err[0] and "--resume" not in err[0]
