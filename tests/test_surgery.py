"""plan/apply/compress: matching, skipping, budgets, and that the input model is untouched."""

import copy
import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from compresscnn import compress
from compresscnn.measure.counting import count
from compresscnn.errors import CompressError
from compresscnn.util.modules import set_module
from compresscnn.core.ranks import Skip
from compresscnn.core.applying import apply, measured
from compresscnn.core.planning import plan


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def test_compress_leaves_input_untouched_and_costs_match_count():
    m = small_net()
    before = copy.deepcopy(m.state_dict())
    rules = [{"match": "*", "method": "tucker2", "rank": 0.5},
             {"match": "1*", "method": "svd", "rank": 8}]
    new, p = compress(m, rules, (3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    c = count(new, (3, 16, 16))
    assert c == {"params": p.params_after, "macs": p.macs_after}
    rows = {r.name: r for r in p.replacements}
    assert rows["2"].skipped  # depthwise: tucker2 cannot take it, said in the plan
    assert rows["10"].method == "svd" and rows["10"].rank == [8]
    assert new(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert "skipped" in p.summary()


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(CompressError, match=r"rules\[0\]\.match: .*matches no"):
        plan(small_net(), [{"match": "layer9.*", "method": "tucker2", "rank": 4}], (3, 16, 16))


def test_method_on_wrong_layer_type_is_an_error():
    with pytest.raises(CompressError, match=r"rules\[0\]\.method: tucker2 takes Conv2d"):
        plan(small_net(), [{"match": "1*", "method": "tucker2", "rank": 4}], (3, 16, 16))


def test_geometry_a_method_cannot_take_is_skipped_with_reason():
    p = plan(small_net(), [{"match": "0", "method": "svd", "rank": 2}], (3, 16, 16))
    assert "1x1" in p.replacements[0].skipped


@pytest.mark.parametrize("key,frac", [("macs", 0.5), ("params", 0.3), ("macs", 0.7)])
def test_global_budget_within_two_percent(key, frac):
    m = torchvision.models.resnet18(num_classes=10)
    rules = [{"match": "layer*.conv*", "method": "tucker2"}, {"match": "fc", "method": "svd"}]
    new, p = compress(m, rules, (3, 64, 64), target={key: frac})
    c = count(new, (3, 64, 64))
    base = count(m, (3, 64, 64))
    got = c[key] / base[key]
    assert frac * 0.98 <= got <= frac + 1e-9, got


def test_first_matching_rule_wins_and_set_module():
    m = small_net()
    p = plan(m, [{"match": "6", "method": "tucker2", "rank": [8, 8]},
                 {"match": "*", "method": "tucker2", "rank": 0.9}], (3, 16, 16))
    assert {r.name: r.rank for r in p.replacements}["6"] == [8, 8]
    set_module(m, "6", nn.Identity())
    assert isinstance(m[6], nn.Identity)


def test_apply_records_measured_fit():
    m = small_net()
    p = plan(m, [{"match": "4", "method": "tucker2", "rank": [4, 4]}], (3, 16, 16))
    fitted = measured(p, apply(m, p))
    assert p.replacements[0].fit == {} and fitted.replacements[0].fit  # p is not edited
    assert fitted.replacements[0].rel_error is not None
    assert 0 < fitted.replacements[0].rel_error < 1


def test_plan_is_frozen_and_later_steps_return_new_plans():
    m = small_net()
    rules = [{"match": ["4", "6"], "method": "tucker2", "rank": [4, 4]}]
    p = plan(m, rules, (3, 16, 16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.replacements[0].rank = [2, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.calibration = {}
    before = copy.deepcopy(p)
    _, q = compress(m, rules, (3, 16, 16), planned=p, calibration=[torch.randn(4, 3, 16, 16)])
    assert p == before and q is not p
    assert q.calibration is not None and all("output_error" in r.fit for r in q.replacements)


def test_skip_kinds():
    m = small_net()
    p = plan(m, [{"match": "*", "method": "tucker2"}], (3, 16, 16), target={"macs": 1.0})
    kinds = {r.name: r.skip for r in p.replacements}
    assert kinds["2"] is Skip.REFUSED  # depthwise: tucker2 cannot take it
    assert {kinds[n] for n in ("0", "4", "6")} == {Skip.BUDGET}
    assert all(r.skipped == "kept dense by the budget" for r in p.replacements
               if r.skip is Skip.BUDGET)
    assert all("skip" not in row for row in p.to_rows())


def test_params_target_below_the_rank_grid_is_reached():
    """A global target tighter than every layer at its grid's cheapest rank (1/48 of full)
    still plans: ranks below the grid are added, halving down to rank 1, only then."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 10))
    rules = [{"match": "1", "method": "svd"}]
    total = count(net, (3, 16, 16))["params"]
    small, p = compress(net, rules, (3, 16, 16), target={"params": 0.04})
    (rep,) = [r for r in p.replacements if r.name == "1"]
    assert rep.rank[0] < 768 // 48
    assert count(small, (3, 16, 16))["params"] <= 0.04 * total
    _, p = compress(net, rules, (3, 16, 16), target={"params": 0.5})
    (rep,) = [r for r in p.replacements if r.name == "1"]
    assert rep.rank[0] >= 768 // 48
