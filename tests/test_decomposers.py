"""Decomposers: exactness at full rank, geometry, monotone error, analytic cost, ranks,
registry, CP degeneracy control, ONNX parity and the numeric kernels' contracts.

Everything runs in float64 on small layers (<= 8 channels) and odd inputs (<= 32x32) on one
thread. Each method gets a seeded random sample of geometries from an explicit grid; a case
either is refused by ``supports`` with a reason, or must pass every check below.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compresscnn.core.decomposers as D
import compresscnn.core.ranks as RK
from compresscnn.core.decomposers import _numerics as num, base
from compresscnn.core.decomposers.fire import FireModule
from compresscnn.core import method_options
from compresscnn.config import MethodOptions
from compresscnn.errors import MethodError, RankError

T_GRID = (0.25, 0.5, 0.75, 1.0)
#: ALS at different ranks are separate fits: the error is only monotone up to this
#: tolerance (it is bounded by the monotone per-tap truncation error; see cp.py)
CP_MONOTONE_TOL = 0.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------
# the geometry grid
# ---------------------------------------------------------------------------------------

KERNELS = [(1, 1), (3, 3), (5, 5), (7, 7), (3, 1), (1, 5), (2, 2), (4, 3)]
STRIDES = [(1, 1), (2, 1), (2, 2)]
PADDINGS = [0, 1, (1, 2), "same", "valid"]
DILATIONS = [1, 2, 3, (1, 2)]
GROUPS = [1, 2, "dw"]
MODES = ["zeros", "reflect", "circular"]


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _geometries(seed: int, n: int, kernels=KERNELS, group_choices=GROUPS) -> list[dict]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        k = rng.choice(kernels)
        pad = rng.choice(PADDINGS)
        stride = (1, 1) if pad == "same" else rng.choice(STRIDES)
        dil = rng.choice(DILATIONS)
        groups = rng.choice(group_choices)
        if groups == "dw":
            cin = cout = groups = rng.choice([4, 6])
        else:
            cin = rng.choice([4, 6, 8])
            cout = rng.choice([4, 6, 8])
        eff = [_pair(dil)[a] * (k[a] - 1) + 1 for a in range(2)]
        hw = tuple(max(base_hw, e + 4) | 1 for base_hw, e in zip((9, 11), eff))
        out.append(dict(cin=cin, cout=cout, k=k, stride=stride, padding=pad, dilation=dil,
                        groups=groups, bias=rng.random() < 0.5, mode=rng.choice(MODES),
                        hw=hw))
    return out


def _make(g: dict, dtype=torch.float64, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"],
                     dilation=g["dilation"], groups=g["groups"], bias=g["bias"],
                     padding_mode=g["mode"], dtype=dtype)
    return conv


def _id(g: dict) -> str:
    return (f"c{g['cin']}-{g['cout']}_k{g['k'][0]}x{g['k'][1]}_s{g['stride'][0]}{g['stride'][1]}"
            f"_p{g['padding']}_d{g['dilation']}_g{g['groups']}_{g['mode']}"
            f"{'_b' if g['bias'] else ''}").replace(" ", "")


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------

def _macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops() // 2


def _probe_kernel(module: nn.Module, layer: nn.Conv2d) -> torch.Tensor:
    """The dense kernel (C_out x C_in x kh x kw) of a linear module that acts like a conv
    with ``layer``'s geometry: the gradient of one output position whose receptive field
    lies inside the input (so padding plays no part) with respect to the input, read at the
    kernel's taps."""
    kh, kw = layer.kernel_size
    (s0, s1), (d0, d1) = layer.stride, layer.dilation
    (pt, pb), (pl, pr) = base.padding_pairs(layer)
    y0, x0 = -(-pt // s0), -(-pl // s1)
    r0, c0 = y0 * s0 - pt, x0 * s1 - pl
    hp = r0 + d0 * (kh - 1) + 2 + max(pt, pb)
    wp = c0 + d1 * (kw - 1) + 2 + max(pl, pr)
    x = torch.zeros(1, layer.in_channels, hp, wp, dtype=layer.weight.dtype,
                    requires_grad=True)
    out = module(x)[0, :, y0, x0]
    rows = torch.arange(kh) * d0 + r0
    cols = torch.arange(kw) * d1 + c0
    taps = []
    for o in range(out.shape[0]):
        (grad,) = torch.autograd.grad(out[o], x, retain_graph=True)
        taps.append(grad[0][:, rows][:, :, cols])
    return torch.stack(taps)


def _grouped(dense: torch.Tensor, groups: int) -> tuple[torch.Tensor, float]:
    """Grouped kernel from a dense one, and the largest entry outside the group blocks."""
    co, ci = dense.shape[:2]
    cog, cig = co // groups, ci // groups
    blocks, off = [], 0.0
    for g in range(groups):
        blk = dense[g * cog:(g + 1) * cog]
        blocks.append(blk[:, g * cig:(g + 1) * cig])
        mask = torch.ones(ci, dtype=torch.bool)
        mask[g * cig:(g + 1) * cig] = False
        if mask.any():
            off = max(off, float(blk[:, mask].abs().max()))
    return torch.cat(blocks), off


def _check_plain(module: nn.Module, layer: nn.Module) -> None:
    allowed = (nn.Sequential, nn.Conv2d, nn.Linear, FireModule)
    for m in module.modules():
        assert isinstance(m, allowed), type(m)
    for p in module.parameters():
        assert p.dtype == layer.weight.dtype and p.device == layer.weight.device
        assert torch.isfinite(p).all()
    info = module.fit_info
    assert set(info) >= {"rel_error", "norm_ratio", "iters"}
    assert math.isfinite(info["rel_error"]) and math.isfinite(info["norm_ratio"])


def _check_layer(method: str, g: dict, options: dict) -> None:
    dec = D.get_decomposer(method)
    layer = _make(g)
    reason = dec.supports(layer)
    if reason is not None:
        assert isinstance(reason, str) and reason
        with pytest.raises(MethodError):
            RK.decompose(layer, method, "full", **options)
        return
    torch.manual_seed(1)
    x = torch.randn(2, g["cin"], *g["hw"], dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x)
    scale = max(1.0, float(ref.abs().max()))
    linear = not options.get("relu", False)
    exact = method != "fire" or (options.get("pct3x3", 0.5) == 1.0 and linear)

    full = dec.max_rank(layer, **options)
    assert RK.resolve_rank(dec, layer, "full", **options) == full
    errs = []
    ranks = [dec.scale_rank(layer, t, **options) for t in T_GRID]
    assert ranks[-1] == full
    for a, b in zip(ranks, ranks[1:]):
        assert all(p <= q for p, q in zip(a, b)), ranks
    for rank in ranks:
        mod = dec.decompose(layer, rank, **options)
        _check_plain(mod, layer)
        with torch.no_grad():
            out = mod(x)
        assert out.shape == ref.shape
        # cost() is the built module's params and MACs, exactly
        params, macs = dec.cost(layer, rank, g["hw"], **options)
        assert params == sum(p.numel() for p in mod.parameters())
        with torch.no_grad():
            assert macs == _macs(mod, x[:1])
        if rank == full and exact:
            assert float((out - ref).abs().max()) < 1e-9 * scale
        if not linear:
            continue
        # the module IS a conv with the layer's geometry and some kernel W_hat (checked on
        # the whole input, padding included), and fit_info reports ||W - W_hat|| / ||W||
        dense = _probe_kernel(mod, layer)
        w_hat, off = _grouped(dense, layer.groups)
        assert off < 1e-12
        twin = _make(g)
        with torch.no_grad():
            twin.weight.copy_(w_hat)
            assert float((mod(x) - twin(x)).abs().max()) < 1e-9 * scale
        w = layer.weight.detach()
        rel = float((w - w_hat).norm() / w.norm())
        assert abs(rel - mod.fit_info["rel_error"]) < 1e-9
        errs.append(rel)
    if not linear:
        return
    tol = CP_MONOTONE_TOL if method == "cp" else 1e-9
    for a, b in zip(errs, errs[1:]):
        assert b <= a + tol, errs
    if exact:
        assert errs[-1] < 1e-9


#: method -> (seed, kernels, groups): the grid is weighted towards what the method takes,
#: keeping some refused combinations (each must come with a reason)
_SPATIAL_K = [k for k in KERNELS if min(k) > 1] + [(3, 1), (1, 1)]
CONV_METHODS = {
    "tucker2": (101, KERNELS, GROUPS),
    "spatial": (202, _SPATIAL_K, GROUPS),
    "cp": (303, KERNELS[1:] + [(1, 1)], [1, 1, 1, 1, 2, "dw"]),
    "fire": (404, KERNELS[1:] + [(1, 1)], [1, 1, 1, 1, 2, "dw"]),
}
N_PER_METHOD = 48
CASES = [(m, g) for m, (seed, ks, gs) in CONV_METHODS.items()
         for g in _geometries(seed, N_PER_METHOD, ks, gs)]


@pytest.mark.parametrize("method,g", CASES, ids=[f"{m}-{_id(g)}" for m, g in CASES])
def test_conv_geometry(method, g):
    options = {}
    if method == "fire":
        rng = random.Random(_id(g))
        options = {"pct3x3": rng.choice([1.0, 1.0, 0.5, 0.25, 0.0]), "relu": rng.random() < 0.15}
    if method == "cp":
        options = {"iters": 30}
    _check_layer(method, g, options)


SVD_CASES = _geometries(505, 24, kernels=[(1, 1)] * 5 + [(3, 3)], group_choices=[1, 1, 1, 1, 2])


@pytest.mark.parametrize("g", SVD_CASES, ids=[_id(g) for g in SVD_CASES])
def test_svd_conv1x1(g):
    _check_layer("svd", g, {})


@pytest.mark.parametrize("shape", [(7, 5, True), (5, 9, False), (12, 12, True), (1, 6, True)])
def test_svd_linear(shape):
    fin, fout, bias = shape
    torch.manual_seed(0)
    layer = nn.Linear(fin, fout, bias=bias, dtype=torch.float64)
    dec = D.get_decomposer("svd")
    assert dec.supports(layer) is None
    x = torch.randn(3, fin, dtype=torch.float64)
    errs = []
    for t in T_GRID:
        rank = dec.scale_rank(layer, t)
        mod = dec.decompose(layer, rank)
        _check_plain(mod, layer)
        params, macs = dec.cost(layer, rank, None)
        assert params == sum(p.numel() for p in mod.parameters())
        assert macs == _macs(mod, x[:1])
        w_hat = mod[1].weight @ mod[0].weight
        w = layer.weight.detach()
        errs.append(float((w - w_hat.detach()).norm() / w.norm()))
        assert abs(errs[-1] - mod.fit_info["rel_error"]) < 1e-9
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    with torch.no_grad():
        assert float((mod(x) - layer(x)).abs().max()) < 1e-9


def test_svd_randomized_close_to_exact():
    """Above 1024 the randomized path is used and stays within 1e-3 of the exact error,
    also for a slowly decaying spectrum."""
    torch.manual_seed(0)
    m, n, r = 1040, 1100, 40
    u, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64))
    s = 1.0 / torch.arange(1, m + 1, dtype=torch.float64).sqrt()
    layer = nn.Linear(n, m, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_((u * s) @ v.mT)
    mod = RK.decompose(layer, "svd", r)
    exact = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
    assert abs(mod.fit_info["rel_error"] - exact) <= 1e-3 * exact
    # flat spectrum (Gaussian matrix): the hard case for a randomized range finder
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, dtype=torch.float64))
    mod = RK.decompose(layer, "svd", r)
    s = torch.linalg.svdvals(layer.weight.detach())
    exact = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
    assert abs(mod.fit_info["rel_error"] - exact) <= 1e-3 * exact


# ---------------------------------------------------------------------------------------
# targeted cases
# ---------------------------------------------------------------------------------------

def _conv(cin=8, cout=8, k=3, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, k, dtype=torch.float64, **kw)


@pytest.mark.parametrize("method,kwargs,fragment", [
    ("tucker2", dict(cin=6, cout=6, groups=6), "depthwise"),
    ("cp", dict(groups=2), "groups"),
    ("cp", dict(k=1), "1x1"),
    ("spatial", dict(k=(3, 1)), "nothing to separate"),
    ("spatial", dict(k=1), "nothing to separate"),
    ("fire", dict(k=1), "1x1"),
    ("fire", dict(groups=2), "groups"),
    ("svd", dict(k=3), "1x1"),
])
def test_refusals_have_reasons(method, kwargs, fragment):
    layer = _conv(**kwargs)
    reason = D.get_decomposer(method).supports(layer)
    assert reason is not None and fragment in reason
    with pytest.raises(MethodError, match=fragment):
        RK.decompose(layer, method)


def test_layer_type_refused():
    assert "Linear" in D.get_decomposer("tucker2").supports(nn.Linear(3, 4))


def test_depthwise_spatial_is_per_channel():
    layer = _conv(6, 6, 5, groups=6, padding=2)
    dec = D.get_decomposer("spatial")
    assert dec.max_rank(layer) == (5,)
    mod = dec.decompose(layer, (2,))
    assert mod[0].out_channels == 12 and mod[0].groups == 6 and mod[1].groups == 6
    # each channel: the best rank-2 approximation of its 5x5 kernel (Eckart-Young)
    w = layer.weight.detach()[:, 0]
    s = torch.linalg.svdvals(w)
    best = float(s[:, 2:].square().sum().sqrt() / w.norm())
    assert abs(mod.fit_info["rel_error"] - best) < 1e-12


def test_tucker2_hooi_never_worse():
    layer = _conv(8, 8, 3)
    dec = D.get_decomposer("tucker2")
    plain = dec.decompose(layer, (3, 4)).fit_info["rel_error"]
    refined = dec.decompose(layer, (3, 4), hooi=5).fit_info
    assert refined["rel_error"] <= plain + 1e-12 and refined["iters"] >= 1


def test_fire_channel_order_and_geometry():
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3, padding=0, stride=2, dtype=torch.float64)
    with torch.no_grad():   # make channels 1, 4 and 6 centre-only: they must go to 1x1
        for o in (1, 4, 6):
            keep = layer.weight[o, :, 1, 1].clone()
            layer.weight[o] = 0
            layer.weight[o, :, 1, 1] = keep
    mod = RK.decompose(layer, "fire", "full", pct3x3=5 / 8)
    assert mod.expand1x1.out_channels == 3 and mod.perm is not None
    assert "perm" in mod.state_dict()
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        assert float((mod(x) - layer(x)).abs().max()) < 1e-12   # exact: the 1x1 ones were
    assert mod.fit_info["rel_error"] < 1e-12
    # contiguous 1x1 block at the end: no permutation, the expand3x3 is concatenated first
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
        keep = layer.weight[5:, :, 1, 1].clone()
        layer.weight[5:] = 0
        layer.weight[5:, :, 1, 1] = keep
    mod = RK.decompose(layer, "fire", "full", pct3x3=5 / 8)
    assert mod.perm is None and mod.expand3x3_first
    with torch.no_grad():
        assert float((mod(x) - layer(x)).abs().max()) < 1e-12


def test_fire_squeeze_ratio_caps_rank():
    layer = _conv(8, 4, 3, padding=1)
    dec = D.get_decomposer("fire")
    assert dec.max_rank(layer, squeeze_ratio=0.5) == (2,)
    assert dec.max_rank(layer) == (8,)
    with pytest.raises(MethodError, match="pct3x3"):
        dec.decompose(layer, (2,), pct3x3=1.5)


# ---------------------------------------------------------------------------------------
# CP: degeneracy control
# ---------------------------------------------------------------------------------------

def test_cp_hard_random_case_bounded():
    layer = _conv(64, 64, 3, padding=1)
    mod = RK.decompose(layer, "cp", 16)
    info = mod.fit_info
    assert all(torch.isfinite(p).all() for p in mod.parameters())
    assert info["norm_ratio"] <= 2.0
    spec = D.get_decomposer("cp").spectra(layer)[0]
    tap_err = float(spec[16:].square().sum().sqrt() / layer.weight.detach().norm())
    assert info["rel_error"] <= tap_err + 1e-12 and info["rel_error"] < 1.0


def _border_rank_tensor() -> torch.Tensor:
    """Rank 4, border rank 2 (sum of a o a o a o a with one factor replaced by b): the
    best rank-2 approximation does not exist and plain ALS diverges (CP degeneracy)."""
    torch.manual_seed(3)
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    t = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    for p in range(4):
        v = [a] * 4
        v[p] = b
        t += torch.einsum("a,b,c,d->abcd", *v)
    return t


def test_cp_degeneracy_detected_and_controlled():
    t = _border_rank_tensor()
    dec = D.get_decomposer("cp")
    _, info = num.cp_als(t, dec._hosvd_init(t, 2, 0), iters=300, tol=0.0, ridge=0.0)
    assert info["norm_ratio"] > 2.0               # plain ALS: cancelling terms
    layer = nn.Conv2d(3, 3, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(t)
    mod = dec.decompose(layer, (2,), ridge=0.0)
    assert mod.fit_info["norm_ratio"] <= 2.0
    assert all(torch.isfinite(p).all() for p in mod.parameters())


def test_cp_never_nan_on_zero_and_huge_weights():
    for fill in (0.0, 1e150):
        layer = _conv(4, 4, 3)
        with torch.no_grad():
            layer.weight.fill_(fill)
            layer.weight[0, 0, 0, 0] += 1.0
        mod = RK.decompose(layer, "cp", 3)
        assert all(torch.isfinite(p).all() for p in mod.parameters())
        assert math.isfinite(mod.fit_info["rel_error"])


# ---------------------------------------------------------------------------------------
# ranks, registry, options
# ---------------------------------------------------------------------------------------

def test_rank_parsing():
    layer = _conv(8, 16, 3, padding=1)
    dec = D.get_decomposer("tucker2")
    assert RK.resolve_rank(dec, layer, 3) == (3, 3)
    assert RK.resolve_rank(dec, layer, (2, 5)) == (2, 5)
    assert RK.resolve_rank(dec, layer, [2, 5]) == (2, 5)
    assert RK.resolve_rank(dec, layer, "full") == (8, 16)
    for frac in (0.1, 0.3, 0.5, 1.0):
        r = RK.resolve_rank(dec, layer, frac, in_hw=(9, 9))
        kept = dec.cost(layer, r, (9, 9))[0]
        assert kept <= frac * D.layer_cost(layer, (9, 9))[0] or r == dec.scale_rank(layer, 1e-9)
    for bad in (0, -1, 17, (1, 2, 3), (2,), True, float("nan"), 1.5, "half", 0.0, (2, 0),
                (2.0, 3), None):
        with pytest.raises(RankError, match=r"Conv2d\(8->16"):
            RK.resolve_rank(dec, layer, bad)
    mod = RK.decompose(layer, "tucker2", 0.5)
    assert sum(p.numel() for p in mod.parameters()) <= 0.5 * D.layer_cost(layer, (9, 9))[0]


def test_unknown_method_lists_known():
    with pytest.raises(MethodError) as err:
        D.get_decomposer("tuker2")
    for name in ("auto", "cp", "fire", "spatial", "svd", "tucker2"):
        assert name in str(err.value)
    assert D.list_decomposers() == ["auto", "cp", "fire", "spatial", "svd", "tucker2"]


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        @D.register_decomposer("tucker2")
        class Again(D.Decomposer):
            pass
    try:
        @D.register_decomposer("_test_tmp")
        class Tmp(D.Decomposer):
            pass
        with pytest.raises(ValueError):
            D.register_decomposer("_test_tmp")(Tmp)
    finally:
        base._REGISTRY.pop("_test_tmp", None)
        method_options.forget("_test_tmp")


def test_options_validated():
    layer = _conv(4, 4, 3)
    with pytest.raises(MethodError, match="hooi"):
        RK.decompose(layer, "tucker2", 2, hoi=2)
    with pytest.raises(MethodError, match="expected"):
        RK.decompose(layer, "tucker2", 2, hooi="2")
    for name in D.list_decomposers():
        dec = D.get_decomposer(name)
        assert issubclass(dec.Options, MethodOptions)
        assert len(dec.rank_names) >= 1 or name == "auto"  # auto: chosen per layer


def test_dtype_device_and_spectra():
    layer = _conv(6, 8, 3, padding=1).float()
    for name in ("tucker2", "cp", "spatial", "fire"):
        dec = D.get_decomposer(name)
        mod = dec.decompose(layer, dec.scale_rank(layer, 0.5))
        assert all(p.dtype == torch.float32 for p in mod.parameters())
        spec = dec.spectra(layer)
        full = dec.max_rank(layer)
        assert len(spec) == len(full)
        for s, m in zip(spec, full):
            assert s.ndim == 1 and len(s) == m and bool((s[:-1] >= s[1:] - 1e-6).all())


# ---------------------------------------------------------------------------------------
# ONNX export and onnxruntime parity
# ---------------------------------------------------------------------------------------

ONNX_CASES = [
    ("tucker2", dict(cin=6, cout=8, k=3, padding=(1, 2), stride=(2, 1), groups=2), {}),
    ("cp", dict(cin=4, cout=6, k=3, padding=1, padding_mode="reflect"), {}),
    ("spatial", dict(cin=6, cout=6, k=5, padding=2, groups=6, dilation=(1, 2)), {}),
    ("fire", dict(cin=6, cout=8, k=3, padding=0, stride=2), {"pct3x3": 0.5, "relu": True}),
    ("svd", None, {}),
]


@pytest.mark.parametrize("method,kwargs,options", ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_onnx_parity(method, kwargs, options, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    if kwargs is None:
        layer = nn.Linear(12, 10)
        x = torch.randn(2, 12)
    else:
        layer = nn.Conv2d(kwargs.pop("cin"), kwargs.pop("cout"), kwargs.pop("k"), **kwargs)
        x = torch.randn(2, layer.in_channels, 11, 13)
    dec = D.get_decomposer(method)
    mod = dec.decompose(layer, dec.scale_rank(layer, 0.5, **options), **options).eval()
    path = tmp_path / f"{method}.onnx"
    try:
        torch.onnx.export(mod, (x,), str(path), dynamo=True, external_data=False,
                          opset_version=18)
    except Exception:  # fall back to the TorchScript exporter
        torch.onnx.export(mod, (x,), str(path), dynamo=False, opset_version=18)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = mod(x).numpy()
    assert got.shape == want.shape
    assert float(abs(got - want).max()) < 1e-4


# ---------------------------------------------------------------------------------------
# numeric kernels: shape contracts and agreement with tensorly
# ---------------------------------------------------------------------------------------

def _rand(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64)


def test_numerics_shapes():
    t = _rand(6, 5, 3, 4)
    assert num.unfold(t, 2).shape == (3, 6 * 5 * 4)
    assert num.mode_dot(t, _rand(7, 5), 1).shape == (6, 7, 3, 4)
    sig, u = num.gram_eig(t, 0)
    assert sig.shape == (6,) and u.shape == (6, 6)
    assert torch.allclose(sig, torch.linalg.svdvals(num.unfold(t, 0)), atol=1e-10)
    assert torch.allclose(u.mT @ u, torch.eye(6, dtype=t.dtype), atol=1e-12)
    core, (u0, u1) = num.hosvd(t, (0, 1), (3, 2))
    assert core.shape == (3, 2, 3, 4) and u0.shape == (6, 3) and u1.shape == (5, 2)
    core, fs, done = num.hooi(t, (3, 2), iters=4)
    assert core.shape == (3, 2, 3, 4) and [f.shape for f in fs] == [(6, 3), (5, 2)]
    assert 0 <= done <= 4
    a = _rand(9, 7)
    u, s, vh = num.truncated_svd(a, 3)
    assert u.shape == (9, 3) and s.shape == (3,) and vh.shape == (3, 7)
    u, s, vh = num.truncated_svd(_rand(4, 9, 7), 3)                 # batched
    assert u.shape == (4, 9, 3) and s.shape == (4, 3) and vh.shape == (4, 3, 7)
    u, s, vh = num.randomized_svd(a, 3)
    assert u.shape == (9, 3) and s.shape == (3,) and vh.shape == (3, 7)
    assert torch.allclose(s, torch.linalg.svdvals(a)[:3], atol=1e-8)
    fs = [_rand(n, 4, seed=i) for i, n in enumerate(t.shape)]
    assert num.cp_reconstruct(fs).shape == t.shape
    assert num.cp_term_norms(fs).shape == (4,)
    assert num.mttkrp(t, fs, 2).shape == (3, 4)
    out, info = num.cp_als(t, fs, iters=5)
    assert [f.shape for f in out] == [f.shape for f in fs]
    assert set(info) == {"iters", "rel_error", "norm_ratio", "finite", "revived"}


def test_numerics_agree_with_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac, partial_tucker
    from tensorly.tenalg import khatri_rao
    from tensorly.cp_tensor import cp_to_tensor

    t = _rand(8, 6, 3, 3)
    with tl.backend_context("pytorch"):
        (core_tl, f_tl), _ = partial_tucker(t, rank=[4, 3], modes=[0, 1], n_iter_max=100,
                                            tol=1e-12)
        err_tl = float((t - num.mode_dot(num.mode_dot(core_tl, f_tl[0], 0), f_tl[1], 1)).norm())
        core, fs, _ = num.hooi(t, (4, 3), iters=100, tol=1e-12)
        err = float((t - num.mode_dot(num.mode_dot(core, fs[0], 0), fs[1], 1)).norm())
        assert err <= err_tl * (1 + 1e-6)
        # same subspaces (up to rotation): the projectors agree
        for a, b in zip(fs, f_tl):
            assert torch.allclose(a @ a.mT, b @ b.mT, atol=1e-5)

        fs4 = [_rand(n, 3, seed=i) for i, n in enumerate(t.shape)]
        assert torch.allclose(num.cp_reconstruct(fs4), cp_to_tensor((None, fs4)), atol=1e-12)
        kr = khatri_rao([fs4[m] for m in (0, 1, 3)])
        assert torch.allclose(num.mttkrp(t, fs4, 2), num.unfold(t, 2) @ kr, atol=1e-10)

        low = num.cp_reconstruct(fs4) + 0.01 * _rand(*t.shape, seed=9)
        cp_tl = parafac(low, 3, init="svd", n_iter_max=200, tol=1e-12)
        err_tl = float((low - cp_to_tensor(cp_tl)).norm() / low.norm())
    dec = D.get_decomposer("cp")
    ours, info = num.cp_als(low, dec._hosvd_init(low, 3, 0), iters=200, tol=1e-12, ridge=0.0)
    assert info["rel_error"] <= err_tl * 1.05 + 1e-6


def _tucker2_error(t, core, fs) -> float:
    approx = num.mode_dot(num.mode_dot(core, fs[0], 0), fs[1], 1)
    return float((t - approx).norm() / t.norm())


def test_hooi_monotone_in_sweeps_and_extrapolation_converges_faster():
    """Every extra sweep fits at least as well (the extrapolated step is only kept when it
    gains), and extrapolation reaches the plain HOOI's 12-sweep fit in fewer sweeps."""
    t = _rand(40, 32, 3, 3)
    ranks = (10, 8)
    errs = [_tucker2_error(t, *num.hooi(t, ranks, k, tol=0.0)[:2]) for k in range(1, 13)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    plain = [_tucker2_error(t, *num.hooi(t, ranks, k, tol=0.0, extrapolate=0.0)[:2])
             for k in (1, 12)]
    assert errs[0] == pytest.approx(plain[0], abs=1e-12)    # sweep 1 is never extrapolated
    assert errs[-1] <= plain[-1] + 1e-12
    first = next(k for k, e in enumerate(errs, 1) if e <= plain[-1] + 1e-12)
    assert first < 12
    core, _ = num.hosvd(t, (0, 1), ranks)
    assert errs[0] < float((t.norm() ** 2 - core.norm() ** 2).sqrt() / t.norm())


def test_hooi_float32_sweeps_match_float64():
    """Sweeping in float32 picks the same subspaces to float32 accuracy (factors orthonormal
    to float32 precision); the result keeps the input's dtype."""
    t = _rand(24, 20, 3, 3)
    c64, f64, _ = num.hooi(t, (6, 5), 8, tol=0.0)
    c32, f32, _ = num.hooi(t, (6, 5), 8, tol=0.0, sweep_dtype=torch.float32)
    assert c32.dtype == torch.float64 and all(f.dtype == torch.float64 for f in f32)
    assert abs(_tucker2_error(t, c32, f32) - _tucker2_error(t, c64, f64)) < 1e-5
    for a, b in zip(f64, f32):
        assert torch.allclose(a @ a.mT, b @ b.mT, atol=1e-3)
        assert torch.allclose(b.mT @ b, torch.eye(b.shape[1], dtype=b.dtype), atol=1e-6)


def test_tucker2_hooi_float32_layer():
    layer = nn.Conv2d(16, 24, 3, padding=1)       # float32, as a pretrained model's
    dec = D.get_decomposer("tucker2")
    plain = dec.decompose(layer, (4, 6)).fit_info["rel_error"]
    refined = dec.decompose(layer, (4, 6), hooi=6)
    assert refined[1].weight.dtype == torch.float32
    assert refined.fit_info["rel_error"] < plain and refined.fit_info["iters"] >= 1
    x = torch.randn(2, 16, 8, 8)
    assert refined(x).shape == layer(x).shape


def test_mttkrp_of_a_conv_kernel_matches_the_unfolding_with_and_without_the_cache():
    from compresscnn.core.decomposers import _numerics as num

    g = torch.Generator().manual_seed(0)
    t = torch.randn(7, 5, 3, 2, generator=g, dtype=torch.float64)
    fs = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in t.shape]
    cache: dict = {}
    for mode in range(4):
        others = [fs[m] for m in range(4) if m != mode]
        kr = others[0]
        for f in others[1:]:  # Khatri-Rao, first factor varying slowest (C-order unfolding)
            kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, 4)
        want = num.unfold(t, mode) @ kr
        torch.testing.assert_close(num.mttkrp(t, fs, mode), want)
        torch.testing.assert_close(num.mttkrp(t, fs, mode, cache), want)
    assert set(cache) == {"y"}  # one O-contraction shared by modes 1-3


def test_cp_precision_float32_matches_float64_on_a_large_layer():
    torch.manual_seed(0)
    layer = nn.Conv2d(96, 96, 3)
    dec = D.get_decomposer("cp")
    r = 120  # 96*96*9*120 = 9.95e6 entries x rank: below the auto threshold
    from compresscnn.core.decomposers.cp import _single
    assert not _single("auto", dec_w := layer.weight.detach().double(), r)
    assert _single("auto", torch.zeros(256, 256, 3, 3, dtype=torch.float64), 432)
    assert _single("float32", dec_w, r) and not _single("float64", dec_w, 10**6)
    a = dec.decompose(layer, (r,), precision="float64", iters=30)
    b = dec.decompose(layer, (r,), precision="float32", iters=30)
    assert abs(a.fit_info["rel_error"] - b.fit_info["rel_error"]) < 1e-3
    x = torch.randn(2, 96, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=2e-3, rtol=1e-2)


def test_cp_als_reseeds_dead_terms_from_the_residual():
    """A term at zero in every mode is a fixed point of ALS (a dead channel once built);
    ``revive`` re-seeds it from the residual, where it earns its place."""
    t = _rand(12, 10, 3, 3, seed=4)
    dec = D.get_decomposer("cp")
    init = dec._hosvd_init(t, 6, 0)
    for f in init:
        f[:, 2] = 0.0  # one term dead from the start
    kept, info0 = num.cp_als(t, [f.clone() for f in init], iters=50, ridge=1e-6, revive=0)
    assert float(num.cp_term_norms(kept)[2]) == 0.0 and info0["revived"] == 0
    out, info = num.cp_als(t, [f.clone() for f in init], iters=50, ridge=1e-6)
    norms = num.cp_term_norms(out)
    assert info["revived"] >= 1 and bool((norms > num.DEAD_TERM * norms.max()).all())
    assert info["rel_error"] < info0["rel_error"] - 0.01
    # an exactly low-rank tensor asked for more terms: the spare terms have nothing to take
    # from the residual, and the re-seeding stops after its allowance, finite
    low = num.cp_reconstruct([_rand(n, 2, seed=i) for i, n in enumerate(t.shape)])
    _, info = num.cp_als(low, dec._hosvd_init(low, 5, 0), iters=60, ridge=1e-2)
    assert info["finite"] and info["rel_error"] < 0.05


def test_cp_layer_has_no_dead_terms_where_the_ridge_kills_them():
    """At a ridge that shrinks most terms of a random 16-channel 3x3 conv to nothing (9 of 24
    dead without re-seeding), every term of the built layer carries weight."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    w = conv.weight.detach().double()
    dec = D.get_decomposer("cp")
    plain, info0 = num.cp_als(w, dec._hosvd_init(w, 24, 0), iters=100, tol=1e-6, ridge=1e-2,
                              revive=0)
    norms0 = num.cp_term_norms(plain)
    assert int((norms0 < num.DEAD_TERM * norms0.max()).sum()) >= 5
    for extrapolate in (False, True):  # plain sweeps as above; then the default, accelerated
        seq = dec.decompose(conv, (24,), ridge=1e-2, iters=100, extrapolate=extrapolate)
        norms = num.cp_term_norms([seq[3].weight.detach().reshape(16, -1),
                                   seq[0].weight.detach().reshape(24, -1).mT,
                                   seq[1].weight.detach().reshape(24, 3).mT,
                                   seq[2].weight.detach().reshape(24, 3).mT])
        assert bool((norms > num.DEAD_TERM * norms.max()).all())
        assert seq.fit_info["rel_error"] < info0["rel_error"] - 0.05
        assert extrapolate or seq.fit_info["revived"] > 0


def test_cp_als_extrapolation_reaches_a_lower_error_in_fewer_sweeps():
    """Bro's line search: 50 accelerated sweeps end below 100 plain ones on a random 3x3
    conv, and bfloat16 products (float32 sweeps) land on the same error to 1e-3."""
    torch.manual_seed(0)
    w = nn.Conv2d(32, 32, 3).weight.detach().double()
    init = D.get_decomposer("cp")._hosvd_init(w, 48, 0)
    _, plain = num.cp_als(w, init, iters=100, tol=0.0, ridge=1e-4)
    _, fast = num.cp_als(w, init, iters=50, tol=0.0, ridge=1e-4, extrapolate=True)
    assert fast["iters"] == 50 and fast["rel_error"] < plain["rel_error"]
    _, low = num.cp_als(w.float(), [f.float() for f in init], iters=50, tol=0.0, ridge=1e-4,
                        extrapolate=True, products=torch.bfloat16)
    assert abs(low["rel_error"] - fast["rel_error"]) < 1e-3


def test_gram_svd_is_the_truncated_svd_of_a_wide_and_a_tall_matrix():
    """The smaller Gram matrix's eigenvectors give the same truncation error as the exact
    SVD (to rounding), with the error returned beside the factors, for either orientation;
    the large-layer path of the SVD method goes through it."""
    torch.manual_seed(0)
    for shape in ((60, 300), (300, 60)):
        a = torch.randn(*shape, dtype=torch.float64) @ torch.diag(
            torch.linspace(1, 3, shape[1], dtype=torch.float64))
        u, s, vh, rel = num.gram_svd(a, 20)
        eu, es, evh = num.truncated_svd(a, 20)
        exact = float((a - (eu * es) @ evh).norm() / a.norm())
        assert u.shape == eu.shape and s.shape == es.shape and vh.shape == evh.shape
        assert float((a - (u * s) @ vh).norm() / a.norm()) == pytest.approx(exact, rel=1e-9)
        assert rel == pytest.approx(exact, rel=1e-6)
        assert torch.allclose(s, es, rtol=1e-9)
    layer = nn.Linear(1100, 1040, dtype=torch.float64)
    mod = RK.decompose(layer, "svd", 40)
    s = torch.linalg.svdvals(layer.weight.detach())
    exact = float(s[40:].square().sum().sqrt() / s.square().sum().sqrt())
    assert mod.fit_info["rel_error"] == pytest.approx(exact, rel=1e-6)
    with torch.no_grad():  # and the factors are the ones the error was measured on
        got = mod[1].weight @ mod[0].weight
    w = layer.weight.detach()
    assert float((w - got).norm() / w.norm()) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("method,layer", [
    ("tucker2", nn.Conv2d(12, 20, 3)), ("tucker2", nn.Conv2d(16, 8, 3, groups=4)),
    ("tucker2", nn.Conv2d(40, 6, 1)), ("spatial", nn.Conv2d(8, 12, 3, groups=2)),
    ("svd", nn.Linear(30, 20)), ("svd", nn.Conv2d(30, 20, 1))])
def test_errors_without_decomposing_are_the_errors_decompose_measures(method, layer):
    """``errors`` (what ``auto`` plans with) tells every rank's weight error from the
    spectra alone, and it is the error the decomposition then measures."""
    torch.manual_seed(0)
    dec = D.get_decomposer(method)
    full = dec.max_rank(layer)
    ranks = sorted({dec.scale_rank(layer, t) for t in (0.1, 0.3, 0.5, 0.8, 1.0)})
    ranks += [full[:1] + (1,) * (len(full) - 1)] if len(full) > 1 else []
    got = dec.errors(layer, ranks)
    for r, e in zip(ranks, got):
        want = dec.decompose(layer, r).fit_info["rel_error"]
        assert e == pytest.approx(want, rel=1e-6, abs=1e-9), r
    assert dec.errors(layer, [full])[0] < 1e-6
    if method == "tucker2":
        assert dec.errors(layer, ranks, hooi=2) is None  # HOOI: only decomposing tells


def test_cp_errors_are_measured_on_small_layers_and_estimated_from_a_few_sweeps_on_large(
        monkeypatch):
    """Small: None where every rank lies on one side of ``ANCHOR_CEILING`` (``auto``
    decomposes and measures). Large (the threshold lowered here): an estimate from the
    first sweeps of the same ALS, which the full fit only improves on, and never above the
    per-tap construction's error."""
    from compresscnn.core.decomposers import cp as CPM
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 12, 3)   # 30 parameters a rank, 1296 dense: the ceiling at 30
    dec = D.get_decomposer("cp")
    assert dec.errors(conv, [(10,), (20,)]) is None
    assert dec.errors(conv, [(35,), (40,)]) is None
    monkeypatch.setattr(CPM, "EXACT_BELOW", 0)
    ranks = [(10,), (30,), (60,), (dec.max_rank(conv)[0],)]
    est = dec.errors(conv, ranks)
    sv = torch.linalg.svdvals(conv.weight.detach().double().permute(2, 3, 0, 1)).reshape(-1)
    taps = base.tail_errors(torch.sort(sv, descending=True).values, [r[0] for r in ranks])
    for r, e, tap in zip(ranks, est, taps):
        assert e <= tap + 1e-12
        assert dec.decompose(conv, r).fit_info["rel_error"] <= e + 1e-9
    assert est[-1] == 0.0 and est[0] > est[1] > est[2]


def test_cp_errors_of_small_layers_are_fitted_up_to_the_ceiling_and_scaled_above():
    """A small layer's candidates up to ``ANCHOR_CEILING`` of its parameters are decomposed
    and their errors are the ones ``decompose`` measures; above, the per-tap error times
    the ratio of the fitted error to it at the highest fitted rank, never above the
    per-tap error, without running ALS there."""
    from compresscnn.core.decomposers import cp as CPM
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 12, 3)   # 30 parameters a rank, 1296 dense: the ceiling at 30
    dec = D.get_decomposer("cp")
    ranks = [(40,), (30,), (20,), (10,)]
    fitted = []
    real = dec.decompose

    def counting(layer, rank, **kw):
        fitted.append(rank[0])
        return real(layer, rank, **kw)

    dec.decompose = counting
    try:
        got = dec.errors(conv, ranks)
    finally:
        del dec.decompose
    assert sorted(fitted) == [10, 20, 30]
    for (r,), e in zip(ranks[1:], got[1:]):
        assert e == dec.decompose(conv, (r,)).fit_info["rel_error"]
    sv = torch.linalg.svdvals(conv.weight.detach().double().permute(2, 3, 0, 1)).reshape(-1)
    taps = base.tail_errors(torch.sort(sv, descending=True).values, [40, 30])
    assert got[0] == pytest.approx(min(taps[0] * got[1] / taps[1], taps[0]), rel=1e-9)
    assert got[0] < got[1]


def test_cp_estimates_run_als_at_a_few_anchor_ranks_and_interpolate_the_rest(monkeypatch):
    """On a large layer ALS runs at ``ESTIMATE_ANCHORS`` of the candidate ranks (the
    smallest and the largest among them); the errors at the other ranks are interpolated
    between the anchors' ratios to the per-tap error, stay at or below the per-tap error,
    decrease with the rank, and are close to what the sweeps give at those ranks."""
    from compresscnn.core.decomposers import cp as CPM
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 24, 3)
    dec = D.get_decomposer("cp")
    monkeypatch.setattr(CPM, "EXACT_BELOW", 0)
    monkeypatch.setattr(CPM, "ANCHORS_FROM", 0)
    monkeypatch.setattr(CPM, "ANCHOR_CEILING", 10.0)  # every rank may be an anchor
    ranks = [(r,) for r in (120, 100, 80, 60, 40, 20)]
    ran = []
    real = CPM.num.cp_als

    def counting(t, init, **kw):
        ran.append(init[0].shape[1])
        return real(t, init, **kw)

    monkeypatch.setattr(CPM.num, "cp_als", counting)
    est = dec.errors(conv, ranks)
    assert len(ran) == CPM.ESTIMATE_ANCHORS and {20, 120} <= set(ran)
    anchors = set(ran)
    assert all(a > b for a, b in zip(est[1:], est))  # larger rank, lower error
    monkeypatch.setattr(CPM, "ESTIMATE_ANCHORS", len(ranks))
    each = dec.errors(conv, ranks)
    sv = torch.linalg.svdvals(conv.weight.detach().double().permute(2, 3, 0, 1)).reshape(-1)
    taps = base.tail_errors(torch.sort(sv, descending=True).values, [r[0] for r in ranks])
    for (r,), e, exact, tap in zip(ranks, est, each, taps):
        assert e <= tap + 1e-12
        if r in anchors:
            assert e == pytest.approx(exact, abs=1e-9)
        else:
            assert abs(e - exact) < 0.05, (r, e, exact)
    assert CPM._anchors([1, 2, 3], 4) == [1, 2, 3]
    assert CPM._anchors(list(range(11)), 4) == [0, 3, 7, 10]
    assert CPM._interpolate({10: 0.5, 20: 1.0}, 15) == pytest.approx(0.75)
    assert CPM._interpolate({10: 0.5, 20: math.inf}, 30) == 1.0
    # below ANCHORS_FROM (the medium layers of the shipped recipes) every rank is estimated
    monkeypatch.setattr(CPM, "ANCHORS_FROM", 1e12)
    monkeypatch.setattr(CPM, "ESTIMATE_ANCHORS", 4)
    ran.clear()
    assert dec.errors(conv, ranks) == pytest.approx(each, abs=1e-9) and len(ran) == len(ranks)
    # the anchors lie among the ranks whose factors hold at most ANCHOR_CEILING of the
    # kernel's parameters (24x24x3x3 = 5184; rank r holds 54 r: up to rank 67 at 0.7); above
    # them the ratio of the highest anchor is kept
    monkeypatch.setattr(CPM, "ANCHORS_FROM", 0)
    monkeypatch.setattr(CPM, "ANCHOR_CEILING", 0.7)
    ran.clear()
    capped = dec.errors(conv, ranks)
    assert sorted(ran) == [20, 40, 60]
    ratio = each[3] / taps[3]  # rank 60
    for (r,), e, tap in zip(ranks, capped, taps):
        assert e == pytest.approx(min(tap * ratio, tap) if r > 60 else each[ranks.index((r,))],
                                  abs=1e-9)


def test_small_cp_problems_run_on_one_thread_and_the_setting_is_restored(monkeypatch):
    """ALS below ``ONE_THREAD_BELOW`` runs with one intra-op thread, above it with the
    caller's; the caller's thread count is back afterwards, also when ALS fails."""
    from compresscnn.core.decomposers import cp as CPM
    seen = []
    real = CPM.num.cp_als

    def spy(t, init, **kw):
        seen.append(torch.get_num_threads())
        return real(t, init, **kw)

    monkeypatch.setattr(CPM.num, "cp_als", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        conv = nn.Conv2d(8, 8, 3)
        D.get_decomposer("cp").decompose(conv, (6,))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(CPM, "ONE_THREAD_BELOW", 1)
        seen.clear()
        D.get_decomposer("cp").decompose(conv, (6,))
        assert seen and set(seen) == {2}
        monkeypatch.setattr(CPM, "ONE_THREAD_BELOW", 1e10)
        with pytest.raises(RuntimeError):
            with CPM._threads_for(conv.weight, 6):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_svd_spectra_then_decompose_forms_the_gram_eigendecomposition_once(monkeypatch):
    """The Gram path (a large truncated Linear): ``spectra`` keeps the eigendecomposition it
    computes, ``decompose`` takes it instead of computing it again, with the same result as
    without it; a changed weight is not served the old one."""
    from compresscnn.core.decomposers import svd as SVDM
    monkeypatch.setattr(SVDM, "RANDOMIZED_MIN_DIM", 16)
    monkeypatch.setattr(SVDM, "GRAM_SPECTRA_MIN_DIM", 16)
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    dec = D.get_decomposer("svd")
    calls = []
    real = SVDM.num.gram_eigh

    def counting(a, products=None):
        calls.append(a.shape)
        return real(a, products)

    monkeypatch.setattr(SVDM.num, "gram_eigh", counting)
    s = dec.spectra(lin)[0]
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(lin.weight.detach().double()),
                               rtol=1e-4, atol=1e-5)
    shared = dec.decompose(lin, (12,))
    assert len(calls) == 1 and not SVDM._EIG
    alone = dec.decompose(lin, (12,))
    assert len(calls) == 2
    torch.testing.assert_close(shared(torch.ones(2, 96)), alone(torch.ones(2, 96)))
    assert shared.fit_info["rel_error"] == pytest.approx(alone.fit_info["rel_error"])
    dec.spectra(lin)
    with torch.no_grad():
        lin.weight.mul_(2.0)   # a new version of the weight: the kept one is not used
    dec.decompose(lin, (12,))
    assert len(calls) == 4
    dec.spectra(lin)           # a copy of the layer (compress applies to a copy) is served
    twin = copy.deepcopy(lin)
    dec.decompose(twin, (12,))
    assert len(calls) == 5
    dec.spectra(lin)           # a layer of the same shape but other weights is not
    other = nn.Linear(96, 40)
    dec.decompose(other, (12,))
    assert len(calls) == 7 and len(SVDM._EIG) == 1


def test_lower_gram_blocks_give_the_same_eigensystem():
    """Large Gram matrices are computed below the diagonal only, block by block: the lower
    triangle equals the full product's, and eigh (which reads it) gives the same system."""
    from compresscnn.core.decomposers import _numerics as num
    from compresscnn.util.linalg import GRAM_BLOCK, lower_gram

    torch.manual_seed(0)
    b = torch.randn(2 * GRAM_BLOCK + 77, 3000, dtype=torch.float64)
    full = b @ b.mT
    low = lower_gram(b)
    assert torch.allclose(torch.tril(low), torch.tril(full), rtol=1e-12, atol=1e-9)
    assert torch.count_nonzero(low[:GRAM_BLOCK, GRAM_BLOCK:]) == 0  # not computed
    e1, v1 = torch.linalg.eigh(full)
    e2, v2 = num.gram_eigh(b)
    assert torch.allclose(e1, e2, rtol=1e-10, atol=1e-7)
    small = torch.randn(100, 300)
    assert torch.equal(lower_gram(small), small @ small.mT)


def test_sym_gram_is_the_whole_product_and_symmetric():
    """The data-aware fit's Gram matrices: blocks below the diagonal mirrored above give the
    full product (batched, and of a transposed view), exactly symmetric."""
    from compresscnn.util.linalg import GRAM_BLOCK, sym_gram

    torch.manual_seed(0)
    b = torch.randn(2, 2 * GRAM_BLOCK + 77, 900)
    for x in (b, b.mT.contiguous().mT):
        g = sym_gram(x)
        assert torch.allclose(g, x @ x.mT, rtol=1e-5, atol=1e-3) and torch.equal(g, g.mT)
    small = torch.randn(3, 100, 300)
    assert torch.equal(sym_gram(small), small @ small.mT)


def test_svals_from_the_gram_match_svdvals_and_their_tails():
    """Rank selection's singular values from the smaller Gram matrix's eigenvalues: the
    same as ``svdvals`` (batched, wide and tall), and the tail errors agree to rounding."""
    from compresscnn.core.decomposers import _numerics as num
    from compresscnn.core.decomposers.base import tail_errors

    torch.manual_seed(0)
    for shape in ((3, 40, 70), (70, 40), (9, 64, 64)):
        m = torch.randn(*shape, dtype=torch.float64)
        s, ref = num.svals(m), torch.linalg.svdvals(m)
        assert s.shape == ref.shape and torch.allclose(s, ref, rtol=1e-9, atol=1e-9)
    m = torch.randn(300, 300, dtype=torch.float64) @ torch.diag(torch.logspace(0, -6, 300,
                                                                               dtype=torch.float64))
    ranks = list(range(10, 300, 30))
    got, want = tail_errors(num.svals(m), ranks), tail_errors(torch.linalg.svdvals(m), ranks)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-10  # of errors from 1 to 1e-6
