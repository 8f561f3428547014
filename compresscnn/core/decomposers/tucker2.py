"""Tucker-2 decomposition of a convolution (Kim et al., ICLR 2016, "Compression of Deep
Convolutional Neural Networks for Fast and Low Power Mobile Applications", eq. 2-3).

The kernel ``W`` (``C_out x C_in/g x k_h x k_w``) is approximated by a Tucker model in its
two channel modes only, ``W ~= G x_0 U_out x_1 U_in`` with ``U_in`` (``C_in/g x r_in``)
and ``U_out`` (``C_out/g x r_out``) orthonormal and core ``G`` (``r_out x r_in x k_h x
k_w``). That is three plain convs:

    1x1 (C_in -> r_in, weight U_in^T, no bias)
    k_h x k_w core (r_in -> r_out, the ORIGINAL stride/padding/dilation/padding_mode)
    1x1 (r_out -> C_out, weight U_out, carries the bias)

Factors: truncated HOSVD of modes 1 (input channels) and 0 (output channels), each from the
eigen-decomposition of the mode Gram matrix ``W_(n) W_(n)^T`` (unfoldings ``W_(1)``:
``C_in/g x C_out/g*k_h*k_w`` and ``W_(0)``: ``C_out/g x C_in/g*k_h*k_w``); optional HOOI
sweeps (``hooi=``) refine them. Kim et al. pick ranks by VBMF on the same two unfoldings,
which is what :meth:`Tucker2.spectra` returns.

Groups: each group is decomposed on its own and the three convs keep ``groups=g``; the rank
``(r_in, r_out)`` is per group. Exact (float64 round-off) at ``max_rank`` = the bounds on
the two unfoldings' ranks, ``(min(C_in/g, C_out/g*k_h*k_w), min(C_out/g, C_in/g*k_h*k_w))``
(ranks beyond them add parameters but no accuracy). Every padding mode commutes with the
1x1 channel maps, so the core conv can keep the original padding unchanged.
Depthwise-style layers (one input channel per group) are refused: there is no input mode
to compress.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from compresscnn.core.decomposers import _numerics as num
from compresscnn.core.method_options import Tucker2Options
from compresscnn.core.decomposers.base import (ConvSpec, Decomposer, Rank, parse_options,
                                               fit_info, register_decomposer, work_weight)


@register_decomposer("tucker2")
class Tucker2(Decomposer):
    layer_types = (nn.Conv2d,)
    rank_names = ("r_in", "r_out")

    Options = Tucker2Options

    def supports(self, layer: nn.Module) -> str | None:
        reason = super().supports(layer)
        if reason is not None:
            return reason
        if layer.in_channels // layer.groups == 1:
            return ("tucker2 cannot take a depthwise conv (one input channel per group): "
                    "there is no input-channel mode to compress; use spatial")
        return None

    def max_rank(self, layer: nn.Module, **options: Any) -> Rank:
        cin, cout, kk = self._dims(layer)
        return (min(cin, cout * kk), min(cout, cin * kk))

    def _dims(self, layer: nn.Conv2d) -> tuple[int, int, int]:
        kh, kw = layer.kernel_size
        return layer.in_channels // layer.groups, layer.out_channels // layer.groups, kh * kw

    def _specs(self, layer: nn.Conv2d, rank: Rank) -> list[ConvSpec]:
        g = layer.groups
        r_in, r_out = rank
        return [
            ConvSpec(layer.in_channels, g * r_in, groups=g),
            ConvSpec(g * r_in, g * r_out, tuple(layer.kernel_size), tuple(layer.stride),
                     layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                     tuple(layer.dilation), groups=g, padding_mode=layer.padding_mode),
            ConvSpec(g * r_out, layer.out_channels, groups=g, bias=layer.bias is not None),
        ]

    def chain_specs(self, layer: nn.Module, rank: Rank, **options: Any) -> list[ConvSpec]:
        return self._specs(layer, tuple(rank))

    def spectra(self, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        """[sigma of W_(1) (input mode), sigma of W_(0) (output mode)], each combined over
        groups as sqrt(sum_g sigma_g^2) and cut to ``max_rank``."""
        full = self.max_rank(layer)
        out = []
        for mode, m in zip((1, 0), full):
            sq = sum(num.gram_svals(w, mode).square() for w in self._groups(layer))
            out.append(sq.sqrt()[:m].to(layer.weight.dtype))
        return out

    def errors(self, layer: nn.Module, ranks: Sequence[Rank], **options: Any
               ) -> list[float] | None:
        """Exact for the HOSVD (``hooi: 0``): with the full eigenbases ``U_out``, ``U_in`` of
        the two mode Gram matrices, the kernel rotated into them, ``C = W x_0 U_out^T x_1
        U_in^T``, holds all its energy, and the HOSVD at ``(r_in, r_out)`` keeps exactly
        the block ``C[:r_out, :r_in]``: its error is the energy outside that block, for
        every rank at once (per group, summed). None with HOOI sweeps (decomposing tells)."""
        if parse_options(self, options).hooi > 0:
            return None
        dropped = torch.zeros(len(ranks), dtype=torch.float64)
        total = 0.0
        for w in self._groups(layer):
            u_out, u_in = num.gram_eig(w, 0)[1], num.gram_eig(w, 1)[1]
            core = num.mode_dot(num.mode_dot(w, u_out.mT, 0), u_in.mT, 1)
            e = core.square().flatten(2).sum(-1)                     # C_out/g x C_in/g
            total += float(e.sum())
            rows = e.flip(0).cumsum(0).flip(0)                        # rows[i] = e[i:].sum(0)
            rows = torch.cat([rows, rows.new_zeros(1, e.shape[1])])
            cols = e.cumsum(0)                                        # cols[i] = e[:i+1].sum(0)
            for j, (r_in, r_out) in enumerate(ranks):
                below = float(rows[min(r_out, e.shape[0])].sum())    # output rows dropped
                right = float(cols[min(r_out, e.shape[0]) - 1, r_in:].sum()) if r_out else 0.0
                dropped[j] += below + right
        if total <= 0.0:
            return [0.0 for _ in ranks]
        return [math.sqrt(max(float(d), 0.0) / total) for d in dropped]

    def _groups(self, layer: nn.Conv2d) -> list[torch.Tensor]:
        w = work_weight(layer)
        return list(w.chunk(layer.groups, dim=0))

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        """Options: ``hooi`` (int, default 0): at most this many HOOI sweeps from the HOSVD
        (:func:`~compresscnn.core.decomposers._numerics.hooi`: extrapolated, float32 sweeps for a
        float32 layer); they stop once a sweep gains less than 1e-5 of the captured energy
        and are skipped at full rank. 7 sweeps reach TensorLy's converged ``partial_tucker``
        fit on every VGG-16 conv, 5x faster (``tools/bench_tensorly.py --hooi 7``)."""
        hooi_iters = parse_options(self, options).hooi
        r_in, r_out = rank
        full = rank == self.max_rank(layer)
        # HOOI's sweeps only choose subspaces: the layer's own precision is enough for them
        sweep_dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        cores, u_ins, u_outs, sweeps = [], [], [], 0
        for w in self._groups(layer):
            if hooi_iters > 0 and not full:
                core, (u_out, u_in), done = num.hooi(w, (r_out, r_in), hooi_iters,
                                                     sweep_dtype=sweep_dtype)
                sweeps = max(sweeps, done)
            else:
                core, (u_out, u_in) = num.hosvd(w, (0, 1), (r_out, r_in))
            cores.append(core)
            u_ins.append(u_in)
            u_outs.append(u_out)
        specs = self._specs(layer, rank)
        first = specs[0].build(torch.cat([u.mT for u in u_ins]), None, layer)
        core = specs[1].build(torch.cat(cores), None, layer)
        bias = layer.bias.detach() if layer.bias is not None else None
        last = specs[2].build(torch.cat(u_outs), bias, layer)
        seq = nn.Sequential(first, core, last)
        approx = torch.cat([num.mode_dot(num.mode_dot(c, uo, 0), ui, 1)
                            for c, uo, ui in zip(cores, u_outs, u_ins)])
        seq.fit_info = fit_info(layer.weight.detach(), approx, iters=sweeps)
        return seq
