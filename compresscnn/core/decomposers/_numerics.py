"""Small numeric kernels behind the decomposers, in plain ``torch.linalg``.

One small function per kernel, each with a pinned return contract (shapes and ordering are
tested in ``tests/test_decomposers.py``), so that no decomposer depends on a third-party
signature (tensorly changed ``partial_tucker``'s twice). Everything works in the dtype it is
given; the decomposers pass float64.

Notation: ``unfold(t, n)`` is the mode-``n`` unfolding ``T_(n)`` of shape
``(I_n, prod_{m != n} I_m)`` (remaining modes in their original order, C-order), and
``mode_dot(t, M, n)`` is the mode-``n`` product ``t x_n M`` (Kolda & Bader 2009, sec. 2.5).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from compresscnn.util.linalg import lower_gram


def unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(I_mode, prod of the other dims)``."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def mode_dot(t: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """``t x_mode m`` for ``m`` of shape ``(J, I_mode)``: replaces dim ``mode`` by ``J``."""
    return torch.tensordot(m, t, dims=([1], [mode])).movedim(0, mode)


def gram_eig(t: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular system of the mode-``mode`` unfolding via the eigen-decomposition of its
    Gram matrix ``T_(n) T_(n)^T`` (``I_n x I_n``, cheap when ``I_n`` is small against the
    other dims). Returns ``(sigma, U)``: ``sigma`` (``I_n``,) descending, >= 0, and ``U``
    (``I_n x I_n``) orthonormal with columns in the same order."""
    m = unfold(t, mode)
    g = m @ m.mT
    g = (g + g.mT) / 2
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    return evals.clamp_min(0).sqrt(), evecs


def gram_svals(t: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values (descending) of the mode-``mode`` unfolding, from the eigenvalues of
    its Gram matrix only (``eigvalsh``: several times faster than ``gram_eig`` when the
    vectors are not needed, as in rank selection)."""
    m = unfold(t, mode)
    n, rest = m.shape[-2], m.shape[-1]
    s = svals(m)
    if n > rest:  # the other n - rest singular values are exactly zero
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], n - rest)], -1)
    return s


def svals(m: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a matrix or a batch of them (``... x n x k``),
    ``min(n, k)`` of them, from the eigenvalues of the smaller Gram matrix: a quarter of
    ``svdvals``' time on the 1536 x 1536 unfolding of a 512-channel 3x3 conv (one thread).
    The small ones lose relative precision (squared, they sit below ``eps`` times the
    largest), which the tails of the spectrum that rank selection sums do not see: the
    relative tail errors of that unfolding agree with ``svdvals``' to 3e-16."""
    n, k = m.shape[-2], m.shape[-1]
    g = m @ m.mT if n <= k else m.mT @ m
    return torch.linalg.eigvalsh((g + g.mT) / 2).flip(-1).clamp_min(0).sqrt()


def hosvd(t: torch.Tensor, modes: Sequence[int], ranks: Sequence[int]
          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Truncated (partial) HOSVD (De Lathauwer et al. 2000) over ``modes``: factor ``U_n``
    (``I_n x r_n``, orthonormal) = leading eigenvectors of the mode-n Gram matrix; core
    ``G = t x_n U_n^T`` for each n in ``modes``. Returns ``(core, [U_n for n in modes])``."""
    factors = [gram_eig(t, n)[1][:, :r] for n, r in zip(modes, ranks)]
    core = t
    for n, u in zip(modes, factors):
        core = mode_dot(core, u.mT, n)
    return core, factors


def _top_eigvecs(g: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """Leading ``r`` eigenvectors of the symmetric PSD ``g`` (columns, descending) and the sum
    of their eigenvalues (float64)."""
    evals, evecs = torch.linalg.eigh(g)   # reads one triangle: no symmetrising needed
    return evecs[:, -r:].flip(-1), float(evals[-r:].double().sum())


def hooi(w: torch.Tensor, ranks: Sequence[int], iters: int, tol: float = 1e-5,
         extrapolate: float = 1.0, sweep_dtype: torch.dtype | None = None
         ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Tucker-2 by higher-order orthogonal iteration (De Lathauwer et al. 2000, alg. 4.2) on
    the two leading modes of ``w`` (``I_0 x I_1 x ...``, a conv kernel), ``ranks = (r_0,
    r_1)``. Returns ``(core, [U_0, U_1], sweeps_done)`` like :func:`hosvd` with modes
    ``(0, 1)``; the fit is never worse than the HOSVD's (each half-sweep maximises the
    captured energy ``||G||^2`` exactly given the other factor, starting from the HOSVD's
    ``U_1``).

    Faster than the textbook loop, for the same fixed points:

    * ``U_0``'s HOSVD is never computed (the first half-sweep replaces it), and a sweep is
      two batched products with the kernel's spatial slices, two ``I_n x I_n`` Gram
      matrices and their ``eigh``; the captured energy is the sum of the kept eigenvalues,
      so no core is formed until the end.
    * The sweeps only pick subspaces, so they may run in a cheaper ``sweep_dtype``
      (Tucker-2 passes float32 for a float32 layer: about 2.5x faster); the factors
      (orthonormal to ``sweep_dtype``'s precision) and the core come back in ``w``'s dtype.
    * Extrapolation (``extrapolate`` = beta > 0): before a sweep, ``U_1`` is pushed further
      along its last move, ``qr(U + beta (U - P P^T U))`` with ``P`` the previous ``U_1``
      (the line-search acceleration used for ALS, e.g. Bro 1998, on the Grassmannian); the
      step is kept only if its half-sweep captures more energy than the last one, else the
      sweep restarts from the plain ``U_1``. It cuts the sweeps needed for a given fit by
      about a third on VGG-16's kernels (``tools/bench_tensorly.py``).

    Stops after ``iters`` sweeps or when a sweep raises the captured energy by less than
    ``tol`` (relative).
    """
    if iters < 1:
        core, factors = hosvd(w, (0, 1), ranks)
        return core, factors, 0
    n0, n1 = w.shape[0], w.shape[1]
    r0, r1 = int(ranks[0]), int(ranks[1])
    ws = w.reshape(n0, n1, -1).to(sweep_dtype or w.dtype)
    slices = ws.permute(2, 0, 1).contiguous()           # (k, I_0, I_1): spatial slices

    def gram0(u1: torch.Tensor) -> torch.Tensor:       # Gram of (w x_1 U_1^T)_(0)
        a = (slices @ u1).transpose(0, 1).reshape(n0, -1)
        return a @ a.mT

    def gram1(u0: torch.Tensor) -> torch.Tensor:       # Gram of (w x_0 U_0^T)_(1)
        a = (u0.mT @ slices).permute(2, 0, 1).reshape(n1, -1)
        return a @ a.mT

    m1 = ws.transpose(0, 1).reshape(n1, -1)
    u1, _ = _top_eigvecs(m1 @ m1.mT, r1)                # HOSVD factor of mode 1
    energy = -math.inf
    prev: torch.Tensor | None = None
    done = 0
    for _ in range(iters):
        start = u1
        if extrapolate > 0 and prev is not None:
            start = torch.linalg.qr(u1 + extrapolate * (u1 - prev @ (prev.mT @ u1)))[0]
        u0, e0 = _top_eigvecs(gram0(start), r0)
        if start is not u1 and not e0 > energy:         # overshoot: plain sweep instead
            start = u1
            u0, e0 = _top_eigvecs(gram0(u1), r0)
        prev = start
        u1, e1 = _top_eigvecs(gram1(u0), r1)
        done += 1
        gain = (e1 - energy) / max(abs(e1), 1e-300)
        energy = e1
        if gain < tol:
            break
    u0 = torch.linalg.qr(u0)[0]
    u1 = torch.linalg.qr(u1)[0]
    core = (u0.mT @ slices @ u1).permute(1, 2, 0).reshape(r0, r1, *w.shape[2:])
    return core.to(w.dtype), [u0.to(w.dtype), u1.to(w.dtype)], done


def truncated_svd(a: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``a`` (``... x m x n``, batched allowed) truncated to ``rank``:
    ``(U (.. m x r), S (.. r) descending, Vh (.. r x n))``."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def gram_eigh(a: torch.Tensor, products: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the smaller Gram matrix of ``a`` (``a a^T`` if ``a`` is wide,
    ``a^T a`` if tall), in ``products``' dtype (default ``a``'s): ``(evals ascending,
    evecs)``, what :func:`gram_svd` starts from; its eigenvalues are the squared singular
    values of ``a``."""
    b = a.mT if a.shape[0] > a.shape[1] else a
    low = b.to(products) if products is not None and products != b.dtype else b
    return torch.linalg.eigh(lower_gram(low))  # in the products' dtype: no more is known


def gram_svd(a: torch.Tensor, rank: int, products: torch.dtype | None = None,
             eig: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of a wide or tall ``a`` (``m x n``) from the eigendecomposition of its
    smaller Gram matrix (``min(m, n)`` square): the leading ``rank`` eigenvectors span the
    best rank-``rank`` subspace of that side, and the projection of ``a`` on them gives the
    other side and the singular values (its rows' norms). Two products with ``a`` and one
    symmetric eigendecomposition of the small side, against a full SVD's bidiagonalisation
    of all of ``a``: VGG-16's fc6 (4096 x 25088) in seconds. The result is the orthogonal
    projection of ``a`` on that subspace, so its error is ``sqrt(||a||^2 - sum s^2)``,
    returned as the fourth value (relative). ``products``: the dtype of the two products
    with ``a`` and of the eigendecomposition (e.g. float32 for a float32 layer held in
    float64: about twice as fast); the results are in ``a``'s dtype. ``eig``: the
    :func:`gram_eigh` of ``a`` in ``products``, when already computed (then one product
    with ``a``). Same contract as :func:`truncated_svd` otherwise; exact to rounding (not a
    sketch), but a full-rank SVD should use that one."""
    tall = a.shape[0] > a.shape[1]
    b = a.mT if tall else a                                   # k x N, k = min(m, n)
    low = b.to(products) if products is not None and products != b.dtype else b
    vecs = (eig if eig is not None else gram_eigh(a, products))[1]
    u = vecs[:, -rank:].flip(-1).to(low.dtype)               # k x r, descending
    proj = (u.mT @ low).to(a.dtype)                           # r x N
    u = u.to(a.dtype)
    s = torch.linalg.vector_norm(proj, dim=1)
    order = torch.argsort(s, descending=True, stable=True)
    u, proj, s = u[:, order], proj[order], s[order]
    vh = proj / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    total = float(torch.linalg.vector_norm(a)) ** 2
    kept = float(s.double().square().sum())
    rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    if tall:  # a = b^T ~ proj^T u^T
        return vh.mT, s, u.mT, rel
    return u, s, vh, rel


def randomized_svd(a: torch.Tensor, rank: int, oversample: int | None = None,
                   power_iters: int | None = None, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder + SVD (Halko, Martinsson & Tropp 2011, alg. 4.4 with QR
    re-orthonormalisation between power iterations). Same contract as
    :func:`truncated_svd`. Defaults: oversampling ``max(20, rank // 2)`` and 10 power
    iterations, which keep the truncation error within 1e-3 (relative) of the exact
    truncated SVD's even for a flat (Gaussian random matrix) spectrum, the worst case."""
    m, n = a.shape
    p = max(20, rank // 2) if oversample is None else oversample
    q = 10 if power_iters is None else power_iters
    k = min(rank + p, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=a.device, dtype=a.dtype)
    y, _ = torch.linalg.qr(a @ omega)
    for _ in range(q):
        z, _ = torch.linalg.qr(a.mT @ y)
        y, _ = torch.linalg.qr(a @ z)
    b = y.mT @ a
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return (y @ ub)[:, :rank], s[:rank], vh[:rank]


def cp_reconstruct(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor ``sum_r a_0[:, r] o a_1[:, r] o ...`` from CP factors ``I_n x R``, as
    ``A_0 @ KR(A_1, ...)^T`` (the Khatri-Rao matrix of the trailing modes only, never an
    ``I_0 x I_1 x R`` intermediate)."""
    letters = "bcdefgh"[: len(factors) - 1]
    expr = ",".join(f"{c}r" for c in letters) + "->" + letters + "r"
    rest = torch.einsum(expr, *factors[1:]) if len(factors) > 2 else factors[1]
    shape = [f.shape[0] for f in factors]
    return (factors[0] @ rest.reshape(-1, factors[0].shape[1]).mT).reshape(shape)


def _mttkrp4(t: torch.Tensor, factors: Sequence[torch.Tensor], mode: int,
             cache: dict[str, torch.Tensor] | None = None,
             products: torch.dtype | None = None) -> torch.Tensor:
    """:func:`mttkrp` of an ``(O, I, h, w)`` tensor. Mode ``O``: one matrix product with the
    Khatri-Rao product of the input mode and the small spatial ones (``I * h * w`` rows).
    The other modes from ``Y = A_O^T T_(O)`` (``R x I x h x w``, one matrix product), then
    elementwise contractions: ``I`` against the spatial Khatri-Rao product, the spatial modes
    after contracting ``I``. ``cache``: a dict that keeps ``Y`` between calls while ``A_O``
    does not change (an ALS sweep updates ``O`` first, so the sweep's other three modes share
    one ``Y``: two large matrix products per sweep instead of four); the caller empties it
    when ``A_O`` changes. ``products``: the dtype the two large products run in (their
    results come back in ``t``'s dtype; ``cache`` may then also hold ``t`` in it)."""
    a_o, a_i, a_h, a_w = factors
    o, i, h, w = t.shape
    r = a_o.shape[1]
    hw = (a_h[:, None, :] * a_w[None, :, :]).reshape(h * w, r)  # KR of the spatial modes
    flat = t.reshape(o, i * h * w)
    if products is not None and products != t.dtype:
        low = None if cache is None else cache.get("t")
        if low is None:
            low = flat.to(products)
            if cache is not None:
                cache["t"] = low
        flat = low
    if mode == 0:
        kr = (a_i[:, None, :] * hw[None, :, :]).reshape(i * h * w, r)
        return (flat @ kr.to(flat.dtype)).to(t.dtype)
    y = None if cache is None else cache.get("y")
    if y is None:
        y = (a_o.mT.to(flat.dtype) @ flat).to(t.dtype).reshape(r, i, h * w)  # O contracted
        if cache is not None:
            cache["y"] = y
    if mode == 1:
        return torch.einsum("rik,kr->ir", y, hw)
    z = torch.einsum("rik,ir->rk", y, a_i).reshape(r, h, w)
    if mode == 2:
        return torch.einsum("rhw,wr->hr", z, a_w)
    return torch.einsum("rhw,hr->wr", z, a_h)


def cp_term_norms(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm of each rank-1 term: ``prod_n ||a_n[:, r]||`` (shape ``R``)."""
    out = torch.ones_like(factors[0][0])
    for f in factors:
        out = out * torch.linalg.vector_norm(f, dim=0)
    return out


def mttkrp(t: torch.Tensor, factors: Sequence[torch.Tensor], mode: int,
           cache: dict[str, torch.Tensor] | None = None,
           products: torch.dtype | None = None) -> torch.Tensor:
    """Matricised tensor times Khatri-Rao product ``T_(n) (KR of the other factors)``
    (``I_n x R``); the Khatri-Rao matrix of the two large modes is never formed. A 4-way
    conv kernel ``(O, I, kh, kw)`` goes through one matrix product with the first large
    mode contracted (:func:`_mttkrp4`, which may keep that product in ``cache`` and run the
    large products in ``products``); other orders through one einsum."""
    if t.ndim == 4:
        return _mttkrp4(t, factors, mode, cache, products)
    letters = "abcdefgh"[: t.ndim]
    ops = [f"{letters[m]}r" for m in range(t.ndim) if m != mode]
    expr = letters + "," + ",".join(ops) + f"->{letters[mode]}r"
    return torch.einsum(expr, t, *[f for m, f in enumerate(factors) if m != mode])


#: a CP term whose norm falls below this fraction of the largest term's is dead
DEAD_TERM = 1e-6


def cp_als(t: torch.Tensor, init: Sequence[torch.Tensor], iters: int = 100,
           tol: float = 1e-7, ridge: float = 1e-6, revive: int = 3,
           extrapolate: bool = False, products: torch.dtype | None = None
           ) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Regularised CP-ALS (Kolda & Bader 2009, fig. 3.3, with Tikhonov/ridge terms as in
    Navasca, De Lathauwer & Kindermann 2008). Each mode update solves
    ``A_n (V_n + lam I) = MTTKRP_n`` with ``V_n`` the Hadamard product of the other factors'
    Gram matrices (Cholesky; no Khatri-Rao product is formed). The problem is solved on
    ``t / ||t||`` so ``ridge`` is scale-free; after each sweep the columns are balanced
    (equal norm across modes) so the ridge penalises term magnitude, which is what keeps
    cancelling (degenerate) terms from diverging. Stops when the relative error changes by
    less than ``tol``.

    The ridge can also shrink a term that earns less than its penalty to nothing; a term at
    zero in every mode is a fixed point of ALS (its columns' right-hand sides vanish), and
    in a network it is a dead channel: MACs paid, nothing computed, no gradient to revive
    it in fine-tuning. Up to ``revive`` times, the terms whose norm falls below
    ``DEAD_TERM`` of the largest are re-seeded from the residual (:func:`_reseed`) and the
    sweeps go on; terms dead after the last sweep are re-seeded once more, without sweeps
    (each new term is the residual's projection on a rank-1 direction, the new terms
    mutually orthogonal while they are fewer than the largest mode's size, so the error
    cannot grow). E.g. ResNet-20's ``layer3.2.conv1`` at rank 88, ridge
    1e-3: 7 dead terms and error 0.529 without, none and 0.505 with.

    ``extrapolate``: Bro's line-search acceleration (Bro 1998, sec. 4.3; TensorLy's
    ``linesearch``): before a sweep the factors are pushed along their last move,
    ``A + (k^(1/3) - 1) (A - A_prev)`` at sweep ``k``, and the sweep from there is kept only
    if its error is below the last one, else the sweep is run again from the plain factors.
    A rejected try counts as a sweep; the error test costs nothing (it is the sweep's own).
    It reaches in 40-50 sweeps the error plain ALS reaches in 100 (ResNet-18's 3x3 convs).
    ``products``: the dtype of the two large products of a sweep (:func:`mttkrp`), e.g.
    bfloat16 where the CPU multiplies it natively; the factors and solves stay in ``t``'s.

    ``ridge`` is the absolute Tikhonov weight on the unit-norm problem: the objective is
    ``||x - [[A]]||^2 + ridge * sum_n ||A_n||_F^2``.

    Returns ``(factors, info)``: factors ``I_n x R`` of ``t`` itself (the scale ``||t||`` is
    spread evenly over the modes) and ``info = {"iters", "rel_error", "norm_ratio",
    "finite", "revived"}`` (``iters``: the sweeps run, rejected extrapolations included)
    with ``norm_ratio = sqrt(sum_r ||term_r||^2) / ||t||`` and
    ``revived`` the number of terms re-seeded.
    """
    tn = float(torch.linalg.vector_norm(t))
    if tn == 0.0:
        zs = [torch.zeros_like(f) for f in init]
        return zs, {"iters": 0, "rel_error": 0.0, "norm_ratio": 0.0, "finite": True,
                    "revived": 0}
    als = _Als(t / tn, [f.clone() for f in init], ridge, products)
    done, finite, revived = als.run(iters, tol, revive, extrapolate)
    if finite and revive > 0:  # what the ridge killed after the last re-seeding: a final
        dead = _dead_terms(als.a)  # projection of the residual, which cannot raise the
        if len(dead):              # error
            _reseed(als.x, als.a, dead)
            revived += len(dead)
    scale = tn ** (1.0 / t.ndim)
    a = [f * scale for f in als.a]
    rel, ratio = math.inf, math.inf
    if finite:
        rel = float(torch.linalg.vector_norm(t - cp_reconstruct(a))) / tn
        ratio = float(torch.linalg.vector_norm(cp_term_norms(a))) / tn
        finite = math.isfinite(rel) and math.isfinite(ratio)
    return a, {"iters": done, "rel_error": rel, "norm_ratio": ratio, "finite": finite,
               "revived": revived}


class _Als:
    """The state of :func:`cp_als` on the unit-norm tensor ``x``: the factors ``a``, their
    Gram matrices ``grams`` (``grams[0]`` is not read: mode 0 is updated first), the
    factors before the last kept sweep (``last``, for extrapolation) and the MTTKRP cache."""

    def __init__(self, x: torch.Tensor, a: list[torch.Tensor], ridge: float,
                 products: torch.dtype | None) -> None:
        self.x, self.a, self.ridge, self.products = x, a, ridge, products
        rank = a[0].shape[1]
        self.ridged_eye = ridge * torch.eye(rank, dtype=x.dtype, device=x.device)
        self.cache: dict[str, torch.Tensor] = {}
        self.grams: list[torch.Tensor | None] = _grams(a)
        self.last: list[torch.Tensor] | None = None

    def sweep(self, f: list[torch.Tensor], grams: list[torch.Tensor | None]
              ) -> tuple[float, list[torch.Tensor | None]]:
        """One ALS sweep on ``f`` (in place); its relative error and the Gram matrices."""
        grams, n_modes = list(grams), len(f)
        for n in range(n_modes):
            others = [grams[m] for m in range(n_modes) if m != n]
            v = others[0]  # the Hadamard product of the others' Grams (1 * g is g exactly)
            for g in others[1:]:
                v = v * g
            if n == 0:
                self.cache.pop("y", None)  # what it holds was computed from the first factor
            mk = mttkrp(self.x, f, n, self.cache, self.products)
            chol, info = torch.linalg.cholesky_ex(v + self.ridged_eye)
            if int(info) != 0:
                new = torch.linalg.lstsq(v + self.ridged_eye, mk.mT).solution.mT
            else:
                new = torch.cholesky_solve(mk.mT, chol).mT
            f[n] = new
            grams[n] = new.mT @ new
        # ||x - x_hat||^2 = 1 - 2 <x, x_hat> + ||x_hat||^2, from the last update's pieces
        inner = float((mk * f[n_modes - 1]).sum())
        hat2 = float((v * grams[n_modes - 1]).sum())
        return math.sqrt(max(1.0 - 2.0 * inner + hat2, 0.0)), grams

    def step(self, done: int, rel: float, extrapolate: bool, iters: int
             ) -> tuple[int, float, bool]:
        """One sweep (after an extrapolated try, when asked and possible): the sweeps done,
        the error and whether the loop goes on."""
        if extrapolate and self.last is not None:
            jump = (done + 1) ** (1.0 / 3.0) - 1.0
            b = [f + jump * (f - p) for f, p in zip(self.a, self.last)]
            rel_b, grams_b = self.sweep(b, _grams(b))
            done += 1
            if math.isfinite(rel_b) and rel_b < rel:
                self.last, self.a, self.grams, rel = self.a, b, grams_b, rel_b
            elif done >= iters:
                return done, rel, False
            else:
                self.last = None
        if self.last is None or not extrapolate:
            c = list(self.a)
            rel, self.grams = self.sweep(c, self.grams)
            done += 1
            self.last, self.a = self.a, c
        return done, rel, True

    def run(self, iters: int, tol: float, revive: int, extrapolate: bool
            ) -> tuple[int, bool, int]:
        """Sweeps until ``iters`` or convergence, re-seeding dead terms up to ``revive``
        times: (sweeps done, whether finite, terms re-seeded)."""
        prev = rel = math.inf
        done = reseeds = revived = 0
        while done < iters:
            done, rel, go = self.step(done, rel, extrapolate, iters)
            if not go:
                break
            if not math.isfinite(rel):  # a non-finite factor reaches rel via mk or grams
                return done, False, revived
            self.grams = [None if g is None else g * d[:, None] * d[None, :]
                          for g, d in zip(self.grams, _balance(self.a))]
            if reseeds < revive:
                dead = _dead_terms(self.a)
                if len(dead):
                    _reseed(self.x, self.a, dead)
                    self.grams = _grams(self.a)
                    reseeds, revived, prev, self.last = reseeds + 1, revived + len(dead), \
                        math.inf, None
                    continue
            if math.isfinite(prev) and abs(prev - rel) < tol * max(prev, 1e-12):
                break
            prev = rel
        return done, True, revived


def _grams(factors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """``[None, A_1^T A_1, ...]``: the Gram matrices a sweep reads (mode 0 is updated
    first)."""
    return [None] + [f.mT @ f for f in factors[1:]]


def _dead_terms(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Indices of the terms whose norm is below ``DEAD_TERM`` of the largest term's."""
    norms = cp_term_norms(factors)
    return torch.nonzero(norms < DEAD_TERM * norms.max()).flatten()


def _reseed(x: torch.Tensor, factors: list[torch.Tensor], dead: torch.Tensor) -> None:
    """Replace the ``dead`` columns of ``factors`` (in place) by new terms from the residual
    ``x - [[factors]]``: the k-th dead term takes the k-th leading left singular vector of
    every mode's unfolding of the residual (cycling where a mode is smaller than the number
    of dead terms), scaled to its projection on the residual, its norm spread evenly over
    the modes as after balancing."""
    res = x - cp_reconstruct(factors)
    k = len(dead)
    new = []
    for n in range(x.ndim):
        u = gram_eig(res, n)[1]
        new.append(u[:, torch.arange(k, device=u.device) % u.shape[1]])
    lam = (mttkrp(res, new, 0) * new[0]).sum(0)  # <res, term_j> for each new term
    scale = lam.abs().clamp_min(torch.finfo(lam.dtype).tiny) ** (1.0 / x.ndim)
    for n in range(x.ndim):
        factors[n][:, dead] = new[n] * scale * (torch.sign(lam) if n == 0 else 1.0)


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale columns in place so every factor's r-th column has norm
    ``||term_r|| ** (1/N)`` (the product, i.e. the CP model, is unchanged). Returns each
    factor's column scales (a Gram matrix ``G`` becomes ``d G d^T``)."""
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    total = torch.ones_like(norms[0])
    for nv in norms:
        total = total * nv
    target = total.clamp_min(0) ** (1.0 / len(factors))
    scales = []
    for i, (f, nv) in enumerate(zip(factors, norms)):
        safe = torch.where(nv > 0, nv, torch.ones_like(nv))
        scales.append(target / safe)
        factors[i] = f * scales[-1]
    return scales
