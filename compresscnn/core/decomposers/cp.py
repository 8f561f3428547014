"""CP-4 decomposition of a convolution (Lebedev et al., ICLR 2015, "Speeding-up
Convolutional Neural Networks Using Fine-tuned CP-Decomposition", eq. 2-5).

``W[o, c, i, j] ~= sum_r A_out[o, r] A_in[c, r] A_h[i, r] A_w[j, r]`` becomes four convs:

    1x1          C_in -> R   (weight A_in^T, no bias)
    k_h x 1      R -> R depthwise (A_h; stride (s0, 1), padding (p0, 0), dilation (d0, 1))
    1 x k_w      R -> R depthwise (A_w; stride (1, s1), padding (0, p1), dilation (1, d1))
    1x1          R -> C_out  (weight A_out, carries the bias)

with the layer's padding_mode on the depthwise convs (padding each axis separately equals
padding both, for every mode; ``'same'`` stays ``'same'`` per axis, which also matches
PyTorch's trailing extra element for even extents).

Fitting: CP-ALS on the 4-way kernel (:func:`_numerics.cp_als`, MTTKRP by einsum, Hadamard
products of Gram matrices, no Khatri-Rao matrix), initialised from the HOSVD (leading left
singular vectors of the four unfoldings ``W_(n)``; where R exceeds a mode's size the extra
columns are filled with a seeded Gaussian). Ridge regularisation keeps it well posed.
**Degeneracy control**: ``norm_ratio = sqrt(sum_r ||term_r||^2) / ||W||`` is 1 for
orthogonal terms and grows when terms cancel (the CP degeneracy that makes fine-tuning
collapse); if a fit exceeds ``max_norm_ratio`` (or goes non-finite) it is refitted with a
10x stronger ridge, up to 4 times, and in the end the best admissible candidate among the
ALS fits and the always-safe "tap" construction below is kept (lowest error). So the
result never holds NaN/Inf and never has norm_ratio above the bound. A stronger ridge can
shrink terms to exactly zero (dead channels of the factorized layer); ALS re-seeds them from
its residual (``_numerics.cp_als``; ``fit_info["revived"]`` counts them).

Exact "full rank": ``max_rank = k_h k_w min(C_in, C_out)``. At that rank the module is
built directly, without ALS: one group of terms per spatial tap ``(i, j)``, from the SVD of
the ``C_out x C_in`` matrix ``W[:, :, i, j] = U S V^T``: terms ``(U s^1/2, V s^1/2, e_i,
e_j)``. Truncating this construction to the R terms with the largest singular values (the
"tap" candidate) is a CP of rank R with orthogonal terms (norm_ratio <= 1), whose error
decreases monotonically with R; ALS results are only kept when they beat it, so the error is
bounded by a monotone sequence (the error of ALS itself is not strictly monotone in R;
the tests allow a small tolerance).

Refused: groups > 1 (no exact grouped CP-4 with plain convs here; use tucker2/spatial),
1x1 kernels (no spatial mode; use svd/tucker2).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from compresscnn.core.decomposers import _numerics as num
from compresscnn.core.decomposers.base import (ConvSpec, Decomposer, Rank, parse_options,
                                               register_decomposer, split_axes, work_weight,
                                               tail_errors)
from compresscnn.core.method_options import CPOptions
from compresscnn.util.modules import parallel_map


#: ``precision: auto`` runs ALS in float32 from this many kernel entries x rank
SINGLE_FROM = 1e8
#: :meth:`CP.errors`: below this many kernel entries x (largest) rank the candidates are
#: decomposed and measured; from it, estimated from ``ESTIMATE_SWEEPS`` ALS sweeps at
#: ``ESTIMATE_ANCHORS`` of the ranks (the largest, the smallest and evenly between), the
#: others interpolated
EXACT_BELOW, ESTIMATE_SWEEPS, ESTIMATE_ANCHORS = 1e7, 8, 4
#: below this many kernel entries x (largest) rank every candidate is estimated, none
#: interpolated: the medium layers of the shipped recipes (SqueezeNet's 3x3 expands) plan
#: as they did before the anchors
ANCHORS_FROM = 1e8
#: the anchors are taken among the ranks whose factors hold at most this fraction of the
#: dense kernel's parameters; above it the ratio of the highest anchor is kept (see
#: :meth:`CP.errors`)
ANCHOR_CEILING = 0.7


#: ALS runs on one intra-op thread below this many kernel entries x rank (every 3x3 conv
#: of ResNet-18/50 and VGG-16 at any rank they are planned at)
ONE_THREAD_BELOW = 1e10


def _one_thread(w: torch.Tensor, r: int) -> bool:
    """Whether ALS on ``w`` at rank ``r`` runs on one intra-op thread (``ONE_THREAD_BELOW``)."""
    return w.device.type == "cpu" and w.numel() * int(r) < ONE_THREAD_BELOW


@contextlib.contextmanager
def _threads_for(w: torch.Tensor, r: int) -> Iterator[None]:
    """One intra-op thread for the length of a block where the ALS problem is below
    ``ONE_THREAD_BELOW``: a sweep is a few dozen operations on ``R x R`` and ``I_n x R``
    matrices, too small for a second thread to pay for its start on small problems, and
    on a machine where another process is busy on a core each multi-threaded operation
    waits for that core. Measured with other processes running on a 2-core machine, 10
    sweeps on 2 threads against one: ResNet-18's ``layer2.1.conv1`` at rank 300 9.5 s
    against 0.8 s, ``layer3.1.conv1`` at 944 17.9 s against 4.9 s, ``layer4.1.conv1`` at
    1200 46.9 s against 13.4 s. (On an idle machine the largest problems' products could
    gain from a second thread; not measured.) The caller's setting is restored."""
    before = torch.get_num_threads()
    small = _one_thread(w, r) and before > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def _single(precision: str, w: torch.Tensor, r: int) -> bool:
    """Whether ALS runs in float32 (see ``CP.Options.precision``)."""
    if precision == "auto":
        return w.device.type != "mps" and w.numel() * r >= SINGLE_FROM
    return precision in ("float32", "bfloat16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16): there a bfloat16
    matrix product is several times faster than a float32 one; elsewhere it is emulated
    and slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(bool(getattr(torch.cpu, p)()) for p in probes if hasattr(torch.cpu, p))
    except Exception:  # noqa: BLE001 - a private probe that changed: assume not
        return False


def _products(precision: str, w: torch.Tensor, r: int) -> torch.dtype | None:
    """The dtype of ALS's large products: bfloat16 when asked, or with ``auto`` on a large
    problem on a CPU that multiplies it natively; else that of the sweeps."""
    if precision == "bfloat16":
        return torch.bfloat16
    if (precision == "auto" and w.device.type == "cpu" and w.numel() * r >= SINGLE_FROM
            and native_bf16()):
        return torch.bfloat16
    return None


@register_decomposer("cp")
class CP(Decomposer):
    layer_types = (nn.Conv2d,)
    rank_names = ("r",)

    Options = CPOptions

    def supports(self, layer: nn.Module) -> str | None:
        reason = super().supports(layer)
        if reason is not None:
            return reason
        if layer.groups != 1:
            return ("cp takes groups=1 convs only (a grouped/depthwise CP-4 has no exact "
                    "plain-conv form here); use tucker2 or spatial")
        if tuple(layer.kernel_size) == (1, 1):
            return "cp needs a spatial kernel, not 1x1; use svd or tucker2"
        return None

    def max_rank(self, layer: nn.Module, **options: Any) -> Rank:
        kh, kw = layer.kernel_size
        return (kh * kw * min(layer.in_channels, layer.out_channels),)

    def _specs(self, layer: nn.Conv2d, r: int) -> list[ConvSpec]:
        kh, kw = layer.kernel_size
        (sv, pv, dv), (sh, ph, dh) = split_axes(layer)
        mode = layer.padding_mode
        return [ConvSpec(layer.in_channels, r),
                ConvSpec(r, r, (kh, 1), sv, pv, dv, r, padding_mode=mode),
                ConvSpec(r, r, (1, kw), sh, ph, dh, r, padding_mode=mode),
                ConvSpec(r, layer.out_channels, bias=layer.bias is not None)]

    def chain_specs(self, layer: nn.Module, rank: Rank, **options: Any) -> list[ConvSpec]:
        return self._specs(layer, rank[0])

    @staticmethod
    def _tap_terms(w: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The exact per-tap construction, terms sorted by singular value (descending):
        factors ``[A_out, A_in, A_h, A_w]`` each ``I_n x R_max`` and the singular values."""
        co, ci, kh, kw = w.shape
        m = min(co, ci)
        u, s, vh = torch.linalg.svd(w.permute(2, 3, 0, 1), full_matrices=False)
        # u: kh x kw x co x m, s: kh x kw x m, vh: kh x kw x m x ci
        root = s.sqrt()
        a_out = (u * root[..., None, :]).permute(2, 0, 1, 3).reshape(co, -1)
        a_in = (vh * root[..., None]).permute(3, 0, 1, 2).reshape(ci, -1)
        eye_h = torch.eye(kh, dtype=w.dtype, device=w.device)
        eye_w = torch.eye(kw, dtype=w.dtype, device=w.device)
        a_h = eye_h[:, :, None, None].expand(kh, kh, kw, m).reshape(kh, -1)
        a_w = eye_w[:, None, :, None].expand(kw, kh, kw, m).reshape(kw, -1)
        sv = s.reshape(-1)
        order = torch.argsort(sv, descending=True, stable=True)
        return [f[:, order] for f in (a_out, a_in, a_h, a_w)], sv[order]

    def spectra(self, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        """Singular values of the per-tap construction (``max_rank`` of them, descending):
        the error of keeping R terms of it is the norm of the rest."""
        return [_tap_spectrum(work_weight(layer)).to(layer.weight.dtype)]

    def _hosvd_init(self, w: torch.Tensor, r: int, seed: int,
                    bases: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The leading ``r`` left singular vectors of each unfolding (``bases``: all of
        them, when already computed), a seeded Gaussian fill beyond a mode's size."""
        gen = torch.Generator(device=w.device).manual_seed(seed)
        out = []
        for n in range(4):
            u = num.gram_eig(w, n)[1] if bases is None else bases[n]
            k = min(r, u.shape[1])
            f = u[:, :k]
            if k < r:
                extra = torch.randn(u.shape[0], r - k, generator=gen, dtype=w.dtype,
                                    device=w.device) / math.sqrt(u.shape[0])
                f = torch.cat([f, extra], dim=1)
            out.append(f)
        return out

    def errors(self, layer: nn.Module, ranks: Sequence[Rank], **options: Any
               ) -> list[float] | None:
        """Where the largest candidate is small (kernel size x rank below ``EXACT_BELOW``)
        the errors measured by decomposing, up to ``ANCHOR_CEILING`` (:meth:`_fitted_errors`;
        None where the caller decomposes each). Else an estimate from
        ``ESTIMATE_SWEEPS`` sweeps of the same ALS from the same start (``decompose`` runs
        ``iters``, which only lower it) at ``ESTIMATE_ANCHORS`` of the ranks (the largest,
        the smallest and evenly between), never above the per-tap construction's error
        (``decompose`` keeps the better of the two). Between anchors the ratio of the
        estimate to the per-tap error is interpolated linearly in the rank: on large layers
        it varies slowly (0.61, 0.81, 0.94 at ranks 944, 664, 376 of ResNet-18's
        ``layer3.1.conv1``; interpolated from 4 of its 11 candidates, the others moved by
        at most 0.012, all towards the full fit's errors). The anchors lie among the ranks
        whose factors hold at most ``ANCHOR_CEILING`` of the kernel's parameters: ALS's cost
        grows faster than the rank (its R x R solves), so the candidates near the dense
        layer's cost, which rarely beat keeping it dense, cost most to estimate (the rank
        2096 anchor of a 512-channel 3x3 conv: 10 of the 18 s its four anchors took); above
        the highest anchor its ratio is kept, which, as the ratio falls with the rank,
        errs on the side of a larger error there. On small layers the measured
        errors jump where ALS stops being admissible, so each is measured there."""
        opt = parse_options(self, options)
        w = work_weight(layer)
        if w.numel() * max(r[0] for r in ranks) < EXACT_BELOW:
            return self._fitted_errors(layer, w, [r[0] for r in ranks], options)
        rs = [r[0] for r in ranks]
        taps = tail_errors(_tap_spectrum(w), rs)
        full = self.max_rank(layer)[0]
        todo = sorted({r for r, tap in zip(rs, taps) if r < full and tap > 0.0})
        if not todo:
            return list(taps)
        bases = [num.gram_eig(w, n)[1] for n in range(4)]
        tap_of = dict(zip(rs, taps))
        every = w.numel() * max(rs) < ANCHORS_FROM
        co, ci, kh, kw = w.shape
        low = [r for r in todo if r * (co + ci + kh + kw) <= ANCHOR_CEILING * w.numel()]
        at = todo if every else _anchors(low or todo, ESTIMATE_ANCHORS)
        # independent fits, each on one intra-op thread (_threads_for): side by side
        est = parallel_map(lambda r: self._estimate(w, r, opt, bases), at,
                           workers=None if _one_thread(w, max(at)) else 1, cost=float)
        ratio = {r: e / tap_of[r] for r, e in zip(at, est)}
        return [tap if r not in todo else min(tap * _interpolate(ratio, r), tap)
                for r, tap in zip(rs, taps)]

    def _fitted_errors(self, layer: nn.Module, w: torch.Tensor, rs: list[int],
                       options: dict[str, Any]) -> list[float] | None:
        """The errors of a small layer's candidates: each decomposed in full (``decompose``)
        up to ``ANCHOR_CEILING`` of the kernel's parameters; above, the per-tap error times
        the ratio of the fitted error to it at the highest rank fitted (as for the anchors
        of large layers). ALS near the dense layer's rank costs most and ends near the
        per-tap error anyway: the three candidates of a 64-channel 3x3 conv above the ceiling
        took 58% of its eleven fits (3.6 of 6.1 s on one thread, ResNet-18's
        ``layer1.0.conv1``). None (the caller decomposes each) where none lies above the
        ceiling or none below."""
        co, ci, kh, kw = w.shape
        fit = [r for r in rs if r * (co + ci + kh + kw) <= ANCHOR_CEILING * w.numel()]
        if not fit or len(fit) == len(rs):
            return None
        got = dict(zip(fit, parallel_map(
            lambda r: float(self.decompose(layer, (r,), **options).fit_info["rel_error"]),
            fit, workers=None if _one_thread(w, max(fit)) else 1, cost=float)))
        taps = dict(zip(rs, tail_errors(_tap_spectrum(w), rs)))
        top = max(fit)
        ratio = got[top] / taps[top] if taps[top] > 0.0 else 1.0
        return [got[r] if r in got else min(taps[r] * ratio, taps[r]) for r in rs]

    def one_thread(self, layer: nn.Module, rank: Rank, **options: Any) -> bool:
        return _one_thread(work_weight(layer), rank[0])

    def _estimate(self, w: torch.Tensor, r: int, opt: Any, bases: list[torch.Tensor]
                  ) -> float:
        """The error of ``ESTIMATE_SWEEPS`` ALS sweeps at rank ``r`` (inf if inadmissible)."""
        wa = w.float() if _single(opt.precision, w, r) else w
        with _threads_for(w, r):
            _, info = num.cp_als(wa, [f.to(wa.dtype) for f in self._hosvd_init(
                w, r, opt.seed, bases)], iters=min(ESTIMATE_SWEEPS, opt.iters), tol=opt.tol,
                ridge=opt.ridge, extrapolate=opt.extrapolate,
                products=_products(opt.precision, w, r))
        ok = info["finite"] and info["norm_ratio"] <= opt.max_norm_ratio
        return info["rel_error"] if ok else math.inf

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        """Options: :class:`CP.Options`."""
        opt = parse_options(self, options)
        (r,) = rank
        w = work_weight(layer)
        wn = float(torch.linalg.vector_norm(w))
        # the tap terms are orthogonal: their errors and term energy follow from the
        # spectrum alone; their vectors are computed only if they are kept (below)
        sv = _tap_spectrum(w)
        kept, dropped = sv[:r].square().sum(), sv[r:].square().sum()
        best: tuple[list[torch.Tensor] | None, dict[str, float]] = (
            None, {"rel_error": float(dropped.sqrt()) / wn if wn else 0.0,
                   "norm_ratio": float(kept.sqrt()) / wn if wn else 0.0})
        total_iters = 0
        if r < self.max_rank(layer)[0] and wn > 0:
            ridge = opt.ridge
            wa = w.float() if _single(opt.precision, w, r) else w
            init = [f.to(wa.dtype) for f in self._hosvd_init(w, r, opt.seed)]
            products = _products(opt.precision, w, r)
            large = w.numel() * r >= SINGLE_FROM
            for _ in range(4):
                # the accelerated fit; plain ALS at twice the sweeps (the fit without
                # extrapolation) only where the accelerated fit is inadmissible
                # (extrapolation can grow cancelling terms) or had to re-seed dead terms
                # (under a strong ridge plain ALS, re-seeding them, settles better). Running
                # both on every small layer lowered their errors a little but doubled the
                # planning of CIFAR ResNets, whose layers are all small. On large problems
                # (from SINGLE_FROM) an admissible accelerated fit is kept even where it
                # re-seeded: there the plain fit took about twice as long and ended higher
                # on each of ResNet-18's 3x3 convs tried (layer4.1.conv1 at rank 1200:
                # 0.4599 accelerated, 0.4652 plain).
                tries = [(opt.extrapolate, opt.iters)] + (
                    [(False, 2 * opt.iters)] if opt.extrapolate else [])
                fits = []
                for extrapolate, iters in tries:
                    if fits and fits[-1][1] and (large or not fits[-1][2]["revived"]):
                        break
                    with _threads_for(w, r):
                        factors, info = num.cp_als(wa, init, iters=iters, tol=opt.tol,
                                                   ridge=ridge, extrapolate=extrapolate,
                                                   products=products)
                    total_iters += info["iters"]
                    fits.append((factors, info["finite"]
                                 and info["norm_ratio"] <= opt.max_norm_ratio, info))
                fits = [f for f in fits if f[1]]
                if fits:
                    factors, _, info = min(fits, key=lambda f: f[2]["rel_error"])
                    if info["rel_error"] < best[1]["rel_error"]:
                        best = ([f.to(w.dtype) for f in factors],
                                {"rel_error": info["rel_error"],
                                 "norm_ratio": info["norm_ratio"],
                                 "revived": info["revived"]})
                    break
                ridge = ridge * 10 if ridge > 0 else 1e-4
        factors = best[0]
        if factors is None:  # the per-tap construction is kept
            factors = [f[:, :r] for f in self._tap_terms(w)[0]]
        a_out, a_in, a_h, a_w = factors
        specs = self._specs(layer, r)
        bias = layer.bias.detach() if layer.bias is not None else None
        kh, kw = layer.kernel_size
        seq = nn.Sequential(
            specs[0].build(a_in.mT, None, layer),
            specs[1].build(a_h.mT.reshape(r, 1, kh, 1), None, layer),
            specs[2].build(a_w.mT.reshape(r, 1, 1, kw), None, layer),
            specs[3].build(a_out, bias, layer),
        )
        seq.fit_info = {"rel_error": float(best[1]["rel_error"]),
                        "norm_ratio": float(best[1]["norm_ratio"]), "iters": total_iters,
                        "revived": int(best[1].get("revived", 0))}
        return seq


def _tap_spectrum(w: torch.Tensor) -> torch.Tensor:
    """The singular values of every spatial tap's ``C_out x C_in`` matrix, all of them in
    one descending sequence: the per-tap construction's terms, strongest first (no vectors
    needed)."""
    return torch.sort(num.svals(w.permute(2, 3, 0, 1)).reshape(-1), descending=True,
                      stable=True).values


def _anchors(ranks: Sequence[int], k: int) -> list[int]:
    """``k`` of the sorted ``ranks``: the first, the last and evenly between (all of them
    where there are no more than ``k``)."""
    if len(ranks) <= k:
        return list(ranks)
    idx = {round(i * (len(ranks) - 1) / (k - 1)) for i in range(k)}
    return [ranks[i] for i in sorted(idx)]


def _interpolate(points: dict[int, float], r: int) -> float:
    """Piecewise-linear interpolation of ``points`` (rank -> value) at ``r``, constant
    beyond the ends; an infinite value (an inadmissible estimate) is taken as 1 (the per-tap
    error itself)."""
    xs = sorted(points)
    ys = [points[x] if math.isfinite(points[x]) else 1.0 for x in xs]
    if r <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if r <= x1:
            return y0 + (y1 - y0) * (r - x0) / (x1 - x0)
    return ys[-1]
