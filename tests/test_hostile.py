"""Hostile inputs: every bad recipe, file, checkpoint, dataset or output path is refused with
exit code 2, exactly one line on stderr (``compresscnn: error: ...``) naming what and where,
and nothing written (neither the run directory nor ``<out>.partial``). Internal errors exit 1,
with a traceback only under ``--debug``.

Each case builds its bad input in ``tmp_path`` and runs ``compresscnn.cli.main`` in process.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from safetensors.torch import save_file

from compresscnn.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = (FMNIST / "t10k-images-idx3-ubyte.gz").is_file()


def base_recipe() -> dict[str, Any]:
    """A valid, fast recipe: plan + save only (no data, no fine-tuning, no export)."""
    return {
        "name": "hostile",
        "seed": 0,
        "model": {"spec": "fmnist:cnn", "weights": "DEFAULT"},
        "rules": [{"match": ["conv2", "conv3"], "method": "tucker2", "rank": 0.35},
                  {"match": "fc1", "method": "svd", "rank": 0.25}],
        "finetune": {"enabled": False},
        "evaluate": {"baseline": False, "zero_shot": False},
        "export": {"onnx": False},
        "report": {"latency": False, "plots": False},
    }


def with_data(r: dict[str, Any], root: str, dataset: str = "fashion_mnist") -> dict[str, Any]:
    """Evaluate the original model on ``root`` (so the data is read)."""
    r["data"] = {"dataset": dataset, "root": root, "test_subset": 50, "eval_batch_size": 50}
    r["evaluate"]["baseline"] = True
    return r


def fmnist_state() -> dict[str, torch.Tensor]:
    from compresscnn.models import load_model

    return {k: v.clone().contiguous()
            for k, v in load_model("fmnist:cnn", "DEFAULT").state_dict().items()}


class Evil:
    """Unpickling this runs ``os.system``: weights_only=True must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- the corpus
# Each case: tmp_path -> (argv after "run RECIPE", recipe dict or raw text, expected
# fragments of the error line). ``RECIPE`` in argv is replaced by the recipe's path.

Case = Callable[[Path], tuple[list[str], Any, list[str]]]
CASES: dict[str, Case] = {}


def case(name: str, needs_data: bool = False):
    def deco(fn: Case) -> Case:
        CASES[name] = pytest.param(fn, id=name, marks=[pytest.mark.skipif(
            needs_data and not HAVE_FMNIST, reason="needs dataset-fashion-mnist")])
        return fn
    return deco


# ---- recipe files and YAML
@case("yaml_malformed")
def _(t):
    return [], "model: {spec: 'fmnist:cnn'\nrules: [\n", ["recipe.yaml:2:", "invalid YAML"]


@case("yaml_tab_indent")
def _(t):
    return [], "model:\n\tspec: fmnist:cnn\n", ["invalid YAML"]


@case("yaml_duplicate_key")
def _(t):
    return [], "seed: 1\nseed: 2\n", ["seed", "duplicate key"]


@case("yaml_not_a_mapping")
def _(t):
    return [], "- just\n- a list\n", ["expected a mapping"]


@case("yaml_not_utf8")
def _(t):
    return [], b"\xff\xfe\x00bad", ["not UTF-8"]


@case("recipe_missing")
def _(t):
    return ["--out", str(t / "out")], None, ["nope.yaml", "file not found"]


@case("recipe_is_directory")
def _(t):
    (t / "dir.yaml").mkdir()
    return [], "DIR", ["dir.yaml", "is a directory"]


# ---- unknown keys at every level
@case("unknown_top_key")
def _(t):
    r = base_recipe()
    r["fine_tune"] = {}
    return [], r, ["fine_tune", "unknown key"]


@case("unknown_model_key")
def _(t):
    r = base_recipe()
    r["model"]["wieghts"] = "DEFAULT"
    return [], r, ["model.wieghts", "unknown key"]


@case("unknown_rule_key")
def _(t):
    r = base_recipe()
    r["rules"][1]["rnak"] = 4
    return [], r, ["rules[1].rnak", "unknown key"]


@case("unknown_nested_key")
def _(t):
    r = base_recipe()
    r["finetune"]["distill"] = {"temp": 3}
    return [], r, ["finetune.distill.temp", "unknown key"]


@case("unknown_key_in_set")
def _(t):
    return ["--set", "finetune.epohcs=3"], base_recipe(), ["finetune.epohcs", "unknown key"]


# ---- wrong types
@case("type_epochs_string")
def _(t):
    r = base_recipe()
    r["finetune"]["epochs"] = "three"
    return [], r, ["finetune.epochs", "'three'"]


@case("type_batch_size_float")
def _(t):
    r = base_recipe()
    r["data"] = {"dataset": "fashion_mnist", "batch_size": 1.5}
    return [], r, ["data.batch_size", "1.5"]


@case("type_rules_not_list")
def _(t):
    r = base_recipe()
    r["rules"] = "conv2"
    return [], r, ["rules", "expected a list"]


@case("type_model_spec_int")
def _(t):
    r = base_recipe()
    r["model"]["spec"] = 42
    return [], r, ["model.spec", "42"]


@case("unknown_model_spec")
def _(t):
    r = base_recipe()
    r["model"]["spec"] = "fmnist:resnet"
    return [], r, ["fmnist", "resnet"]


# ---- ranks and fractions
@case("rank_zero")
def _(t):
    r = base_recipe()
    r["rules"][1]["rank"] = 0
    return [], r, ["rules[1].rank", "0"]


@case("rank_negative")
def _(t):
    r = base_recipe()
    r["rules"][1]["rank"] = -1
    return [], r, ["rules[1].rank", "-1"]


@case("rank_too_large")
def _(t):
    r = base_recipe()
    r["rules"][1]["rank"] = 100000
    return [], r, ["rules[1] (fc1)", "100000", "exceeds"]


@case("rank_list_too_large")
def _(t):
    r = base_recipe()
    r["rules"][0]["rank"] = [16, 999]
    return [], r, ["rules[0] (conv2)", "999", "exceeds"]


@case("rank_fraction_over_one")
def _(t):
    r = base_recipe()
    r["rules"][1]["rank"] = 1.5
    return [], r, ["rules[1].rank", "1.5"]


@case("rank_word")
def _(t):
    r = base_recipe()
    r["rules"][1]["rank"] = "half"
    return [], r, ["rules[1].rank", "half"]


@case("energy_zero")
def _(t):
    r = base_recipe()
    del r["rules"][1]["rank"]
    r["rules"][1]["energy"] = 0.0
    return [], r, ["rules[1].energy", "0"]


@case("macs_fraction_over_one")
def _(t):
    r = base_recipe()
    del r["rules"][0]["rank"]
    r["rules"][0]["macs"] = 1.2
    return [], r, ["rules[0].macs", "1.2"]


@case("target_negative")
def _(t):
    r = base_recipe()
    r["target"] = {"params": -0.5}
    for rule in r["rules"]:
        del rule["rank"]
    return [], r, ["target", "-0.5"]


# ---- patterns and methods
@case("pattern_matches_nothing")
def _(t):
    r = base_recipe()
    r["rules"][0]["match"] = "layer9.*"
    return [], r, ["rules[0].match", "layer9.*", "matches no"]


@case("tucker2_on_linear")
def _(t):
    r = base_recipe()
    r["rules"][1]["method"] = "tucker2"
    return [], r, ["rules[1]", "tucker2", "Linear"]


@case("cp_on_linear")
def _(t):
    r = base_recipe()
    r["rules"][1]["method"] = "cp"
    return [], r, ["rules[1]", "cp", "Linear"]


@case("rank_list_wrong_length")
def _(t):
    r = base_recipe()
    r["rules"][0]["rank"] = [8, 8, 8]
    return [], r, ["rules[0].rank", "tucker2"]


@case("unknown_method")
def _(t):
    r = base_recipe()
    r["rules"][0]["method"] = "tuker2"
    return [], r, ["rules[0].method", "tuker2"]


# ---- weights files
def _weights_case(t: Path, make: Callable[[Path], Path], frags: list[str]):
    path = make(t)
    r = base_recipe()
    r["model"]["weights"] = str(path)
    return [], r, [path.name, *frags]


@case("weights_missing")
def _(t):
    return _weights_case(t, lambda t: t / "absent.pt", ["not found"])


@case("weights_unreadable_directory")
def _(t):
    def make(t):
        (t / "w.pt").mkdir()
        return t / "w.pt"
    return _weights_case(t, make, ["not a file"])


@case("weights_empty_file")
def _(t):
    def make(t):
        (t / "empty.pt").write_bytes(b"")
        return t / "empty.pt"
    return _weights_case(t, make, ["empty"])


@case("weights_truncated")
def _(t):
    def make(t):
        buf = io.BytesIO()
        torch.save(fmnist_state(), buf)
        (t / "trunc.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        return t / "trunc.pt"
    return _weights_case(t, make, ["truncated or corrupt"])


@case("weights_garbage")
def _(t):
    def make(t):
        (t / "noise.pth").write_bytes(bytes(range(256)) * 40)
        return t / "noise.pth"
    return _weights_case(t, make, ["corrupt"])


@case("weights_truncated_safetensors")
def _(t):
    def make(t):
        save_file(fmnist_state(), str(t / "w.safetensors"))
        data = (t / "w.safetensors").read_bytes()
        (t / "w.safetensors").write_bytes(data[: len(data) - 1000])
        return t / "w.safetensors"
    return _weights_case(t, make, ["safetensors", "corrupt"])


@case("weights_other_architecture")
def _(t):
    def make(t):
        from compresscnn.models import load_model

        torch.save(load_model("cifar:resnet20", None).state_dict(), t / "resnet20.th")
        return t / "resnet20.th"
    return _weights_case(t, make, ["does not match", "fmnist:cnn", "missing"])


@case("weights_wrong_shape")
def _(t):
    def make(t):
        sd = fmnist_state()
        sd["fc2.weight"] = torch.zeros(7, sd["fc2.weight"].shape[1])
        sd["fc2.bias"] = torch.zeros(7)
        torch.save(sd, t / "shape.pt")
        return t / "shape.pt"
    return _weights_case(t, make, ["fc2", "shape"])


@case("weights_nan")
def _(t):
    def make(t):
        sd = fmnist_state()
        sd["conv2.weight"][0, 0, 0, 0] = math.nan
        torch.save(sd, t / "nan.pt")
        return t / "nan.pt"
    return _weights_case(t, make, ["conv2.weight", "NaN"])


@case("weights_inf")
def _(t):
    def make(t):
        sd = fmnist_state()
        sd["fc1.bias"][3] = math.inf
        save_file(sd, str(t / "inf.safetensors"))
        return t / "inf.safetensors"
    return _weights_case(t, make, ["fc1.bias", "Inf"])


@case("weights_pickle_executes_code")
def _(t):
    def make(t):
        with open(t / "evil.pt", "wb") as f:
            pickle.dump({"conv1.weight": Evil(t / "PWNED")}, f, protocol=2)
        return t / "evil.pt"
    return _weights_case(t, make, ["refused as unsafe", "system", "weights_only=True"])


@case("weights_pickle5_executes_code")
def _(t):
    def make(t):
        with open(t / "evil5.pkl", "wb") as f:
            pickle.dump({"conv1.weight": Evil(t / "PWNED")}, f, protocol=5)
        return t / "evil5.pkl"
    return _weights_case(t, make, ["cannot unpickle", "weights_only=True"])


@case("weights_torch_save_with_code")
def _(t):
    def make(t):
        torch.save({"state_dict": fmnist_state(), "hook": Evil(t / "PWNED")}, t / "evil2.pt")
        return t / "evil2.pt"
    return _weights_case(t, make, ["unsafe"])


# ---- datasets
@case("data_root_missing", needs_data=True)
def _(t):
    return [], with_data(base_recipe(), str(t / "no_such_dir")), ["no_such_dir", "not found"]


@case("data_empty_folder", needs_data=True)
def _(t):
    (t / "empty_data").mkdir()
    return [], with_data(base_recipe(), str(t / "empty_data")), ["empty_data"]


@case("data_zip_with_parent_path", needs_data=True)
def _(t):
    with zipfile.ZipFile(t / "evil.zip", "w") as z:
        z.writestr("test/airplane/ok.png", b"x")
        z.writestr("../evil.jpg", b"x")
    r = with_data(base_recipe(), str(t / "evil.zip"), dataset="cifar10")
    return [], r, ["evil.zip", "../evil.jpg"]


@case("data_corrupt_zip", needs_data=True)
def _(t):
    (t / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    r = with_data(base_recipe(), str(t / "broken.zip"), dataset="cifar10")
    return [], r, ["broken.zip", "zip"]


@case("data_truncated_idx", needs_data=True)
def _(t):
    d = t / "fm"
    d.mkdir()
    import gzip

    for f in FMNIST.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    raw = gzip.decompress((FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))
    return [], with_data(base_recipe(), str(d)), ["t10k-images-idx3-ubyte.gz"]


# ---- outputs
@case("output_under_a_file")
def _(t):
    (t / "somefile").write_text("x")
    return ["--out", str(t / "somefile" / "run")], base_recipe(), ["somefile", "not a directory"]


@case("output_is_a_file")
def _(t):
    (t / "out").write_text("x")
    return [], base_recipe(), ["out", "not a directory"]


@case("output_exists")
def _(t):
    (t / "out").mkdir()
    (t / "out" / "report.json").write_text("{}")
    return [], base_recipe(), ["out", "already exists"]


@case("overwrite_non_run_directory")
def _(t):
    (t / "out").mkdir()
    (t / "out" / "thesis.tex").write_text("x")
    return ["--overwrite"], base_recipe(), ["out", "not a compresscnn run directory"]


# ---- resume
@case("resume_without_checkpoint")
def _(t):
    r = base_recipe()
    r["finetune"] = {"enabled": True, "max_steps": 2}
    return ["--resume"], with_data(r, str(FMNIST)), ["--resume", "no checkpoint"]


@case("resume_corrupt_checkpoint", needs_data=True)
def _(t):
    ck = t / "out.partial" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.pt").write_bytes(b"PK\x03\x04garbage")
    r = base_recipe()
    r["finetune"] = {"enabled": True, "max_steps": 2}
    r = with_data(r, str(FMNIST))
    r["data"]["train_subset"] = 64
    return ["--resume"], r, ["last.pt", "truncated or corrupt"]


@case("resume_foreign_checkpoint", needs_data=True)
def _(t):
    ck = t / "out.partial" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save({"format": "compresscnn.finetune/1", "model": {}, "optimizer": {},
                "scheduler": {}, "step": 1, "epoch": 0, "batch_in_epoch": 1, "rng": {},
                "config": {"total_steps": 999}}, ck / "last.pt")
    r = base_recipe()
    r["finetune"] = {"enabled": True, "max_steps": 2}
    r = with_data(r, str(FMNIST))
    r["data"]["train_subset"] = 64
    return ["--resume"], r, ["last.pt", "checkpoint field"]


# --------------------------------------------------------------------------- the test
def _write_recipe(t: Path, content: Any) -> Path:
    path = t / "recipe.yaml"
    if content is None:
        return t / "nope.yaml"
    if content == "DIR":
        return t / "dir.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.mark.parametrize("make", list(CASES.values()))
def test_hostile_input(make: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, content, fragments = make(work)
    recipe = _write_recipe(work, content)
    out = work / "out"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    else:
        out = Path(argv[argv.index("--out") + 1])
    partial = out.with_name(out.name + ".partial")
    existed = {p: p.exists() for p in (out, partial)}
    before = {p: sorted(x.name for x in p.rglob("*")) if p.is_dir() else None for p in existed}
    capsys.readouterr()

    code = main(["run", str(recipe), "--quiet", *argv])

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, lines
    assert lines[0].startswith("compresscnn: error: "), lines
    assert "Traceback" not in captured.err and captured.out == ""
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    for p, was in existed.items():  # nothing created, nothing removed or changed
        assert p.exists() == was, p
        if p.is_dir():
            assert sorted(x.name for x in p.rglob("*")) == before[p], p
    assert not (work / "PWNED").exists(), "unpickling ran code"


def test_corpus_size() -> None:
    assert len(CASES) >= 30


# --------------------------------------------------------------------------- internal errors
def test_internal_error_exit_1_traceback_only_with_debug(tmp_path, capsys, monkeypatch):
    import compresscnn.pipeline as pipeline

    def boom(*a, **k):
        raise ZeroDivisionError("synthetic internal failure")

    monkeypatch.setattr(pipeline, "count", boom)
    recipe = _write_recipe(tmp_path, base_recipe())
    out = tmp_path / "out"
    args = ["run", str(recipe), "--out", str(out), "--quiet"]

    assert main(args) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compresscnn: internal error: "), lines
    assert "ZeroDivisionError" in lines[0] and "--debug" in lines[0]
    assert "Traceback" not in err

    assert main(["--debug", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "synthetic internal failure" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_internal_error_after_staging_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A failure once ``<out>.partial`` exists (here: writing the report) removes it, since
    it holds no checkpoint to resume from."""
    import compresscnn.report as report

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", boom)
    recipe = _write_recipe(tmp_path, base_recipe())
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
