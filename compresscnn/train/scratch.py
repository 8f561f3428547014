"""Low-rank training: factorize before training, constrain and regularise the factors, or
train dense first and switch to low rank when the layers' stable ranks settle.

The layers are the ones the decomposers build for compression (``skeleton`` /
``decompose``), chosen by the same rules and rank policies as :func:`compresscnn.core.surgery.plan`
(``rank: 0.5``, ``params:``, ``macs:``, a global ``target``), so a model factorized from the
start has exactly the architecture of a pretrained model compressed at that plan.

* :func:`factorize` builds the factorized model with a fresh initialisation: per-factor
  Kaiming, or *spectral* (Khodak, Tenenholtz, Mackey & Fusi, ICLR 2021, "Initialization and
  regularization of factorized neural layers", sec. 3: factorize a dense Kaiming init).
  Dense first layers (Pufferfish: Wang, Agarwal & Papailiopoulos, MLSys 2021, "Pufferfish:
  Communication-efficient models at no extra cost", sec. 3) are a rule's ``exclude``.
* :class:`SemiOrthogonal` keeps one factor of each layer (scaled) semi-orthogonal with the
  periodic update of Povey et al. (Interspeech 2018, "Semi-orthogonal low-rank matrix
  factorization for deep neural networks", sec. 2.2-2.3; Kaldi's TDNN-F).
* :class:`FrobeniusDecay` is Khodak et al.'s Frobenius decay (sec. 4): a penalty on the
  squared Frobenius norm of the *product* of the factors, instead of weight decay on each.
* :class:`StableRankMonitor` is Cuttlefish (Wang, Sreenivasan, Rajput, Vishwakarma, Agarwal,
  Sohn & Papailiopoulos, MLSys 2023, "Cuttlefish: Low-rank model training without all the
  tuning", sec. 3): train dense, track each layer's stable rank per epoch, and once they all
  stop moving, factorize the trained weights at ranks scaled from their stable ranks.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.errors import CheckpointError, MethodError, RecipeError
from compresscnn.core.rules import POLICY_KEYS
from compresscnn.train.config import INITS
from compresscnn.util.modules import get_module, set_module
from compresscnn.core.surgery import Plan, Skip, apply, measured, plan
from compresscnn.util.common import atomic_write_text, unwrap_model

#: what ``factorize(init=...)`` accepts

Factor = nn.Conv2d | nn.Linear


# ---------------------------------------------------------------------------- chains


def _chain(module: nn.Module, name: str) -> list[Factor]:
    """The factors of a factorized layer: an ``nn.Sequential`` of at least two plain
    ``nn.Conv2d`` (or two ``nn.Linear``) modules, as the chain decomposers build it."""
    kids = list(module.children()) if isinstance(module, nn.Sequential) else []
    if len(kids) >= 2 and (all(type(k) is nn.Conv2d for k in kids)
                           or all(type(k) is nn.Linear for k in kids)):
        return kids
    raise MethodError(f"{name}: a {type(module).__name__} is not a factorized layer (an "
                      f"nn.Sequential of plain Conv2d or Linear factors, what tucker2, cp, "
                      f"spatial and svd build)")


def factorized_layers(model: nn.Module) -> list[str]:
    """Names of the factorized layers of ``model``: every ``nn.Sequential`` of two or more
    plain Conv2d (or Linear) modules and nothing else."""
    out = []
    for name, mod in unwrap_model(model).named_modules():
        if name and isinstance(mod, nn.Sequential):
            try:
                _chain(mod, name)
            except MethodError:
                continue
            out.append(name)
    return out


def _chains(model: nn.Module, names: Sequence[str] | None) -> dict[str, list[Factor]]:
    model = unwrap_model(model)
    names = factorized_layers(model) if names is None else list(names)
    out = {}
    for name in names:
        try:
            mod = get_module(model, name)
        except AttributeError:
            raise MethodError(f"{name}: no such module in the model") from None
        out[name] = _chain(mod, name)
    return out


# ---------------------------------------------------------------------------- factorize


def _kaiming_(layer: Factor, gen: torch.Generator, nonlinearity: str) -> None:
    """Kaiming-normal (fan_in) weight with the gain of ``nonlinearity``; zero bias. Drawn on
    the CPU in float32 from ``gen`` (the same numbers on every device), then copied."""
    w = torch.empty(layer.weight.shape)
    nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity=nonlinearity, generator=gen)
    with torch.no_grad():
        layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.zero_()


def _kaiming_chain(module: nn.Module, name: str, gen: torch.Generator) -> nn.Module:
    """Every factor Kaiming-normal (fan_in, ReLU gain), then all of them scaled by one common
    factor so that the dense kernel they multiply to has ``||W_eff||_F^2 = 2 C_out``, the
    expected squared norm of one dense Kaiming layer (``C_out`` rows of ``fan_in`` entries
    of variance ``2 / fan_in``): on white input the chain's output mean square is then
    exactly a dense Kaiming layer's, ``2 E[x^2]`` (He et al. 2015, eq. 10).

    Without the correction a chain of N factors multiplies the mean square by ``2^N``
    instead of 2 (each factor is a linear map with the ReLU gain and no ReLU after it):
    2x too much for svd/spatial, 4x for tucker2, 8x for cp, compounding over the layers
    (measured: ``tools/lowrank_init_scale.py``); and at small ranks the product's norm
    varies widely from draw to draw, which the common scale also removes. On inputs that
    are not white (post-ReLU activations, with a large mean) the chain's gain still
    fluctuates more than a dense layer's: it sees only ``r`` directions.
    """
    factors = _chain(module, name)
    for f in factors:
        _kaiming_(f, gen, "relu")
    with torch.no_grad():
        sq = float(_sq_frobenius(factors))
        scale = (2.0 * _matrix(factors[-1]).shape[0] / sq) ** (0.5 / len(factors))
        for f in factors:
            f.weight.mul_(scale)
    return module


@torch.no_grad()
def factorize(model: nn.Module, rules: Sequence[dict[str, Any]], input_size: Sequence[int],
              *, target: dict[str, float] | None = None, init: str = "kaiming",
              seed: int = 0) -> tuple[nn.Module, Plan]:
    """Factorize ``model``'s layers *before* training: ``(new_model, plan)``.

    Ranks come from :func:`compresscnn.core.surgery.plan` with the same ``rules`` (and global
    ``target``) as compression; every planned layer is replaced by exactly the module
    structure its decomposer builds (plain Conv2d/Linear chains: tucker2, cp, spatial, svd;
    fire is refused). Works on a deep copy: ``model`` is left untouched; the layers no rule
    takes keep their weights. Dense first layers (Pufferfish) are a rule's ``exclude``.

    ``init``:

    * ``"kaiming"``: every factor Kaiming-normal (fan_in, ReLU gain), then all scaled by a
      common factor so the product has the squared Frobenius norm a dense Kaiming layer has
      in expectation, and so the chain's output variance at init matches one dense Kaiming
      layer's (see :func:`_kaiming_chain`); biases zero.
    * ``"spectral"`` (Khodak et al. 2021, sec. 3): a dense Kaiming-normal (fan_in, ReLU
      gain, zero bias) weight factorized by the method's own ``decompose`` at the planned
      rank: for tucker2/spatial/svd the product is its best approximation at that rank
      (truncated SVD / HOSVD), for cp the ALS fit. Each plan row's ``fit`` records it.

    With a global ``target`` the allocation follows the spectra of ``model``'s current
    weights (for a randomly initialised model these reflect only the layer shapes). The
    random numbers come from one generator seeded by ``seed``, in plan order.
    """
    if init not in INITS:
        raise RecipeError(f"init: {init!r} is not one of {', '.join(INITS)}")
    p = plan(model, rules, input_size, target=target)
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for rep in p.replacements:
        if not rep.applied:
            rows.append(rep)
            continue
        layer = get_module(new, rep.name)
        dec = get_decomposer(rep.method)
        if init == "kaiming":
            mod = _kaiming_chain(dec.skeleton(layer, tuple(rep.rank), **rep.options),
                                 rep.name, gen)
            rep = replace(rep, rel_error=None, fit={"init": init})
        else:
            dense = copy.deepcopy(layer)
            _kaiming_(dense, gen, "relu")
            mod = dec.decompose(dense, tuple(rep.rank), **rep.options)
            _chain(mod, rep.name)
            fit = dict(getattr(mod, "fit_info", {}) or {})
            rep = replace(rep, rel_error=fit.get("rel_error"), fit={"init": init, **fit})
        mod.train(layer.training)
        for name in (rep.name, *rep.aliases):  # a shared layer stays shared
            set_module(new, name, mod)
        rows.append(rep)
    return new, replace(p, replacements=tuple(rows))


# ---------------------------------------------------------------------------- semi-orthogonal


def _matrix(f: Factor) -> torch.Tensor:
    """The factor's weight as ``(out, in/groups * k_h * k_w)`` (a view)."""
    return f.weight.reshape(f.weight.shape[0], -1)


def _constraint_refusal(f: Factor) -> str | None:
    if isinstance(f, nn.Conv2d) and f.groups != 1:
        return f"its first factor is a grouped conv (groups={f.groups})"
    rows, cols = _matrix(f).shape
    if rows > cols:
        return (f"its first factor is {rows}x{cols} (more rows than columns): its rows "
                f"cannot be orthonormal")
    return None


def _scale_sq(p: torch.Tensor) -> torch.Tensor:
    """alpha^2 = tr(P P^T) / tr(P): the scale that makes the update orthogonal to M."""
    return (p * p).sum() / torch.diagonal(p).sum()


def semi_orthogonal_update(m: torch.Tensor) -> torch.Tensor:
    """One floating-scale semi-orthogonal step on ``m`` (rows <= cols), as Kaldi's
    ``ConstrainOrthonormalInternal`` (Povey et al. 2018, sec. 2.2-2.3):
    ``P = M M^T``, ``alpha^2 = tr(P P^T)/tr(P)``, ``Q = P - alpha^2 I``,
    ``M <- M - 4 nu / alpha^2 * Q M`` with ``nu = 1/8`` (i.e. ``M - Q M / (2 alpha^2)``,
    quadratic convergence near the constraint), halved while
    ``tr(P P^T) rows / tr(P)^2 > 1.02`` (eigenvalues still spread: Kaldi's guard against
    divergence far from it). Computed in at least float32; returns the new matrix."""
    w = m.to(torch.promote_types(m.dtype, torch.float32))
    p = w @ w.mT
    tr = torch.diagonal(p).sum()
    if float(tr) == 0.0:
        return m
    a2 = _scale_sq(p)
    nu = 0.125 * (0.5 if float((p * p).sum() * p.shape[0] / tr**2) > 1.02 else 1.0)
    q = p - a2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return (w - (4.0 * nu / a2) * (q @ w)).to(m.dtype)


def semi_orthogonal_deviation(m: torch.Tensor) -> float:
    """``||M M^T / alpha^2 - I||_F / sqrt(rows)``: 0 for a scaled semi-orthogonal ``m``."""
    w = m.detach().to(torch.promote_types(m.dtype, torch.float32))
    p = w @ w.mT
    if float(torch.diagonal(p).sum()) == 0.0:
        return math.inf
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return float(torch.linalg.vector_norm(p / _scale_sq(p) - eye)) / math.sqrt(p.shape[0])


class SemiOrthogonal:
    """Povey et al. (2018)'s semi-orthogonal constraint on one factor of each factorized
    layer (Kaldi TDNN-F's linear bottleneck), applied every ``every`` optimizer steps.

    The constrained factor is the first of each chain (it reads the layer's input): its
    weight as ``(out, in/groups * k_h * k_w)`` must have rows <= cols, so the rows can be
    orthonormal up to a common scale: the first Linear for svd, the first 1x1 for tucker2
    and cp (cp only when ``R <= C_in``), the ``k_h x 1`` conv for spatial (``R <= C_in k_h``,
    always at groups 1). Layers where it is not are left out, with the reason in
    ``skipped``. The scale floats (sec. 2.3): the next layer or BatchNorm absorbs it.

    ``names``: the factorized layers (``plan.ranks()``'s keys); None: every layer
    :func:`factorized_layers` finds. The training loop calls :meth:`after_step` after each
    optimizer step (DDP replicas stay equal: the update is deterministic).
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None,
                 every: int = 4) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise RecipeError(f"semi-orthogonal every: expected an int >= 1, got {every!r}")
        self.every = every
        self.factors: dict[str, Factor] = {}
        self.skipped: dict[str, str] = {}
        for name, chain in _chains(model, names).items():
            reason = _constraint_refusal(chain[0])
            if reason is None:
                self.factors[name] = chain[0]
            else:
                self.skipped[name] = reason

    def after_step(self, step: int) -> bool:
        """Call after optimizer step ``step`` (1-based, global); updates the factors when
        ``step`` is a multiple of ``every``. Returns whether it did."""
        if step % self.every:
            return False
        self.apply()
        return True

    @torch.no_grad()
    def apply(self) -> None:
        """One update of every constrained factor, now."""
        for f in self.factors.values():
            f.weight.copy_(semi_orthogonal_update(_matrix(f)).reshape(f.weight.shape))

    def max_deviation(self) -> float:
        """Max over the constrained factors of ``||M M^T / alpha^2 - I||_F / sqrt(rows)``
        (0.0 when none is constrained)."""
        return max((semi_orthogonal_deviation(_matrix(f)) for f in self.factors.values()),
                   default=0.0)


# ---------------------------------------------------------------------------- Frobenius decay


def _geometry(f: Factor) -> tuple[tuple[int, int], ...]:
    if isinstance(f, nn.Linear):
        return (1, 1), (1, 1), (1, 1)
    return tuple(f.kernel_size), tuple(f.stride), tuple(f.dilation)


def _check_composable(factors: Sequence[Factor], name: str) -> None:
    """The dense kernel is composed for chains where, along each spatial axis, at most one
    factor has a kernel extent, stride or dilation other than 1 (every chain tucker2, cp,
    spatial and svd build: the channel maps commute with it, so the chain is one conv with
    that factor's geometry and the channel product as kernel)."""
    for ax in (0, 1):
        busy = [i for i, f in enumerate(factors) if any(g[ax] != 1 for g in _geometry(f))]
        if len(busy) > 1:
            raise MethodError(f"{name}: factors {busy} both have a kernel extent, stride or "
                              f"dilation along spatial axis {ax}; their dense kernel is not "
                              f"composed here")


def _weight4d(f: Factor) -> torch.Tensor:
    w = f.weight
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    return w[:, :, None, None] if isinstance(f, nn.Linear) else w


def _dense4d(f: Factor) -> torch.Tensor:
    """The factor's kernel as a groups=1 ``(out, in, k_h, k_w)`` (block-diagonal when
    grouped)."""
    w = _weight4d(f)
    g = f.groups if isinstance(f, nn.Conv2d) else 1
    if g == 1:
        return w
    o, i, kh, kw = w.shape
    eye = torch.eye(g, dtype=w.dtype, device=w.device)
    blocks = torch.einsum("gpikl,gq->gpqikl", w.reshape(g, o // g, i, kh, kw), eye)
    return blocks.reshape(o, g * i, kh, kw)


def _then(acc: torch.Tensor, f: Factor) -> torch.Tensor:
    """The kernel of ``acc`` (``(m, c, h, w)``) followed by factor ``f`` (grouped or not;
    along each axis one of the two has extent 1)."""
    w = _weight4d(f)
    g = f.groups if isinstance(f, nn.Conv2d) else 1
    o, mg, a, b = w.shape
    m, c, h, wd = acc.shape
    out = torch.einsum("gpmab,gmchw->gpcahbw", w.reshape(g, o // g, mg, a, b),
                       acc.reshape(g, m // g, c, h, wd))
    return out.reshape(o, c, a * h, b * wd)


def _compose(factors: Sequence[Factor]) -> torch.Tensor:
    acc = _dense4d(factors[0])
    for f in factors[1:]:
        acc = _then(acc, f)
    return acc


def dense_kernel(chain: nn.Module) -> torch.Tensor:
    """The dense weight a factorized layer equals (differentiable in the factors): ``(out,
    in)`` for a Linear chain, ``(C_out, C_in, k_h, k_w)`` for a conv chain (a groups=1
    kernel, block-diagonal when the factors are grouped), to be applied with the stride,
    padding and dilation of the factor that has them along each axis."""
    factors = _chain(chain, type(chain).__name__)
    _check_composable(factors, "chain")
    k = _compose(factors)
    return k[:, :, 0, 0] if isinstance(factors[0], nn.Linear) else k


def _sq_frobenius(factors: Sequence[Factor]) -> torch.Tensor:
    """``||W_eff||_F^2`` without forming ``W_eff``: with ``W_eff = L * R`` split at the last
    factor ``L`` (``(o, r, ...)``) and the rest ``R`` (``(r, c, ...)``, spatial axes
    disjoint), ``||W_eff||^2 = <L^T L, R R^T>``, two ``r x r`` Gram matrices (the dense
    4096 x 4096 product of an svd-factorized classifier is never built)."""
    rest = _compose(factors[:-1])
    last = _dense4d(factors[-1])
    g_last = torch.einsum("orab,osab->rs", last, last)
    flat = rest.flatten(1)
    return (g_last * (flat @ flat.mT)).sum()


class FrobeniusDecay:
    """Frobenius decay (Khodak et al. 2021, sec. 4): ``penalty() = coeff * sum over layers
    of ||W_eff||_F^2``, ``W_eff`` the dense kernel the layer's factors multiply to
    (:func:`dense_kernel`), computed exactly (in float32, outside autocast) and
    differentiable. The training loop adds it to the loss and, as in the paper, takes the
    factors out of the optimizer's weight decay (:meth:`parameters` lists them).

    ``names``: the factorized layers (``plan.ranks()``'s keys); None: every layer
    :func:`factorized_layers` finds. ``coeff``: 1e-4 is Cuttlefish's default.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None,
                 coeff: float = 1e-4) -> None:
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or coeff < 0:
            raise RecipeError(f"frobenius decay coeff: expected a number >= 0, got {coeff!r}")
        self.coeff = float(coeff)
        self.chains = _chains(model, names)
        for name, factors in self.chains.items():
            _check_composable(factors, name)

    def parameters(self) -> list[nn.Parameter]:
        """The factors' weights (biases are not decayed)."""
        return [f.weight for fs in self.chains.values() for f in fs]

    def penalty(self) -> torch.Tensor:
        params = self.parameters()
        if not params:
            return torch.zeros(())
        with torch.autocast(params[0].device.type, enabled=False):
            total = sum(_sq_frobenius(fs) for fs in self.chains.values())
        return self.coeff * total


# ---------------------------------------------------------------------------- Cuttlefish


def stable_rank(weight: torch.Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2`` of the ``(out, in/groups * k_h * k_w)`` unfolding (a
    Linear weight as it is): between 1 and the rank, insensitive to tiny singular values
    (Cuttlefish, sec. 3.1). 0.0 for a zero matrix. In float64 on the CPU, from the largest
    eigenvalue of the smaller Gram matrix."""
    m = weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64)
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    top = float(torch.linalg.eigvalsh(g)[-1])
    return float(m.square().sum()) / top if top > 0 else 0.0


def _ema(x: Sequence[float], span: int) -> np.ndarray:
    """Exponential moving average with weight 2 / (span + 1) (Cuttlefish's smoothing)."""
    w = 2.0 / (span + 1)
    out = np.empty(len(x))
    out[0] = x[0]
    for i in range(1, len(x)):
        out[i] = w * x[i] + (1 - w) * out[i - 1]
    return out


def _selection_rules(rules: Sequence[Any]) -> list[Any]:
    """The rules with their rank policies replaced by ``rank: full`` (and no latency
    timing): they then only say which layers, which method and which options."""
    drop = set(POLICY_KEYS) | {"objective"}
    return [{**{k: v for k, v in r.items() if k not in drop}, "rank": "full"}
            if isinstance(r, dict) else r for r in rules]


def planned_layers(model: nn.Module, rules: Sequence[dict[str, Any]],
                   input_size: Sequence[int]) -> list[str]:
    """The layers ``rules`` factorize (whatever their rank policies), in model order: what
    a :class:`StableRankMonitor` for :meth:`StableRankMonitor.switch` should watch."""
    p = plan(model, _selection_rules(rules), input_size)
    return [r.name for r in p.replacements if r.applied]


class StableRankMonitor:
    """Cuttlefish's switch point and ranks (Wang et al. 2023, sec. 3; their code:
    ``hwang595/Cuttlefish``, ``utils.py``, ``rank_estimation`` /
    ``layer_rank_stable_detector``).

    Construct it on the dense model *at initialisation* (it records each layer's initial
    stable rank ``s_0``); call :meth:`update` at the end of every epoch of dense training.
    A layer has settled once its stable-rank trace stops moving: after more than ``window``
    measurements, the mean absolute derivative (``np.gradient``, per epoch) of the trace
    smoothed by an exponential moving average of span ``window`` (weight 2/(window+1)),
    over the last ``window`` epochs, is at most ``tol`` (an absolute rate, in rank units
    per epoch, as in the paper and code; their CIFAR runs use window 15, tol 0.1). As in
    their code the last layers to settle get a looser test (``tol * relax`` when two are
    left, ``2 * tol * relax`` when one is), and a settled layer stays settled. Unlike
    their code, the trace is the unrounded stable rank.

    :meth:`ranks`: the *scaled* stable rank ``ceil(s * r_full / s_0)`` (the ratio of full
    to stable rank at init undoes how far a random matrix's stable rank sits below its
    rank), within ``[max(1, ceil(min_fraction * r_full)), r_full]``; ``r_full =
    min(rows, cols)`` of the unfolding. Their ImageNet code also bounds it below by 1/5 of
    the full rank (``min_fraction=0.2``); their CIFAR code does not (the default, 0).

    ``names``: the layers to watch (:func:`planned_layers` gives those the rules would
    factorize); None: every Conv2d and Linear.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None, tol: float = 0.1,
                 window: int = 15, relax: float = 1.0, min_fraction: float = 0.0) -> None:
        self._check(tol, window, relax, min_fraction)
        self.tol, self.window, self.relax = float(tol), int(window), float(relax)
        self.min_fraction = float(min_fraction)
        net = unwrap_model(model)
        if names is None:
            names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.layers: dict[str, Factor] = {}
        for n in names:
            try:
                mod = get_module(net, n)
            except AttributeError:
                raise MethodError(f"{n}: no such module in the model") from None
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                raise MethodError(f"{n}: a {type(mod).__name__}, not a Conv2d or Linear")
            self.layers[n] = mod
        self.full = {n: min(_matrix(m).shape) for n, m in self.layers.items()}
        self.initial = {n: stable_rank(m.weight) for n, m in self.layers.items()}
        self.epochs: list[int] = []
        self.trace: dict[str, list[float]] = {n: [] for n in self.layers}
        self.settled: dict[str, int | None] = {n: None for n in self.layers}

    @staticmethod
    def _check(tol: Any, window: Any, relax: Any, min_fraction: Any) -> None:
        def num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not num(tol) or tol <= 0:
            raise RecipeError(f"stable rank tol: expected a number > 0, got {tol!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise RecipeError(f"stable rank window: expected an int >= 2, got {window!r}")
        if not num(relax) or relax < 1:
            raise RecipeError(f"stable rank relax: expected a number >= 1, got {relax!r}")
        if not num(min_fraction) or not 0 <= min_fraction <= 1:
            raise RecipeError(f"stable rank min_fraction: expected a number in [0, 1], "
                              f"got {min_fraction!r}")

    @property
    def done(self) -> bool:
        """Whether every watched layer has settled."""
        return bool(self.layers) and all(e is not None for e in self.settled.values())

    def _flat(self, trace: Sequence[float], tol: float) -> bool:
        if len(trace) <= self.window:
            return False
        slope = np.abs(np.gradient(_ema(trace, self.window)))
        return float(slope[-self.window:].mean()) <= tol

    def update(self, epoch: int) -> bool:
        """Measure the stable ranks after ``epoch``; True once every layer has settled."""
        left = sum(e is None for e in self.settled.values())
        tol = self.tol * {2: self.relax, 1: 2 * self.relax}.get(left, 1.0)
        self.epochs.append(int(epoch))
        for n, layer in self.layers.items():
            self.trace[n].append(stable_rank(layer.weight))
            if self.settled[n] is None and self._flat(self.trace[n], tol):
                self.settled[n] = int(epoch)
        return self.done

    def ranks(self) -> dict[str, int]:
        """Per layer, the scaled stable rank of the latest measurement (of the initial
        weights before any :meth:`update`)."""
        out = {}
        for n, full in self.full.items():
            s0 = self.initial[n]
            s = self.trace[n][-1] if self.trace[n] else s0
            r = math.ceil(s * full / s0 - 1e-9) if s0 > 0 else full
            lo = max(1, math.ceil(self.min_fraction * full - 1e-9))
            out[n] = int(min(full, max(lo, r)))
        return out

    def switch(self, model: nn.Module, rules: Sequence[dict[str, Any]],
               input_size: Sequence[int]) -> tuple[nn.Module, Plan]:
        """Factorize the trained dense ``model`` at :meth:`ranks`: ``(new_model, plan)``
        (``model`` is left untouched). ``rules`` choose the layers, methods and options;
        their rank policies are ignored. Every layer they take must be watched. A layer's
        rank ``r`` of ``r_full`` becomes the method's rank ``scale_rank(r / r_full)``: for
        svd and tucker2's output rank exactly ``r`` (the same unfolding), for the other
        components the same fraction of their own full rank. A layer whose factorized form
        would have no fewer parameters than the dense one stays dense (the plan row says
        why). The trained weights are decomposed by the method's ``decompose`` (SVD,
        HOSVD, ALS...)."""
        ranks = self.ranks()
        net = unwrap_model(model)
        chosen = plan(net, _selection_rules(rules), input_size)
        explicit = []
        for rep in chosen.replacements:
            if not rep.applied:
                continue
            if rep.name not in ranks:
                raise MethodError(f"{rep.name}: the rules factorize it but the stable rank "
                                  f"monitor does not watch it")
            t = min(1.0, ranks[rep.name] / self.full[rep.name]) * (1 - 1e-9)
            r = get_decomposer(rep.method).scale_rank(get_module(net, rep.name), t,
                                                      **rep.options)
            explicit.append({"match": rep.name, "method": rep.method, "rank": list(r),
                             **rep.options})
        p = plan(net, explicit, input_size)
        rows = []
        for rep in p.replacements:
            rep = replace(rep, policy=f"stable rank {ranks[rep.name]} of {self.full[rep.name]}")
            if rep.applied and rep.params_after >= rep.params_before:
                rep = replace(rep, skip=Skip.NO_SMALLER, skipped=(
                    f"no smaller than dense at stable rank {ranks[rep.name]} of "
                    f"{self.full[rep.name]}"))
            rows.append(rep)
        p = replace(p, replacements=tuple(rows))
        new = apply(copy.deepcopy(net), p)
        return new, measured(p, new)

    def rewind(self, epoch: int) -> None:
        """Forget the measurements of ``epoch`` and later (a resumed run redoes them)."""
        keep = sum(e < epoch for e in self.epochs)
        self.epochs = self.epochs[:keep]
        self.trace = {n: t[:keep] for n, t in self.trace.items()}
        self.settled = {n: (e if e is not None and e < epoch else None)
                        for n, e in self.settled.items()}

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to resume (plain lists and numbers)."""
        return {"epochs": list(self.epochs), "initial": dict(self.initial),
                "trace": {n: list(t) for n, t in self.trace.items()},
                "settled": dict(self.settled)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state.get("initial", {})) != sorted(self.layers):
            raise MethodError("stable rank monitor state: it watches other layers "
                              f"({sorted(state.get('initial', {}))[:4]}...)")
        self.epochs = [int(e) for e in state["epochs"]]
        self.initial = {n: float(v) for n, v in state["initial"].items()}
        self.trace = {n: [float(x) for x in t] for n, t in state["trace"].items()}
        self.settled = {n: (None if e is None else int(e)) for n, e in state["settled"].items()}


class SwitchPoint:
    """When a Cuttlefish run switches from dense to factorized training, as a training-loop
    callback (``on_epoch_end``), and the wall time of every epoch of both phases.

    In the dense phase each epoch end updates ``monitor`` and stops the run once every
    watched layer has settled, or at the end of epoch ``max_epochs`` at the latest
    (``epoch`` and ``reason``, ``"settled"`` or ``"max_epochs"``, then say which). After
    :meth:`start_factorized` it only times the epochs of the factorized phase. With ``path``
    the state (the monitor's, the switch, the epoch times) is written there as JSON after
    every epoch (when ``write``) and read back when the file exists, so a resumed run
    continues where the interrupted one was; an epoch redone after a resume replaces its
    measurements. An epoch's time runs from the previous epoch end (or the start of the
    phase) to its end, without the stable-rank measurements.
    """

    def __init__(self, monitor: StableRankMonitor, max_epochs: int,
                 path: str | Path | None = None, write: bool = True) -> None:
        self.monitor, self.max_epochs = monitor, int(max_epochs)
        self.path, self.write = (Path(path) if path is not None else None), write
        self.epoch: int | None = None
        self.reason: str | None = None
        self.phase = "dense"
        self.seconds: dict[str, dict[int, float]] = {"dense": {}, "factorized": {}}
        if self.path is not None and self.path.is_file():
            self._load()
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> bool:
        self.seconds[self.phase][int(epoch)] = time.perf_counter() - self._t
        stop = False
        if self.phase == "dense":
            self.monitor.rewind(epoch)
            settled = self.monitor.update(epoch)
            if settled or epoch >= self.max_epochs:
                self.epoch, self.reason = int(epoch), "settled" if settled else "max_epochs"
                stop = True
        self.save()
        self._t = time.perf_counter()
        return stop

    def start_factorized(self) -> None:
        """From now on, time the epochs of the factorized phase."""
        self.phase = "factorized"
        self._t = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "epoch": self.epoch,
                "reason": self.reason, "max_epochs": self.max_epochs,
                "seconds": {k: {str(e): s for e, s in v.items()}
                            for k, v in self.seconds.items()}}

    def save(self) -> None:
        if self.path is not None and self.write:
            atomic_write_text(self.path, json.dumps(self.state_dict(), indent=1) + "\n")

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            self.monitor.load_state_dict(state["monitor"])
            self.epoch, self.reason = state["epoch"], state["reason"]
            self.seconds = {k: {int(e): float(s) for e, s in state["seconds"][k].items()}
                            for k in ("dense", "factorized")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: not a readable stable-rank switch state "
                                  f"({type(e).__name__}: {e})") from None

    def report(self) -> dict[str, Any]:
        """The switch as the run report records it."""
        m = self.monitor
        return {"epoch": self.epoch, "reason": self.reason, "max_epochs": self.max_epochs,
                "window": m.window, "tol": m.tol, "min_fraction": m.min_fraction,
                "ranks": m.ranks(), "full_ranks": dict(m.full),
                "stable_ranks": {n: (t[-1] if t else None) for n, t in m.trace.items()},
                "initial_stable_ranks": dict(m.initial), "settled": dict(m.settled),
                "seconds_per_epoch": {k: [v[e] for e in sorted(v)]
                                      for k, v in self.seconds.items()}}
