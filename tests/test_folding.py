"""Folding BatchNorm and Fire's channel reorder into convs before export."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import compresscnn as cc
from compresscnn.core.decomposers import get_decomposer
from compresscnn.core.decomposers.fire import FireModule
from compresscnn.core.folding import fold_for_export, foldable_batchnorms, foldable_gathers


def random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _fire(conv: nn.Conv2d, **options) -> FireModule:
    dec = get_decomposer("fire")
    return dec.decompose(conv, dec.scale_rank(conv, 0.5, **options), **options)


def _n(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def resnet18_fire() -> nn.Module:
    torch.manual_seed(0)
    base = random_bn(torchvision.models.resnet18(num_classes=10))
    small, _ = cc.compress(base, [{"match": "layer*.conv*", "method": "fire", "rank": 0.3}],
                           (3, 64, 64))
    return small.eval()


def test_resnet18_fire_folds_exactly_and_leaves_the_model_alone(resnet18_fire):
    model = resnet18_fire
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, done = fold_for_export(model)
    # every BatchNorm (16 after Fire modules, 4 after dense convs) and the 8 reorders that
    # reach conv2 through bn1 and relu; the 8 that feed the residual sum stay
    assert len(done["batchnorms"]) == 20 and len(done["gathers"]) == 8
    assert _n(folded, nn.BatchNorm2d) == 0 and _n(model, nn.BatchNorm2d) == 20
    assert sum(m.perm is not None for m in folded.modules() if isinstance(m, FireModule)) == 8
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5                       # float32 round-off
        m64 = copy.deepcopy(model).double()
        f64, _ = fold_for_export(m64)
        assert _rel(f64(x.double()), m64(x.double())) < 1e-12         # the maths is exact


class _FireNet(nn.Module):
    """Fire (4x4 kernel, no padding: the 1x1 branch reads a cropped window) -> BN -> ReLU ->
    conv."""

    def __init__(self, next_groups: int = 1, affine: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = _fire(nn.Conv2d(6, 8, 4, bias=False), relu=True)
        self.bn1 = nn.BatchNorm2d(8, affine=affine)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=next_groups)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("affine", [True, False])
def test_fold_through_concat_and_gather(affine):
    net = random_bn(_FireNet(affine=affine))
    assert net.conv1.perm is not None and net.conv1.shift is not None
    assert net.conv1.expand1x1.bias is None  # folding adds one
    folded, done = fold_for_export(net)
    assert done == {"batchnorms": ["bn1", "bn2"], "gathers": ["conv1"]}
    assert folded.conv1.perm is None and net.conv1.perm is not None
    x = torch.randn(3, 6, 11, 9)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5


def test_reorder_before_a_grouped_conv_stays():
    net = random_bn(_FireNet(next_groups=2))
    assert foldable_gathers(net) == {}
    folded, done = fold_for_export(net)
    assert done["gathers"] == [] and folded.conv1.perm is not None
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5


def test_grouped_tucker2_chain_folds():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False)
    dec = get_decomposer("tucker2")
    net = random_bn(nn.Sequential(dec.decompose(conv, dec.scale_rank(conv, 0.5)),
                                  nn.BatchNorm2d(12), nn.ReLU()))
    assert foldable_batchnorms(net) == {"1": [("0.2", c) for c in range(12)]}
    folded, _ = fold_for_export(net)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.bn, self.bn_twice = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.a(x)
        z = self.b(x)
        return self.bn(y) + y + self.bn_twice(z) + self.bn_twice(z * 2)


def test_not_folded_when_the_conv_output_or_the_bn_is_shared():
    assert foldable_batchnorms(_Shared()) == {}


def test_not_folded_through_a_reorder_that_repeats_channels():
    net = random_bn(_FireNet())
    net.conv1.perm = torch.zeros(8, dtype=torch.long)  # channel 0 eight times
    assert "bn1" not in foldable_batchnorms(net) and foldable_gathers(net) == {}


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this module
            x = -x
        return self.block(x)


def test_untraceable_model_is_folded_child_by_child():
    net = random_bn(_Untraceable())
    folded, done = fold_for_export(net)
    assert done["batchnorms"] == ["block.1"] and isinstance(folded.block[1], nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5


def test_nothing_to_fold_returns_the_model_itself():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fold_for_export(net) == (net, {"batchnorms": [], "gathers": []})
