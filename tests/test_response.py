"""The closed-form response fit (compresscnn.fit.response) against reference solutions."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresscnn.fit import chain as C
from compresscnn.fit import response as R
from compresscnn.core.ranks import decompose
from compresscnn.errors import CompressError, DataError
from compresscnn.fit.response import Tail, fit_layer


def _batches(layer: nn.Module, n: int = 3, size: int = 9, seed: int = 0):
    """ReLU inputs (correlated channels) and the outputs of a *different* random layer of
    the same shape plus noise, so that no decomposition fits exactly."""
    gen = torch.Generator().manual_seed(seed)
    target = copy.deepcopy(layer)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    cin = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
    mix = torch.randn(cin, cin, generator=gen, dtype=torch.float64)
    xs, ys = [], []
    for _ in range(n):
        shape = (6, cin, size, size) if isinstance(layer, nn.Conv2d) else (40, cin)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        x = torch.relu(torch.movedim(torch.movedim(x, 1, -1) @ mix, -1, 1))
        with torch.no_grad():
            y = target(x)
        xs.append(x)
        ys.append(y + 0.05 * torch.randn(y.shape, generator=gen, dtype=y.dtype))
    return xs, ys


def _rows(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patches of ``x`` as ``conv`` reads them (zero padding), one row per output position."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _lstsq(a: list[torch.Tensor], y: list[torch.Tensor]) -> torch.Tensor:
    a, y = torch.cat(a), torch.cat(y)
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    return torch.linalg.lstsq(a, y).solution                     # (d + 1) x out


def _outputs(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def test_dense_conv_is_the_least_squares_solution():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    xs, ys = _batches(conv)
    mod = copy.deepcopy(conv)
    fit = fit_layer(mod, xs, ys, reference=conv)
    ref = _lstsq([_rows(x, conv) for x in xs], [_outputs(y) for y in ys])
    torch.testing.assert_close(mod.weight.reshape(6, -1), ref[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.bias, ref[-1], rtol=1e-4, atol=1e-5)
    assert fit["solver"] == "closed_form" and fit["after"] < fit["before"]


@pytest.mark.parametrize("method,rank", [("tucker2", (2, 3)), ("spatial", (4,)),
                                         ("cp", (5,))])
def test_last_factor_is_the_least_squares_solution(monkeypatch, method, rank):
    """With the joint refinement off, the last factor is the least-squares fit of the
    targets on what the factors before it output (unfolded for a 1 x k_w last factor)."""
    monkeypatch.setattr(R, "LBFGS_MAX", 0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    xs, ys = _batches(conv)
    mod = decompose(conv, method, rank).double()
    prefix = copy.deepcopy(mod[:-1])
    fit_layer(mod, xs, ys, reference=conv)
    last = mod[-1]
    with torch.no_grad():
        zs = [prefix(x) for x in xs]
    ref = _lstsq([_rows(z, last) for z in zs], [_outputs(y) for y in ys])
    torch.testing.assert_close(last.weight.reshape(6, -1), ref[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.bias, ref[-1], rtol=1e-4, atol=1e-5)
    # the prefix is what it was
    assert all(torch.equal(a, b) for a, b in zip(prefix.parameters(), mod[:-1].parameters()))


def test_joint_refinement_only_lowers_the_error(monkeypatch):
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    xs, ys = _batches(conv)
    errors = []
    for budget in (0, R.LBFGS_MAX):
        monkeypatch.setattr(R, "LBFGS_MAX", budget)
        mod = decompose(conv, "cp", (4,)).double()
        errors.append(fit_layer(mod, xs, ys, reference=conv)["after"])
        assert errors[-1] == pytest.approx(R.relative_error(mod, xs, ys, Tail([])), rel=1e-6)
    assert errors[1] < errors[0]


def test_svd_pair_is_the_reduced_rank_regression():
    layer = nn.Linear(10, 7).double()
    xs, ys = _batches(layer, n=4)
    mod = decompose(layer, "svd", 3).double()
    fit_layer(mod, xs, ys, reference=layer)
    x, y = torch.cat(xs), torch.cat(ys)
    ref = _lstsq([x], [y])                                        # 11 x 7
    fitted = x @ ref[:-1]
    fitted = fitted - fitted.mean(0)
    v = torch.linalg.svd(fitted, full_matrices=False)[2][:3].T    # 7 x 3
    w = ref[:-1] @ v @ v.T
    b = y.mean(0) - x.mean(0) @ w
    torch.testing.assert_close((mod[1].weight @ mod[0].weight).T, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod[1].bias, b, rtol=1e-4, atol=1e-5)
    s0 = torch.linalg.svdvals(mod[0].weight)
    torch.testing.assert_close(s0, torch.linalg.svdvals(mod[1].weight))  # balanced split


@pytest.mark.parametrize("conv,method,rank", [
    (nn.Conv2d(6, 8, 3, padding=1, bias=False), "cp", (7,)),
    (nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), "tucker2", (3, 4)),
    (nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), groups=2), "spatial", (3,)),
    (nn.Conv2d(6, 8, 3, padding=1, groups=2), "tucker2", (2, 3)),
    (nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), "cp", (5,)),
    (nn.Conv2d(6, 8, 1, stride=2), "svd", (3,)),
    (nn.Linear(9, 7), "svd", (3,)),
])
def test_composite_kernel_is_what_the_chain_computes(conv, method, rank):
    conv = conv.double()
    mod = decompose(conv, method, rank).double()
    chain = C._Chain.of(mod, conv)
    assert chain is not None
    k = chain.kernel()
    dense = copy.deepcopy(conv)
    with torch.no_grad():
        d = chain.d
        dense.weight.copy_(k[..., :d].reshape(dense.weight.shape))
        dense.bias.copy_(k[..., d].reshape(-1)) if chain.bias else None
    shape = (2, 6, 11, 13) if isinstance(conv, nn.Conv2d) else (5, 9)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), mod(x), rtol=1e-10, atol=1e-12)
    last = chain.params[len(chain.layers) - 1].reshape(chain.g, chain.co, -1)
    torch.testing.assert_close(last @ chain.last_operator().mT, k[..., :d])


def test_zstep_is_the_elementwise_minimum():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(500, generator=gen).clamp(0, 6)
    u0 = 3 * torch.randn(500, generator=gen)
    grid = torch.linspace(-12, 12, 24001)
    for lo, hi in ((0.0, math.inf), (0.0, 6.0)):
        for lam in (0.01, 1.0):
            u = R._zstep(t, u0, lam, lo, hi)
            cost = (t - u.clamp(lo, hi)) ** 2 + lam * (u - u0) ** 2
            brute = ((t[:, None] - grid.clamp(lo, hi)) ** 2
                     + lam * (grid - u0[:, None]) ** 2).min(1).values
            assert bool((cost <= brute + 1e-5).all())


def test_tail_structure():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    t = torch.randn(2, 3, 4, 4)
    scale, shift, lo, hi = Tail([bn, (0.0, 6.0)]).affine_clamp()
    with torch.no_grad():
        want = F.relu6(bn(t))
    got = (t * scale[:, None, None] + shift[:, None, None]).clamp(lo, hi)
    torch.testing.assert_close(got, want)
    assert Tail([bn]).linear and not Tail([(0.0, math.inf)]).linear
    assert Tail([(0.0, math.inf), bn]).affine_clamp() is None   # a clamp, then more


def test_relu_tail_is_fitted_through_the_relu():
    """Through a ReLU, the fit is closer after the ReLU than the linear fit of the raw
    output, and never worse than the data-free start."""
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    xs, ys = _batches(conv)
    relu = Tail([(0.0, math.inf)])
    linear, through = decompose(conv, "cp", (4,)).double(), decompose(conv, "cp", (4,)).double()
    fit_layer(linear, xs, ys, reference=conv)
    fit = fit_layer(through, xs, ys, relu, reference=conv)
    ts = [relu(y) for y in ys]
    assert fit["after"] < fit["before"]
    assert fit["after"] == pytest.approx(R.relative_error(through, xs, ts, relu), rel=1e-6)
    assert fit["after"] < R.relative_error(linear, xs, ts, relu)


def test_fire_module_falls_back_to_the_iterative_fit():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    xs, ys = _batches(conv.double())
    conv = conv.float()
    mod = decompose(conv, "fire", (3,))
    fit = fit_layer(mod, [x.float() for x in xs], [y.float() for y in ys], reference=conv,
                    adam=(20, 3e-3))
    assert fit["solver"] == "adam" and fit["iters"] == 20 and fit["after"] <= fit["before"]


def test_non_finite_activations_are_a_one_line_error():
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    xs, ys = _batches(conv)
    xs[1][0, 0, 0, 0] = math.inf
    with pytest.raises(DataError, match=r"^layer3\.conv: the calibration activations") as e:
        fit_layer(decompose(conv, "cp", (4,)).double(), xs, ys, reference=conv,
                  name="layer3.conv")
    assert "\n" not in str(e.value) and isinstance(e.value, CompressError)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
    nn.Conv2d(4, 6, (3, 5), padding="same", groups=2),
    nn.Conv2d(4, 6, 1, stride=2),
    nn.Linear(5, 3),
])
def test_drawn_rows_are_the_unfolded_ones(layer):
    """Reading only the drawn positions gives the rows the unfolding gives (all drawn)."""
    x = torch.randn((3, 4, 9, 8) if isinstance(layer, nn.Conv2d) else (7, 5))
    with torch.no_grad():
        y = layer(x)
    g, d, co = C._dims(layer)
    rows, outs = C._gather(layer, x, y, 1.0, torch.Generator().manual_seed(0))
    cols, ref = C._columns(layer, x), C._outputs(layer, y)
    torch.testing.assert_close(rows, cols.permute(1, 0, 3, 2).reshape(g, -1, d))
    torch.testing.assert_close(outs, ref.permute(1, 0, 3, 2).reshape(g, -1, co))
    # and the layer is a linear map of them
    w = layer.weight.reshape(g, co, d)
    torch.testing.assert_close(rows @ w.mT + layer.bias.reshape(g, 1, co), outs)


def test_the_joint_refinement_is_budgeted_by_the_layers_size_not_the_images(monkeypatch):
    """Each L-BFGS evaluation multiplies the kernel by the d' x d' Gram matrix: a layer
    whose ``LBFGS_MAX`` evaluations would cost more than ``LBFGS_WORK`` gets fewer
    iterations (whole blocks, at least one), and the fit still never ends worse."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    chain = C._Chain.of(decompose(conv, "tucker2", (4, 4)), conv)
    per = chain.g * chain.co * (chain.d + 1) ** 2
    assert R._budget(chain) == R.LBFGS_MAX
    monkeypatch.setattr(R, "LBFGS_WORK", 25 * per)
    assert R._budget(chain) == 20
    monkeypatch.setattr(R, "LBFGS_WORK", 1.0)
    assert R._budget(chain) == R.LBFGS_BLOCK
    mod = decompose(conv, "tucker2", (4, 4))
    xs = [torch.randn(4, 8, 8, 8) for _ in range(2)]
    ys = [conv(x).detach() for x in xs]
    out = fit_layer(mod, xs, ys, Tail([(0.0, math.inf)]), reference=conv)
    assert out["solver"] == "closed_form" and out["after"] < out["before"]
    assert out["iters"] <= R.LBFGS_BLOCK + R.MAX_ROUNDS


def test_the_default_work_budget_bounds_imagenet_sized_layers_only():
    """By default the refinement is bounded: every layer of a CIFAR ResNet (64-channel 3x3
    convs at most) keeps all of ``LBFGS_MAX`` iterations, a 512-channel 3x3 conv of an
    ImageNet ResNet (Tucker-2 at half its MACs) gets a fraction of them."""
    assert math.isfinite(R.LBFGS_WORK)
    small = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    chain = C._Chain.of(decompose(small, "tucker2", (32, 32)), small)
    assert R._budget(chain) == R.LBFGS_MAX
    big = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    chain = C._Chain.of(decompose(big, "tucker2", (360, 360)), big)
    assert R.LBFGS_BLOCK <= R._budget(chain) <= R.LBFGS_MAX // 2
