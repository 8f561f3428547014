"""Low-rank training: factorize before training (Kaiming / spectral init, dense first
layers), the semi-orthogonal constraint, Frobenius decay and the Cuttlefish switch."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _tools import load_tool
from torch import nn

from compresscnn import compress
from compresscnn.measure.counting import count
from compresscnn.core.decomposers import get_decomposer
from compresscnn.errors import CompressError, MethodError
from compresscnn.train.cuttlefish import StableRankMonitor, planned_layers, stable_rank
from compresscnn.train.scratch import (FrobeniusDecay, SemiOrthogonal, dense_kernel, factorize,
                                       factorized_layers, semi_orthogonal_deviation,
                                       semi_orthogonal_update)
from compresscnn.io.models.cifar_resnet import cifar_resnet
from compresscnn.util.modules import set_module

IN = (3, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    """These layers are tiny: a second OpenMP thread only adds waiting on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))


def structure(model: nn.Module) -> list:
    return [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False)))
            for n, m in model.named_modules()]


# ---------------------------------------------------------------------------- factorize

@pytest.mark.parametrize("method", ["tucker2", "cp", "spatial"])
def test_factorize_builds_the_compressed_architecture_at_a_mac_target(method):
    m = cifar_resnet(20)
    before = copy.deepcopy(m.state_dict())
    rules = [{"match": "layer*", "method": method}, {"match": "linear", "method": "svd"}]
    new, p = factorize(m, rules, IN, target={"macs": 0.5})
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert count(new, IN) == {"params": p.params_after, "macs": p.macs_after}
    assert p.macs_after <= 0.5 * p.total_macs
    ref = copy.deepcopy(m)                                    # what the decomposers build
    for r in p.replacements:
        if r.applied:
            layer = ref.get_submodule(r.name)
            set_module(ref, r.name, get_decomposer(r.method).skeleton(layer, tuple(r.rank)))
    assert structure(new) == structure(ref)
    assert all(r.fit == {"init": "kaiming"} for r in p.replacements if r.applied)
    assert torch.equal(new.conv1.weight, m.conv1.weight)      # no rule takes it
    assert new(torch.randn(2, *IN)).shape == (2, 10)


@pytest.mark.parametrize("rule", [{"rank": 0.5}, {"params": 0.4}, {"macs": 0.3}])
def test_factorize_takes_the_per_rule_policies(rule):
    m = tiny_net()
    rules = [{"match": ["3", "6"], "method": "tucker2", **rule}]
    new, p = factorize(m, rules, IN)
    _, ref = compress(m, rules, IN)
    assert p.ranks() == ref.ranks()
    assert count(new, IN)["params"] == p.params_after


def kaiming_dense_mean_square(conv: nn.Conv2d, x: torch.Tensor) -> float:
    dense = copy.deepcopy(conv)
    nn.init.kaiming_normal_(dense.weight, nonlinearity="relu")
    with torch.no_grad():
        return float(dense(x).square().mean())


@pytest.mark.parametrize("method", ["tucker2", "cp", "spatial", "svd"])
def test_kaiming_chain_keeps_a_dense_kaiming_layers_output_scale(method):
    conv = nn.Conv2d(64, 48, 1 if method == "svd" else 3, padding="same", bias=True)
    x = torch.randn(8, 64, 12, 12)
    dense_ms = kaiming_dense_mean_square(conv, x)
    new, _ = factorize(nn.Sequential(conv), [{"match": "0", "method": method, "rank": 0.5}],
                       (64, 12, 12), seed=3)
    chain = new[0]
    assert all(f.bias is None or not f.bias.any() for f in chain)
    assert chain[-1].bias is not None                       # the bias stays on the last factor
    # the product has a dense Kaiming kernel's expected squared norm, 2 C_out
    assert float(dense_kernel(chain).detach().square().sum()) == pytest.approx(2 * 48, rel=1e-5)
    with torch.no_grad():
        ratio = float(chain(x).square().mean()) / dense_ms
    assert 0.8 < ratio < 1.25, ratio      # 2^(N-1) = 2 to 8 with the ReLU gain on every factor
    # Kaiming-normal factors under one common scale: std * sqrt(fan_in) alike for all
    scaled = [float(f.weight.detach().std()) * f.weight[0].numel() ** 0.5 for f in chain]
    assert max(scaled) / min(scaled) < 1.3, scaled


def test_spectral_init_is_the_best_low_rank_approximation_of_a_kaiming_dense_layer():
    layer = nn.Linear(40, 30)
    new, p = factorize(nn.Sequential(layer), [{"match": "0", "method": "svd", "rank": 6}],
                       (40,), init="spectral", seed=7)
    w = torch.empty(30, 40)
    nn.init.kaiming_normal_(w, nonlinearity="relu", generator=torch.Generator().manual_seed(7))
    u, s, vh = torch.linalg.svd(w.double())
    best = (u[:, :6] * s[:6]) @ vh[:6]
    assert torch.allclose(dense_kernel(new[0]).double(), best, atol=1e-5)
    assert not new[0][1].bias.any()
    row = p.replacements[0]
    assert row.fit["init"] == "spectral"
    assert row.rel_error == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-4)


def test_spectral_init_tucker2_product_is_the_hosvd_of_a_kaiming_kernel():
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=False)
    new, p = factorize(nn.Sequential(conv), [{"match": "0", "method": "tucker2",
                                              "rank": [4, 5]}], (8, 8, 8), init="spectral")
    w = torch.empty(12, 8, 3, 3)
    nn.init.kaiming_normal_(w, nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    dense = copy.deepcopy(conv)
    with torch.no_grad():
        dense.weight.copy_(w)
    ref = get_decomposer("tucker2").decompose(dense, (4, 5))
    assert torch.allclose(dense_kernel(new[0]), dense_kernel(ref), atol=1e-6)


def test_dense_first_layers_through_exclude():
    m = cifar_resnet(20)
    rules = [{"match": ["conv1", "layer*"], "exclude": ["conv1", "layer1.*"],
              "method": "tucker2", "rank": 0.5}]
    new, p = factorize(m, rules, IN)
    done = set(p.ranks())
    assert done and not any(n == "conv1" or n.startswith("layer1.") for n in done)
    assert {n for n in done if n.startswith("layer2.")}
    for name, mod in new.named_modules():
        if name == "conv1" or (name.startswith("layer1.") and name.endswith(("conv1", "conv2"))):
            assert type(mod) is nn.Conv2d
            assert torch.equal(mod.weight, m.get_submodule(name).weight)
    assert set(factorized_layers(new)) == done


def test_factorize_refuses_bad_init_and_non_chain_methods():
    with pytest.raises(CompressError, match="init: 'xavier' is not one of kaiming, spectral"):
        factorize(tiny_net(), [{"match": "3", "method": "tucker2", "rank": 0.5}], IN,
                  init="xavier")
    with pytest.raises(MethodError, match="FireModule is not a factorized layer"):
        factorize(tiny_net(), [{"match": "3", "method": "fire", "rank": 4}], IN)


# ---------------------------------------------------------------------------- dense kernel

@pytest.mark.parametrize("method,conv", [
    ("tucker2", nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2)),
    ("tucker2", nn.Conv2d(8, 12, 3, padding=1, groups=2)),
    ("cp", nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2))),
    ("spatial", nn.Conv2d(6, 10, 3, stride=2, padding=1)),
    ("spatial", nn.Conv2d(8, 8, 3, padding=1, groups=8)),
    ("svd", nn.Conv2d(8, 10, 1, stride=2)),
])
def test_dense_kernel_is_the_conv_the_chain_computes(method, conv):
    torch.manual_seed(0)
    conv = conv.double()
    dec = get_decomposer(method)
    opts = {"iters": 3} if method == "cp" else {}
    chain = dec.decompose(conv, dec.scale_rank(conv, 0.5), **opts)
    w = dense_kernel(chain)
    x = torch.randn(2, conv.in_channels, 11, 11, dtype=torch.double)
    ref = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert torch.allclose(chain(x), ref, atol=1e-12)
    # at full rank it is the layer's own kernel (block-diagonal when grouped)
    full = dense_kernel(dec.decompose(conv, dec.max_rank(conv)))
    x1 = torch.randn(2, conv.in_channels, 9, 9, dtype=torch.double)
    assert torch.allclose(F.conv2d(x1, full, None, conv.stride, conv.padding, conv.dilation),
                          conv._conv_forward(x1, conv.weight, None), atol=1e-10)


def test_dense_kernel_refuses_chains_it_cannot_compose():
    chain = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(MethodError, match="spatial axis 0"):
        dense_kernel(chain)
    with pytest.raises(MethodError, match="not a factorized layer"):
        dense_kernel(nn.Conv2d(4, 4, 3))


# ---------------------------------------------------------------------------- Frobenius decay

def test_frobenius_decay_penalty_is_the_dense_kernels_norm_and_has_gradients():
    m = tiny_net()
    rules = [{"match": "3", "method": "tucker2", "rank": 0.5},
             {"match": "6", "method": "cp", "rank": 20},
             {"match": "11", "method": "svd", "rank": 8}]
    new, p = factorize(m, rules, IN)
    names = list(p.ranks())
    fd = FrobeniusDecay(new, names, coeff=1e-3)
    expect = sum(float(dense_kernel(new.get_submodule(n)).detach().square().sum())
                 for n in names)
    pen = fd.penalty()
    assert float(pen.detach()) == pytest.approx(1e-3 * expect, rel=1e-5)
    pen.backward()
    assert len(fd.parameters()) == 3 + 4 + 2
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in fd.parameters())
    with torch.autocast("cpu", torch.bfloat16):
        assert fd.penalty().dtype == torch.float32
    # spatial: the other split of the spatial axes
    sp, _ = factorize(m, [{"match": "6", "method": "spatial", "rank": 12}], IN)
    fd = FrobeniusDecay(sp, None, coeff=1.0)
    assert list(fd.chains) == ["6"]
    expect = float(dense_kernel(sp[6]).detach().square().sum())
    assert float(fd.penalty().detach()) == pytest.approx(expect, rel=1e-5)


def test_frobenius_decay_errors_name_the_layer():
    with pytest.raises(MethodError, match="3: a Conv2d is not a factorized layer"):
        FrobeniusDecay(tiny_net(), ["3"], 1e-4)
    with pytest.raises(MethodError, match="nope: no such module"):
        FrobeniusDecay(tiny_net(), ["nope"], 1e-4)
    with pytest.raises(CompressError, match="coeff"):
        FrobeniusDecay(tiny_net(), [], -1.0)


# ---------------------------------------------------------------------------- semi-orthogonal

@pytest.mark.parametrize("rows,cols", [(8, 64), (16, 36), (30, 36)])
def test_semi_orthogonal_updates_converge_from_a_random_matrix(rows, cols):
    m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    assert semi_orthogonal_deviation(m) > 0.2
    for _ in range(30):
        m = semi_orthogonal_update(m)
    assert semi_orthogonal_deviation(m) < 1e-5
    p = m @ m.T
    alpha2 = float(torch.diagonal(p).mean())
    assert torch.allclose(p / alpha2, torch.eye(rows), atol=1e-4)


def test_semi_orthogonal_picks_the_first_factor_or_says_why_not():
    m = tiny_net()
    rules = [{"match": "3", "method": "tucker2", "rank": 0.5},
             {"match": "6", "method": "cp", "rank": 40},        # R = 40 > C_in = 32
             {"match": "11", "method": "svd", "rank": 8}]
    new, p = factorize(m, rules, IN)
    so = SemiOrthogonal(new, list(p.ranks()))
    assert so.factors == {"3": new[3][0], "11": new[11][0]}
    assert "more rows than columns" in so.skipped["6"]
    sp, _ = factorize(m, [{"match": "6", "method": "spatial", "rank": 12}], IN)
    assert SemiOrthogonal(sp).factors == {"6": sp[6][0]}           # the k_h x 1 conv
    g = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2))
    gt, _ = factorize(g, [{"match": "0", "method": "tucker2", "rank": 2}], (8, 8, 8))
    assert "grouped" in SemiOrthogonal(gt).skipped["0"]
    with pytest.raises(CompressError, match="every"):
        SemiOrthogonal(new, every=0)


def test_semi_orthogonal_runs_every_n_steps_and_holds_during_training():
    torch.manual_seed(0)
    m = tiny_net()
    rules = [{"match": ["3", "6"], "method": "tucker2", "rank": 0.5},
             {"match": "11", "method": "svd", "rank": 8}]
    runs = {}
    for constrained in (True, False):
        new, p = factorize(m, rules, IN, seed=1)
        so = SemiOrthogonal(new, list(p.ranks()), every=4)
        opt = torch.optim.SGD(new.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        applied = []
        for step in range(1, 41):
            x = torch.randn(8, 3, 16, 16, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(new(x), y).backward()
            opt.step()
            if constrained and so.after_step(step):
                applied.append(step)
        runs[constrained] = so.max_deviation()
        if constrained:
            assert applied == list(range(4, 41, 4))
    assert runs[True] < 0.02 < 0.2 < runs[False], runs


# ---------------------------------------------------------------------------- Cuttlefish

def with_stable_rank(n: int, s: float) -> torch.Tensor:
    """An n x n matrix whose stable rank is s: singular values 1, then n-1 equal ones."""
    v = ((s - 1) / (n - 1)) ** 0.5
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(n)))
    return q @ torch.diag(torch.tensor([1.0] + [v] * (n - 1)))


def test_stable_rank_of_known_matrices():
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert stable_rank(torch.outer(torch.randn(5), torch.randn(9))) == pytest.approx(1.0)
    assert stable_rank(torch.diag(torch.tensor([1.0, 0.5]))) == pytest.approx(1.25)
    assert stable_rank(with_stable_rank(16, 5.5)) == pytest.approx(5.5)
    assert stable_rank(torch.zeros(3, 4)) == 0.0
    w = torch.randn(6, 4, 3, 3)
    assert stable_rank(w) == pytest.approx(stable_rank(w.reshape(6, 36)))
    assert stable_rank(w) == pytest.approx(stable_rank(w.reshape(6, 36).T))


def set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(w)


def test_monitor_settles_when_the_stable_ranks_stop_moving():
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    set_weight(net[0], with_stable_rank(16, 12.0))
    set_weight(net[2], with_stable_rank(16, 10.0))
    mon = StableRankMonitor(net, window=5, tol=0.1)
    settled_at = None
    for epoch in range(40):
        # layer 0 decays to 4 quickly; layer 2 keeps drifting until epoch 20, then stops
        set_weight(net[0], with_stable_rank(16, 4.0 + 8.0 * 0.5 ** epoch))
        set_weight(net[2], with_stable_rank(16, max(4.0, 10.0 - 0.3 * epoch)))
        if mon.update(epoch) and settled_at is None:
            settled_at = epoch
    assert mon.settled["0"] is not None and mon.settled["0"] < mon.settled["2"]
    assert 20 < settled_at == mon.settled["2"] < 40
    assert mon.epochs == list(range(40))
    # scaled stable rank: s * full / s_0
    assert mon.ranks() == {"0": 6, "2": 7}     # ceil(4 * 16/12), ceil(4 * 16/10)
    state = mon.state_dict()
    again = StableRankMonitor(net, window=5)
    again.load_state_dict(state)
    assert again.ranks() == mon.ranks() and again.done


def test_monitor_does_not_settle_while_ranks_move():
    net = nn.Sequential(nn.Linear(16, 16))
    mon = StableRankMonitor(net, window=4, tol=0.1)
    for epoch in range(30):
        set_weight(net[0], with_stable_rank(16, 2.0 + 0.4 * epoch % 12))
        assert not mon.update(epoch)
    assert mon.settled == {"0": None}


def test_switch_at_init_keeps_full_rank_layers_dense():
    m = tiny_net().eval()
    rules = [{"match": ["3", "6"], "method": "tucker2", "rank": 0.1},
             {"match": "11", "method": "svd"}]
    names = planned_layers(m, rules, IN)
    assert names == ["3", "6", "11"]
    mon = StableRankMonitor(m, names)
    assert mon.ranks() == {"3": 32, "6": 32, "11": 24}           # at init: the full ranks
    new, p = mon.switch(m, rules, IN)
    assert p.ranks() == {}
    assert all("no smaller than dense" in r.skipped for r in p.replacements)
    assert structure(new) == structure(m)


def test_switch_uses_the_scaled_stable_ranks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 10)).eval()
    rules = [{"match": "3", "method": "tucker2"}, {"match": "8", "method": "svd"}]
    mon = StableRankMonitor(m, planned_layers(m, rules, IN), min_fraction=0.1)
    with torch.no_grad():   # "training" concentrates the spectra: keep the top directions
        for n in ("3", "8"):
            w = m.get_submodule(n).weight
            u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
            s[4:] *= 0.02
            w.copy_((u * s @ vh).reshape(w.shape))
    mon.update(0)
    r = mon.ranks()
    assert all(4 <= r[n] <= 16 for n in r), r          # ~ s * 64 / s_0, s ~ 4 of s_0 ~ 16-30
    new, p = mon.switch(m, rules, IN)
    assert p.ranks()["8"] == [r["8"]]               # svd: the same unfolding, exactly r
    assert p.ranks()["3"][1] == r["3"]              # tucker2's output rank is that unfolding's
    assert p.replacements[0].policy.startswith("stable rank")
    x = torch.randn(8, *IN)
    with torch.no_grad():
        err = (new.eval()(x) - m(x)).norm() / m(x).norm()
    assert err < 0.05, err


def test_switch_needs_every_factorized_layer_watched():
    m = tiny_net()
    mon = StableRankMonitor(m, ["3"])
    with pytest.raises(MethodError, match="6: the rules factorize it but"):
        mon.switch(m, [{"match": ["3", "6"], "method": "tucker2"}], IN)
    with pytest.raises(CompressError, match="window"):
        StableRankMonitor(m, ["3"], window=1)


def test_init_scale_tool_reports_sizes_and_scales(tmp_path, capsys):
    tool = load_tool("lowrank_init_scale")
    rows = tool.main(["--methods", "tucker2", "--inits", "kaiming", "relu_every",
                      "--batch", "4", "--out", str(tmp_path / "r.json")])
    dense, kaiming, relu_every = rows
    assert kaiming["macs"] <= 0.5 * dense["macs"] and kaiming["params"] < dense["params"]
    assert 0.9 < kaiming["white_ms_median"] < 1.1
    assert 3.0 < relu_every["white_ms_median"] < 5.0      # 2^(3-1) for three factors
    assert (tmp_path / "r.json").is_file() and "tucker2" in capsys.readouterr().out
