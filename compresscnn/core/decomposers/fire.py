"""Fire-module substitution (Iandola et al. 2016, "SqueezeNet: AlexNet-level accuracy with
50x fewer parameters and <0.5MB model size", sec. 3.1-3.2, strategies 1-2) for a pretrained
``k_h x k_w`` conv ``C_in -> C_out``:

    squeeze   1x1 C_in -> s                       (no bias; optional ReLU after, as the paper)
    expand1x1 1x1 s -> e1        } in parallel, concatenated along channels;
    expand3x3 k_h x k_w s -> e3  } e1 + e3 = C_out, e3 = round(pct3x3 * C_out)

Initialisation from the pretrained kernel ``W``:

* squeeze = the top-``s`` left singular subspace ``U_s`` of the mode-1 (input channel)
  unfolding ``W_(1)`` (``C_in x C_out k_h k_w``), from the eigenvectors of its Gram matrix;
* the ``e1`` output channels whose kernels are most concentrated in the centre tap
  ``(ic, jc) = ((k_h-1)//2, (k_w-1)//2)`` (largest ``||W[o,:,ic,jc]||^2 / ||W[o]||^2``)
  become the 1x1 expand, holding their centre tap projected onto ``U_s``;
* the others become the ``k_h x k_w`` expand, holding ``W[o] x_1 U_s^T``; it keeps the
  layer's stride, padding, dilation and padding_mode.

Geometry of the 1x1 expand: it must read, for output position y, the input row the centre
tap reads, ``y*s + ic*d - p_before``. So it keeps the stride and pads (or crops, when
negative) ``p_before - ic*d`` in front and ``p_after - (k-1-ic)*d`` behind, per axis; this
gives the same output size for every geometry (odd or even kernels, 'same', 'valid',
asymmetric 'same', dilation). When both sides are equal and >= 0 this is the conv's own
``padding`` (the usual case: odd kernel, padding >= d(k-1)/2); otherwise the module pads
(F.pad with the layer's padding mode) / crops (slicing) the squeeze output first.

Channel order: the two branches are built over sorted channel lists and concatenated
(expand1x1 first, or expand3x3 first if that alone restores the original order); when the
1x1 channels are not one contiguous block, a fixed permutation buffer ``perm`` (persistent,
in the state dict) is applied with ``index_select`` after the cat (an ONNX Gather, no
FLOPs). A permutation by a 1x1 conv is never used.

Rank ``(s,)``; ``max_rank = (min(C_in, C_out k_h k_w),)`` (capped at ``ceil(squeeze_ratio
* C_out)`` when that option is given). Exact at max_rank only with ``pct3x3=1.0`` and no
ReLU (then it is a Tucker-1 in the input mode); ``pct3x3 < 1`` drops the off-centre taps of
the 1x1 channels by design. Without ReLU the module is linear. Refused: groups > 1 and 1x1
kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compresscnn.core.decomposers import _numerics as num
from compresscnn.core.method_options import FireOptions
from compresscnn.core.decomposers.base import (F_PAD_MODES, ConvSpec, Decomposer, Rank, parse_options, fit_info,
                   padding_pairs, register_decomposer, work_weight)


class FireModule(nn.Module):
    """squeeze -> [expand1x1 | expand3x3] -> cat (-> fixed channel permutation)."""

    def __init__(self, squeeze: nn.Conv2d, expand1x1: nn.Conv2d | None,
                 expand3x3: nn.Conv2d | None, relu: bool, perm: torch.Tensor | None,
                 expand3x3_first: bool, shift: tuple[int, int, int, int] | None,
                 pad_mode: str) -> None:
        super().__init__()
        self.squeeze = squeeze
        self.expand1x1 = expand1x1
        self.expand3x3 = expand3x3
        self.relu = relu
        self.expand3x3_first = expand3x3_first
        #: (top, bottom, left, right) pad (>0) / crop (<0) before expand1x1, or None
        self.shift = shift
        self.pad_mode = pad_mode
        if perm is not None:
            self.register_buffer("perm", perm)
        else:
            self.perm = None

    def _shifted(self, s: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.shift
        pads = [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)]
        if any(pads):
            s = F.pad(s, pads, mode=self.pad_mode)
        h, w = s.shape[-2], s.shape[-1]
        return s[..., max(-top, 0): h - max(-bottom, 0), max(-left, 0): w - max(-right, 0)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        if self.relu:
            s = F.relu(s)
        outs = []
        if self.expand1x1 is not None:
            outs.append(self.expand1x1(s if self.shift is None else self._shifted(s)))
        if self.expand3x3 is not None:
            outs.append(self.expand3x3(s))
        if self.expand3x3_first:
            outs.reverse()
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self.perm is not None:
            y = y.index_select(1, self.perm)
        return y


@register_decomposer("fire")
class Fire(Decomposer):
    layer_types = (nn.Conv2d,)
    rank_names = ("s",)

    Options = FireOptions

    def supports(self, layer: nn.Module) -> str | None:
        reason = super().supports(layer)
        if reason is not None:
            return reason
        if layer.groups != 1:
            return "fire takes groups=1 convs only"
        if tuple(layer.kernel_size) == (1, 1):
            return "fire needs a spatial kernel, not 1x1 (its expand3x3 would be a 1x1); use svd"
        return None

    def _check(self, options: dict[str, Any]) -> tuple[float, bool, float | None]:
        opt = parse_options(self, options)
        return opt.pct3x3, opt.relu, opt.squeeze_ratio

    def max_rank(self, layer: nn.Module, **options: Any) -> Rank:
        _, _, sr = self._check(options)
        kh, kw = layer.kernel_size
        full = min(layer.in_channels, layer.out_channels * kh * kw)
        if sr is not None:
            full = max(1, min(full, math.ceil(float(sr) * layer.out_channels)))
        return (full,)

    @staticmethod
    def _split(layer: nn.Conv2d, pct: float) -> tuple[int, int]:
        e1 = int(round((1.0 - pct) * layer.out_channels))
        return e1, layer.out_channels - e1

    @staticmethod
    def _centre(layer: nn.Conv2d) -> tuple[int, int]:
        kh, kw = layer.kernel_size
        return (kh - 1) // 2, (kw - 1) // 2

    def _shift(self, layer: nn.Conv2d) -> tuple[int, int, int, int]:
        """(front, back) offsets per axis for the 1x1 branch: (top, bottom, left, right)."""
        out = []
        for ax, (pb, pa) in enumerate(padding_pairs(layer)):
            k, d = layer.kernel_size[ax], layer.dilation[ax]
            c = self._centre(layer)[ax]
            out += [pb - c * d, pa - (k - 1 - c) * d]
        return tuple(out)

    def _specs(self, layer: nn.Conv2d, s: int, pct: float
               ) -> tuple[ConvSpec, ConvSpec | None, ConvSpec | None, tuple | None]:
        e1, e3 = self._split(layer, pct)
        bias = layer.bias is not None
        squeeze = ConvSpec(layer.in_channels, s)
        t, b, l, r = self._shift(layer)
        sym = t == b >= 0 and l == r >= 0
        ex1 = None
        if e1:
            ex1 = ConvSpec(s, e1, (1, 1), tuple(layer.stride), (t, l) if sym else (0, 0),
                           bias=bias, padding_mode=layer.padding_mode)
        ex3 = None
        if e3:
            pad = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
            ex3 = ConvSpec(s, e3, tuple(layer.kernel_size), tuple(layer.stride), pad,
                           tuple(layer.dilation), bias=bias, padding_mode=layer.padding_mode)
        return squeeze, ex1, ex3, (None if sym else (t, b, l, r))

    def cost(self, layer: nn.Module, rank: Rank, in_hw: tuple[int, int] | None,
             **options: Any) -> tuple[int, int]:
        assert in_hw is not None, "a Conv2d needs its input size"
        pct, _, _ = self._check(options)
        squeeze, ex1, ex3, shift = self._specs(layer, rank[0], pct)
        params, macs = squeeze.params(), squeeze.macs(in_hw)
        if ex1 is not None:
            hw = in_hw if shift is None else (in_hw[0] + shift[0] + shift[1],
                                              in_hw[1] + shift[2] + shift[3])
            params, macs = params + ex1.params(), macs + ex1.macs(hw)
        if ex3 is not None:
            params, macs = params + ex3.params(), macs + ex3.macs(in_hw)
        return params, macs

    def spectra(self, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        """Singular values of the mode-1 (input channel) unfolding, cut to ``max_rank``."""
        m = self.max_rank(layer, **options)[0]
        return [num.gram_svals(work_weight(layer), 1)[:m].to(layer.weight.dtype)]

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        """Options: ``pct3x3`` (fraction of output channels in the k x k expand, default
        0.5 as in SqueezeNet), ``relu`` (ReLU after the squeeze, default False: keeps the
        substitution linear), ``squeeze_ratio`` (caps s at ``ceil(SR * C_out)``)."""
        pct, relu, _ = self._check(options)
        (s,) = rank
        w = work_weight(layer)
        co = w.shape[0]
        ic, jc = self._centre(layer)
        e1, e3 = self._split(layer, pct)
        # centre concentration per output channel; all-zero kernels count as concentrated
        tot = w.square().sum(dim=(1, 2, 3))
        conc = torch.where(tot > 0, w[:, :, ic, jc].square().sum(1) / tot.clamp_min(1e-300),
                           torch.ones_like(tot))
        order = torch.argsort(conc, descending=True, stable=True)
        sel1 = torch.sort(order[:e1]).values
        sel3 = torch.sort(order[e1:]).values
        u = num.gram_eig(w, 1)[1][:, :s]                          # C_in x s
        proj = num.mode_dot(w, u.mT, 1)                           # C_out x s x kh x kw
        squeeze_s, ex1_s, ex3_s, shift = self._specs(layer, s, pct)
        bias = layer.bias.detach() if layer.bias is not None else None
        squeeze = squeeze_s.build(u.mT, None, layer)
        ex1 = ex3 = None
        approx = torch.zeros_like(proj)
        if ex1_s is not None:
            ex1 = ex1_s.build(proj[sel1][:, :, ic, jc], None if bias is None else bias[sel1],
                              layer)
            approx[sel1, :, ic, jc] = proj[sel1][:, :, ic, jc]
        if ex3_s is not None:
            ex3 = ex3_s.build(proj[sel3], None if bias is None else bias[sel3], layer)
            approx[sel3] = proj[sel3]
        cat1 = torch.cat([sel1, sel3])
        cat3 = torch.cat([sel3, sel1])
        ident = torch.arange(co, device=cat1.device)
        expand3_first = bool(e1 and e3 and torch.equal(cat3, ident)
                             and not torch.equal(cat1, ident))
        perm = None
        if not torch.equal(cat3 if expand3_first else cat1, ident):
            perm = torch.argsort(cat1).to(layer.weight.device)
        module = FireModule(squeeze, ex1, ex3, relu, perm, expand3_first, shift,
                            F_PAD_MODES[layer.padding_mode])
        module.fit_info = fit_info(w, num.mode_dot(approx, u, 1))
        return module
