"""Fitting one replaced layer to the original layer's response on calibration data.

Given the replacement's inputs ``xs`` (the compressed model's own activations) and the
original layer's outputs ``ys`` (on the original model's activations), the replacement is
fitted so that ``tail(module(x))`` reproduces ``tail(y)``; ``tail`` is what alone follows
the layer (:class:`Tail`: BatchNorm and/or ReLU, or nothing).

``solver="closed_form"`` works on second moments (Zhang et al. 2015, "Accelerating very deep
convolutional networks for classification and detection", TPAMI, sec. 3, solve their
response reconstruction the same way). Every decomposition here is a chain of plain convs
that computes one linear map of the original layer's input patches: its composite kernel
``W_hat`` (``C_out x C_in k_h k_w`` per group; computed by running the chain, unpadded, on
one-hot patches). So with ``X`` the patches of the inputs as the original layer reads
them, the response error ``||Y - W_hat X||^2`` is the quadratic form
``tr(W_hat G W_hat^T) - 2 tr(W_hat C) + ||Y||^2`` in the moments ``G = X X^T`` and
``C = X Y^T``, accumulated in one pass (float32 products per chunk, summed in float64) and
independent of the amount of data afterwards:

* the last factor (a 1x1 conv after Tucker-2 or CP, the 1 x k_w conv of the spatial
  scheme) and a dense Conv2d/Linear as a whole are linear in their weights: least squares
  per output channel, solved once in float64 with a small ridge term;
* an SVD pair (two Linear / 1x1 convs) is solved as a whole: the rank-r reduced-rank
  regression in the input covariance's metric (Zhang et al.'s GSVD solution), split into
  two balanced factors;
* the other factors are then refined jointly with the last on the same quadratic form
  (L-BFGS, float64), until its relative change falls below ``TOL``: each step costs a
  product with ``G``, not a pass over the data, and ``LBFGS_WORK`` bounds those products
  per layer (it bites on ImageNet models' widest layers only).

A per-channel affine tail (a BatchNorm alone) only weights the output channels. A clamp in
the tail (ReLU, ReLU6) makes the target non-linear: then Zhang et al.'s alternation refines
that solution on a random sample of the rows: with auxiliary pre-activations ``u``, it
minimises ``||t - clamp(u)||^2 + lam ||u - (a p + c)||^2`` over ``u`` elementwise in closed
form and over the weights by the quadratic solve above, ``lam`` growing each round, until
the loss changes by less than ``TOL``, keeping the best weights seen.

Modules that are no such chain (a Fire module) use the iterative fit, ``solver="adam"``:
Adam on all the replacement's parameters with a cosine schedule for a fixed number of
steps, one calibration batch per step (the method before the closed form).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compresscnn.config import SOLVERS
from compresscnn.fit.chain import RIDGE, _Chain, _Moments, _moments, _ridge
from compresscnn.util.linalg import sym_gram

#: the joint refinement and the non-linear rounds stop once the loss changes by less than
#: this (relative)
TOL = 1e-3
#: non-linear rounds at most; L-BFGS iterations per check, and at most in all
MAX_ROUNDS, LBFGS_BLOCK, LBFGS_MAX = 8, 10, 100
#: L-BFGS iterations of the joint refinement within each non-linear round
ROUND_LBFGS = 3
#: multiply-adds with the Gram matrix the joint refinement of one layer may spend
#: (:func:`_budget`): all of ``LBFGS_MAX`` iterations up to ResNet-18's 256-channel 3x3
#: convs (and every layer of the CIFAR ResNets, whose largest needs 2e9), 20 on its
#: 512-channel ones, whose every evaluation multiplies 512 x 4608 x 4608. What it trades
#: there: ``layer4.1.conv1`` (Tucker-2 at half its MACs, 64 random images through BatchNorm
#: and ReLU) ends at 0.491 instead of 0.442, for a sixth of the refinement's products.
#: ``math.inf``: unbounded
LBFGS_WORK = 2.5e11
#: first and largest weight of the coupling term, and its growth per round
LAM_START, LAM_MAX, LAM_GROWTH = 0.01, 1.0, 2.0
#: rows of the random sample the non-linear rounds run on: SAMPLE_PER_INPUT per input of
#: the regression, at least SAMPLE_MIN, within SAMPLE_ELEMENTS in all
SAMPLE_PER_INPUT, SAMPLE_MIN, SAMPLE_ELEMENTS = 32, 1 << 14, 1 << 24


class Tail:
    """What alone follows a layer: eval-mode BatchNorms (per-channel affine maps) and
    ReLU / ReLU6 (clamps ``(lo, hi)``), applied in order to a tensor with channels on
    dim 1 (dim -1 for :meth:`rows`)."""

    def __init__(self, ops: Sequence[nn.Module | tuple[float, float]]) -> None:
        self.ops = list(ops)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            if isinstance(op, tuple):
                t = t.clamp(op[0], op[1]) if math.isfinite(op[1]) else t.clamp_min(op[0])
            else:
                t = F.batch_norm(t, op.running_mean, op.running_var, op.weight, op.bias,
                                 False, 0.0, op.eps)
        return t

    @property
    def linear(self) -> bool:
        return not any(isinstance(op, tuple) for op in self.ops)

    def affine_clamp(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float
                                    ] | None:
        """``(scale, shift, lo, hi)`` when the chain is affine maps then at most one clamp
        (``scale``/``shift`` None: identity; no clamp: infinite bounds), else None."""
        scale = shift = None
        lo, hi = -math.inf, math.inf
        for i, op in enumerate(self.ops):
            if isinstance(op, tuple):
                if i != len(self.ops) - 1:
                    return None
                lo, hi = op
                continue
            s = (op.weight if op.weight is not None else 1.0) / torch.sqrt(
                op.running_var + op.eps)
            c = (op.bias if op.bias is not None else 0.0) - op.running_mean * s
            s, c = s.detach(), c.detach()
            scale, shift = (s, c) if scale is None else (scale * s, shift * s + c)
        return scale, shift, lo, hi


def relative_error(mod: nn.Module, xs: Sequence[torch.Tensor], ts: Sequence[torch.Tensor],
                   tail: Tail) -> float:
    """``||tail(mod(x)) - t|| / ||t||`` over all batches (``ts`` already through the tail)."""
    with torch.no_grad():
        num = sum(float((tail(mod(x)) - t).double().square().sum()) for x, t in zip(xs, ts))
        den = sum(float(t.double().square().sum()) for t in ts)
    return (num / max(den, 1e-30)) ** 0.5


def fit_layer(mod: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor],
              tail: Tail | None = None, *, reference: nn.Module | None = None,
              solver: str = "closed_form", adam: tuple[int, float] = (300, 3e-3),
              name: str = "layer") -> dict[str, Any]:
    """Fit ``mod`` in place so that ``tail(mod(x))`` matches ``tail(y)``; never leaves it
    worse than it was (the data-free decomposition). ``reference``: the layer ``mod``
    replaces (its geometry reads the patches; default ``mod`` itself). ``adam``: the steps
    and learning rate of the iterative fit (``solver="adam"``, or a module that is no chain
    of convs). Returns
    ``before``/``after`` (relative errors after the tail, on all batches), ``seconds``,
    ``solver`` (the one used: a module that is no chain of convs falls back to ``adam``)
    and ``iters`` (Adam steps, or L-BFGS iterations plus non-linear rounds)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    t0 = time.perf_counter()
    tail = tail or Tail([])
    chain = None
    if solver == "closed_form" and tail.affine_clamp() is not None:
        chain = _Chain.of(mod, reference if reference is not None else mod)
    if chain is not None:
        before, after, iters = _closed_form(chain, xs, ys, tail, name)
        return {"before": before, "after": after, "seconds": time.perf_counter() - t0,
                "solver": "closed_form", "iters": iters}
    with torch.no_grad():
        ts = [tail(y) for y in ys]
    before = relative_error(mod, xs, ts, tail)
    steps, lr = int(adam[0]), float(adam[1])
    saved = {k: v.clone() for k, v in mod.state_dict().items()}
    _adam(mod, xs, ts, tail, steps, lr)
    after = relative_error(mod, xs, ts, tail)
    if not after < before:  # never make a layer worse than its data-free init
        mod.load_state_dict(saved)
        after = before
    return {"before": before, "after": after, "seconds": time.perf_counter() - t0,
            "solver": "adam", "iters": steps}


def _adam(mod: nn.Module, xs: list[torch.Tensor], ts: list[torch.Tensor], tail: Tail,
          steps: int, lr: float) -> None:
    """The iterative fit: Adam on every floating-point parameter of ``mod`` on the mean
    squared error, normalised per batch, cosine schedule, one batch per step."""
    params = [p for p in mod.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    scale = [float(t.square().mean()) + 1e-12 for t in ts]
    try:
        with torch.enable_grad():
            for step in range(steps):
                i = step % len(xs)
                loss = (tail(mod(xs[i])) - ts[i]).square().mean() / scale[i]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None


#: the last few Cholesky factors and ridged Gram matrices, by the Gram matrix they came from
#: (the non-linear rounds solve with one Gram matrix and a new right-hand side each round)
_FACTORS: list[tuple[torch.Tensor, str, torch.Tensor]] = []


def _cached(gram: torch.Tensor, kind: str, make) -> torch.Tensor:
    for g, k, v in _FACTORS:
        if g is gram and k == kind:
            return v
    v = make()
    _FACTORS.append((gram, kind, v))
    del _FACTORS[:-4]
    return v


def _cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``gram`` plus the ridge, the ridge raised until it factorises."""
    ridge = RIDGE
    while True:
        chol, info = torch.linalg.cholesky_ex(_ridge(gram, ridge))
        if not info.any():
            return chol
        ridge *= 100.0


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(gram + ridge)^-1 rhs`` by Cholesky, the ridge raised until it factorises (the
    factor of a Gram matrix solved with before is reused)."""
    return torch.cholesky_solve(rhs, _cached(gram, "chol", lambda: _cholesky(gram)))


def _objective(chain: _Chain, mom: _Moments, w2: torch.Tensor,
               params: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The chain's squared response error, channels weighted by ``w2``."""
    k = chain.kernel(params)                                      # g x co x d'
    quad = ((k @ mom.gram) * k).sum(-1)
    lin = (k * mom.cross.mT).sum(-1)
    return (w2 * (quad - 2.0 * lin + mom.yy)).sum()


def _solve_last(chain: _Chain, mom: _Moments) -> None:
    """The last layer (and the bias) by least squares given the layers before it (their
    operator and its normal matrix reused while neither they nor the Gram matrix change)."""
    n = len(chain.layers) - 1
    key = (mom.gram, *chain.params[:n])
    hit = getattr(chain, "_last", None)
    if hit is not None and len(hit[0]) == len(key) and all(
            a is b for a, b in zip(hit[0], key)):
        q, normal = hit[1:]
    else:
        q = chain.last_operator()                                 # g x d x e
        if chain.bias:
            g, d, e = q.shape
            qt = q.new_zeros(g, d + 1, e + 1)
            qt[:, :d, :e], qt[:, d, e] = q, 1.0
            q = qt
        normal = q.mT @ mom.gram @ q
        chain._last = (key, q, normal)
    sol = _solve(normal, q.mT @ mom.cross)                         # g x e' x co
    last = chain.layers[-1]
    e = q.shape[-1] - int(chain.bias)
    chain.params[len(chain.layers) - 1] = sol[:, :e].mT.reshape(last.weight.shape)
    if chain.bias:
        chain.params[-1] = sol[:, e].reshape(-1)


def _solve_pair(chain: _Chain, mom: _Moments, w: torch.Tensor) -> None:
    """An SVD pair as the best rank-r map in the input covariance's metric, the outputs
    weighted by ``w``: the top-r eigenvectors ``V`` of ``W^T G W`` for the least-squares
    ``W`` (centred moments, so the bias stays free), ``W_r = W V V^T``, split as
    ``U S^1/2`` and ``S^1/2 V^T`` like the data-free SVD."""
    gram, cross = mom.gram[0], mom.cross[0]
    sol = _solve(gram, cross)                                      # d' x co
    d = chain.d
    if chain.bias:  # centred covariance of the inputs: G_zz - n mu mu^T
        n = gram[d, d]
        mu = gram[:d, d] / n
        gc, wz = gram[:d, :d] - n * torch.outer(mu, mu), sol[:d]
    else:
        gc, wz = gram, sol
    r = chain.layers[0].weight.shape[0]
    ws = wz * w
    m = ws.mT @ gc @ ws
    v = torch.linalg.eigh((m + m.mT) / 2)[1][:, -r:].flip(1)      # co x r
    p, s, qh = torch.linalg.svd(v.mT @ ws.mT, full_matrices=False)
    root = s.sqrt()
    first, second = root[:, None] * qh, (v / w[:, None]) @ p * root[None, :]
    chain.params[0] = first.reshape(chain.layers[0].weight.shape)
    chain.params[1] = second.reshape(chain.layers[1].weight.shape)
    if chain.bias:  # intercept of the rank-r map: the fitted values' mean
        chain.params[2] = sol[d] + (wz - first.mT @ second.mT).mT @ mu


def _lbfgs(chain: _Chain, mom: _Moments, w2: torch.Tensor, budget: int) -> int:
    """Refine every layer of the chain jointly on the quadratic form, by L-BFGS in float32
    on its residual form ``sum_o w2_o (w_o - w*_o)^T G (w_o - w*_o)`` about the unconstrained
    least-squares kernel ``W*`` (no cancellation, so single precision is enough); stops once
    a block of iterations lowers the whole loss by less than ``TOL`` (relative). Returns the
    iterations run."""
    if budget <= 0:
        return 0
    gram = _cached(mom.gram, "ridged", lambda: _ridge(mom.gram))
    wstar = _solve(mom.gram, mom.cross).mT                          # g x co x d'
    floor = float((w2 * (mom.yy - (wstar * mom.cross.mT).sum(-1))).sum())

    def excess(params: list[torch.Tensor], g: torch.Tensor, ws: torch.Tensor,
               wt: torch.Tensor) -> torch.Tensor:
        e = chain.kernel(params) - ws
        return (wt * ((e @ g) * e).sum(-1)).sum()

    start = float(excess(chain.params, gram, wstar, w2))
    if not (start > 0.0 and budget > 0):
        return 0
    g32, ws32, wt32 = gram.float(), wstar.float(), (w2 / start).float()
    params = [p.float().requires_grad_(True) for p in chain.params]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=min(LBFGS_BLOCK, budget),
                            history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = excess(params, g32, ws32, wt32)
        loss.backward()
        return loss

    prev, done = floor + start, 0
    with torch.enable_grad():
        while done < budget:
            opt.step(closure)
            done += min(LBFGS_BLOCK, budget)
            with torch.no_grad():
                loss = floor + start * float(excess(params, g32, ws32, wt32))
            if not math.isfinite(loss) or prev - loss <= TOL * abs(prev):
                break
            prev = loss
    new = [p.detach().double() for p in params]
    if float(excess(new, gram, wstar, w2)) < start:
        chain.params = new
    return done


def _solve_quadratic(chain: _Chain, mom: _Moments, w2: torch.Tensor, budget: int) -> int:
    """The chain's weights for the quadratic form ``mom``: closed form, then (for a chain
    of more than what the closed form covers) the joint refinement; its iterations."""
    if chain.pair:
        _solve_pair(chain, mom, w2.sqrt()[0])
        return 0
    _solve_last(chain, mom)
    return _lbfgs(chain, mom, w2, budget) if len(chain.layers) > 1 else 0


def _closed_form(chain: _Chain, xs: list[torch.Tensor], ys: list[torch.Tensor], tail: Tail,
                 name: str) -> tuple[float, float, int]:
    """Fit ``chain`` as the module docstring describes: (before, after, iterations)."""
    scale, shift, lo, hi = tail.affine_clamp()
    a = (scale.double() if scale is not None else torch.ones(chain.g * chain.co,
                                                               dtype=torch.float64))
    w2 = a.reshape(chain.g, chain.co).square()
    w2 = w2.clamp_min(1e-16 * float(w2.max()))
    sample = 0
    if not tail.linear:
        dp = chain.d + int(chain.bias)
        sample = min(max(SAMPLE_PER_INPUT * dp, SAMPLE_MIN), SAMPLE_ELEMENTS // dp)
    budget = _budget(chain)
    with torch.no_grad():
        mom, rows = _moments(chain, xs, ys, sample, name)
        start = [p.clone() for p in chain.params]
        if tail.linear:  # exact errors from the moments: ||a (W_hat x - y)|| / ||a y + c||
            den = float(mom.norm2(a.reshape(w2.shape), None if shift is None
                                  else shift.double().reshape(w2.shape)))
            before = (max(float(_objective(chain, mom, w2)), 0.0) / max(den, 1e-300)) ** 0.5
            iters = _solve_quadratic(chain, mom, w2, budget)
            after = (max(float(_objective(chain, mom, w2)), 0.0) / max(den, 1e-300)) ** 0.5
        else:  # errors on the sampled rows (all of them when there are few)
            structure = (a, shift, lo, hi)
            before = _sample_error(chain, rows, structure)
            iters = _solve_quadratic(chain, mom, w2, budget)
            iters += _rounds(chain, rows, w2, structure,
                             ROUND_LBFGS if budget >= LBFGS_MAX else 0)
            after = _sample_error(chain, rows, structure)
        if not after < before:  # never make a layer worse than its data-free init
            chain.params, after = start, before
        chain.store()
    _FACTORS.clear()
    chain._last = None
    return before, after, iters


def _budget(chain: _Chain) -> int:
    """L-BFGS iterations of the joint refinement: ``LBFGS_MAX``, or fewer (whole blocks, at
    least one) where ``LBFGS_MAX`` evaluations would multiply more than ``LBFGS_WORK``:
    each costs a product of the ``co x d'`` kernel with the ``d' x d'`` Gram matrix per
    group, so it grows with the square of the layer's inputs and not with the images."""
    if not math.isfinite(LBFGS_WORK):
        return LBFGS_MAX
    per = chain.g * chain.co * (chain.d + int(chain.bias)) ** 2
    fit = int(LBFGS_WORK // max(per, 1)) // LBFGS_BLOCK * LBFGS_BLOCK
    return min(LBFGS_MAX, max(LBFGS_BLOCK, fit))


def _affine(chain: _Chain, structure: tuple, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail's per-channel scale and shift as ``g x 1 x co`` tensors of ``dtype``."""
    scale, shift = structure[:2]
    g, co = chain.g, chain.co
    c = shift if shift is not None else torch.zeros(g * co)
    return scale.to(dtype).reshape(g, 1, co), c.to(dtype).reshape(g, 1, co)


def _sample_error(chain: _Chain, rows: tuple[torch.Tensor, torch.Tensor],
                  structure: tuple) -> float:
    """``||clamp(a p + c) - clamp(a y + c)|| / ||clamp(a y + c)||`` on the sampled rows."""
    am, y = rows
    (a, c), (lo, hi) = _affine(chain, structure, am.dtype), structure[2:]
    t = (a * y + c).clamp(lo, hi)
    p = am @ chain.kernel().to(am.dtype).mT
    num = float(((a * p + c).clamp(lo, hi) - t).double().square().sum())
    return (num / max(float(t.double().square().sum()), 1e-300)) ** 0.5


def _rounds(chain: _Chain, rows: tuple[torch.Tensor, torch.Tensor], w2: torch.Tensor,
            structure: tuple, lbfgs: int = ROUND_LBFGS) -> int:
    """Zhang et al.'s alternation for a clamp in the tail, on the sampled ``rows``, with
    ``lbfgs`` joint iterations per round (0: the last layer alone, in closed form); the
    chain is left at the best weights seen. Returns rounds plus L-BFGS iterations."""
    am, y = rows
    (a, c), (lo, hi) = _affine(chain, structure, am.dtype), structure[2:]
    safe = a.abs() > 1e-12
    inv_a = torch.where(safe, 1.0 / torch.where(safe, a, torch.ones_like(a)),
                        torch.zeros_like(a))
    t = (a * y + c).clamp(lo, hi)
    gram = sym_gram(am.mT).double()
    lam, prev, work = LAM_START, None, 0
    best = (math.inf, [p.clone() for p in chain.params])
    for rounds in range(1, MAX_ROUNDS + 1):
        p = am @ chain.kernel().to(am.dtype).mT                       # g x n x co
        u0 = a * p + c
        loss = float((u0.clamp(lo, hi) - t).double().square().sum())
        if loss < best[0]:
            best = (loss, [q.clone() for q in chain.params])
        if prev is not None and prev - loss <= TOL * prev:
            break
        prev = loss
        target = torch.where(safe, (_zstep(t, u0, lam, lo, hi) - c) * inv_a, p)
        mom = _Moments.of(am, target, gram)
        work += 1 + _solve_quadratic(chain, mom, w2, lbfgs)
        lam = min(lam * LAM_GROWTH, LAM_MAX)
    chain.params = best[1]
    return work


def _zstep(t: torch.Tensor, u0: torch.Tensor, lam: float, lo: float, hi: float
           ) -> torch.Tensor:
    """Elementwise ``argmin_u (t - clamp(u, lo, hi))^2 + lam (u - u0)^2``: the best of the
    three pieces (below ``lo``, between, above ``hi``)."""
    mid = ((t + lam * u0) / (1.0 + lam)).clamp(lo, hi)
    best_u, best_c = mid, (t - mid).square() + lam * (mid - u0).square()
    for bound, pick in ((lo, torch.minimum), (hi, torch.maximum)):
        if not math.isfinite(bound):
            continue
        u = pick(u0, torch.full_like(u0, bound))
        cost = (t - bound) ** 2 + lam * (u - u0).square()
        take = cost < best_c
        best_u, best_c = torch.where(take, u, best_u), torch.where(take, cost, best_c)
    return best_u
