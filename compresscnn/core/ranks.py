"""Rank policies: fixed, fraction of parameters or MACs, energy, EVBMF, and a global budget.

Every policy works through the decomposer contract (``compresscnn.core.decomposers.base``):
``max_rank``/``scale_rank`` give a monotone family of candidate ranks, ``cost`` prices one
analytically and ``spectra`` gives the singular values each rank component truncates.

The global budget (``allocate``) is a greedy descent on a convex-hull-like trade-off:
starting from every budgeted layer dense, it repeatedly takes the single move (one layer to
its next cheaper candidate) with the smallest increase of estimated error per MAC (or
parameter) saved, until the model fits the target; then it spends what is left of the
budget on the moves that buy back the most error per MAC, so the result lands just under
the target. The error of a layer at a rank is its relative weight reconstruction error
estimated from the spectra (tail energy; for Tucker-2 the HOSVD bound over both modes),
so the allocation needs no data; with calibration data, ``compresscnn.core.surgery`` weights it
by each layer's measured output sensitivity (``allocation: sensitivity``), or replaces it by
each decomposed candidate's relative error on the layer's outputs for calibration inputs
(``allocation: output``, :func:`measured_candidates` with a ``probe``), or estimates it
from the spectrum of each SVD layer's outputs (``allocation: data_spectral``,
:func:`data_spectra`).

The error a layer contributes is ``weight * e**2`` (``penalty="squared"``, the default:
summed squared relative errors), or ``-weight * log(1 - e**2)`` (``penalty="log_energy"``:
maximise the *product* of the energies the layers keep, Zhang et al. 2015, eq. 14): the
second grows without bound as a layer loses all its energy, so no single layer is cut to
nothing to spare the others.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import torch
from torch import nn

from compresscnn.core.decomposers.base import Decomposer, Rank, check_weights, get_decomposer, layer_cost
from compresscnn.errors import MethodError, RankError
from compresscnn.util.modules import parallel_map

# ---------------------------------------------------------------------------- rounding



def layer_label(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        return (f"Conv2d({layer.in_channels}->{layer.out_channels}, "
                f"k={tuple(layer.kernel_size)}, groups={layer.groups})")
    if isinstance(layer, nn.Linear):
        return f"Linear({layer.in_features}->{layer.out_features})"
    return type(layer).__name__


def resolve_rank(dec: Decomposer, layer: nn.Module, rank: Any,
                 in_hw: tuple[int, int] | None = None, **options: Any) -> Rank:
    """Turn a user's rank (int, tuple/list, "full", float in (0, 1]) into a rank tuple.

    A float is the fraction of the layer's parameters to keep: the largest rank of the
    method's ``scale_rank`` family whose parameter count does not exceed it (at least the
    smallest rank of the family).
    """
    reason = dec.supports(layer)
    if reason is not None:
        raise MethodError(reason)
    full = dec.max_rank(layer, **options)
    label = layer_label(layer)
    if isinstance(rank, str):
        if rank == "full":
            return full
        raise RankError(f"rank {rank!r} for {label}: expected an int, a list of ints, "
                        f"a float in (0, 1] or 'full'")
    if isinstance(rank, bool):
        raise RankError(f"rank {rank!r} for {label}: expected a number, not a boolean")
    if isinstance(rank, int):
        rank = (rank,) * len(full)
    if isinstance(rank, (tuple, list)):
        if len(rank) != len(full) or not all(isinstance(r, int) and not isinstance(r, bool)
                                             for r in rank):
            raise RankError(f"rank {list(rank)!r} for {label}: {dec.name} takes "
                            f"{len(full)} int(s) ({', '.join(dec.rank_names)})")
        for r, m, n in zip(rank, full, dec.rank_names):
            if r < 1:
                raise RankError(f"rank {list(rank)!r} for {label}: {n}={r} must be >= 1")
            if r > m:
                raise RankError(f"rank {list(rank)!r} for {label}: {n}={r} exceeds the "
                                f"full rank {m} of this layer")
        return tuple(int(r) for r in rank)
    if isinstance(rank, float):
        if not (0.0 < rank <= 1.0) or math.isnan(rank):
            raise RankError(f"rank {rank!r} for {label}: a fraction must be in (0, 1]")
        return rank_for_fraction(dec, layer, rank, in_hw, key="params", **options)
    raise RankError(f"rank {rank!r} for {label}: expected an int, a list of ints, "
                    f"a float in (0, 1] or 'full'")


def rank_for_fraction(dec: Decomposer, layer: nn.Module, fraction: float,
                      in_hw: tuple[int, int] | None, key: str = "params",
                      **options: Any) -> Rank:
    """Largest rank in ``dec.scale_rank``'s family keeping at most ``fraction`` of
    the layer's params (``key="params"``) or MACs (``key="macs"``)."""
    idx = 0 if key == "params" else 1
    if key == "macs" and in_hw is None and isinstance(layer, nn.Conv2d):
        raise RankError("a MAC fraction needs the layer's input size")
    budget = fraction * layer_cost(layer, in_hw if isinstance(layer, nn.Conv2d) else None)[idx]

    def spend(t: float) -> int:
        return dec.cost(layer, dec.scale_rank(layer, t, **options), in_hw, **options)[idx]

    lo, hi = 0.0, 1.0
    if spend(hi) <= budget:
        return dec.scale_rank(layer, hi, **options)
    for _ in range(40):  # bisection on the monotone family
        mid = (lo + hi) / 2
        if spend(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return dec.scale_rank(layer, max(lo, 1e-9), **options)


def decompose(layer: nn.Module, method: str, rank: Any = "full", **options: Any) -> nn.Module:
    """Decompose one layer: ``decompose(conv, "tucker2", 0.5)``.

    Returns plain ``nn.Conv2d``/``nn.Linear`` modules (in an ``nn.Sequential``, or a small
    module of them for Fire), on the layer's device and dtype. For a float rank on a Conv2d
    the fraction refers to parameters, which does not depend on input size.
    """
    dec = get_decomposer(method)
    check_weights(layer, type(layer).__name__)
    r = resolve_rank(dec, layer, rank, in_hw=(32, 32) if isinstance(layer, nn.Conv2d) else None,
                     **options)
    return dec.decompose(layer, r, **options)


def round_rank(rank: Rank, full: Rank, multiple: int) -> Rank:
    """Round each component to the nearest multiple of ``multiple`` where that costs little.

    A component is rounded only when the layer is wide enough that one step of ``multiple``
    is at most a quarter of its full rank (rounding 13 to 16 of 64 is cheap; 5 to 8 of 16 is
    not). Never below ``multiple`` or above the full rank.
    """
    if multiple <= 1:
        return rank
    out = []
    for r, m in zip(rank, full):
        if m >= 4 * multiple and r < m:
            r = max(multiple, int(round(r / multiple)) * multiple)
            r = min(r, m)
        out.append(r)
    return tuple(out)


# ---------------------------------------------------------------------------- energy / EVBMF


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r squared singular values hold ``energy`` of the total."""
    e = (s.double() ** 2)
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return 0.5 * (x - (1 + alpha) + torch.sqrt(torch.clamp((x - (1 + alpha)) ** 2 - 4 * alpha,
                                                           min=0)))


def evbmf_rank(s: torch.Tensor, L: int, M: int) -> int:
    """Rank chosen by empirical variational Bayesian matrix factorization.

    Nakajima, Sugiyama, Babacan & Tomioka (2013), "Global analytic solution of fully-observed
    variational Bayesian matrix factorization", JMLR 14: Theorem 2 / eq. (15) for the
    threshold, with the noise variance sigma^2 estimated by minimising the free energy
    (their eq. (32)) on its bounded interval. Kim et al. (2016) apply it to the mode-0 and
    mode-1 unfoldings of a conv kernel to pick Tucker-2 ranks. ``s`` holds all
    ``min(L, M)`` singular values of an L x M matrix (L <= M is enforced by swapping).
    May return 0 (nothing above the noise); callers decide the fallback.
    """
    s = s.double().flatten()
    if L > M:
        L, M = M, L
    H = s.numel()
    if H == 0 or float(s.max()) <= 0:
        return 0
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    residual = 0.0  # we always have the full spectrum
    eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    s2 = s ** 2
    upper = float((s2.sum() + residual) / (L * M))
    lower = max(float(s2[eH_ub + 1] / (M * xubar)) if eH_ub + 1 < H else 0.0,
                float(s2[eH_ub + 1:].mean() / M) if eH_ub + 1 < H else 0.0)
    lower = max(lower, upper * 1e-12)

    def free_energy(sigma2: float) -> float:
        x = s2 / (M * sigma2)
        z1 = x[x > xubar]
        z2 = x[x <= xubar]
        tz1 = _tau(z1, alpha)
        obj = float((z2 - torch.log(z2)).sum()) + float((z1 - tz1).sum())
        obj += float(torch.log((tz1 + 1) / z1).sum()) + alpha * float(torch.log(tz1 / alpha + 1).sum())
        obj += residual / (M * sigma2) + (L - H) * math.log(sigma2)
        return obj

    # golden-section search on log(sigma2) over [lower, upper]
    a, b = math.log(lower), math.log(max(upper, lower * (1 + 1e-9)))
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = free_energy(math.exp(c)), free_energy(math.exp(d))
    for _ in range(100):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = free_energy(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = free_energy(math.exp(d))
    sigma2 = math.exp((a + b) / 2)
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int((s > threshold).sum())


# ---------------------------------------------------------------------------- error estimate


def tail_error(spectra: Sequence[torch.Tensor], rank: Rank) -> float:
    """Relative weight error estimated from the spectra a rank truncates.

    sqrt(sum over components of the discarded fraction of squared singular values): exact
    for a truncated SVD (one component), the standard HOSVD upper bound for Tucker-2 (two
    components), and a proxy for CP and Fire.
    """
    total = 0.0
    for s, r in zip(spectra, rank):
        e = s.double() ** 2
        tot = float(e.sum())
        if tot > 0:
            total += float(e[r:].sum()) / tot
    # not clipped at 1: the bound can exceed 1 at tiny ranks, and a plateau there would hide
    # from the budget that a slightly larger rank still helps
    return math.sqrt(total)


# ---------------------------------------------------------------------------- per-layer policy


def _mode_shapes(layer: nn.Module, spectra: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(L, M) of the matrix each component's spectrum came from: L = its length, M the rest."""
    numel = layer.weight.numel()
    return [(max(1, s.numel()), max(1, numel // max(1, s.numel()))) for s in spectra]


#: the rank multiple of a rule that gives none and is not timed on a runtime
DEFAULT_ROUND_TO = 8


def rule_round_to(rule: dict[str, Any], runtime_round_to: int | None = None) -> int:
    """The rank multiple of ``rule``: its ``round_to``, else (null or absent) the one the
    latency runtime its layers are timed on rewards (``runtime_round_to``), else
    :data:`DEFAULT_ROUND_TO`."""
    given = rule.get("round_to")
    if given is not None:
        return int(given)
    return int(runtime_round_to or DEFAULT_ROUND_TO)


def select_rank(dec: Decomposer, layer: nn.Module, rule: dict[str, Any],
                in_hw: tuple[int, int] | None, options: dict[str, Any]) -> tuple[Rank, str]:
    """The rank a rule asks for on one layer, and a short description of how it was chosen.

    ``rule`` holds at most one of ``rank``, ``energy``, ``macs``, ``params`` (validated by
    the recipe schema); ``round_to`` rounds ranks chosen by a policy (never an explicit int).
    """
    full = dec.max_rank(layer, **options)
    multiple = rule_round_to(rule)
    rank = rule.get("rank")
    if rule.get("energy") is not None:
        e = float(rule["energy"])
        spectra = dec.spectra(layer, **options)
        r = tuple(max(1, min(m, energy_rank(s, e))) for s, m in zip(spectra, full))
        return round_rank(r, full, multiple), f"energy {e:g}"
    if rule.get("macs") is not None:
        f = float(rule["macs"])
        r = rank_for_fraction(dec, layer, f, in_hw, key="macs", **options)
        return round_rank(r, full, multiple), f"macs {f:g}"
    if rule.get("params") is not None:
        rank = float(rule["params"])
    if rank == "evbmf":
        spectra = dec.spectra(layer, **options)
        shapes = _mode_shapes(layer, spectra)
        r, notes = [], []
        for s, (L, M), m in zip(spectra, shapes, full):
            k = evbmf_rank(s, L, M)
            if k == 0:  # everything under the estimated noise: fall back to 50% energy
                k = energy_rank(s, 0.5)
                notes.append("0->energy 0.5")
            r.append(max(1, min(m, k)))
        how = "evbmf" + (f" ({', '.join(notes)})" if notes else "")
        return round_rank(tuple(r), full, multiple), how
    if isinstance(rank, float):
        r = resolve_rank(dec, layer, rank, in_hw, **options)
        return round_rank(r, full, multiple), f"params {rank:g}"
    if rank is None:
        raise RankError("no rank policy given and no global target")
    return resolve_rank(dec, layer, rank, in_hw, **options), "fixed" if rank != "full" else "full"


# ---------------------------------------------------------------------------- global budget


class Skip(Enum):
    """Why a layer a rule matched is left dense (a plan row's ``skip``; its ``skipped``
    says it in words)."""

    REFUSED = "refused"          # the method cannot take the layer (its geometry, groups)
    BUDGET = "budget"            # the global budget kept the layer dense
    NOT_FASTER = "not faster"    # measured: no decomposition is faster than the dense layer
    PUT_BACK = "put back"        # the whole compressed model was slower: layer restored
    NO_SMALLER = "no smaller"    # at its stable rank the factorized layer is no smaller



@dataclass
class Candidate:
    rank: Rank | None          # None = keep the layer dense
    params: int
    macs: int
    error: float
    latency: float | None = None   # measured ms (latency-aware planning only)
    method: str | None = None      # set by mixed-method planning (``auto``): the method


@dataclass
class BudgetItem:
    """One layer the budget may compress: its candidates from dense (index 0) to cheapest."""

    name: str
    candidates: list[Candidate]
    weight: float = 1.0        # sensitivity weight of the layer's error
    choice: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def candidates_for(dec: Decomposer, layer: nn.Module, in_hw: tuple[int, int] | None,
                   options: dict[str, Any], round_to: int = 1, steps: int = 48,
                   tokens: int = 1, spectra: list[torch.Tensor] | None = None
                   ) -> list[Candidate]:
    """Dense first, then decomposed candidates in decreasing rank.

    ``tokens`` multiplies MACs: a Linear layer applied at every position of an (N, H, W, C)
    tensor (ConvNeXt's MLPs) runs ``H * W`` times per sample. ``spectra`` replaces the
    method's weight spectra (:func:`data_spectra`).
    """
    dense_p, dense_m = layer_cost(layer, in_hw)
    dense_m *= tokens
    full = dec.max_rank(layer, **options)
    spectra = dec.spectra(layer, **options) if spectra is None else spectra
    seen: set[Rank] = set()
    cands = [Candidate(None, dense_p, dense_m, 0.0)]
    for i in range(steps, 0, -1):
        r = round_rank(dec.scale_rank(layer, i / steps, **options), full, round_to)
        if r in seen:
            continue
        seen.add(r)
        p, m = dec.cost(layer, r, in_hw, **options)
        cands.append(Candidate(r, p, m * tokens, tail_error(spectra, r)))
    return cands


#: input samples per input dimension below which a layer's second moment is too poorly
#: known to rank it by (a 1280-input classifier seen on 128 images would look exactly
#: rank 128): :func:`data_spectra` then keeps the weight spectrum
DATA_SAMPLES_PER_DIM = 4


def data_spectra(dec: Decomposer, layer: nn.Module, gram: torch.Tensor | None,
                 samples: int = 0) -> list[torch.Tensor] | None:
    """The spectrum of an ``svd`` layer's outputs: the singular values of ``W C^(1/2)``,
    ``C`` the second moment of the layer's inputs (``gram``, in x in, from ``samples``
    input vectors). Its tail energy is the relative error of the best rank-r map on those
    inputs, ``min ||(W - W_r) x|| / ||W x||`` (Zhang et al. 2015's generalised SVD), which
    the closed-form calibration fit of an SVD pair reaches; the weight spectrum ignores which
    input directions the data excites. None for other methods and layers, and where there
    are fewer than :data:`DATA_SAMPLES_PER_DIM` samples per input dimension (the caller
    keeps the weight spectra)."""
    if dec.name != "svd" or gram is None or dec.supports(layer) is not None:
        return None
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if gram.shape != (w.shape[1], w.shape[1]) or samples < DATA_SAMPLES_PER_DIM * w.shape[1]:
        return None
    evals, vecs = torch.linalg.eigh(gram.double())
    s = torch.linalg.svdvals(w @ (vecs * evals.clamp_min(0).sqrt()))
    return [s.to(layer.weight.dtype)]


def output_error(new: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``||new(x) - y|| / ||y||`` with ``y`` the layer's own outputs on ``x``: the relative
    error of a replacement on the inputs the layer really receives (directions of the
    weights that the data never excites cost nothing here, unlike in the weight error)."""
    with torch.no_grad():
        return float((new(x).float() - y).norm() / y.norm().clamp_min(1e-30))


def measured_candidates(dec: Decomposer, layer: nn.Module, in_hw: tuple[int, int] | None,
                        options: dict[str, Any], round_to: int = 1, steps: int = 12,
                        tokens: int = 1, probe: torch.Tensor | None = None
                        ) -> list[Candidate]:
    """One method's candidates for mixed-method planning (``method: auto``): the ranks
    keeping ``k / steps`` of the dense layer's MACs for k = steps-1 .. 1 (rounded to
    ``round_to``; none that costs the dense layer's parameters and MACs or more), each
    *decomposed* with ``options`` and its measured relative error kept, tagged with the
    method. No dense candidate (the caller adds one for all methods). With ``probe`` (inputs
    of the layer, e.g. from calibration images) the error kept is :func:`output_error` on
    them instead of the weight error. Without, the weight errors come from
    :meth:`~compresscnn.core.decomposers.base.Decomposer.errors` where the method tells them
    without decomposing (exactly from the spectra for SVD, spatial and Tucker-2; from a few
    ALS sweeps for CP on large layers), so only the candidate a plan keeps is decomposed in
    full, by :func:`compresscnn.core.surgery.apply`."""
    dense_p, dense_m = layer_cost(layer, in_hw)
    full = dec.max_rank(layer, **options)
    if probe is not None:
        with torch.no_grad():
            dense_out = layer(probe).float()
    seen: dict[Rank, tuple[int, int]] = {}
    for k in range(steps - 1, 0, -1):
        r = round_rank(rank_for_fraction(dec, layer, k / steps, in_hw, key="macs", **options),
                       full, round_to)
        p, m = dec.cost(layer, r, in_hw, **options)
        if r in seen or (p >= dense_p and m >= dense_m):
            continue
        seen[r] = (p, m)
    ranks = list(seen)
    # weight errors without building the candidates where the method can tell them
    errors = dec.errors(layer, ranks, **options) if probe is None and ranks else None
    if errors is None:
        def measure(r: Rank) -> float:
            new = dec.decompose(layer, r, **options)
            return (float(new.fit_info["rel_error"]) if probe is None
                    else output_error(new.eval(), probe, dense_out))
        # independent decompositions, each seeded: side by side where each is one-threaded
        big = max(ranks, key=lambda r: seen[r][1], default=None)   # the most MACs
        errors = parallel_map(measure, ranks, workers=None if big is not None and
                              dec.one_thread(layer, big, **options) else 1,
                              cost=lambda r: seen[r][1])
    return [Candidate(r, seen[r][0], seen[r][1] * tokens, float(e), method=dec.name)
            for r, e in zip(ranks, errors)]


PENALTIES = ("squared", "log_energy")


def allocate(items: list[BudgetItem], key: str, budget: int, penalty: str = "squared") -> None:
    """Choose ``item.choice`` for every item so that the sum of ``key`` is <= ``budget``.

    Greedy in two passes (see the module docstring). Raises RankError when even the
    cheapest candidates do not fit.
    """
    def cost(it: BudgetItem, j: int) -> int:
        return getattr(it.candidates[j], key)

    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")

    def err(it: BudgetItem, j: int) -> float:
        e2 = it.candidates[j].error ** 2  # may exceed 1: Tucker-2's bound sums two modes
        if penalty == "log_energy":
            return -it.weight * math.log(max(1.0 - min(e2, 1.0), 1e-9))
        return it.weight * e2

    def cheapest_after(it: BudgetItem, j: int) -> int | None:
        """Next candidate after j that is cheaper than j (candidates may not be sorted)."""
        best = None
        for k in range(j + 1, len(it.candidates)):
            if cost(it, k) < cost(it, j):
                if best is None or (err(it, k) - err(it, j)) / (cost(it, j) - cost(it, k)) < \
                        (err(it, best) - err(it, j)) / (cost(it, j) - cost(it, best)):
                    best = k
        return best

    total = sum(cost(it, it.choice) for it in items)
    minimum = sum(min(cost(it, j) for j in range(len(it.candidates))) for it in items)
    if minimum > budget:
        unit = (lambda v: f"{v:.3g} ms") if key == "latency" else (lambda v: f"{v:,} {key}")
        raise RankError(f"the {key} target cannot be reached by the rules' layers: their "
                        f"cheapest ranks still need {unit(minimum)} against a budget of "
                        f"{unit(budget)}")
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        it = items[i]
        k = cheapest_after(it, it.choice)
        if k is not None:
            saved = cost(it, it.choice) - cost(it, k)
            heapq.heappush(heap, ((err(it, k) - err(it, it.choice)) / saved, i, k))

    for i in range(len(items)):
        push(i)
    while total > budget and heap:
        _, i, k = heapq.heappop(heap)
        it = items[i]
        if k <= it.choice:
            continue
        total += cost(it, k) - cost(it, it.choice)
        it.choice = k
        push(i)
    # second pass: buy back error with what is left of the budget
    improved = True
    while improved:
        improved = False
        best: tuple[float, int, int] | None = None
        for i, it in enumerate(items):
            for k in range(len(it.candidates)):
                extra = cost(it, k) - cost(it, it.choice)
                gain = err(it, it.choice) - err(it, k)
                if extra > 0 and gain > 0 and total + extra <= budget:
                    score = gain / extra
                    if best is None or score > best[0]:
                        best = (score, i, k)
        if best is not None:
            _, i, k = best
            total += cost(items[i], k) - cost(items[i], items[i].choice)
            items[i].choice = k
            improved = True
