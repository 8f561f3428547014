"""``method: auto``: per layer, the method and rank with the lowest *measured* error per MAC
(CP here, spatial there, Tucker-2 elsewhere, dense where nothing pays)."""

import pytest
import torch
from torch import nn

from compresscnn import compress, decompose
from compresscnn.measure.counting import count
from compresscnn.errors import CompressError, MethodError
from compresscnn.recipe.schema import validate_rules
from compresscnn.core.planning import plan

from test_surgery import small_net

SIZE = (3, 16, 16)
SIZE32 = (32, 16, 16)


def _spatially_separable(c: int, r: int) -> torch.Tensor:
    """A 3x3 kernel that is exactly Jaderberg's k x 1 then 1 x k chain of rank ``r``:
    W[o, i, y, x] = sum_k V[k, i, y] H[o, k, x]."""
    v, h = torch.randn(r, c, 3), torch.randn(c, r, 3)
    return torch.einsum("kiy,okx->oiyx", v, h)


def _tucker(c: int, r: int) -> torch.Tensor:
    """A 3x3 kernel with an exact Tucker-2 form of ranks (r, r): 1x1 in, r x r core, 1x1 out."""
    core, u_in, u_out = torch.randn(r, r, 3, 3), torch.randn(c, r), torch.randn(c, r)
    return torch.einsum("oiyx,co,di->cdyx", core, u_out, u_in)


def _net_with(*kernels: torch.Tensor) -> nn.Sequential:
    layers = []
    for w in kernels:
        conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False)
        conv.weight.data.copy_(w)
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def test_each_layer_gets_the_method_its_weights_are_low_rank_in():
    torch.manual_seed(0)
    # at 0.15 of the MACs the only exact plan is spatial for the first (Tucker-2 needs ranks
    # (12, 12): 0.22) and Tucker-2 for the second (spatial needs rank 12: 0.25)
    net = _net_with(_spatially_separable(32, 4), _tucker(32, 4))
    p = plan(net, [{"match": "*", "method": "auto", "methods": ["cp", "spatial", "tucker2"],
                    "ranks": 8}], SIZE32, target={"macs": 0.15})
    rows = {r.name: r for r in p.replacements}
    assert rows["0"].method == "spatial" and rows["0"].rel_error < 1e-6
    assert rows["2"].method == "tucker2" and rows["2"].rel_error < 1e-6
    assert p.macs_after <= 0.15 * p.total_macs


def test_target_rows_are_concrete_measured_and_within_budget():
    net = small_net()
    rules = [{"match": "*", "method": "auto", "methods": ["spatial", "tucker2", "svd"],
              "ranks": 6}]
    new, p = compress(net, rules, SIZE, target={"macs": 0.6})
    assert count(new, SIZE)["macs"] <= 0.6 * p.total_macs
    applied = [r for r in p.replacements if r.applied]
    assert applied and all(r.method in ("spatial", "tucker2", "svd") for r in applied)
    for r in applied:  # the planned error is the error of the decomposition applied
        again = decompose(dict(net.named_modules())[r.name], r.method, tuple(r.rank))
        assert r.rel_error == pytest.approx(again.fit_info["rel_error"], rel=1e-6, abs=1e-9)
    depthwise = next(r for r in p.replacements if r.name == "2")
    assert depthwise.method in ("spatial", "auto")  # the one method that takes it, or dense
    assert new(torch.randn(2, *SIZE)).shape == (2, 10)


def test_methods_restricts_the_choice_and_linear_layers_get_svd():
    p = plan(small_net(), [{"match": ["4", "6"], "method": "auto", "methods": ["tucker2"],
                            "ranks": 4},
                           {"match": "1*", "method": "auto", "params": 0.5, "ranks": 4}],
             SIZE, target={"params": 0.3})
    assert [r.method for r in p.replacements] == ["tucker2", "tucker2", "svd", "svd"]
    assert all(r.applied for r in p.replacements)


def test_a_macs_policy_takes_the_lowest_error_within_it():
    torch.manual_seed(0)
    net = _net_with(_spatially_separable(32, 8), torch.randn(32, 32, 3, 3))
    p = plan(net, [{"match": "*", "method": "auto", "methods": ["tucker2", "spatial"],
                    "macs": 0.4, "ranks": 10}], SIZE32)
    for r in p.replacements:
        assert r.applied and r.macs_after <= 0.4 * r.macs_before
        assert r.policy == "macs 0.4"
    assert p.replacements[0].method == "spatial"


def test_auto_refuses_rank_and_energy_and_direct_use():
    for key, value in (("rank", 8), ("energy", 0.9)):
        with pytest.raises(CompressError, match=f"method auto takes .*not {key}"):
            validate_rules([{"match": "*", "method": "auto", key: value}])
    with pytest.raises(CompressError, match="expected one of 'cp'"):
        validate_rules([{"match": "*", "method": "auto", "methods": ["fire"], "macs": 0.5}])
    with pytest.raises(MethodError, match="chooses a method per layer"):
        decompose(nn.Conv2d(8, 8, 3), "auto", 4)
    with pytest.raises(CompressError, match="give one of rank"):  # nor a target
        validate_rules([{"match": "4", "method": "auto"}])


def test_auto_with_objective_latency_keeps_only_faster_candidates():
    """Latency-aware planning times each method's candidates; only those faster than the
    dense layer compete, and a layer where none is stays dense with the reason."""
    from test_latency import _macs_timer, _net
    timer = _macs_timer(overhead_ms=0.5)
    rules = [{"match": ["2", "8"], "method": "auto", "methods": ["spatial", "tucker2"],
              "ranks": 4, "objective": "latency"}]
    p = plan(_net(), rules, (3, 16, 16), target={"macs": 0.8}, config={"latency": {"timer": timer}})
    rows = {r.name: r for r in p.replacements}
    assert rows["2"].applied and rows["2"].method in ("spatial", "tucker2")
    assert rows["2"].latency_after < rows["2"].latency_before
    assert not rows["8"].applied  # 4 -> 4 channels: every chain pays more launches than MACs
    assert "faster" in rows["8"].skipped
    p = plan(_net(), [dict(rules[0], macs=0.9)], (3, 16, 16), config={"latency": {"timer": timer}})
    rows = {r.name: r for r in p.replacements}
    assert rows["2"].applied and rows["2"].latency_after < rows["2"].latency_before
    assert "no candidate within macs 0.9 is faster" in rows["8"].skipped


def test_a_recipe_giving_auto_a_rank_is_a_one_line_error(tmp_path, capsys):
    from pathlib import Path
    from compresscnn.cli import main
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "resnet20_cifar10_2x.yaml"
    out = tmp_path / "run"
    code = main(["run", str(recipe), "--out", str(out), "--set", "rules.0.method=auto",
                 "--set", "rules.0.rank=8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "rules[0].rank" in err and "method auto takes a global target" in err
    assert not out.exists()


@pytest.mark.parametrize("allocation", ["sensitivity", "output"])
def test_auto_with_sensitivity_allocation_and_calibration(allocation):
    """``allocation: sensitivity`` probes each auto layer with the first method that takes
    it, ``output`` scores every candidate on the layer's outputs; the data-aware fit then
    runs on the chosen methods' modules."""
    torch.manual_seed(0)
    batches = [torch.randn(4, *SIZE) for _ in range(2)]
    new, p = compress(small_net(), [{"match": ["4", "6"], "method": "auto",
                                     "methods": ["spatial", "tucker2"], "ranks": 4}], SIZE, target={"macs": 0.7}, calibration=batches, config={"allocation": allocation})
    applied = [r for r in p.replacements if r.applied]
    assert applied and all(r.method in ("spatial", "tucker2") for r in applied)
    assert all("output_error" in r.fit for r in applied)
    assert new(batches[0]).shape == (4, 10)
