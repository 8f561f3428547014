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

The Cuttlefish switch (dense first, factorized once the stable ranks settle) is
:mod:`compresscnn.train.cuttlefish`; the factor chains themselves are recognised by
:mod:`compresscnn.train.engine`, whose ``factor_lr`` groups train them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.errors import MethodError, RecipeError
from compresscnn.train.config import INITS
from compresscnn.train.engine import Factor, factor_chain as _chain, factorized_layers
from compresscnn.util.modules import get_module, set_module
from compresscnn.core.surgery import Plan, plan
from compresscnn.util.common import unwrap_model

__all__ = ["factorized_layers", "factorize", "semi_orthogonal_update",
           "semi_orthogonal_deviation", "SemiOrthogonal", "dense_kernel", "FrobeniusDecay"]


# ---------------------------------------------------------------------------- chains


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
