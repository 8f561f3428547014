"""The typed configuration: one set of models behind recipes, the Python API, decomposer
options and compare recipes, so that what one accepts the others accept too."""

from __future__ import annotations

import textwrap
from unittest import mock

import pytest
import torch
from torch import nn

import compresscnn as cc
from compresscnn import config as C
from compresscnn.train import config as TC
from compresscnn.recipe import schema as R
from compresscnn.train import loop as finetune
from compresscnn.core.decomposers import get_decomposer
from compresscnn.core.ranks import decompose
from compresscnn.errors import MethodError, RecipeError
from compresscnn.io.models.loaders import SOURCES

GOOD = """\
model: {spec: 'cifar:resnet20'}
data: {dataset: cifar10}
rules: [{match: '*', method: tucker2, rank: 0.5}]
"""


def write(tmp_path, text):
    p = tmp_path / "x.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


# --------------------------------------------------------------------------- schema = loader

def test_model_sources_are_the_loaders(tmp_path):
    """A spec the loader cannot build (``file:``) is refused by the schema, with its line."""
    assert R.MODEL_SOURCES == SOURCES
    p = write(tmp_path, GOOD.replace("cifar:resnet20", "file:net.pt"))
    with pytest.raises(RecipeError, match=r"^.*x\.yaml: model\.spec: unknown model source "
                                          r"'file' .*\(line 1\)$"):
        R.load_recipe(p)


def test_latency_margin_is_refused_where_latency_config_would_refuse_it(tmp_path):
    p = write(tmp_path, GOOD + "latency:\n  margin: 1.0\n")
    with pytest.raises(RecipeError, match=r"latency\.margin: expected a number in \[0, 1\), "
                                          r"got 1\.0 \(line 5\)$"):
        R.load_recipe(p)
    assert R.load_recipe(write(tmp_path, GOOD + "latency: {margin: 0.99}\n"))[
        "latency"]["margin"] == 0.99


def test_one_list_of_schedules(tmp_path):
    from compresscnn.train import engine
    from compresscnn.util import common
    assert common.SCHEDULES is TC.SCHEDULES  # what lr_factor runs
    assert engine.OPTIMIZERS is TC.OPTIMIZERS
    for s in TC.SCHEDULES:  # every schedule the training loop runs, the recipe takes
        r = R.load_recipe(write(tmp_path, GOOD + f"finetune: {{schedule: {s}}}\n"))
        assert r["finetune"]["schedule"] == s
        assert 0.0 <= finetune.lr_factor(5, 10, schedule=s) <= 1.0


# --------------------------------------------------------------------------- method options

def test_method_options_are_checked_by_the_decomposers_model(tmp_path):
    """A bound a method's ``Options`` declares holds in a recipe as in ``decompose``."""
    p = write(tmp_path, GOOD.replace("method: tucker2, rank: 0.5",
                                     "method: fire, rank: 4, pct3x3: 1.5"))
    with pytest.raises(RecipeError, match=r"rules\[0\]\.pct3x3: expected a number in \[0, 1\], "
                                          r"got 1\.5 \(line 3\)$"):
        R.load_recipe(p)
    layer = nn.Conv2d(8, 8, 3)
    with pytest.raises(MethodError, match=r"^fire option pct3x3: expected a number in \[0, 1\], "
                                          r"got 1\.5$"):
        decompose(layer, "fire", "full", pct3x3=1.5)
    with pytest.raises(MethodError, match=r"^tucker2 option hoi: unknown key \(did you mean "
                                          r"'hooi'\?\)$"):
        decompose(layer, "tucker2", 2, hoi=2)
    assert get_decomposer("cp").Options().iters == 50


# --------------------------------------------------------------------------- python API

def test_compress_validates_target_and_arguments_first():
    m = net()
    rules = [{"match": "2", "method": "tucker2", "rank": 4}]
    _, planned = cc.compress(m, rules, (3, 8, 8))
    with pytest.raises(RecipeError, match=r"^compress\(\): target\.macs: expected a number in "
                                          r"\(0, 1\], got 2\.0$"):
        cc.compress(m, rules, (3, 8, 8), target={"macs": 2.0}, planned=planned)
    with pytest.raises(RecipeError, match=r"^compress\(\): target: give exactly one of macs, "
                                          r"params, latency \(got macs and params\)$"):
        cc.compress(m, rules, (3, 8, 8), target={"macs": 0.5, "params": 0.5}, planned=planned)
    with mock.patch("compresscnn.fit.calibration.layer_sensitivity") as sens:
        with pytest.raises(RecipeError, match=r"^compress\(\): target\.flops: unknown key"):
            cc.compress(m, rules, (3, 8, 8), target={"flops": 0.5}, calibration=[torch.randn(2, 3, 8, 8)], config={"allocation": "sensitivity"})
        sens.assert_not_called()
    with pytest.raises(RecipeError, match=r"^compress\(\): fit\.steps: expected an int "
                                          r"> 0, got 0$"):
        cc.compress(m, rules, (3, 8, 8), planned=planned, config={"fit": {"steps": 0}})
    with pytest.raises(RecipeError, match=r"^compress\(\): fit\.solver: expected one of 'closed_form', "
                                          r"'adam', got 'sgd'"):
        cc.compress(m, rules, (3, 8, 8), planned=planned, config={"fit": {"solver": "sgd"}})


def test_compress_takes_typed_rules_and_target():
    Tucker2Rule = cc.rule_model("tucker2")
    rule = Tucker2Rule(match="2", rank=[4, 4], hooi=2)
    assert rule.hooi == 2 and rule.round_to is None  # null: 8, or the latency runtime's multiple
    assert rule.model_dump()["hooi"] == 2 and "hooi" not in Tucker2Rule(match="2").model_dump()
    new, p = cc.compress(net(), [rule], (3, 8, 8))
    assert p.replacements[0].rank == [4, 4] and p.replacements[0].options == {"hooi": 2}
    _, p2 = cc.compress(net(), [Tucker2Rule(match="*")], (3, 8, 8), target=cc.Target(params=0.5))
    assert p2.target == {"params": 0.5}
    with pytest.raises(Exception, match="hooi"):
        Tucker2Rule(match="2", rank=4, hooi=-1)
    with pytest.raises(Exception, match="did you mean 'rank'"):
        Tucker2Rule(match="2", rnak=4)


def test_typed_recipe_round_trips(tmp_path):
    r = R.load_recipe(write(tmp_path, GOOD))
    typed = R.Recipe.model_validate(r, context={"where": C.Where()})
    assert typed.model_dump() == r
    assert isinstance(typed.rules[0], R.rule_model("tucker2"))
    assert isinstance(typed.finetune.distill, TC.Distill)
