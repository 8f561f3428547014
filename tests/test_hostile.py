"""Hostile inputs: every bad recipe, file, checkpoint, dataset, output path or API argument is
refused with exit code 2 (CLI) or a :class:`CompressError` (API), exactly one line naming what
and where, no traceback, and nothing written, changed or deleted anywhere in the test's
folder (the run folder and ``<out>.partial`` included); no payload runs code (no ``PWNED``
file). Internal errors exit 1, with a traceback only under ``--debug``.

Each CLI case builds its bad input in ``tmp_path`` and runs ``compresscnn.cli.main`` in
process; each API case calls the Python API. Families: recipe files and YAML limits, schema
keys, types, ranks, methods, weights and state files, datasets, output folders (ownership
markers, locks, paths), resume integrity and crafted checkpoints, disk full, and the API's
own arguments.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import pickle
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import save_file

import compresscnn as cc
from compresscnn.cli import main
from compresscnn.errors import CompressError
from compresscnn.runs.rundir import MARKER, RunDir

FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = (FMNIST / "t10k-images-idx3-ubyte.gz").is_file()
# torch's advice a message must never repeat
UNSAFE = ("weights_only=False", "weights_only` set to `False`", "weights_only set to False")


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


def train_recipe() -> dict[str, Any]:
    """Two fine-tuning steps on 64 Fashion-MNIST images (a checkpoint after each)."""
    r = base_recipe()
    r["finetune"] = {"enabled": True, "max_steps": 2, "lr": 0.02, "checkpoint_every": 1,
                     "log_every": 1}
    r["data"] = {"dataset": "fashion_mnist", "root": str(FMNIST), "train_subset": 64,
                 "test_subset": 50, "batch_size": 32, "eval_batch_size": 50}
    return r


def fmnist_state() -> dict[str, torch.Tensor]:
    from compresscnn.io.models import load_model

    return {k: v.clone().contiguous()
            for k, v in load_model("fmnist:cnn", "DEFAULT").state_dict().items()}


class Evil:
    """Unpickling this runs ``os.system``: weights_only=True must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(path: Path, protocol: int = 2) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": Evil(path.parent / "PWNED")}, f, protocol=protocol)
    return path


def alias_bomb(levels: int = 6, width: int = 10, key: str = "rules") -> str:
    """A few hundred bytes that expand to ``width ** levels`` values."""
    text = "a0: &a0 [" + ", ".join(["lol"] * width) + "]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]\n"
    return text + f"{key}: *a{levels - 1}\n"


# ---- runs made once and copied into the cases that need one
_MADE: dict[str, Path] = {}


def _made(kind: str) -> Path:
    """A completed run ("run") or an interrupted one with a fine-tuning checkpoint in
    ``out.partial`` ("partial"), made once per test process in a folder removed at exit."""
    if kind not in _MADE:
        root = Path(tempfile.mkdtemp(prefix="compresscnn-hostile-"))
        atexit.register(shutil.rmtree, root, True)
        recipe = root / "r.yaml"
        out = root / "out"
        if kind == "run":
            recipe.write_text(yaml.safe_dump(base_recipe()))
            assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
            _MADE[kind] = out
        else:  # interrupted after fine-tuning, before the report: the checkpoint stays
            recipe.write_text(yaml.safe_dump(train_recipe()))
            with mock.patch("compresscnn.runs.report.write_report", side_effect=KeyboardInterrupt):
                assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 130
            assert (root / "out.partial" / "checkpoints" / "last.pt").is_file()
            _MADE[kind] = root / "out.partial"
    return _MADE[kind]


def completed_run(t: Path, name: str = "done") -> Path:
    dst = t / name
    shutil.copytree(_made("run"), dst, symlinks=True)
    return dst


def interrupted_run(t: Path) -> Path:
    """``t/out.partial``: an interrupted run of :func:`train_recipe`; returns its checkpoint."""
    shutil.copytree(_made("partial"), t / "out.partial", symlinks=True)
    return t / "out.partial" / "checkpoints" / "last.pt"


def rehash(path: Path) -> None:
    """Record ``path``'s sha256 beside it again, as a writer with a bug would after writing
    bad content: what is then checked is the content itself."""
    from compresscnn.util.common import digest_path, sha256_file

    digest_path(path).write_text(f"{sha256_file(path)}  {path.name}\n")


def crafted_checkpoint(t: Path, **fields: Any) -> Path:
    """An interrupted run whose checkpoint has ``fields`` replaced (its hash recorded again,
    so that the fields themselves are checked)."""
    ck = interrupted_run(t)
    state = torch.load(ck, weights_only=True)
    state.update(fields)
    torch.save(state, ck)
    rehash(ck)
    return ck


def fake_run(folder: Path, files: dict[str, str] | None = None) -> Path:
    """A folder carrying a run marker (as a finished run has) and a report."""
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"format": "compresscnn.run/1", "run_id": "x",
                                              "state": "complete", "recipe": {}}))
    for name, text in (files or {"report.json": "{}"}).items():
        (folder / name).write_text(text)
    return folder


# --------------------------------------------------------------------------- the corpus
# Each case: tmp_path -> (argv, recipe dict or raw text, expected fragments of the error
# line[, a context manager active during the call]). argv follows "run RECIPE --quiet" (and
# "--out <work>/out" unless it has --out), or is a whole "compare ..." command line.

Case = Callable[[Path], tuple]
CASES: dict[str, Any] = {}


def case(name: str, needs_data: bool = False, needs_non_root: bool = False):
    def deco(fn: Case) -> Case:
        marks = [pytest.mark.skipif(needs_data and not HAVE_FMNIST,
                                    reason="needs dataset-fashion-mnist"),
                 pytest.mark.skipif(needs_non_root and os.geteuid() == 0,
                                    reason="root may write to read-only folders")]
        assert name not in CASES, name
        CASES[name] = pytest.param(fn, id=name, marks=marks)
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


def _weights_file(t: Path, key: str, suffix: str, dtype: torch.dtype | None = None,
                  value: float | None = None) -> Path:
    """The demo model's weights with tensor ``key`` cast to ``dtype`` or its element 3 (in
    flat order) set to ``value``, as ``.safetensors`` or ``.pt``."""
    sd = fmnist_state()
    if dtype is not None:
        sd[key] = sd[key].to(dtype)
    if value is not None:
        sd[key].view(-1)[3] = value
    path = t / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


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
        from compresscnn.io.models import load_model

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
    return _weights_case(t, lambda t: _weights_file(t, "conv2.weight", ".pt", value=math.nan),
                         ["conv2.weight", "NaN"])


@case("weights_inf")
def _(t):
    return _weights_case(t, lambda t: _weights_file(t, "fc1.bias", ".safetensors",
                                                    value=math.inf), ["fc1.bias", "Inf"])


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


# ---- YAML limits and payloads (recipe files, --set values, compare recipes)
@case("yaml_alias_bomb")
def _(t):
    text = "model: {spec: 'fmnist:cnn'}\n" + alias_bomb()
    return [], text, ["recipe.yaml:", "aliases expand the document to more than"]


@case("yaml_alias_bomb_wide")
def _(t):
    return [], alias_bomb(levels=3, width=200, key="seed"), ["aliases expand"]


@case("yaml_alias_chain_deep")
def _(t):
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 400))
    return [], text + "rules: *a399\n", ["levels deep"]


@case("yaml_recursive_alias")
def _(t):
    return [], "model: &m {spec: 'fmnist:cnn', x: *m}\nrules: []\n", ["recursive"]


@case("yaml_nested_2000_deep")
def _(t):
    return [], "rules: " + "[" * 2000 + "]" * 2000 + "\n", ["recipe.yaml:1:", "nested more than"]


@case("yaml_nested_block_deep")
def _(t):
    text = "".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "v\n"
    return [], text, ["nested more than"]


@case("yaml_too_large")
def _(t):
    text = yaml.safe_dump(base_recipe()) + "# padding\n" * 200_000
    return [], text, ["recipe.yaml", "bytes, more than"]


@case("yaml_python_object_tag")
def _(t):
    r = yaml.safe_dump(base_recipe()).replace("name: hostile",
                                              "name: !!python/object/apply:os.system "
                                              "['touch PWNED']")
    return [], r, ["invalid YAML", "python/object/apply"]


@case("yaml_python_name_tag")
def _(t):
    return [], "seed: !!python/name:os.system\n", ["invalid YAML"]


@case("set_alias_bomb")
def _(t):
    value = "{" + alias_bomb(levels=6, width=10, key="z").replace("\n", ", ") + "}"
    return ["--set", f"target={value}"], base_recipe(), ["--set", "aliases expand"]


@case("set_nested_deep")
def _(t):
    return ["--set", "seed=" + "[" * 500 + "]" * 500], base_recipe(), ["--set",
                                                                         "nested more than"]


@case("set_python_tag")
def _(t):
    return ["--set", "name=!!python/object/apply:os.system ['touch PWNED']"], base_recipe(), \
        ["name", "not valid YAML"]


@case("compare_recipe_alias_bomb")
def _(t):
    (t / "cmp.yaml").write_text(alias_bomb(key="compare"))
    return ["compare", "--recipe", str(t / "cmp.yaml"), "--out", str(t / "cmp")], None, \
        ["cmp.yaml", "aliases expand"]


@case("compare_recipe_python_tag")
def _(t):
    (t / "cmp.yaml").write_text("compare: [!!python/object/apply:os.system ['touch PWNED']]\n")
    return ["compare", "--recipe", str(t / "cmp.yaml"), "--out", str(t / "cmp")], None, \
        ["cmp.yaml"]


@case("compare_run_dir_recipe_alias_bomb")
def _(t):
    run = completed_run(t)
    (run / "recipe.yaml").write_text("model: {spec: 'fmnist:cnn'}\n" + alias_bomb())
    return ["compare", str(run), "--no-onnx", "--no-latency", "--no-quantize", "--out",
            str(t / "cmp")], None, ["done/recipe.yaml", "aliases expand"]


@case("compare_run_dir_nan_weights")
def _(t):
    run = completed_run(t)
    sd = _run_state(run)
    sd["fc2.weight"][0, 0] = math.nan
    save_file(sd, str(run / "model.safetensors"))
    rehash_run(run)
    return ["compare", str(run), "--no-onnx", "--no-latency", "--no-quantize", "--out",
            str(t / "cmp")], None, ["model.safetensors", "fc2.weight", "NaN"]


def _run_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


# ---- weights: dtypes and values (a tensor of the wrong kind would be cast silently)
for _name, _key, _dtype, _suffix, _frags in [
        ("bool_safetensors", "conv2.weight", torch.bool, ".safetensors",
         ["conv2.weight", "torch.bool", "floating-point"]),
        ("int8_safetensors", "fc1.weight", torch.int8, ".safetensors", ["fc1.weight", "int8"]),
        ("complex_safetensors", "conv1.weight", torch.complex64, ".safetensors",
         ["conv1.weight", "complex64"]),
        ("int32_pt", "fc2.bias", torch.int32, ".pt", ["fc2.bias", "int32"]),
        ("float_counter", "bn1.num_batches_tracked", torch.float32, ".pt",
         ["bn1.num_batches_tracked", "torch.int64"])]:
    case(f"weights_{_name}")(
        lambda t, key=_key, dtype=_dtype, suffix=_suffix, frags=_frags:
        _weights_case(t, lambda t: _weights_file(t, key, suffix, dtype), frags))


@case("weights_nan_safetensors")
def _(t):
    return _weights_case(t, lambda t: _weights_file(t, "bn2.running_var", ".safetensors",
                                                    value=math.nan), ["bn2.running_var", "NaN"])


@case("weights_neg_inf_pt")
def _(t):
    return _weights_case(t, lambda t: _weights_file(t, "conv3.weight", ".pt", value=-math.inf),
                         ["conv3.weight", "Inf"])


@case("weights_pickle_in_safetensors_name")
def _(t):
    return _weights_case(t, lambda t: evil_pickle(t / "evil.safetensors"),
                         ["safetensors", "corrupt"])


# ---- output folders: only folders compresscnn made are replaced or deleted
def _foreign_partial(t: Path) -> None:
    (t / "out.partial").mkdir()
    (t / "out.partial" / "notes.txt").write_text("mine")


@case("partial_not_ours")
def _(t):
    _foreign_partial(t)
    return [], base_recipe(), ["out.partial", "was not made by compresscnn"]


@case("partial_not_ours_bad_rule")
def _(t):
    _foreign_partial(t)
    r = base_recipe()
    r["rules"][1]["rank"] = 100000
    return [], r, ["rules[1] (fc1)", "exceeds"]


@case("partial_not_ours_overwrite")
def _(t):
    _foreign_partial(t)
    return ["--overwrite"], base_recipe(), ["was not made by compresscnn"]


@case("partial_not_ours_resume")
def _(t):
    _foreign_partial(t)
    (t / "out.partial" / "checkpoints").mkdir()
    (t / "out.partial" / "checkpoints" / "last.pt").write_bytes(b"x")
    return ["--resume"], base_recipe(), ["was not made by compresscnn"]


@case("partial_is_a_file")
def _(t):
    (t / "out.partial").write_text("mine")
    return [], base_recipe(), ["out.partial", "was not made by compresscnn"]


@case("partial_marker_garbage")
def _(t):
    _foreign_partial(t)
    (t / "out.partial" / MARKER).write_text("{not json")
    return ["--overwrite"], base_recipe(), ["was not made by compresscnn"]


@case("partial_symlink_to_folder")
def _(t):
    (t / "elsewhere").mkdir()
    (t / "elsewhere" / "data.bin").write_text("mine")
    (t / "out.partial").symlink_to(t / "elsewhere")
    return ["--overwrite"], base_recipe(), ["out.partial", "symbolic link"]


@case("partial_dangling_symlink")
def _(t):
    (t / "out.partial").symlink_to(t / "nowhere")
    return [], base_recipe(), ["symbolic link"]


@case("output_symlink_to_run")
def _(t):
    fake_run(t / "real")
    (t / "out").symlink_to(t / "real")
    return ["--overwrite"], base_recipe(), ["out", "symbolic link"]


@case("output_dangling_symlink")
def _(t):
    (t / "out").symlink_to(t / "nowhere")
    return [], base_recipe(), ["symbolic link"]


@case("output_foreign_report_json")
def _(t):
    (t / "out").mkdir()
    (t / "out" / "report.json").write_text("{}")
    (t / "out" / "thesis.tex").write_text("precious")
    return ["--overwrite"], base_recipe(), ["not a compresscnn run directory", MARKER]


@case("output_old_style_run")
def _(t):
    (t / "out").mkdir()
    for f in ("report.json", "recipe.yaml", "model.safetensors"):
        (t / "out" / f).write_text("x")
    return ["--overwrite"], base_recipe(), ["not a compresscnn run directory"]


@case("output_marker_wrong_format")
def _(t):
    (t / "out").mkdir()
    (t / "out" / MARKER).write_text(json.dumps({"format": "something/9"}))
    (t / "out" / "data.csv").write_text("x")
    return ["--overwrite"], base_recipe(), ["not a compresscnn run directory"]


@case("output_dot")
def _(t):
    return ["--out", "."], base_recipe(), ["current folder"]


@case("output_dotdot")
def _(t):
    return ["--out", ".."], base_recipe(), ["current folder or holds it"]


@case("output_root")
def _(t):
    return ["--out", "/"], base_recipe(), ["output /:", "root"]


@case("output_name_250_bytes")
def _(t):
    return ["--out", str(t / ("r" * 250))], base_recipe(), ["250 bytes", "limit"]


@case("output_folder_name_300_bytes")
def _(t):
    return ["--out", str(t / ("d" * 300) / "run")], base_recipe(), ["300 bytes", "limit"]


@case("output_replaced_not_ours")
def _(t):
    fake_run(t / "out")
    (t / "out.replaced").mkdir()
    (t / "out.replaced" / "keep.txt").write_text("mine")
    return ["--overwrite"], base_recipe(), ["out.replaced", "was not made by compresscnn"]


@case("output_lock_symlink")
def _(t):
    (t / "target.txt").write_text("mine")
    (t / "out.lock").symlink_to(t / "target.txt")
    return [], base_recipe(), ["out.lock", "symbolic link"]


@case("output_locked_by_running_run")
def _(t):
    @contextlib.contextmanager
    def other_run():
        rd = RunDir(t / "out")
        rd.acquire()
        before = (t / "out.lock").read_bytes()
        try:
            yield
        finally:
            assert (t / "out.lock").read_bytes() == before
            rd.release()
    return [], base_recipe(), ["another run is writing it", f"pid {os.getpid()}"], other_run()


@case("output_locked_on_another_host")
def _(t):
    (t / "out.lock").write_text(json.dumps({"pid": 1, "host": "build-node-7",
                                            "started": "2026-12-01 10:00:00"}))
    return [], base_recipe(), ["another run is writing it", "build-node-7", "out.lock"]


@case("output_read_only_parent", needs_non_root=True)
def _(t):
    (t / "ro").mkdir()
    (t / "ro").chmod(0o555)
    return ["--out", str(t / "ro" / "run")], base_recipe(), ["ro", "not writable"]


@case("output_holds_the_input_weights")
def _(t):
    run = fake_run(t / "out")
    save_file(fmnist_state(), str(run / "w.safetensors"))
    r = base_recipe()
    r["model"]["weights"] = str(run / "w.safetensors")
    return ["--overwrite"], r, ["model.weights", "w.safetensors", "is inside the output"]


# ---- disk full: "no space left on <path>", whatever the writer reports
def _full_torch_save(obj, f, *a, **k):
    Path(f).write_bytes(b"PK\x03\x04partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def _no_free_space():
    return mock.patch("shutil.disk_usage", return_value=shutil._ntuple_diskusage(1 << 30,
                                                                                  1 << 30, 0))


@case("disk_full_checkpoint", needs_data=True)
def _(t):
    patches = contextlib.ExitStack()
    patches.enter_context(mock.patch("torch.save", _full_torch_save))
    patches.enter_context(_no_free_space())
    return [], train_recipe(), ["no space left on", "out.partial/checkpoints",
                                "last.pt"], patches


@case("disk_full_weights")
def _(t):
    err = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    return [], base_recipe(), ["no space left on", "out.partial", "model.safetensors"], \
        mock.patch("safetensors.torch.save_file", side_effect=err)


@case("disk_full_report")
def _(t):
    err = OSError(28, "No space left on device")
    return [], base_recipe(), ["no space left on", "out.partial"], \
        mock.patch("compresscnn.runs.report.atomic_write_text", side_effect=err)


# ---- resume: an interrupted run, and only with the recipe it was started with
@case("rerun_over_interrupted_run", needs_data=True)
def _(t):
    interrupted_run(t)
    return [], train_recipe(), ["interrupted run", "use --resume or --overwrite"]


@case("rerun_over_interrupted_run_bad_rule", needs_data=True)
def _(t):
    interrupted_run(t)
    r = train_recipe()
    r["rules"][0]["method"] = "tuker2"
    return [], r, ["rules[0].method", "tuker2"]


def _changed(t: Path, key: str, value: str, *shown: str):
    interrupted_run(t)
    return ["--resume", "--set", f"{key}={value}"], train_recipe(), \
        ["the recipe differs", *(shown or (key,))]


for _key, _value, _shown in [
        ("finetune.lr", "0.5", "finetune.lr (0.02 -> 0.5)"),
        ("finetune.momentum", "0.5", "finetune.momentum (0.9 -> 0.5)"),
        ("finetune.weight_decay", "0.1", "finetune.weight_decay"),
        ("finetune.optimizer", "adamw", "finetune.optimizer"),
        ("finetune.schedule", "constant", "finetune.schedule"),
        ("finetune.warmup_steps", "1", "finetune.warmup_steps"),
        ("finetune.distill.alpha", "0.1", "finetune.distill.alpha"),
        ("finetune.distill.temperature", "2", "finetune.distill.temperature"),
        ("finetune.distill.enabled", "false", "finetune.distill.enabled"),
        ("finetune.amp", "bf16", "finetune.amp"),
        ("seed", "7", "seed (0 -> 7)"),
        ("data.batch_size", "16", "data.batch_size"),
        ("data.train_subset", "96", "data.train.subset (64 -> 96)"),
        ("data.augment", "false", "data.augment"),
        ("rules[0].rank", "0.5", "rules[0].rank"),
        ("rules[1].rank", "0.5", "rules[1].rank (0.25 -> 0.5)"),
        ("finetune.max_steps", "3", "finetune.max_steps (2 -> 3)"),
        ("calibration", "{batches: 1}", "calibration"),
        ("allocation", "energy", "allocation")]:
    def _make(t, key=_key, value=_value, shown=_shown):
        return _changed(t, key, value, *([shown] if shown else []))
    case(f"resume_changed_{_key.replace('.', '_').replace('[', '').replace(']', '')}",
         needs_data=True)(_make)


@case("resume_changed_weights_file", needs_data=True)
def _(t):
    save_file(fmnist_state(), str(t / "same.safetensors"))
    return _changed(t, "model.weights", str(t / "same.safetensors"), "model.weights")


@case("resume_marker_without_recipe", needs_data=True)
def _(t):
    interrupted_run(t)
    marker = t / "out.partial" / MARKER
    info = json.loads(marker.read_text())
    del info["recipe"], info["sha256"]  # as an older version wrote it
    marker.write_text(json.dumps(info))
    return ["--resume"], train_recipe(), ["does not record the recipe"]


@case("resume_marker_removed", needs_data=True)
def _(t):
    interrupted_run(t)
    (t / "out.partial" / MARKER).unlink()
    return ["--resume"], train_recipe(), ["was not made by compresscnn"]


@case("resume_without_checkpoint")
def _(t):
    r = base_recipe()
    r["finetune"] = {"enabled": True, "max_steps": 2}
    return ["--resume"], with_data(r, str(FMNIST)), ["--resume", "no checkpoint"]


@case("resume_corrupt_checkpoint", needs_data=True)
def _(t):
    ck = interrupted_run(t)
    ck.write_bytes(b"PK\x03\x04garbage")
    rehash(ck)  # the content itself is checked
    return ["--resume"], train_recipe(), ["last.pt", "truncated or corrupt"]


@case("resume_empty_checkpoint", needs_data=True)
def _(t):
    interrupted_run(t).write_bytes(b"")
    return ["--resume"], train_recipe(), ["last.pt"]


@case("resume_unsafe_checkpoint", needs_data=True)
def _(t):
    rehash(evil_pickle(interrupted_run(t)))
    return ["--resume"], train_recipe(), ["last.pt", "refused as unsafe", "system"]


@case("resume_unsafe_checkpoint_zip", needs_data=True)
def _(t):
    ck = interrupted_run(t)
    torch.save({"format": "compresscnn.finetune/1", "hook": Evil(t / "PWNED")}, ck)
    rehash(ck)
    return ["--resume"], train_recipe(), ["last.pt", "refused as unsafe"]


@case("resume_foreign_checkpoint", needs_data=True)
def _(t):
    crafted_checkpoint(t, config={"total_steps": 999, "steps_per_epoch": 2,
                                  "optimizer": "sgd", "world_size": 1})
    return ["--resume"], train_recipe(), ["last.pt", "total_steps"]


@case("resume_other_format", needs_data=True)
def _(t):
    crafted_checkpoint(t, format="lightning/2")
    return ["--resume"], train_recipe(), ["last.pt", "not a compresscnn fine-tuning"]


for _name, _fields, _frag in [
        ("step_string", {"step": "x"}, "'step'"),
        ("step_negative", {"step": -3}, "'step'"),
        ("epoch_float", {"epoch": 1.5}, "'epoch'"),
        ("batch_bool", {"batch_in_epoch": True}, "'batch_in_epoch'"),
        ("rng_empty", {"rng": {}}, "'rng' cannot be restored"),
        ("rng_wrong_tensor", {"rng": {"torch": torch.zeros(3)}}, "'rng' cannot be restored"),
        ("rng_list", {"rng": [1, 2]}, "'rng'"),
        ("model_not_tensors", {"model": {"conv1.weight": 3}}, "non-tensor"),
        ("model_list", {"model": [1]}, "'model'"),
        ("optimizer_list", {"optimizer": []}, "'optimizer'"),
        ("optimizer_no_groups", {"optimizer": {"state": {}}}, "not an optimizer state"),
        ("config_string", {"config": "x"}, "'config'")]:
    def _make(t, fields=_fields, frag=_frag):
        crafted_checkpoint(t, **fields)
        return ["--resume"], train_recipe(), ["last.pt", frag]
    case(f"resume_crafted_{_name}", needs_data=True)(_make)


def _crafted_model(t: Path, edit: Callable[[dict], None]):
    ck = interrupted_run(t)
    state = torch.load(ck, weights_only=True)
    edit(state["model"])
    torch.save(state, ck)
    rehash(ck)
    return ["--resume"], train_recipe()


@case("resume_checkpoint_nan_weights", needs_data=True)
def _(t):
    def edit(m):
        m["fc2.weight"][0, 0] = math.nan
    return (*_crafted_model(t, edit), ["last.pt", "fc2.weight", "NaN"])


@case("resume_checkpoint_int_weights", needs_data=True)
def _(t):
    def edit(m):
        m["fc2.bias"] = m["fc2.bias"].to(torch.int32)
    return (*_crafted_model(t, edit), ["last.pt", "fc2.bias", "int32"])


@case("resume_checkpoint_wrong_shape", needs_data=True)
def _(t):
    def edit(m):
        m["fc2.bias"] = torch.zeros(3)
    return (*_crafted_model(t, edit), ["last.pt", "fc2.bias", "shape"])


# --------------------------------------------------------------------------- the CLI test
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


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (links not followed): kind, and size, mtime and mode of files
    and links. Folder mtimes are left out (a lock file comes and goes in the parent)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            out[rel] = ("dir", stat.S_IMODE(st.st_mode)) if stat.S_ISDIR(st.st_mode) else \
                (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("compresscnn: error: "), lines
    assert "Traceback" not in err
    assert not any(u in lines[0] for u in UNSAFE), lines[0]
    return lines[0]


@pytest.mark.parametrize("make", list(CASES.values()))
def test_hostile_input(make: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, content, fragments, *ctx = make(work)
    recipe = _write_recipe(work, content)
    if argv[:1] == ["compare"]:
        cmd = [*argv, "--quiet"]
    else:
        if "--out" not in argv:
            argv = [*argv, "--out", str(work / "out")]
        cmd = ["run", str(recipe), "--quiet", *argv]
    before = snapshot(tmp_path)
    capsys.readouterr()

    with ctx[0] if ctx else contextlib.nullcontext():
        code = main(cmd)

    captured = capsys.readouterr()
    assert code == 2, captured.err
    line = _one_error_line(captured.err)
    # stdout holds at most the plan, printed once the model, data and output were checked
    assert captured.out == "" or captured.out.startswith("layer "), captured.out
    for frag in fragments:
        assert frag in line, (frag, line)
    assert snapshot(tmp_path) == before, "something was written, changed or deleted"
    assert not (work / "PWNED").exists(), "a payload ran code"


# --------------------------------------------------------------------------- the API
# Each case: tmp_path -> (a call that must raise CompressError, expected fragments).
API: dict[str, Any] = {}


def api_case(name: str):
    def deco(fn: Callable) -> Callable:
        assert name not in API, name
        API[name] = pytest.param(fn, id=name)
        return fn
    return deco


def _small() -> torch.nn.Module:
    from compresscnn.io.models import load_model

    return load_model("fmnist:cnn", None)


def _compress(rules: Any = None, target: Any = None, model: torch.nn.Module | None = None,
              size: Any = (1, 28, 28)) -> Callable[[], Any]:
    rules = [{"match": "conv2", "method": "tucker2", "rank": 0.5}] if rules is None else rules
    return lambda: cc.compress(model if model is not None else _small(), rules, size,
                               target=target)


_BUDGET = [{"match": "conv*", "method": "tucker2"}]
for _name, _target, _frag in [
        ("nan", {"macs": math.nan}, "target.macs"),
        ("inf", {"params": math.inf}, "target.params"),
        ("two_keys", {"macs": 0.5, "params": 0.5}, "exactly one"),
        ("flops", {"flops": 0.5}, "target.flops"),
        ("zero", {"macs": 0}, "target.macs"),
        ("over_one", {"macs": 1.5}, "target.macs"),
        ("bool", {"macs": True}, "target.macs"),
        ("word", {"macs": "half"}, "target.macs"),
        ("list", [0.5], "expected null or a mapping"),
        ("number", 0.5, "expected null or a mapping"),
        ("empty", {}, "exactly one")]:
    api_case(f"compress_target_{_name}")(
        lambda t, target=_target, frag=_frag: (_compress(_BUDGET, target), ["compress()", frag]))

for _name, _rules, _frag in [
        ("none", None, "rules: expected a list of rules, got null"),
        ("string", "conv2", "expected a list of rules"),
        ("empty", [], "at least one rule"),
        ("not_a_mapping", ["conv2"], "rules[0]"),
        ("no_method", [{"match": "conv2", "rank": 4}], "rules[0].method"),
        ("unknown_key", [{"match": "conv2", "method": "tucker2", "rnak": 4}], "rules[0].rnak"),
        ("negative_rank", [{"match": "conv2", "method": "tucker2", "rank": -1}],
         "rules[0].rank"),
        ("nan_energy", [{"match": "conv2", "method": "tucker2", "energy": math.nan}],
         "rules[0].energy"),
        ("no_policy", [{"match": "conv2", "method": "tucker2"}], "give one of")]:
    api_case(f"compress_rules_{_name}")(
        lambda t, rules=_rules, frag=_frag: (
            (lambda: cc.compress(_small(), rules, (1, 28, 28))) if rules is None
            else _compress(rules), [frag]))


def _poisoned(value: float, key: str = "conv2.weight") -> torch.nn.Module:
    m = _small()
    with torch.no_grad():
        m.get_parameter(key).view(-1)[3] = value
    return m


@api_case("compress_nan_weights")
def _(t):
    return _compress(model=_poisoned(math.nan)), ["rules[0] (conv2)", "weight", "NaN"]


@api_case("compress_inf_weights_budget")
def _(t):
    return _compress(_BUDGET, {"macs": 0.5}, model=_poisoned(math.inf, "conv3.weight")), \
        ["conv3", "Inf"]


@api_case("compress_meta_model")
def _(t):
    return _compress(model=_small().to("meta")), ["meta device"]


@api_case("compress_input_size_wrong_channels")
def _(t):
    return _compress(size=(3, 28, 28)), ["input_size [3, 28, 28]", "cannot run"]


@api_case("compress_input_size_too_small")
def _(t):
    return _compress(size=(1, 2, 2)), ["input_size [1, 2, 2]"]


@api_case("compress_input_size_huge")
def _(t):
    return _compress(size=(1, 100_000, 100_000)), ["input_size", "values in one input"]


@api_case("plan_target_nan")
def _(t):
    return (lambda: cc.plan(_small(), _BUDGET, (1, 28, 28), target={"macs": math.nan})), \
        ["target.macs"]


def _layer(kind: str, value: float | None = None, device: str = "cpu") -> torch.nn.Module:
    layer = torch.nn.Conv2d(8, 16, 3, device=device) if kind == "conv" else \
        torch.nn.Linear(32, 16, device=device)
    if value is not None:
        with torch.no_grad():
            (layer.bias if kind == "linear" else layer.weight).view(-1)[0] = value
    return layer


for _name, _args, _frag in [
        ("tucker2_inf", ("conv", math.inf, "tucker2"), "weight contains Inf"),
        ("cp_nan", ("conv", math.nan, "cp"), "weight contains NaN"),
        ("spatial_nan", ("conv", math.nan, "spatial"), "NaN"),
        ("fire_inf", ("conv", -math.inf, "fire"), "Inf"),
        ("svd_nan_bias", ("linear", math.nan, "svd"), "bias contains NaN"),
        ("tucker2_meta", ("conv", None, "tucker2", "meta"), "meta device"),
        ("svd_meta", ("linear", None, "svd", "meta"), "meta device")]:
    def _make(t, args=_args, frag=_frag):
        layer = _layer(args[0], args[1], *(args[3:] or ["cpu"]))
        return (lambda: cc.decompose(layer, args[2], 4)), [frag]
    api_case(f"decompose_{_name}")(_make)


def rehash_run(run: Path) -> Path:
    """Record the sha256 of ``run``'s files in its manifest again (and the manifest's own), as
    a writer with a bug would after writing bad content: what is then checked is the content
    of the files themselves."""
    from compresscnn.runs.rundir import _self_digest
    from compresscnn.util.common import sha256_file

    info = json.loads((run / MARKER).read_text())
    for name, rec in info.get("files", {}).items():
        rec["sha256"] = sha256_file(run / name)
    info["sha256"] = _self_digest(info)
    (run / MARKER).write_text(json.dumps(info))
    return run


def _edit_run(t: Path, edit: Callable[[Path], None]) -> Callable[[], Any]:
    run = completed_run(t)
    edit(run)
    rehash_run(run)
    return lambda: cc.load_compressed(run)


def _edit_recipe(run: Path, change: Callable[[dict], None]) -> None:
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    change(r)
    (run / "recipe.yaml").write_text(yaml.safe_dump(r, sort_keys=False))


def _edit_state(run: Path, change: Callable[[dict], None]) -> None:
    sd = _run_state(run)
    change(sd)
    save_file(sd, str(run / "model.safetensors"))


@api_case("load_compressed_edited_ranks")
def _(t):
    def rank(r):
        r["rules"][0]["rank"] = [8, 8]
    return _edit_run(t, lambda run: _edit_recipe(run, rank)), \
        ["model.safetensors", "does not match", "shape"]


@api_case("load_compressed_impossible_rank")
def _(t):
    def rank(r):
        r["rules"][0]["rank"] = [999, 999]
    return _edit_run(t, lambda run: _edit_recipe(run, rank)), ["rules[0] (conv2)", "exceeds"]


@api_case("load_compressed_nan_weights")
def _(t):
    def nan(sd):
        sd["fc2.bias"][1] = math.nan
    return _edit_run(t, lambda run: _edit_state(run, nan)), ["fc2.bias", "NaN"]


@api_case("load_compressed_int32_weights")
def _(t):
    def int32(sd):
        sd["fc2.weight"] = sd["fc2.weight"].to(torch.int32)
    return _edit_run(t, lambda run: _edit_state(run, int32)), ["fc2.weight", "int32"]


@api_case("load_compressed_bool_weights")
def _(t):
    def to_bool(sd):
        sd["bn1.weight"] = sd["bn1.weight"] > 0
    return _edit_run(t, lambda run: _edit_state(run, to_bool)), ["bn1.weight", "bool"]


@api_case("load_compressed_extra_tensor")
def _(t):
    def extra(sd):
        sd["backdoor.weight"] = torch.zeros(3)
    return _edit_run(t, lambda run: _edit_state(run, extra)), ["unexpected", "backdoor.weight"]


@api_case("load_compressed_recipe_alias_bomb")
def _(t):
    def bomb(run):
        (run / "recipe.yaml").write_text("model: {spec: 'fmnist:cnn'}\n" + alias_bomb())
    return _edit_run(t, bomb), ["recipe.yaml", "aliases expand"]


@api_case("load_compressed_recipe_deep")
def _(t):
    def deep(run):
        (run / "recipe.yaml").write_text("rules: " + "[" * 3000 + "]" * 3000 + "\n")
    return _edit_run(t, deep), ["recipe.yaml", "nested more than"]


@api_case("load_compressed_recipe_python_tag")
def _(t):
    def tag(run):
        text = (run / "recipe.yaml").read_text()
        (run / "recipe.yaml").write_text(
            text + "x: !!python/object/apply:os.system ['touch PWNED']\n")
    return _edit_run(t, tag), ["recipe.yaml", "invalid YAML"]


@api_case("load_compressed_truncated_weights")
def _(t):
    def cut(run):
        data = (run / "model.safetensors").read_bytes()
        (run / "model.safetensors").write_bytes(data[:len(data) // 2])
    return _edit_run(t, cut), ["model.safetensors", "corrupt"]


@api_case("load_compressed_not_a_run")
def _(t):
    (t / "notes").mkdir()
    return (lambda: cc.load_compressed(t / "notes")), ["not a compresscnn run directory"]


@pytest.mark.parametrize("make", list(API.values()))
def test_hostile_api(make: Callable, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    call, fragments = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CompressError) as ei:
        call()
    msg = str(ei.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert not any(u in msg for u in UNSAFE), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


def test_corpus_size() -> None:
    assert len(CASES) + len(API) >= 100


# --------------------------------------------------------------------------- internal errors
def test_internal_error_exit_1_traceback_only_with_debug(tmp_path, capsys, monkeypatch):
    import compresscnn.runs.pipeline as pipeline

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
    it holds no checkpoint to resume from, and the lock with it."""
    import compresscnn.runs.report as report

    def boom(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(report, "write_report", boom)
    recipe = _write_recipe(tmp_path, base_recipe())
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 1
    assert "Input/output error" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert not (tmp_path / "out.lock").exists()
