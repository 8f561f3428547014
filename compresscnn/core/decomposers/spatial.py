"""Spatially separable low-rank filters: Jaderberg, Vedaldi & Zisserman (BMVC 2014),
"Speeding up Convolutional Neural Networks with Low Rank Expansions", scheme 2 (eq. 5), with
the closed-form solution of Tai et al. (ICLR 2016), "Convolutional neural networks with
low-rank regularization", theorem 1.

A ``k_h x k_w`` conv ``C_in -> C_out`` becomes

    k_h x 1 "vertical" conv   C_in -> R   (stride (s0, 1), padding (p0, 0), dilation (d0, 1))
    1 x k_w "horizontal" conv R -> C_out  (stride (1, s1), padding (0, p1), dilation (1, d1),
                                           carries the bias)

both with the layer's padding_mode (every mode pads each axis independently, so padding rows
in the first conv and columns in the second equals padding both before one conv).
``padding='same'`` is kept as ``'same'`` on both convs: each then pads its own axis exactly
as the original does, including PyTorch's extra trailing element for even extents.

Unfolding (Tai et al.): ``W`` reshaped to the matrix ``M[(c, i), (o, j)] = W[o, c, i, j]`` of
shape ``(C_in k_h) x (C_out k_w)``; its truncated SVD ``M ~= U_R S_R V_R^T`` gives the
vertical filters ``U_R S_R^1/2`` and the horizontal ones ``V_R S_R^1/2``, which is the
optimal rank-R separable approximation in Frobenius norm. Exact at
``R = min(C_in k_h, C_out k_w)``.

Groups: per group (both convs keep ``groups=g``, R is per group). Depthwise
(``groups = C_in``) is the same thing: a per-channel SVD of each ``k_h x k_w`` kernel, R per
channel, the vertical conv has ``C_in * R`` outputs. Kernels with ``k_h = 1`` or ``k_w = 1``
are refused (nothing to separate).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from compresscnn.core.decomposers import _numerics as num
from compresscnn.core.decomposers.base import (ConvSpec, Decomposer, Rank, parse_options,
                                               fit_info, register_decomposer, split_axes,
                                               work_weight, tail_errors)


@register_decomposer("spatial")
class Spatial(Decomposer):
    layer_types = (nn.Conv2d,)
    rank_names = ("r",)

    def supports(self, layer: nn.Module) -> str | None:
        reason = super().supports(layer)
        if reason is not None:
            return reason
        kh, kw = layer.kernel_size
        if kh == 1 or kw == 1:
            return (f"spatial needs a k_h x k_w kernel with both sides > 1, not {kh}x{kw}: "
                    f"there is nothing to separate; use tucker2 or svd")
        return None

    def max_rank(self, layer: nn.Module, **options: Any) -> Rank:
        kh, kw = layer.kernel_size
        g = layer.groups
        return (min(layer.in_channels // g * kh, layer.out_channels // g * kw),)

    def _specs(self, layer: nn.Conv2d, r: int) -> list[ConvSpec]:
        g = layer.groups
        kh, kw = layer.kernel_size
        (sv, pv, dv), (sh, ph, dh) = split_axes(layer)
        mode = layer.padding_mode
        return [ConvSpec(layer.in_channels, g * r, (kh, 1), sv, pv, dv, g,
                         padding_mode=mode),
                ConvSpec(g * r, layer.out_channels, (1, kw), sh, ph, dh, g,
                         bias=layer.bias is not None, padding_mode=mode)]

    def chain_specs(self, layer: nn.Module, rank: Rank, **options: Any) -> list[ConvSpec]:
        return self._specs(layer, rank[0])

    @staticmethod
    def _matrices(layer: nn.Conv2d) -> torch.Tensor:
        """``g x (C_in/g k_h) x (C_out/g k_w)``: Tai et al.'s unfolding, per group."""
        w = work_weight(layer)
        g = layer.groups
        co, ci, kh, kw = w.shape
        w = w.reshape(g, co // g, ci, kh, kw)
        return w.permute(0, 2, 3, 1, 4).reshape(g, ci * kh, (co // g) * kw)

    def spectra(self, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        """Singular values of the unfolding, combined over groups as sqrt(sum_g s_g^2)."""
        s = num.svals(self._matrices(layer))
        return [s.square().sum(0).sqrt().to(layer.weight.dtype)]

    def errors(self, layer: nn.Module, ranks: Sequence[Rank], **options: Any) -> list[float]:
        """Exact, from the singular values: each group keeps its top ``r``, so the error is
        the tail of the spectrum combined over groups."""
        parse_options(self, options)
        s = num.svals(self._matrices(layer)).square().sum(0).sqrt()
        return tail_errors(s, [r[0] for r in ranks])

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        parse_options(self, options)
        (r,) = rank
        g = layer.groups
        co, ci, kh, kw = layer.weight.shape
        u, s, vh = num.truncated_svd(self._matrices(layer), r)     # batched over groups
        root = s.sqrt()
        vert = (u * root[:, None, :]).reshape(g, ci, kh, r)          # (c, i) -> r
        vert = vert.permute(0, 3, 1, 2).reshape(g * r, ci, kh, 1)
        horiz = (root[:, :, None] * vh).reshape(g, r, co // g, kw)  # r -> (o, j)
        horiz = horiz.permute(0, 2, 1, 3).reshape(co, r, 1, kw)
        specs = self._specs(layer, r)
        bias = layer.bias.detach() if layer.bias is not None else None
        seq = nn.Sequential(specs[0].build(vert, None, layer),
                            specs[1].build(horiz, bias, layer))
        # W_hat[o, c, i, j] = sum_r H[o, r, j] V[r, c, i], per group
        v = vert.reshape(g, r, ci, kh)
        h = horiz.reshape(g, co // g, r, kw)
        approx = torch.einsum("gorj,grci->gocij", h, v).reshape(co, ci, kh, kw)
        seq.fit_info = fit_info(layer.weight.detach(), approx)
        return seq
