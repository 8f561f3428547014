"""Mistakes are refused before torch is loaded: recipe validation and the model-name check
import no torch, torchvision or timm (a fresh interpreter proves it), and what they read
without torch (the methods' options, the zoos' model names) is what torch-side code has."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compresscnn.core import method_options

from compresscnn.io import zoos
from compresscnn.errors import ModelError, RecipeError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "numpy", "onnx")


def _fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); it prints a
    JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_OFF = "finetune: {enabled: false}\nevaluate: {baseline: false, zero_shot: false}\n"
BAD = {
    "unknown key": "model: {spec: 'torchvision:resnet18'}\nrules: [{match: '*', method: "
                   "tucker2, rank: 0.5}]\nfinetune: {enabled: false, epochz: 3}\n",
    "unknown option": "model: {spec: 'timm:resnet18'}\nrules: [{match: '*', method: tucker2, "
                      "hooii: 2, rank: 0.5}]\n" + _OFF,
    "unknown method": "model: {spec: 'cifar:resnet20'}\nrules: [{match: '*', method: tuker2, "
                      "rank: 0.5}]\n" + _OFF,
    "malformed": "model: {spec: 'torchvision:resnet18'}\nrules: [\n  - match\n",
    "unknown model": "model: {spec: 'torchvision:resnet1888'}\nrules: [{match: '*', method: "
                     "tucker2, rank: 0.5}]\n" + _OFF,
    "unknown timm model": "model: {spec: 'timm:resnet18_nope.a1_in1k'}\nrules: [{match: '*', "
                          "method: svd, rank: 0.5}]\n" + _OFF,
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_cli_refuses_before_torch(tmp_path, what):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD[what])
    got = _fresh(f"""
        import contextlib, io, json, sys
        from compresscnn.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["run", {str(recipe)!r}, "--dry-run"])
        print(json.dumps({{"rc": rc, "err": err.getvalue(),
                          "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert got["rc"] == 2, got
    assert got["heavy"] == [], got
    lines = got["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compresscnn: error: ")
    assert str(recipe) in lines[0]
    expect = {"unknown key": "finetune.epochz", "unknown option": "rules[0].hooii",
              "unknown method": "rules[0].method", "malformed": "invalid YAML",
              "unknown model": "did you mean 'torchvision:resnet18'",
              "unknown timm model": "unknown timm model 'resnet18_nope'"}[what]
    assert expect in lines[0]


def test_recipe_validation_imports_no_torch():
    got = _fresh("""
        import json, sys
        from compresscnn.recipe import validate, validate_rules
        r = validate({"model": {"spec": "cifar:resnet20"},
                      "rules": [{"match": "layer*", "method": "auto", "macs": 0.5},
                                {"match": "fc", "method": "svd", "rank": 4,
                                 "randomized": True}],
                      "finetune": {"enabled": False},
                      "evaluate": {"baseline": False, "zero_shot": False}})
        validate_rules([{"match": "*", "method": "cp", "iters": 5}], target={"macs": 0.5})
        print(json.dumps({"heavy": [m for m in ("torch", "torchvision", "timm", "numpy")
                                    if m in sys.modules],
                          "methods": [x["method"] for x in r["rules"]]}))
    """)
    assert got == {"heavy": [], "methods": ["auto", "svd"]}


def test_builtin_methods_match_their_declarations():
    from compresscnn.core.decomposers import get_decomposer, list_decomposers

    assert sorted(method_options._BUILTIN) == list_decomposers()
    for name in list_decomposers():
        d, info = get_decomposer(name), method_options.methods()[name]
        assert (d.Options, tuple(d.rank_names), d.chooses) == \
            (info.Options, info.rank_names, info.chooses), name
    with pytest.raises(ValueError, match="does not match its declaration"):
        method_options.declare("tucker2", ("r",), method_options.Tucker2Options)


def test_a_method_registered_from_python_is_validated_by_recipes():
    from compresscnn.config import Int, MethodOptions
    from compresscnn.core.decomposers import Decomposer, base, register_decomposer
    from compresscnn.recipe import validate_rules

    class Opts(MethodOptions):
        steps: Int(1) = 3

    try:
        @register_decomposer("_test_declared")
        class Mine(Decomposer):
            rank_names = ("a", "b")
            Options = Opts

        rule = {"match": "*", "method": "_test_declared", "rank": [2, 3], "steps": 4}
        assert validate_rules([rule])[0]["steps"] == 4
        with pytest.raises(RecipeError, match=r"rules\[0\]\.stepz: not an option"):
            validate_rules([{**rule, "stepz": 4}])
    finally:
        base._REGISTRY.pop("_test_declared", None)
        method_options.forget("_test_declared")
    with pytest.raises(RecipeError, match="unknown method"):
        validate_rules([rule])


def test_zoo_names_equal_the_libraries_lists():
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    from timm.models import _registry

    assert set(zoos.known_names("torchvision")) == \
        set(torchvision.models.list_models(module=torchvision.models))
    timm_all = set(timm.list_models()) | set(_registry._deprecated_models)
    assert set(zoos.known_names("timm")) == timm_all
    assert all(timm.is_model(n) for n in zoos.known_names("timm"))


def test_own_zoo_names_equal_the_loaders():
    from compresscnn.io.models import model_names
    from compresscnn.io.models.cifar_zoo import CIFAR_ZOO

    for source in ("cifar", "fmnist"):
        own = {s.partition(":")[2] for s in model_names(source)}
        if source == "cifar":
            own |= set(CIFAR_ZOO)
        assert set(zoos.known_names(source)) == own


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                  "timm:resnet50.a1_in1k", "timm:efficientnet_b0",
                                  "cifar:squeezenet1_1?sr=0.25", "cifar:resnet56",
                                  "fmnist:cnn"])
def test_check_spec_accepts_real_names(spec):
    zoos.check_spec(spec)


@pytest.mark.parametrize("spec,fragment", [
    ("torchvision:resnet1888", "did you mean 'torchvision:resnet18'"),
    ("torchvision:resnet18_", "unknown torchvision model 'resnet18_'"),
    ("timm:efficientnet_b99", "unknown timm model 'efficientnet_b99'"),
    ("cifar:resnet21", "'cifar:resnet20'"),
    ("fmnist:lenet", "known: 'fmnist:cnn'"),
])
def test_check_spec_refuses_unknown_names(spec, fragment):
    with pytest.raises(ModelError, match="^unknown") as e:
        zoos.check_spec(spec)
    assert fragment in str(e.value)


def test_check_spec_leaves_what_it_cannot_tell_to_the_loader(monkeypatch):
    # a word of the package's own source (not a registered name) is not refused here
    zoos.check_spec("torchvision:register_model")
    # a package whose registrations cannot be read: nothing is refused
    monkeypatch.setattr(zoos, "_sources", lambda package, sub: ())
    zoos.known_names.cache_clear()
    try:
        zoos.check_spec("torchvision:resnet1888")
    finally:
        zoos.known_names.cache_clear()
