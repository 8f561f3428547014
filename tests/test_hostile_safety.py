"""Hostile inputs, round 3: inputs that live inside an output, signals, tampered run folders
and checkpoints, broken standard streams, models that cannot be compressed, oversized and
crafted images and archives, shared modules.

Each refusal asserts the exit code (or the CompressError), the one line that names what and
where, and that no byte of the user's files changed: the content of every file under the
test's folder is hashed before and after (:func:`tree_hash`). The CLI is called in process
(``compresscnn.cli.main``), on the tiny Fashion-MNIST model and a few dozen images.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import torch
import yaml
from torch import nn

import compresscnn as cc
from compresscnn.cli import main
from compresscnn.errors import CompressError
from compresscnn.runs.rundir import MARKER
from compresscnn.util.common import digest_path
from test_hostile import (FMNIST, HAVE_FMNIST, base_recipe, completed_run, interrupted_run,
                          rehash, train_recipe)

needs_data = pytest.mark.skipif(not HAVE_FMNIST, reason="needs dataset-fashion-mnist")


# --------------------------------------------------------------------------- helpers
def tree_hash(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links not followed): the sha256 of a file's bytes, a
    link's target, or "dir"."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = os.fsdecode(os.path.relpath(p, root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_recipe(path: Path, recipe: dict[str, Any] | str) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def one_line(err: str, start: str = "compresscnn: error: ") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(start) and "Traceback" not in err, lines
    return lines[0]


def refused(capsys, argv: list[str], root: Path, frags: list[str], code: int = 2) -> str:
    """Run the CLI: exit ``code``, one error line holding ``frags``, ``root`` unchanged."""
    before = tree_hash(root)
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    line = one_line(err)
    for f in frags:
        assert f in line, (f, line)
    assert tree_hash(root) == before, "a byte of the user's files changed"
    return line


def api_refused(call: Callable[[], Any], root: Path, frags: list[str]) -> str:
    before = tree_hash(root)
    with pytest.raises(CompressError) as ei:
        call()
    msg = str(ei.value)
    assert msg and "\n" not in msg, msg
    for f in frags:
        assert f in msg, (f, msg)
    assert tree_hash(root) == before
    return msg


def fm_link(folder: Path) -> Path:
    """``folder`` holding links to the four Fashion-MNIST files (a data root, made at once)."""
    folder.mkdir(parents=True)
    for f in FMNIST.iterdir():
        (folder / f.name).symlink_to(f)
    return folder


def data_recipe(root: Path | str, **data: Any) -> dict[str, Any]:
    r = base_recipe()
    r["data"] = {"dataset": "fashion_mnist", "root": str(root), "test_subset": 20,
                 "eval_batch_size": 20, **data}
    r["evaluate"]["baseline"] = True
    return r


def run_args(recipe: Path, out: Path | str, *extra: str) -> list[str]:
    return ["run", str(recipe), "--out", str(out), "--quiet", *extra]


# --------------------------------------------------------------------------- inputs vs outputs
def test_recipe_inside_the_output_it_replaces(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = completed_run(tmp_path, "o1")
    recipe = write_recipe(out / "my.yaml", base_recipe())
    refused(capsys, run_args(recipe, out, "--overwrite"), tmp_path,
            ["recipe", "my.yaml", "is inside the output", "o1"])


def test_recipe_inside_a_stale_partial(tmp_path, capsys):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / MARKER).write_text(json.dumps(
        {"format": "compresscnn.run/1", "run_id": "x", "state": "staging", "recipe": {}}))
    recipe = write_recipe(tmp_path / "out.partial" / "r.yaml", base_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["recipe", "out.partial", "is inside the output"])


def test_recipe_inside_partial_on_resume(tmp_path, capsys):
    interrupted_run(tmp_path)
    recipe = write_recipe(tmp_path / "out.partial" / "r.yaml", train_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out", "--resume"), tmp_path,
            ["recipe", "is inside the output", "out.partial"])


def test_recipe_named_like_the_lock(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "out.lock", base_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["recipe", "is the output file", "out.lock"])


@needs_data
@pytest.mark.parametrize("key", ["root", "eval", "train", "calibration"])
def test_data_root_inside_the_output(tmp_path, capsys, key):
    out = completed_run(tmp_path, "o2")
    data = fm_link(out / "mydata")
    r = data_recipe(FMNIST)
    if key == "root":
        r["data"]["root"] = str(data)
    else:
        r["data"][key] = {"root": str(data)}
    recipe = write_recipe(tmp_path / "r.yaml", r)
    refused(capsys, run_args(recipe, out, "--overwrite"), tmp_path,
            ["data." + (key if key == "root" else f"{key}.root"), "mydata",
             "is inside the output"])


def test_data_zip_inside_the_output(tmp_path, capsys):
    out = completed_run(tmp_path, "o2")
    _cifar_zip(out / "mydata.zip", {f"test/{c}/0.png": _png(32, 32)
                                    for c in ("airplane", "automobile")})
    recipe = write_recipe(tmp_path / "r.yaml", _cifar_recipe(out / "mydata.zip"))
    refused(capsys, run_args(recipe, out, "--overwrite"), tmp_path,
            ["data.root", "mydata.zip", "is inside the output", "o2"])


@needs_data
def test_output_inside_the_data_root(tmp_path, capsys):
    data = fm_link(tmp_path / "fm")
    recipe = write_recipe(tmp_path / "r.yaml", data_recipe(data))
    refused(capsys, run_args(recipe, data / "run"), tmp_path,
            ["the output", "is inside the data.root", "fm"])


def test_weights_inside_partial_and_through_a_link(tmp_path, capsys):
    from safetensors.torch import save_file
    from test_hostile import fmnist_state

    out = completed_run(tmp_path, "o3")
    save_file(fmnist_state(), str(out / "w.safetensors"))
    (tmp_path / "w-link.safetensors").symlink_to(out / "w.safetensors")
    r = base_recipe()
    r["model"]["weights"] = str(tmp_path / "w-link.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", r)
    refused(capsys, run_args(recipe, out, "--overwrite"), tmp_path,
            ["model.weights", "w-link.safetensors", "is inside the output"])


def test_relative_paths_from_another_working_directory(tmp_path, capsys, monkeypatch):
    out = completed_run(tmp_path, "o4")
    write_recipe(out / "my.yaml", base_recipe())
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deep")
    refused(capsys, ["run", "../../o4/my.yaml", "--out", "../../o4", "--overwrite", "--quiet"],
            tmp_path, ["recipe ../../o4/my.yaml", "is inside the output", "o4"])


@needs_data
def test_relative_data_root_resolved_against_the_recipe(tmp_path, capsys, monkeypatch):
    out = completed_run(tmp_path, "o5")
    fm_link(out / "fm")
    r = data_recipe("o5/fm")  # relative to the recipe's folder (tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", r)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    refused(capsys, run_args(recipe, out, "--overwrite"), tmp_path,
            ["data.root", "fm", "is inside the output"])


def test_dry_run_with_the_recipe_inside_the_output_writes_nothing(tmp_path, capsys):
    out = completed_run(tmp_path, "o6")
    recipe = write_recipe(out / "my.yaml", base_recipe())
    before = tree_hash(tmp_path)
    assert main(run_args(recipe, out, "--overwrite", "--dry-run")) == 0
    assert tree_hash(tmp_path) == before


def _compare(*args: str) -> list[str]:
    return ["compare", *args, "--no-onnx", "--no-latency", "--no-quantize", "--quiet"]


def test_compare_json_onto_its_recipe(tmp_path, capsys):
    run = completed_run(tmp_path)
    cmp = tmp_path / "cmp.yaml"
    cmp.write_text(yaml.safe_dump({"compare": [str(run)], "output": str(tmp_path / "c")}))
    refused(capsys, _compare("--recipe", str(cmp), "--json", str(cmp)), tmp_path,
            ["recipe", "cmp.yaml", "is the output file"])


def test_compare_json_into_a_run_it_reads(tmp_path, capsys):
    run = completed_run(tmp_path)
    refused(capsys, _compare(str(run), "--out", str(tmp_path / "c"), "--json",
                             str(run / "recipe.yaml")), tmp_path,
            ["recipe.yaml", "is inside the compare[0].run"])


def test_compare_output_inside_a_run(tmp_path, capsys):
    run = completed_run(tmp_path)
    refused(capsys, _compare(str(run), "--out", str(run / "cmp")), tmp_path,
            ["the output", "is inside the compare[0].run"])


def test_compare_run_inside_the_onnx_folder(tmp_path, capsys):
    run = completed_run(tmp_path / "c" / "onnx")
    refused(capsys, _compare(str(run), "--out", str(tmp_path / "c")), tmp_path,
            ["compare[0].run", "is inside the output", "onnx"])


# --------------------------------------------------------------------------- signals
def _term_then(real: Callable) -> Callable:
    """``real``, after this process got SIGTERM (the handler raises at once)."""
    def wrapped(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    return wrapped


def terminated(capsys, argv: list[str], root: Path, frags: list[str]) -> str:
    """Exit 143 and one line; the lock released; no byte of the files that were there
    before changed (a resumable ``.partial`` may be left beside them)."""
    before = tree_hash(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 143, err
    line = one_line(err, "compresscnn: terminated (SIGTERM); ")
    for f in frags:
        assert f in line, (f, line)
    after = tree_hash(root)
    assert {k: after.get(k) for k in before} == before
    assert not [k for k in after if k.endswith(".lock")], after
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    return line


_NOTHING = "nothing to resume"
_STAGES = [  # (stage, what to patch, recipe: plain or train)
    ("load_model", "compresscnn.runs.pipeline.load_model", "plain"),
    ("plan", "compresscnn.runs.pipeline.plan_compression", "plain"),
    ("compress", "compresscnn.runs.pipeline.compress", "plain"),
    ("evaluate", "compresscnn.measure.evaluation.evaluate", "train"),
    ("save", "safetensors.torch.save_file", "plain"),
    ("export", "compresscnn.runs.pipeline.export_onnx", "export"),
    ("report", "compresscnn.runs.report.write_report", "plain"),
    ("commit", "compresscnn.runs.rundir.RunDir.commit", "plain"),
]


@pytest.mark.parametrize("stage,target,kind", _STAGES, ids=[s[0] for s in _STAGES])
def test_sigterm_at_each_stage(tmp_path, capsys, stage, target, kind):
    if kind == "train" and not HAVE_FMNIST:
        pytest.skip("needs dataset-fashion-mnist")
    r = train_recipe() if kind == "train" else base_recipe()
    if kind == "train":
        r["evaluate"]["baseline"] = True
    if kind == "export":
        r["export"] = {"onnx": True}
    recipe = write_recipe(tmp_path / "r.yaml", r)
    owner, _, name = target.rpartition(".")
    import importlib

    try:
        obj = importlib.import_module(owner)
    except ImportError:
        mod, _, cls = owner.rpartition(".")
        obj = getattr(importlib.import_module(mod), cls)
    with mock.patch.object(obj, name, _term_then(getattr(obj, name))):
        terminated(capsys, run_args(recipe, tmp_path / "out"), tmp_path, [_NOTHING])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@needs_data
def test_sigterm_while_fine_tuning_keeps_a_resumable_partial(tmp_path, capsys):
    import compresscnn.train.loop as training

    r = train_recipe()
    r["finetune"]["max_steps"] = 4
    recipe = write_recipe(tmp_path / "r.yaml", r)
    real, saves = training.atomic_torch_save, []

    def save_then_term(obj, path, **kw):
        real(obj, path, **kw)
        saves.append(path)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with mock.patch.object(training, "atomic_torch_save", save_then_term):
        line = terminated(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
                          ["to continue from", "last.pt", "--resume"])
    partial = tmp_path / "out.partial"
    assert (partial / "checkpoints" / "last.pt").is_file()
    assert digest_path(partial / "checkpoints" / "last.pt").is_file()
    assert main(run_args(recipe, tmp_path / "out", "--resume")) == 0, line
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["finetune"]["resumed_from_step"] == 2 and not partial.exists()


def test_sigterm_during_compare(tmp_path, capsys):
    run = completed_run(tmp_path)
    before = tree_hash(tmp_path)
    with mock.patch("compresscnn.runs.compare.count", _term_then(cc.count)):
        assert main(_compare(str(run), "--out", str(tmp_path / "c"))) == 143
    assert one_line(capsys.readouterr().err, "compresscnn: terminated (SIGTERM)")
    assert tree_hash(tmp_path) == before


@needs_data
def test_real_sigterm_to_a_run_process(tmp_path):
    import subprocess
    import time

    r = train_recipe()
    r["finetune"].update(max_steps=2000, checkpoint_every=1)
    recipe = write_recipe(tmp_path / "r.yaml", r)
    ck = tmp_path / "out.partial" / "checkpoints" / "last.pt"
    cmd = [sys.executable, "-m", "compresscnn", *run_args(recipe, tmp_path / "out")]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ck.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    line = one_line(err, "compresscnn: terminated (SIGTERM); to continue from ")
    assert "--resume" in line
    assert ck.is_file() and not (tmp_path / "out.lock").exists()


# --------------------------------------------------------------------------- integrity: resume
def _flip_bit(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


@needs_data
def test_resume_refuses_a_checkpoint_with_one_bit_flipped(tmp_path, capsys):
    ck = interrupted_run(tmp_path)
    _flip_bit(ck)
    recipe = write_recipe(tmp_path / "r.yaml", train_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out", "--resume"), tmp_path,
            ["last.pt", "does not match the sha256", "last.pt.sha256"])


@needs_data
def test_resume_refuses_a_truncated_checkpoint(tmp_path, capsys):
    ck = interrupted_run(tmp_path)
    ck.write_bytes(ck.read_bytes()[:-100])
    recipe = write_recipe(tmp_path / "r.yaml", train_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out", "--resume"), tmp_path,
            ["last.pt", "corrupt or was replaced"])


@needs_data
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    """``last.pt`` copied from another interrupted run (same model, other weights) without
    its digest file: the digest beside it names the file that was written there."""
    ck = interrupted_run(tmp_path)
    state = torch.load(ck, weights_only=True)
    state["model"]["fc2.bias"] = state["model"]["fc2.bias"] + 1
    torch.save(state, ck)
    recipe = write_recipe(tmp_path / "r.yaml", train_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out", "--resume"), tmp_path,
            ["last.pt", "does not match the sha256"])


@needs_data
def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    """A checkpoint of another architecture with a matching digest (copied with its digest
    file): the weights are checked against the model."""
    from compresscnn.io.models import load_model

    ck = interrupted_run(tmp_path)
    state = torch.load(ck, weights_only=True)
    state["model"] = load_model("cifar:resnet20", None).state_dict()
    torch.save(state, ck)
    rehash(ck)
    recipe = write_recipe(tmp_path / "r.yaml", train_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out", "--resume"), tmp_path,
            ["last.pt", "does not match the model", "missing"])


@needs_data
def test_resume_refuses_a_damaged_digest_file(tmp_path, capsys):
    ck = interrupted_run(tmp_path)
    digest_path(ck).write_text("not a hash\n")
    recipe = write_recipe(tmp_path / "r.yaml", train_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out", "--resume"), tmp_path,
            ["last.pt.sha256", "not a sha256 digest file"])


@needs_data
def test_resume_refuses_an_edited_marker(tmp_path, capsys):
    interrupted_run(tmp_path)
    marker = tmp_path / "out.partial" / MARKER
    info = json.loads(marker.read_text())
    info["recipe"]["finetune.lr"] = 0.5
    marker.write_text(json.dumps(info))
    recipe = write_recipe(tmp_path / "r.yaml", train_recipe())
    refused(capsys, run_args(recipe, tmp_path / "out", "--resume"), tmp_path,
            ["--resume", MARKER, "edited after the run wrote it"])


@needs_data
def test_resume_without_a_digest_file_reads_it_with_a_warning(tmp_path, capsys):
    ck = interrupted_run(tmp_path)
    digest_path(ck).unlink()
    recipe = write_recipe(tmp_path / "r.yaml", train_recipe())
    assert main(run_args(recipe, tmp_path / "out", "--resume")) == 0
    err = capsys.readouterr().err
    assert "last.pt.sha256" in err and "without checking" in err, err


@needs_data
def test_recipe_edited_between_resumes_only_in_comments(tmp_path, capsys):
    interrupted_run(tmp_path)
    text = "# resumed on a Tuesday\n" + yaml.safe_dump(train_recipe()).replace(
        "\n", "  # note\n", 3)
    recipe = write_recipe(tmp_path / "r.yaml", text)
    assert main(run_args(recipe, tmp_path / "out", "--resume")) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- integrity: run folders
def _load(run: Path) -> Callable[[], Any]:
    return lambda: cc.load_compressed(run)


def test_run_folder_records_the_hashes(tmp_path):
    from compresscnn.util.common import sha256_file

    run = completed_run(tmp_path)
    info = json.loads((run / MARKER).read_text())
    for name in ("recipe.yaml", "model.safetensors"):
        assert info["files"][name]["sha256"] == sha256_file(run / name)
    assert len(info["sha256"]) == 64


def test_load_refuses_a_recipe_whose_content_changed(tmp_path):
    run = completed_run(tmp_path)
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    r["rules"][0]["rank"] = [8, 8]
    (run / "recipe.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    api_refused(_load(run), tmp_path, ["recipe.yaml", "edited after the run wrote it",
                                       "restore it"])


def test_load_refuses_a_recipe_whose_model_changed(tmp_path):
    run = completed_run(tmp_path)
    text = (run / "recipe.yaml").read_text().replace("fmnist:cnn", "cifar:resnet20")
    (run / "recipe.yaml").write_text(text)
    api_refused(_load(run), tmp_path, ["recipe.yaml", "edited after the run wrote it"])


@pytest.mark.parametrize("edit", ["comment", "layout", "key_order"])
def test_load_accepts_a_recipe_edited_only_in_form_with_a_warning(tmp_path, caplog, edit):
    run = completed_run(tmp_path)
    path = run / "recipe.yaml"
    r = yaml.safe_load(path.read_text())
    if edit == "comment":
        path.write_text("# my best run\n" + path.read_text())
    elif edit == "layout":
        path.write_text(yaml.safe_dump(r, sort_keys=False, default_flow_style=True))
    else:
        path.write_text(yaml.safe_dump(dict(reversed(list(r.items()))), sort_keys=False))
    before = tree_hash(tmp_path)
    with caplog.at_level("WARNING", logger="compresscnn"):
        model = cc.load_compressed(run)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert any("only in comments, layout or key order" in m for m in caplog.messages)
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("how", ["bit_flip", "truncated", "other_run"])
def test_load_refuses_weights_that_do_not_match(tmp_path, how):
    from safetensors.torch import load_file, save_file

    run = completed_run(tmp_path)
    w = run / "model.safetensors"
    if how == "bit_flip":
        _flip_bit(w, 0.9)
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[:-10])
    else:  # the same architecture's weights, other values
        sd = load_file(str(w))
        sd["fc2.bias"] = sd["fc2.bias"] * 2
        save_file(sd, str(w))
    api_refused(_load(run), tmp_path, ["model.safetensors", "does not match the sha256",
                                       MARKER])


def test_load_refuses_an_edited_manifest(tmp_path):
    run = completed_run(tmp_path)
    info = json.loads((run / MARKER).read_text())
    info["files"]["model.safetensors"]["sha256"] = "0" * 64
    (run / MARKER).write_text(json.dumps(info))
    api_refused(_load(run), tmp_path, [MARKER, "edited after the run wrote it"])


def test_load_refuses_a_garbage_manifest(tmp_path):
    run = completed_run(tmp_path)
    (run / MARKER).write_text("{not json")
    api_refused(_load(run), tmp_path, [MARKER, "not a compresscnn run marker"])


def test_load_without_a_manifest_warns(tmp_path, caplog):
    run = completed_run(tmp_path)
    (run / MARKER).unlink()
    with caplog.at_level("WARNING", logger="compresscnn"):
        cc.load_compressed(run)
    assert any("loaded unchecked" in m for m in caplog.messages)


def test_compare_refuses_a_tampered_run(tmp_path, capsys):
    run = completed_run(tmp_path)
    _flip_bit(run / "model.safetensors", 0.9)
    refused(capsys, _compare(str(run), "--out", str(tmp_path / "c")), tmp_path,
            ["model.safetensors", "does not match the sha256"])


def test_digest_survives_a_crash_between_file_and_digest(tmp_path):
    """While a checkpoint replaces the previous one, its digest file lists both: a crash
    before or after the rename leaves a file whose hash is listed."""
    from compresscnn.util.common import atomic_torch_save, check_digest

    path = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.zeros(3)}, path, digest=True)
    old = path.read_bytes()
    with mock.patch("os.replace", side_effect=OSError(5, "Input/output error")):
        with pytest.raises(OSError):
            atomic_torch_save({"a": torch.ones(3)}, path, digest=True)
    assert path.read_bytes() == old and check_digest(path)
    atomic_torch_save({"a": torch.ones(3)}, path, digest=True)
    assert check_digest(path) and len(digest_path(path).read_text().splitlines()) == 1


# --------------------------------------------------------------------------- standard streams
class _Broken(io.TextIOBase):
    def __init__(self, err: OSError) -> None:
        self.err = err

    def write(self, s: str) -> int:
        raise self.err

    def flush(self) -> None:
        raise self.err


@pytest.mark.parametrize("err", [OSError(28, "No space left on device"),
                                 BrokenPipeError(32, "Broken pipe")], ids=["full", "pipe"])
def test_broken_stdout_is_not_a_full_disk(tmp_path, capsys, err):
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe())
    before = tree_hash(tmp_path)
    with mock.patch.object(sys, "stdout", _Broken(err)):
        code = main(run_args(recipe, tmp_path / "out"))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "standard output" in line and err.strerror in line, line
    assert "no space left on" not in line and "out.partial" not in line
    assert tree_hash(tmp_path) == before


def test_broken_stdout_of_compare(tmp_path, capsys):
    run = completed_run(tmp_path)
    with mock.patch.object(sys, "stdout", _Broken(OSError(28, "No space left on device"))):
        code = main(_compare(str(run), "--out", str(tmp_path / "c")))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "standard output" in line


def test_broken_stderr_does_not_stop_the_run(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe())
    with mock.patch.object(sys, "stderr", _Broken(OSError(28, "No space left on device"))):
        code = main(["run", str(recipe), "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_broken_stderr_and_a_bad_recipe_still_exit_2(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "seed: [\n")
    before = tree_hash(tmp_path)
    with mock.patch.object(sys, "stderr", _Broken(BrokenPipeError(32, "Broken pipe"))):
        assert main(run_args(recipe, tmp_path / "out")) == 2
    assert tree_hash(tmp_path) == before


# --------------------------------------------------------------------------- unsupported models
def _fm() -> nn.Module:
    from compresscnn.io.models import load_model

    return load_model("fmnist:cnn", None).eval()


_RULES = [{"match": "conv2", "method": "tucker2", "rank": 4}]
_UNSUPPORTED = {
    "scripted": (lambda: torch.jit.script(_fm()), "TorchScript"),
    "traced": (lambda: torch.jit.trace(_fm(), torch.zeros(1, 1, 28, 28)), "TorchScript"),
    "fx": (lambda: torch.fx.symbolic_trace(_fm()), "torch.fx GraphModule"),
    "quantized_dynamic": (lambda: torch.ao.quantization.quantize_dynamic(
        _fm(), {nn.Linear}, dtype=torch.qint8), "quantized modules"),
    "not_a_module": (lambda: {"conv2.weight": torch.zeros(3)}, "expected a torch.nn.Module"),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", list(_UNSUPPORTED))
@pytest.mark.parametrize("api", ["compress", "plan", "count"])
def test_unsupported_models_get_their_own_refusal(tmp_path, kind, api):
    make, frag = _UNSUPPORTED[kind]
    model = make()
    call = {"compress": lambda: cc.compress(model, _RULES, (1, 28, 28)),
            "plan": lambda: cc.plan(model, _RULES, (1, 28, 28)),
            "count": lambda: cc.count(model, (1, 28, 28))}[api]
    msg = api_refused(call, tmp_path, [frag])
    assert "matches no" not in msg


def test_export_onnx_onto_a_folder(tmp_path):
    (tmp_path / "adir").mkdir()
    api_refused(lambda: cc.export_onnx(_fm(), tmp_path / "adir", (1, 28, 28)), tmp_path,
                ["adir", "is a folder", "model.onnx"])


def test_export_onnx_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("mine")
    api_refused(lambda: cc.export_onnx(_fm(), tmp_path / "afile" / "m.onnx", (1, 28, 28)),
                tmp_path, ["afile", "is a file, not a folder"])


# --------------------------------------------------------------------------- shared modules
class Aliased(nn.Module):
    """``b`` is ``a`` under another name."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = self.a
        self.c = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


class Twice(nn.Module):
    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.a(nn.functional.max_pool2d(y, 2) if self.pool else y)


@pytest.mark.parametrize("pattern", ["a", "b"])
def test_a_module_under_two_names_stays_shared(pattern):
    torch.manual_seed(0)
    m = Aliased().eval()
    new, p = cc.compress(m, [{"match": pattern, "method": "tucker2", "rank": 16}], (16, 8, 8))
    assert new.a is new.b and not isinstance(new.b, nn.Conv2d)
    assert [r.name for r in p.replacements if r.applied] == ["a"]
    assert p.replacements[0].aliases == ("b",)
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(new(x), m(x), atol=1e-4)  # full rank: the same function
    assert p.macs_after == cc.count(new, (16, 8, 8))["macs"]


def test_excluding_an_alias_keeps_the_shared_module_dense():
    with pytest.raises(CompressError, match="matches no"):
        cc.compress(Aliased(), [{"match": "a", "exclude": "b", "method": "tucker2",
                                 "rank": 4}], (16, 8, 8))


def test_a_layer_called_twice_is_priced_twice():
    m = Twice().eval()
    new, p = cc.compress(m, [{"match": "a", "method": "tucker2", "rank": 8}], (16, 8, 8))
    assert p.replacements[0].calls == 2
    assert p.total_macs == cc.count(m, (16, 8, 8))["macs"]
    assert p.macs_after == cc.count(new, (16, 8, 8))["macs"]
    new, p = cc.compress(m, [{"match": "a", "method": "tucker2", "rank": 8}], (16, 8, 8),
                         calibration=[torch.randn(4, 16, 8, 8)])
    assert p.macs_after == cc.count(new, (16, 8, 8))["macs"]
    assert "output_error" not in p.replacements[0].fit  # no one output to fit


def test_a_layer_called_on_two_shapes_stays_dense():
    _, p = cc.compress(Twice(pool=True), [{"match": "a", "method": "tucker2", "rank": 8}],
                       (16, 8, 8))
    assert not p.replacements[0].applied
    assert "different shapes" in p.replacements[0].skipped


def test_compress_leaves_the_callers_model_as_it_was():
    torch.manual_seed(0)
    m = _fm().train()
    m.bn1.eval()
    m.conv1.weight.requires_grad_(False)
    m.conv2.register_forward_hook(lambda *a: None)

    def state():
        return ({k: v.clone() for k, v in m.state_dict().items()},
                {n: x.training for n, x in m.named_modules()},
                {n: q.requires_grad for n, q in m.named_parameters()},
                {n: (list(x._forward_hooks), list(x._forward_pre_hooks))
                 for n, x in m.named_modules()})
    before = state()
    cal = [torch.randn(2, 1, 28, 28)]
    cc.compress(m, [{"match": ["conv2", "conv3"], "method": "tucker2", "rank": 0.5}], (1, 28, 28), calibration=cal, config={"fit": {"bn_recalibrate": True, "distill": {"epochs": 1, "holdout": 0}}})
    after = state()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


# --------------------------------------------------------------------------- images and archives
def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header says ``w`` x ``h`` and whose pixel data is a few bytes: decoding
    it would fail (or allocate w*h*3 bytes); its size is known from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _cifar_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _cifar_recipe(root: Path, **data: Any) -> dict[str, Any]:
    r = base_recipe()
    r["model"] = {"spec": "cifar:resnet20", "weights": None}
    r["rules"] = [{"match": "layer1.0.conv1", "method": "tucker2", "rank": 8}]
    r["data"] = {"dataset": "cifar10", "root": str(root), "eval_batch_size": 4, **data}
    r["evaluate"]["baseline"] = True
    return r


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_size_checked_before_decoding(tmp_path, capsys):
    z = _cifar_zip(tmp_path / "big.zip", {"test/airplane/0.png": _png_header_only(12000, 12000)})
    recipe = write_recipe(tmp_path / "r.yaml", _cifar_recipe(z))
    with mock.patch("PIL.Image.Image.convert", side_effect=AssertionError("decoded")):
        refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
                ["big.zip", "0.png", "12000x12000", "144,000,000 pixels",
                 "data.max_image_pixels (50,000,000)", "before decoding"])


def test_image_size_limit_is_a_recipe_key(tmp_path, capsys):
    z = _cifar_zip(tmp_path / "d.zip", {"test/airplane/0.png": _png(32, 32)})
    recipe = write_recipe(tmp_path / "r.yaml", _cifar_recipe(z, max_image_pixels=1000))
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["0.png", "32x32 (1,024 pixels)", "data.max_image_pixels (1,000)"])


def test_image_larger_than_pil_decodes(tmp_path, capsys):
    z = _cifar_zip(tmp_path / "huge.zip",
                   {"test/airplane/0.png": _png_header_only(60000, 60000)})
    recipe = write_recipe(tmp_path / "r.yaml", _cifar_recipe(z, max_image_pixels=10 ** 10))
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["0.png", "larger than PIL decodes", "before decoding"])


def test_zip_bomb_member_refused_unread(tmp_path, capsys):
    z = _cifar_zip(tmp_path / "bomb.zip", {"test/airplane/0.png": b"\0" * (3 << 20)})
    assert z.stat().st_size < 20_000
    recipe = write_recipe(tmp_path / "r.yaml", _cifar_recipe(z, max_image_pixels=1000))
    with mock.patch("zipfile.ZipFile.read", side_effect=AssertionError("read")):
        refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
                ["bomb.zip", "0.png", "would decompress to 3,145,728 bytes", "refused unread"])


def _fm_folder(folder: Path, *, labels: bytes | None = None,
               images: bytes | None = None) -> Path:
    folder.mkdir()
    for f in FMNIST.iterdir():
        (folder / f.name).symlink_to(f)
    if labels is not None:
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    if images is not None:
        (folder / "t10k-images-idx3-ubyte.gz").unlink()
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    return folder


@needs_data
def test_labels_out_of_range(tmp_path, capsys):
    raw = bytearray(gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[8 + 5] = 12
    d = _fm_folder(tmp_path / "fm", labels=bytes(raw))
    recipe = write_recipe(tmp_path / "r.yaml", data_recipe(d))
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["t10k-labels-idx1-ubyte.gz", "label 12 of image 5", "out of range"])


@needs_data
def test_idx_gzip_bomb_refused_from_its_header(tmp_path, capsys):
    head = struct.pack(">IIII", 0x00000803, 10_000_000, 28, 28)
    d = _fm_folder(tmp_path / "fm", images=head + b"\0" * 4096)
    recipe = write_recipe(tmp_path / "r.yaml", data_recipe(d))
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["t10k-images-idx3-ubyte.gz", "declares 7,840,000,000 bytes"])


@needs_data
def test_idx_with_more_data_than_declared(tmp_path, capsys):
    raw = gzip.decompress((FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    d = _fm_folder(tmp_path / "fm", images=raw + b"\0" * 1000)
    recipe = write_recipe(tmp_path / "r.yaml", data_recipe(d))
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["t10k-images-idx3-ubyte.gz", "found more"])


# --------------------------------------------------------------------------- non-UTF-8 names
def _bytes_path(base: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(base) + b"/" + name))


def test_non_utf8_recipe_name_in_the_error(tmp_path, capsys):
    recipe = _bytes_path(tmp_path, b"r\xff.yaml")
    r = base_recipe()
    r["fine_tune"] = {}
    write_recipe(recipe, r)
    line = refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
                   ["fine_tune", "unknown key"])
    assert "r" in line


def test_non_utf8_output_folder_runs_and_loads(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe())
    out = _bytes_path(tmp_path, b"out\xff")
    assert main(run_args(recipe, out)) == 0, capsys.readouterr().err
    assert cc.load_compressed(out)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_non_utf8_image_name_in_a_data_folder(tmp_path, capsys):
    root = tmp_path / "c10"
    (root / "test" / "airplane").mkdir(parents=True)
    bad = _bytes_path(root / "test" / "airplane", b"\xff\xfe.png")
    bad.write_bytes(b"not an image")
    recipe = write_recipe(tmp_path / "r.yaml", _cifar_recipe(root))
    refused(capsys, run_args(recipe, tmp_path / "out"), tmp_path,
            ["c10", "cannot decode image", ".png"])


def test_corpus_size() -> None:
    """At least 60 cases in this file (parametrized cases counted one by one)."""
    import inspect

    mod = sys.modules[__name__]
    n = 0
    for name, fn in inspect.getmembers(mod, inspect.isfunction):
        if not name.startswith("test_") or name == "test_corpus_size":
            continue
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        k = 1
        for m in marks:
            k *= len(m.args[1])
        n += k
    assert n >= 60, n
