"""Truncated SVD of a fully-connected layer (Sainath et al., ICASSP 2013, "Low-rank matrix
factorization for deep neural network training with high-dimensional output targets",
sec. 3: ``W = U S V^T ~= (U_r S_r^1/2)(S_r^1/2 V_r^T)``).

``Linear(in -> out)`` becomes ``Linear(in -> r, no bias)`` (weight ``S_r^1/2 V_r^T``) then
``Linear(r -> out)`` (weight ``U_r S_r^1/2``, carries the bias): the singular values are
split as square roots so both factors have the same scale (better conditioned for
fine-tuning). The matrix factorised is the weight itself, ``out x in`` (no unfolding).

A 1x1 ``Conv2d`` with ``groups=1`` is the same matrix (``C_out x C_in``) and becomes two
1x1 convs; the first carries the stride, padding and padding_mode (all commute with a
pointwise channel map), the second the bias.

Exact SVD (``torch.linalg.svd``) at full rank and for small layers; for large ones
(``min(in, out) > 1024``) at a truncated rank, the eigendecomposition of the smaller Gram
matrix and one projection (:func:`~._numerics.gram_svd`: VGG-16's 25088 x 4096 fc6 in
seconds, where a full SVD takes minutes), or on request (``randomized: true``) a randomized
SVD (Halko et al. 2011) whose truncation error is within 1e-3 (relative) of the exact one.
Exact at ``max_rank = min(in, out)``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from compresscnn.core.decomposers import _numerics as num
from compresscnn.core.decomposers.base import (ConvSpec, Decomposer, Rank, chain_cost,
                                               parse_options, fit_info, register_decomposer,
                                               work_weight, tail_errors)
from compresscnn.core.method_options import SVDOptions

#: above this smaller dimension a truncated rank uses the Gram path (``gram_svd``)
RANDOMIZED_MIN_DIM = 1024
#: above this smaller dimension the spectrum comes from the Gram matrix's eigenvalues
GRAM_SPECTRA_MIN_DIM = 512
#: the Gram eigendecompositions :meth:`SVD.spectra` computed for the Gram path, kept for
#: :meth:`SVD.decompose` (which takes its entry out): planning asks for a layer's spectrum,
#: then applying decomposes it (``compress`` applies to a copy of the model), and the Gram
#: matrix and its eigenvectors are most of the cost of both (VGG-16's fc6). At most
#: ``_EIG_KEEP`` entries, the oldest dropped first; each holds its weight by a weak
#: reference and serves that weight at that version, or an equal copy of it.
_EIG: list[tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor]]] = []
_EIG_KEEP = 2


def _kept_eig(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kept entry of ``layer``'s weight (taken out of ``_EIG``), or None."""
    w = layer.weight.detach()
    for i, (ref, version, eig) in enumerate(_EIG):
        o = ref()
        if (o is not None and o._version == version and o.shape == w.shape
                and o.dtype == w.dtype and o.device == w.device
                and (o is layer.weight or torch.equal(o.detach(), w))):
            del _EIG[i]
            return eig
    return None


def _keep_eig(layer: nn.Module, eig: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keep ``eig`` for ``layer``'s weight, in place of what was kept for it (or for a
    weight freed since)."""
    _EIG[:] = [e for e in _EIG if e[0]() is not None and e[0]() is not layer.weight]
    _EIG.append((weakref.ref(layer.weight), layer.weight._version, eig))
    del _EIG[:-_EIG_KEEP]


@register_decomposer("svd")
class SVD(Decomposer):
    layer_types = (nn.Linear, nn.Conv2d)
    rank_names = ("r",)

    Options = SVDOptions

    def supports(self, layer: nn.Module) -> str | None:
        reason = super().supports(layer)
        if reason is not None:
            return reason
        if isinstance(layer, nn.Conv2d):
            if tuple(layer.kernel_size) != (1, 1):
                return (f"svd takes Linear and 1x1 Conv2d, not a {tuple(layer.kernel_size)} "
                        f"kernel; use tucker2, cp or spatial")
            if layer.groups != 1:
                return "svd takes 1x1 convs with groups=1 only; use tucker2 for grouped ones"
        return None

    @staticmethod
    def _matrix(layer: nn.Module) -> torch.Tensor:
        w = work_weight(layer)
        return w.reshape(w.shape[0], w.shape[1])

    def max_rank(self, layer: nn.Module, **options: Any) -> Rank:
        if isinstance(layer, nn.Linear):
            return (min(layer.in_features, layer.out_features),)
        return (min(layer.in_channels, layer.out_channels),)

    def chain_specs(self, layer: nn.Module, rank: Rank, **options: Any) -> list[ConvSpec] | None:
        return None if isinstance(layer, nn.Linear) else self._specs(layer, rank[0])

    def skeleton(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        if not isinstance(layer, nn.Linear):
            return super().skeleton(layer, rank, **options)
        (r,) = rank
        ref = layer.weight
        return nn.Sequential(
            nn.Linear(layer.in_features, r, bias=False, device=ref.device, dtype=ref.dtype),
            nn.Linear(r, layer.out_features, bias=layer.bias is not None, device=ref.device,
                      dtype=ref.dtype))

    def cost(self, layer: nn.Module, rank: Rank, in_hw: tuple[int, int] | None,
             **options: Any) -> tuple[int, int]:
        (r,) = rank
        if isinstance(layer, nn.Linear):
            i, o = layer.in_features, layer.out_features
            params = i * r + r * o + (o if layer.bias is not None else 0)
            return params, i * r + r * o
        assert in_hw is not None, "a Conv2d needs its input size"
        return chain_cost(self._specs(layer, r), in_hw)

    @staticmethod
    def _specs(layer: nn.Conv2d, r: int) -> list[ConvSpec]:
        pad = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        return [ConvSpec(layer.in_channels, r, (1, 1), tuple(layer.stride), pad,
                         padding_mode=layer.padding_mode),
                ConvSpec(r, layer.out_channels, bias=layer.bias is not None)]

    def spectra(self, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        """Singular values, from the eigenvalues of the smaller Gram matrix: for the large
        fully connected layers of AlexNet/VGG (4096 x 25088) this is several times faster
        than ``svdvals``; the Gram product runs in the weight's precision (float32 relative
        error ~1e-7 of the largest s^2 is far below what energy and EVBMF ranks resolve)."""
        a = self._matrix(layer).detach()
        if min(a.shape) <= GRAM_SPECTRA_MIN_DIM:
            return [torch.linalg.svdvals(a.double()).to(layer.weight.dtype)]
        opt = parse_options(self, options)
        if min(a.shape) > RANDOMIZED_MIN_DIM and opt.randomized is None:
            # the eigenvectors too, in the dtype decompose's Gram path takes them in: it
            # reuses them instead of forming the Gram matrix again
            eig = _kept_eig(layer) or num.gram_eigh(a, layer.weight.dtype)
            _keep_eig(layer, eig)
            ev = eig[0].flip(0).clamp_min(0)
        else:
            g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
            ev = torch.linalg.eigvalsh(g.double()).flip(0).clamp_min(0)
        return [ev.sqrt().to(layer.weight.dtype)]

    def errors(self, layer: nn.Module, ranks: Sequence[Rank], **options: Any) -> list[float]:
        """From the singular values: the truncated SVD's error is exactly their tail (the
        randomized path's is within 1e-3 of it)."""
        return tail_errors(self.spectra(layer, **options)[0], [r[0] for r in ranks])

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        """Options: :class:`SVD.Options`."""
        opt = parse_options(self, options)
        (r,) = rank
        a = self._matrix(layer)
        full = r >= min(a.shape)
        rel = None
        if opt.randomized and not full:
            u, s, vh = num.randomized_svd(a, r, oversample=opt.oversample,
                                          power_iters=opt.power_iters)
        elif opt.randomized is None and not full and min(a.shape) > RANDOMIZED_MIN_DIM:
            u, s, vh, rel = num.gram_svd(a, r, products=layer.weight.dtype,
                                         eig=_kept_eig(layer))
        else:
            u, s, vh = num.truncated_svd(a, r)
        root = s.sqrt()
        w_first = root[:, None] * vh          # r x in
        w_second = u * root[None, :]          # out x r
        bias = layer.bias.detach() if layer.bias is not None else None
        if isinstance(layer, nn.Linear):
            ref = layer.weight
            first = nn.Linear(a.shape[1], r, bias=False, device=ref.device, dtype=ref.dtype)
            second = nn.Linear(r, a.shape[0], bias=bias is not None, device=ref.device,
                               dtype=ref.dtype)
            with torch.no_grad():
                first.weight.copy_(w_first)
                second.weight.copy_(w_second)
                if bias is not None:
                    second.bias.copy_(bias)
        else:
            specs = self._specs(layer, r)
            first = specs[0].build(w_first, None, layer)
            second = specs[1].build(w_second, bias, layer)
        seq = nn.Sequential(first, second)
        # the Gram path's error comes with it (forming the product would cost as much again)
        seq.fit_info = (fit_info(a, w_second @ w_first) if rel is None
                        else {"rel_error": rel, "norm_ratio": math.sqrt(max(1 - rel * rel, 0)),
                              "iters": 0})
        return seq
