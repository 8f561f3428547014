"""Recipe schema: every bad recipe is one line naming the key; good ones resolve and round-trip.

The decomposer registry is replaced by small fakes, so these tests do not depend on the real
methods (or on torch doing any work).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from compresscnn import config as C
from compresscnn.core import rules as rules_mod
from compresscnn.core.decomposers import base
from compresscnn.core.decomposers.auto import Auto
from compresscnn.core import method_options
from compresscnn.recipe import reference
from compresscnn.recipe import schema as R
from compresscnn.errors import CompressError, RecipeError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fake methods

class _FakeTucker2(base.Decomposer):
    rank_names = ("r_out", "r_in")

    class Options(C.MethodOptions):
        hooi: C.Bool = False


class _FakeSVD(base.Decomposer):
    layer_types = ()
    rank_names = ("r",)


class _FakeCP(base.Decomposer):
    rank_names = ("r",)

    class Options(C.MethodOptions):
        n_iter: C.Int() = 10


class _FakeSpatial(base.Decomposer):
    rank_names = ("r",)


class _FakeFire(base.Decomposer):
    rank_names = ("s",)

    class Options(C.MethodOptions):
        squeeze_ratio: C.Float() = 0.5
        pct3x3: C.Float() = 0.5
        relu: C.Bool = False


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    reg = {}
    for name, cls in [("tucker2", _FakeTucker2), ("svd", _FakeSVD), ("cp", _FakeCP),
                      ("spatial", _FakeSpatial), ("fire", _FakeFire), ("auto", Auto)]:
        d = cls()
        d.name = name
        reg[name] = d
    monkeypatch.setattr(base, "_REGISTRY", reg)
    monkeypatch.setattr(method_options, "_METHODS", reg)  # what recipes validate with
    return reg


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Every test runs in its own cwd with a known environment."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("COMPRESSCNN_SHARED_DATA", raising=False)
    monkeypatch.delenv("CC_TEST_UNSET", raising=False)
    return work


GOOD = """\
name: r20
model:
  spec: cifar:resnet20
data:
  dataset: cifar10
rules:
  - match: "layer*.*.conv2"
    method: tucker2
    rank: 0.5
"""

MINIMAL_NO_DATA = """\
model: {spec: "cifar:resnet20"}
rules: [{match: "*", method: svd, rank: 8}]
finetune: {enabled: false}
evaluate: {baseline: false, zero_shot: false}
"""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    d = tmp_path / "recipes"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def edit(text: str, **sections: str) -> str:
    """GOOD plus extra top-level YAML (appended, so keys must not repeat)."""
    return text + "".join(textwrap.dedent(v) for v in sections.values())


def assert_one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.strip() == msg and msg
    return msg


# --------------------------------------------------------------------------- the bad corpus

RULE_HEAD = "model: {spec: 'cifar:resnet20'}\ndata: {dataset: cifar10}\nrules:\n"

# (id, recipe text, key path or location fragment, message fragment)
BAD = [
    ("malformed-yaml", "model: {spec: cifar:resnet20\nrules: []\n", "x.yaml:", "invalid YAML"),
    ("unclosed-quote", 'model:\n  spec: "cifar:resnet20\n', "x.yaml:", "invalid YAML"),
    ("tab-indent", "model:\n\tspec: cifar:resnet20\n", "x.yaml:2:", "tabs"),
    ("duplicate-key", GOOD + "name: again\n", "name", "duplicate key (first at line 1"),
    ("top-level-list", "- model: x\n", "top level", "expected a mapping of recipe keys"),
    ("top-level-scalar", "hello\n", "top level", "got 'hello'"),
    ("empty-file", "", "top level", "got an empty file"),
    ("python-tag", "model: !!python/object/apply:os.system ['true']\n", "x.yaml:1:",
     "invalid YAML"),
    ("unknown-top", GOOD + "finetun: {epochs: 1}\n", "finetun",
     "unknown key (did you mean 'finetune'?)"),
    ("unknown-model-key", GOOD.replace("spec:", "spce:"), "model.spce",
     "unknown key (did you mean 'spec'?)"),
    ("unknown-data-key", GOOD + "finetune: {}\n".replace("{}", "{epochs: 1}") +
     "evaluate: {basline: true}\n", "evaluate.basline", "did you mean 'baseline'"),
    ("unknown-distill-key", GOOD + "finetune:\n  distill: {temprature: 2}\n",
     "finetune.distill.temprature", "did you mean 'temperature'"),
    ("unknown-rule-key", RULE_HEAD + "  - {match: '*', method: tucker2, rnak: 4}\n",
     "rules[0].rnak", "unknown key (did you mean 'rank'?)"),
    ("unknown-key-no-suggestion", GOOD + "export: {zzz: 1}\n", "export.zzz",
     "unknown key (known keys: onnx, opset, dynamic_batch, atol, verify, strip, quantize)"),
    ("non-string-key", GOOD + "report: {1: 2}\n", "report", "keys must be strings"),
    ("missing-model", "rules: [{match: '*', method: svd, rank: 1}]\n", "model",
     "required section missing (it needs 'spec')"),
    ("missing-spec", GOOD.replace("  spec: cifar:resnet20\n", "  weights: DEFAULT\n"),
     "model.spec", "required key missing"),
    ("bad-spec-source", GOOD.replace("cifar:resnet20", "torchvison:resnet18"), "model.spec",
     "did you mean 'torchvision'"),
    ("spec-no-colon", GOOD.replace("cifar:resnet20", "resnet20"), "model.spec",
     "expected a model spec '<source>:<name>'"),
    ("seed-float", GOOD + "seed: 1.5\n", "seed", "expected an int"),
    ("seed-bool", GOOD + "seed: yes\n", "seed", "got true (a boolean)"),
    ("batch-size-bool", GOOD.replace("dataset: cifar10", "dataset: cifar10\n  batch_size: true"),
     "data.batch_size", "got true (a boolean)"),
    ("batch-size-zero", GOOD.replace("dataset: cifar10", "dataset: cifar10\n  batch_size: 0"),
     "data.batch_size", "expected an int > 0, got 0"),
    ("workers-negative", GOOD.replace("dataset: cifar10", "dataset: cifar10\n  workers: -1"),
     "data.workers", "expected an int >= 0, got -1"),
    ("bad-dataset", GOOD.replace("dataset: cifar10", "dataset: cifar100"), "data.dataset",
     "did you mean 'cifar10'"),
    ("resize-string", GOOD.replace("dataset: cifar10", "dataset: cifar10\n  resize: big"),
     "data.resize", "expected 'auto', null or an int > 0, got 'big'"),
    ("input-size-two", GOOD.replace("spec: cifar:resnet20",
                                    "spec: cifar:resnet20\n  input_size: [32, 32]"),
     "model.input_size", "[C, H, W]"),
    ("input-size-elem", GOOD.replace("spec: cifar:resnet20",
                                     "spec: cifar:resnet20\n  input_size: [3, 0, 32]"),
     "model.input_size[1]", "expected an int > 0, got 0"),
    ("lr-negative", GOOD + "finetune: {lr: -1}\n", "finetune.lr",
     "expected a number > 0, got -1"),
    ("lr-word", GOOD + "finetune: {lr: fast}\n", "finetune.lr", "got 'fast'"),
    ("lr-inf", GOOD + "finetune: {lr: .inf}\n", "finetune.lr", "expected a number > 0"),
    ("alpha-oversized", GOOD + "finetune: {distill: {alpha: 1.5}}\n",
     "finetune.distill.alpha", "expected a number in [0, 1], got 1.5"),
    ("temperature-zero", GOOD + "finetune: {distill: {temperature: 0}}\n",
     "finetune.distill.temperature", "expected a number > 0, got 0"),
    ("epochs-string", GOOD + "finetune: {epochs: '3'}\n", "finetune.epochs",
     "expected an int >= 0, got '3'"),
    ("optimizer", GOOD + "finetune: {optimizer: adam}\n", "finetune.optimizer",
     "did you mean 'adamw'"),
    ("amp", GOOD + "finetune: {amp: fp32}\n", "finetune.amp", "one of 'auto', 'off'"),
    ("finetune-null", GOOD + "finetune:\n", "finetune", "enabled: false"),
    ("distill-enabled-int", GOOD + "finetune: {distill: {enabled: 1}}\n",
     "finetune.distill.enabled", "expected true or false, got 1"),
    ("opset-low", GOOD + "export: {opset: 17}\n", "export.opset",
     "expected an int >= 18, got 17"),
    ("atol-zero", GOOD + "export: {atol: 0}\n", "export.atol", "expected a number > 0"),
    ("verify-runtime", GOOD + "export: {verify: [onnxruntime, openvno]}\n", "export.verify[1]",
     "did you mean 'openvino'"),
    ("verify-string", GOOD + "export: {verify: opencv}\n", "export.verify",
     "non-empty list"),
    ("verify-empty", GOOD + "export: {verify: []}\n", "export.verify", "non-empty list"),
    ("latency-batch-empty", GOOD + "report: {latency_batch: []}\n", "report.latency_batch",
     "non-empty list"),
    ("latency-batch-elem", GOOD + "report: {latency_batch: [1, -8]}\n",
     "report.latency_batch[1]", "expected an int > 0, got -8"),
    ("name-slash", GOOD.replace("name: r20", "name: ../../etc"), "name",
     "letters, digits"),
    ("rank-half", RULE_HEAD + "  - {match: '*', method: tucker2, rank: half}\n",
     "rules[0].rank", "expected int, list of int, float in (0, 1], 'full' or 'evbmf', "
                     "got 'half'"),
    ("rank-zero", RULE_HEAD + "  - {match: '*', method: tucker2, rank: 0}\n", "rules[0].rank",
     "an int rank must be >= 1"),
    ("rank-fraction-over-1", RULE_HEAD + "  - {match: '*', method: tucker2, rank: 1.5}\n",
     "rules[0].rank", "a fraction must be in (0, 1]"),
    ("rank-bool", RULE_HEAD + "  - {match: '*', method: tucker2, rank: true}\n",
     "rules[0].rank", "got true"),
    ("rank-list-elem", RULE_HEAD + "  - {match: '*', method: tucker2, rank: [8, 0]}\n",
     "rules[0].rank[1]", "expected an int >= 1 in a rank list, got 0"),
    ("rank-list-length", RULE_HEAD + "  - {match: '*', method: tucker2, rank: [8, 8, 8]}\n",
     "rules[0].rank", "method tucker2 takes 2 rank(s) (r_out, r_in), got 3"),
    ("energy-zero", RULE_HEAD + "  - {match: '*', method: svd, energy: 0}\n",
     "rules[0].energy", "expected a number in (0, 1], got 0"),
    ("macs-oversized", RULE_HEAD + "  - {match: '*', method: svd, macs: 2}\n",
     "rules[0].macs", "expected a number in (0, 1], got 2"),
    ("round-to-zero", RULE_HEAD + "  - {match: '*', method: svd, rank: 4, round_to: 0}\n",
     "rules[0].round_to", "expected an int > 0, got 0"),
    ("objective", RULE_HEAD + "  - {match: '*', method: svd, rank: 4, objective: speed}\n",
     "rules[0].objective", "speed"),
    ("latency-runtime", GOOD + "latency: {runtime: tensorrt}\n", "latency.runtime", "tensorrt"),
    ("target-latency-range", GOOD + "target: {latency: 1.5}\n", "target.latency", "1.5"),
    ("two-policies", RULE_HEAD + "  - {match: '*', method: svd, rank: 4, energy: 0.9}\n",
     "rules[0]", "give at most one of rank, energy, macs, params (got rank and energy)"),
    ("no-policy-no-target", RULE_HEAD + "  - {match: '*', method: svd}\n", "rules[0]",
     "give one of rank, energy, macs, params (or a global 'target'"),
    ("empty-rules", "model: {spec: 'cifar:resnet20'}\ndata: {dataset: cifar10}\nrules: []\n"
                    "finetune: {enabled: false}\n",
     "rules", "expected at least one rule"),
    ("rules-mapping", "model: {spec: 'cifar:resnet20'}\ndata: {dataset: cifar10}\n"
                      "rules: {match: '*'}\n", "rules", "expected a list of rules"),
    ("missing-rules", "model: {spec: 'cifar:resnet20'}\ndata: {dataset: cifar10}\n",
     "rules", "required key missing"),
    ("rule-not-mapping", RULE_HEAD + "  - tucker2\n", "rules[0]", "expected a mapping"),
    ("rule-missing-match", RULE_HEAD + "  - {method: svd, rank: 4}\n", "rules[0].match",
     "required key missing"),
    ("rule-empty-match", RULE_HEAD + "  - {match: [], method: svd, rank: 4}\n",
     "rules[0].match", "non-empty list"),
    ("rule-missing-method", RULE_HEAD + "  - {match: '*', rank: 4}\n", "rules[0].method",
     "required key missing (known methods: auto, cp, fire, spatial, svd, tucker2)"),
    ("unknown-method", RULE_HEAD + "  - {match: '*', method: svd, rank: 4}\n"
                                   "  - {match: '*', method: tuker2, rank: 4}\n",
     "rules[1].method", "unknown method 'tuker2' (known: auto, cp, fire, spatial, svd, tucker2); "
                        "did you mean 'tucker2'?"),
    ("option-of-other-method", RULE_HEAD + "  - {match: '*', method: tucker2, rank: 4, "
                                           "squeeze_ratio: 0.5}\n",
     "rules[0].squeeze_ratio", "not an option of method tucker2 (options: hooi); "
                               "it is an option of fire"),
    ("option-wrong-type", RULE_HEAD + "  - {match: '*', method: tucker2, rank: 4, hooi: 3}\n",
     "rules[0].hooi", "expected true or false, got 3"),
    ("int-option-bool", RULE_HEAD + "  - {match: '*', method: cp, rank: 4, n_iter: yes}\n",
     "rules[0].n_iter", "expected an int, got true"),
    ("target-two-keys", GOOD + "target: {macs: 0.5, params: 0.5}\n", "target",
     "give exactly one of macs, params, latency (got macs and params)"),
    ("target-empty", GOOD + "target: {}\n", "target", "(got none)"),
    ("target-scalar", GOOD + "target: 0.5\n", "target", "expected null or a mapping"),
    ("target-unknown-key", GOOD + "target: {flops: 0.5}\n", "target.flops", "unknown key"),
    ("target-oversized", GOOD + "target: {macs: 1.5}\n", "target.macs",
     "expected a number in (0, 1], got 1.5"),
    ("finetune-without-data", "model: {spec: 'cifar:resnet20'}\n"
                              "rules: [{match: '*', method: svd, rank: 8}]\n", "data",
     "required because finetune.enabled is on"),
    ("evaluate-without-data", MINIMAL_NO_DATA.replace("zero_shot: false", "zero_shot: true"),
     "data", "required because evaluate.zero_shot is on"),
    ("calibration-without-data", MINIMAL_NO_DATA + "calibration: {}\n", "data",
     "required because calibration is on"),
    ("fit-through-unknown", GOOD + "calibration: {fit_through: relu}\n",
     "calibration.fit_through", "relu"),
    ("solver-unknown", GOOD + "calibration: {solver: sgd}\n", "calibration.solver", "sgd"),
    ("env-unset", GOOD.replace("dataset: cifar10", "dataset: cifar10\n  root: ${CC_TEST_UNSET}"),
     "data.root", "environment variable 'CC_TEST_UNSET' is not set"),
    ("env-unsupported", GOOD.replace("dataset: cifar10",
                                     "dataset: cifar10\n  root: ${CC_TEST_UNSET:=x}"),
     "data.root", "unsupported interpolation"),
    ("env-unterminated", GOOD.replace("dataset: cifar10",
                                      "dataset: cifar10\n  root: ${CC_TEST_UNSET"),
     "data.root", "unterminated interpolation"),
    ("data-null-but-needed", GOOD.replace("data:\n  dataset: cifar10\n", "data: null\n"),
     "data", "required because finetune.enabled is on"),
    ("data-missing-dataset", GOOD.replace("dataset: cifar10", "root: /tmp"), "data.dataset",
     "required key missing"),
    ("newline-in-value", GOOD + 'finetune: {optimizer: "sg\\nd"}\n', "finetune.optimizer",
     "got 'sg\\nd'"),
]


@pytest.mark.parametrize("text,where,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_recipe(tmp_path, text, where, fragment):
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as ei:
        R.load_recipe(p)
    msg = assert_one_line(ei.value)
    assert msg.startswith(str(p)), msg
    assert fragment in msg, msg
    if where.endswith(":"):  # a YAML position: <file>:<line>:<col>: invalid YAML
        assert msg.startswith(f"{p}:") and where in msg, msg
    else:  # the schema format: "<source>: <key path>: <what>"
        assert msg.startswith(f"{p}: {where}: "), msg
    assert isinstance(ei.value, CompressError) and ei.value.exit_code == 2


def test_corpus_is_big_enough():
    assert len(BAD) >= 30


def test_line_numbers_are_reported(tmp_path):
    p = write(tmp_path, RULE_HEAD + "  - {match: '*', method: svd, rank: 4}\n"
                                    "  - match: '*'\n    method: tucker2\n    rank: half\n")
    with pytest.raises(RecipeError, match=r"rules\[1\]\.rank: .* \(line 7\)$"):
        R.load_recipe(p)


def test_yaml_error_has_line_and_column(tmp_path):
    p = write(tmp_path, "model:\n  spec: [cifar\nrules: x\n")
    with pytest.raises(RecipeError) as ei:
        R.load_recipe(p)
    msg = assert_one_line(ei.value)
    assert msg.split(": invalid YAML")[0].count(":") >= 2  # file:line:col


# --------------------------------------------------------------------------- files

def test_missing_file_is_a_file_error_before_parsing(tmp_path):
    with pytest.raises(RecipeError, match=r"^recipe .*nope\.yaml: file not found$"):
        R.load_recipe(tmp_path / "nope.yaml")


def test_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="is a directory") as ei:
        R.load_recipe(tmp_path)
    assert_one_line(ei.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files without permission")
def test_unreadable_file(tmp_path):
    p = write(tmp_path, GOOD)
    p.chmod(0)
    try:
        with pytest.raises(RecipeError, match="cannot read"):
            R.load_recipe(p)
    finally:
        p.chmod(0o644)


def test_not_utf8(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        R.load_recipe(p)


def test_never_calls_unsafe_yaml_load():
    src = Path(R.__file__).read_text()
    assert "yaml." + "load(" not in src and "yaml.unsafe_load" not in src
    assert "Loader=yaml.Loader" not in src and "FullLoader" not in src


# --------------------------------------------------------------------------- good recipes

def test_defaults_are_filled(tmp_path, _cwd):
    r = R.load_recipe(write(tmp_path, GOOD))
    assert r["name"] == "r20"
    assert r["seed"] == 0
    assert r["output"] == str(_cwd / "runs" / "r20")
    assert r["model"] == {"spec": "cifar:resnet20", "weights": None, "input_size": None,
                          "num_classes": None}
    assert r["data"]["batch_size"] == 128 and r["data"]["resize"] == "auto"
    assert r["data"]["train"] == {"root": None, "split": "train", "subset": None}
    assert r["data"]["eval"] == {"root": None, "split": "test", "subset": None}
    assert r["data"]["calibration"] == {"root": None, "split": None}
    assert r["data"]["allow_eval_overlap"] is False
    assert r["data"]["download_dir"] == os.path.expanduser("~/.cache/compresscnn")
    assert r["calibration"] is None and r["target"] is None
    assert r["rules"] == [{"match": ["layer*.*.conv2"], "exclude": [], "method": "tucker2",
                           "rank": 0.5, "energy": None, "macs": None, "params": None,
                           "round_to": None, "objective": None}]
    assert r["latency"] == {"runtime": "onnxruntime", "threads": 1, "batch": 1, "rounds": 5,
                            "margin": 0.03, "max_candidates": 8}
    ft = r["finetune"]
    assert ft["lr"] == 0.01 and ft["weight_decay"] == 5e-4 and ft["amp"] == "auto"
    assert ft["distill"] == {"enabled": True, "temperature": 4.0, "alpha": 0.9}
    assert r["evaluate"] == {"baseline": True, "zero_shot": True, "max_batches": None}
    assert r["export"] == {"onnx": True, "opset": 18, "dynamic_batch": True, "atol": 1e-3,
                           "verify": ["onnxruntime"], "strip": True, "quantize": None}
    assert r["report"] == {"latency": True, "runtimes": ["torch", "onnxruntime"],
                           "latency_batch": [1, 8], "threads": 1, "plots": True}
    assert list(r) == list(R.TOP_KEYS)


def test_data_sources_and_old_keys(tmp_path, _cwd):
    """Train, calibration and eval sources are named explicitly; the old flat keys (which
    the schema used to reject for train_root) still load, into the new ones."""
    (tmp_path / "recipes" / "tr.zip").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "recipes" / "tr.zip").write_bytes(b"")
    r = R.load_recipe(write(tmp_path, GOOD.replace("  dataset: cifar10\n", """\
  dataset: cifar10
  train: {root: tr.zip, subset: 100}
  calibration: {split: cal}
  eval: {root: ev, split: val}
  allow_eval_overlap: true
""")))
    assert r["data"]["train"] == {"root": str(tmp_path / "recipes" / "tr.zip"), "split": "train",
                                  "subset": 100}
    assert r["data"]["calibration"] == {"root": None, "split": "cal"}
    assert r["data"]["eval"] == {"root": str(_cwd / "ev"), "split": "val", "subset": None}
    assert r["data"]["allow_eval_overlap"] is True
    old = R.load_recipe(write(tmp_path, GOOD.replace("  dataset: cifar10\n", """\
  dataset: cifar10
  train_root: tr.zip
  test_split: val
  test_subset: 50
""")), ["data.train_subset=7"])
    assert old["data"]["train"] == {"root": str(tmp_path / "recipes" / "tr.zip"), "split": "train",
                                    "subset": 7}
    assert old["data"]["eval"] == {"root": None, "split": "val", "subset": 50}
    assert not set(R.LEGACY_DATA_KEYS) & set(old["data"])  # written back in the new spelling
    out = tmp_path / "resolved.yaml"
    R.dump_resolved(old, out)
    assert R.load_recipe(out) == old
    with pytest.raises(RecipeError, match=r"data\.test_split: give data\.eval\.split or its "
                                          r"old spelling data\.test_split, not both"):
        R.load_recipe(write(tmp_path, GOOD.replace("  dataset: cifar10\n", """\
  dataset: cifar10
  test_split: val
  eval: {split: test}
""")))


def test_name_defaults_to_file_stem(tmp_path):
    r = R.load_recipe(write(tmp_path, MINIMAL_NO_DATA, name="my recipe.yaml"))
    assert r["name"] == "my_recipe" and r["output"].endswith(os.path.join("runs", "my_recipe"))
    assert r["data"] is None


def test_yaml_string_numbers_and_ints_become_floats(tmp_path):
    r = R.load_recipe(write(tmp_path, GOOD + "finetune: {lr: 1e-3, weight_decay: 0, "
                                             "momentum: '5e-1'}\nexport: {atol: 1e-4}\n"))
    assert r["finetune"]["lr"] == 1e-3 and isinstance(r["finetune"]["lr"], float)
    assert r["finetune"]["weight_decay"] == 0.0 and isinstance(r["finetune"]["weight_decay"],
                                                               float)
    assert r["finetune"]["momentum"] == 0.5 and r["export"]["atol"] == 1e-4


def test_rules_forms_and_method_options(tmp_path):
    text = RULE_HEAD + textwrap.dedent("""\
      - {match: "a.*", exclude: "a.skip", method: tucker2, rank: [8, 16], hooi: true}
      - {match: ["b.*", "c.*"], method: fire, params: 0.5, squeeze_ratio: 1e-1, pct3x3: 1,
         relu: false}
      - {match: "d", method: cp, rank: full, n_iter: 10, round_to: 1}
      - {match: "e", method: svd, rank: evbmf}
      - {match: "f", method: svd, energy: 0.95}
      - {match: "g", method: spatial, rank: 5e-1}
    """)
    rules = R.load_recipe(write(tmp_path, text))["rules"]
    assert rules[0]["exclude"] == ["a.skip"] and rules[0]["rank"] == [8, 16]
    assert R.rule_options(rules[0]) == {"hooi": True}
    assert rules[1]["match"] == ["b.*", "c.*"] and rules[1]["params"] == 0.5
    assert R.rule_options(rules[1]) == {"squeeze_ratio": 0.1, "pct3x3": 1.0, "relu": False}
    assert rules[2]["rank"] == "full" and rules[2]["n_iter"] == 10 and rules[2]["round_to"] == 1
    assert rules[3]["rank"] == "evbmf"
    assert rules[4]["energy"] == 0.95 and rules[4]["rank"] is None
    assert rules[5]["rank"] == 0.5
    assert list(rules[0])[: len(R.RULE_KEYS)] == list(R.RULE_KEYS)


def test_target_lets_rules_omit_policy(tmp_path):
    r = R.load_recipe(write(tmp_path, RULE_HEAD + "  - {match: '*', method: svd}\n"
                                                  "target: {macs: 0.5}\n"))
    assert r["target"] == {"macs": 0.5} and r["rules"][0]["rank"] is None


def test_amp_off_bare_word(tmp_path):
    r = R.load_recipe(write(tmp_path, GOOD + "finetune: {amp: off}\n"))
    assert r["finetune"]["amp"] == "off"


def test_round_trip_through_dump_resolved(tmp_path):
    src = write(tmp_path, GOOD + textwrap.dedent("""\
        calibration: {batches: 2}
        target: {params: 0.4}
        finetune: {lr: 5e-4, amp: bf16}
        report: {latency_batch: [1]}
    """))
    r1 = R.load_recipe(src)
    out = tmp_path / "run" / "deep" / "recipe.yaml"
    R.dump_resolved(r1, out)
    assert not [f for f in out.parent.iterdir() if f.name != "recipe.yaml"]  # no temp left
    assert yaml.safe_load(out.read_text()) == r1
    r2 = R.load_recipe(out)
    assert r2 == r1
    R.dump_resolved(r2, out)  # overwrite in place
    assert R.load_recipe(out) == r1


def test_round_trip_minimal_and_validate_api(tmp_path):
    r1 = R.validate(yaml.safe_load(MINIMAL_NO_DATA))
    assert r1["name"] == "recipe"
    p = tmp_path / "resolved.yaml"
    R.dump_resolved(r1, p)
    assert R.load_recipe(p) == r1


def test_validate_does_not_mutate_input():
    data = yaml.safe_load(MINIMAL_NO_DATA)
    before = repr(data)
    R.validate(data)
    R.apply_overrides(data, ["finetune.epochs=3", "rules.0.rank=2"])
    assert repr(data) == before


def test_validate_error_source():
    data = yaml.safe_load(MINIMAL_NO_DATA)
    data["seed"] = -1
    with pytest.raises(RecipeError, match=r"^api: seed: expected an int in \[0, \d+\], got -1$"):
        R.validate(data, "api")


# --------------------------------------------------------------------------- env + paths

def test_env_expansion_with_default_and_set(tmp_path, monkeypatch):
    text = GOOD.replace("dataset: cifar10",
                        "dataset: cifar10\n  root: ${COMPRESSCNN_SHARED_DATA:-../shared/data}")
    p = write(tmp_path, text)
    # unset: default, relative to the recipe folder if it exists there...
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert R.load_recipe(p)["data"]["root"] == str(tmp_path / "shared" / "data")
    # ... and set: the variable
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(tmp_path / "elsewhere"))
    assert R.load_recipe(p)["data"]["root"] == str(tmp_path / "elsewhere")
    # set but empty: the default again (shell ':-' semantics)
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", "")
    assert R.load_recipe(p)["data"]["root"] == str(tmp_path / "shared" / "data")


def test_env_only_braced_forms_are_expanded(monkeypatch):
    monkeypatch.setenv("CC_X", "val")
    assert R.expand_env("a/${CC_X}/$CC_X/$(echo hi)/`id`", {"CC_X": "v"}) == \
        "a/v/$CC_X/$(echo hi)/`id`"
    assert R.expand_env("${CC_NOPE:-d/e}", {}) == "d/e"


def test_relative_paths(tmp_path, _cwd):
    (tmp_path / "recipes" / "w").mkdir(parents=True)
    (tmp_path / "recipes" / "w" / "here.pt").write_bytes(b"")
    text = GOOD.replace("spec: cifar:resnet20",
                        "spec: cifar:resnet20\n  weights: w/here.pt").replace(
        "dataset: cifar10", "dataset: cifar10\n  root: not/there\n  download_dir: dl")
    r = R.load_recipe(write(tmp_path, text + "output: out/run1\n"))
    assert r["model"]["weights"] == str(tmp_path / "recipes" / "w" / "here.pt")  # recipe dir
    assert r["data"]["root"] == str(_cwd / "not" / "there")  # not in recipe dir: cwd
    assert r["data"]["download_dir"] == str(_cwd / "dl")
    assert r["output"] == str(_cwd / "out" / "run1")


def test_base_dir_overrides_recipe_folder(tmp_path):
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    text = GOOD.replace("dataset: cifar10", "dataset: cifar10\n  root: data")
    r = R.load_recipe(write(tmp_path, text), base_dir=other)
    assert r["data"]["root"] == str(other / "data")


def test_weights_enum_name_is_kept(tmp_path):
    text = GOOD.replace("spec: cifar:resnet20", "spec: torchvision:resnet18\n"
                                                "  weights: IMAGENET1K_V1")
    assert R.load_recipe(write(tmp_path, text))["model"]["weights"] == "IMAGENET1K_V1"


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = GOOD.replace("spec: cifar:resnet20", "spec: cifar:resnet20\n  weights: ~/w.pt")
    assert R.load_recipe(write(tmp_path, text))["model"]["weights"] == \
        str(tmp_path / "home" / "w.pt")


# --------------------------------------------------------------------------- overrides

def test_parse_override_values():
    assert R.parse_override("finetune.epochs=3") == (("finetune", "epochs"), 3)
    assert R.parse_override("rules.0.rank=[8, 8]") == (("rules", 0, "rank"), [8, 8])
    assert R.parse_override("rules[1].rank=0.5") == (("rules", 1, "rank"), 0.5)
    assert R.parse_override("data=null") == (("data",), None)
    assert R.parse_override("finetune.enabled=true") == (("finetune", "enabled"), True)
    assert R.parse_override("finetune.max_steps=") == (("finetune", "max_steps"), None)
    assert R.parse_override("name=a=b") == (("name",), "a=b")


def test_overrides_apply(tmp_path, _cwd):
    p = write(tmp_path, GOOD)
    r = R.load_recipe(p, ["finetune.epochs=3", "rules.0.rank=[8, 16]", "rules[0].hooi=true",
                          "calibration.batches=2", "target={macs: 0.5}", "seed=7",
                          "finetune.distill.alpha=0.5", "output=elsewhere"])
    assert r["finetune"]["epochs"] == 3 and r["seed"] == 7
    assert r["rules"][0]["rank"] == [8, 16] and r["rules"][0]["hooi"] is True
    assert r["calibration"] == {"batches": 2, "batch_size": 64, "bn_recalibrate": False,
                                "reconstruct": True, "steps": 300, "lr": 3e-3,
                                "fit_through": "activation", "refit_dense": False,
                                "solver": "closed_form", "distill": None}
    assert r["target"] == {"macs": 0.5} and r["finetune"]["distill"]["alpha"] == 0.5
    assert r["output"] == str(_cwd / "elsewhere")


def test_override_can_switch_data_off(tmp_path):
    r = R.load_recipe(write(tmp_path, GOOD), ["data=null", "finetune.enabled=false",
                                              "evaluate.baseline=false",
                                              "evaluate.zero_shot=false"])
    assert r["data"] is None


BAD_OVERRIDES = [
    ("unknown-key", "finetune.epocs=3", "finetune.epocs", "did you mean 'epochs'"),
    ("unknown-section", "finetun.epochs=3", "finetun", "did you mean 'finetune'"),
    ("into-a-value", "seed.x=1", "seed", "is a value, not a section"),
    ("index-out-of-range", "rules.3.rank=4", "rules[3]", "index out of range"),
    ("key-on-list", "rules.rank=4", "rules.rank", "expected a rule index"),
    ("bad-value-type", "finetune.lr=-1", "finetune.lr", "expected a number > 0, got -1"),
    ("bool-for-int", "finetune.epochs=yes", "finetune.epochs", "(a boolean)"),
    ("rule-unknown-option", "rules.0.relu=true", "rules[0].relu",
     "not an option of method tucker2"),
    ("target-unknown", "target.flops=0.5", "target.flops", "unknown key"),
    ("malformed-value", "rules.0.rank=[8, 8", "rules[0].rank", "is not valid YAML"),
    ("python-tag-value", "seed=!!python/name:os.system", "seed", "is not valid YAML"),
]


@pytest.mark.parametrize("override,where,fragment", [b[1:] for b in BAD_OVERRIDES],
                         ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_override(tmp_path, override, where, fragment):
    p = write(tmp_path, GOOD)
    with pytest.raises(RecipeError) as ei:
        R.load_recipe(p, [override])
    msg = assert_one_line(ei.value)
    assert msg.startswith(f"{p}: {where}: "), msg
    assert fragment in msg, msg
    assert msg.endswith(f"[from --set {override}]"), msg


@pytest.mark.parametrize("override,fragment", [("finetune.epochs", "expected key.path=value"),
                                               ("=3", "malformed key path"),
                                               ("a..b=3", "malformed key path")])
def test_malformed_override(override, fragment):
    with pytest.raises(RecipeError, match="--set") as ei:
        R.parse_override(override)
    assert fragment in assert_one_line(ei.value)


# --------------------------------------------------------------------------- python API rules

def test_validate_rules_for_the_python_api():
    rules = R.validate_rules([{"match": "conv*", "method": "tucker2", "rank": (4, 4)}])
    assert rules[0]["rank"] == [4, 4] and rules[0]["match"] == ["conv*"]
    assert R.validate_rules([{"match": "*", "method": "svd"}], target={"params": 0.5})
    with pytest.raises(RecipeError, match=r"^rules: rules\[0\]: give one of"):
        R.validate_rules([{"match": "*", "method": "svd"}])
    with pytest.raises(RecipeError, match=r"^compress\(\): rules\[0\]\.method: unknown method"):
        R.validate_rules([{"match": "*", "method": "nope", "rank": 1}], "compress()")


def test_options_follow_the_live_registry(fake_registry):
    class _Opt(base.Decomposer):
        class Options(C.MethodOptions):
            mode: C.Nullable(C.Str()) = None
    fake_registry["custom"] = _Opt()
    rule = {"match": "*", "method": "custom", "rank": 2, "mode": None}
    assert R.validate_rules([rule])[0]["mode"] is None
    with pytest.raises(RecipeError, match=r"rules\[0\]\.mode: expected a string, got 3"):
        R.validate_rules([dict(rule, mode=3)])


# --------------------------------------------------------------------------- reference

def test_reference_mentions_every_key():
    md = reference.reference_markdown()

    def walk(model, prefix=""):
        for k, f in model.model_fields.items():
            yield prefix + k
            sub = C.section_of(f.annotation)
            if sub is not None and k != "target":
                yield from walk(sub, prefix + k + ".")

    for key in walk(R.Recipe):
        assert f"`{key}`" in md, key
    for key in R.RULE_KEYS:
        assert f"`{key}`" in md, key


def test_committed_reference_is_up_to_date():
    committed = (REPO / "recipes" / "README.md").read_text()
    assert committed == reference.reference_markdown(), (
        "recipes/README.md is stale: run "
        "`python -m compresscnn.recipe --reference > recipes/README.md`")


def test_reference_cli():
    out = subprocess.run([sys.executable, "-m", "compresscnn.recipe", "--reference"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout == reference.reference_markdown()


def test_numpy_scalars_from_the_python_api_become_plain():
    np = pytest.importorskip("numpy")
    rules = R.validate_rules([{"match": "*", "method": "tucker2", "rank": [np.int64(4), 8],
                               "round_to": np.int32(4)},
                              {"match": "*", "method": "svd", "energy": np.float32(0.5)}])
    assert rules[0]["rank"] == [4, 8] and type(rules[0]["rank"][0]) is int
    assert type(rules[0]["round_to"]) is int and type(rules[1]["energy"]) is float


def test_every_shipped_compression_recipe_validates():
    """Each recipes/*.yaml (the compare recipes aside) passes the schema as shipped."""
    import yaml

    checked = 0
    for f in sorted((REPO / "recipes").glob("*.yaml")):
        if "compare" in (yaml.safe_load(f.read_text()) or {}):
            continue
        r = R.load_recipe(f)
        assert r["name"] and r["model"]["spec"], f
        checked += 1
    assert checked >= 15
