"""The linear map a replaced layer computes, and the moments of its response fit.

:class:`_Chain` reads a decomposition (a chain of plain convs, or a dense Conv2d/Linear) as
one linear map of the original layer's input patches: its composite kernel, the operator of
its last layer and its parameters in float64. :func:`_moments` accumulates in one pass over
the calibration batches the second moments ``G = X X^T`` and ``C = X Y^T`` of those patches
and the layer's outputs (float32 products per chunk, summed in float64), on all rows or a
seeded draw of them, and a random sample of rows for the non-linear rounds.
:mod:`compresscnn.fit.response` solves the fit on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compresscnn.core.decomposers.base import F_PAD_MODES, padding_pairs
from compresscnn.errors import DataError
from compresscnn.util.linalg import sym_gram

#: ridge term, relative to the mean diagonal of the Gram matrix
RIDGE = 1e-6
#: elements of one chunk of unfolded patches (bounds the memory of a pass)
CHUNK = 1 << 22
#: rows the moments are accumulated over at most (drawn at random where there are more):
#: GRAM_ROWS, or GRAM_PER_INPUT per input of the regression if that is more
GRAM_ROWS, GRAM_PER_INPUT = 1 << 15, 128
#: largest regression (inputs per group) solved in closed form; larger ones iterate
MAX_DIM = 8192


# ---------------------------------------------------------------------------- the chain


def _dims(m: nn.Module) -> tuple[int, int, int]:
    """(groups, inputs per group of the regression, outputs per group) of a Conv2d/Linear."""
    if isinstance(m, nn.Linear):
        return 1, m.in_features, m.out_features
    kh, kw = m.kernel_size
    g = m.groups
    return g, m.in_channels // g * kh * kw, m.out_channels // g


def _pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (m.groups == 1 and tuple(m.kernel_size) == (1, 1))


def _then(k: torch.Tensor, hw: tuple[tuple[int, int], ...], m: nn.Conv2d, w: torch.Tensor
          ) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """Compose the unpadded conv ``m`` (weight ``w``) after the composite kernel ``k``
    (``O x C_in x E_h x E_w``, reading input offsets ``0..E-1`` at stride ``s``; ``hw`` is
    ``((E_h, s_h), (E_w, s_w))``): tap ``j`` of ``m`` reads ``k``'s outputs at offset
    ``s d j``, so the result is ``sum_j w[:, :, j] k`` shifted by that many input
    positions: a transposed convolution of ``w`` by ``k`` with stride ``s d``, grouped as
    ``m`` is (the outputs of a group are the batch, so a depthwise ``m`` costs no more
    than its weights)."""
    (eh, sh), (ew, sw) = hw
    g, (dh, dw) = m.groups, m.dilation
    o2, o1 = w.shape[0], k.shape[0]
    x = w.reshape(g, o2 // g, o1 // g, *w.shape[2:]).transpose(0, 1).reshape(
        o2 // g, o1, *w.shape[2:])
    out = F.conv_transpose2d(x, k, stride=(sh * dh, sw * dw), groups=g)
    out = out.reshape(o2 // g, g, k.shape[1], *out.shape[2:]).transpose(0, 1).reshape(
        o2, k.shape[1], *out.shape[2:])
    return out, ((out.shape[2], sh * m.stride[0]), (out.shape[3], sw * m.stride[1]))


class _Chain:
    """A replacement that computes one linear map of its reference layer's input patches:
    a Conv2d/Linear, or a Sequential of them with a bias on the last one only. Its weights
    are read as float64 copies (``params``; written back by :meth:`store`), and its
    composite kernel (the layers composed unpadded, a product of matrices per tap) is a
    differentiable function of them."""

    def __init__(self, layers: list[nn.Module], ref: nn.Module) -> None:
        self.layers, self.ref = layers, ref
        self.g, self.d, self.co = _dims(ref)
        self.bias = layers[-1].bias is not None
        self.params = [m.weight.detach().double().clone() for m in layers]
        if self.bias:
            self.params.append(layers[-1].bias.detach().double().clone())
        #: an SVD pair: two pointwise maps, solved as one reduced-rank regression
        self.pair = (len(layers) == 2 and all(_pointwise(m) for m in layers)
                     and _pointwise(ref))
        #: the last layer's operator and normal matrix while they stay valid (_solve_last)
        self._last: tuple | None = None

    @staticmethod
    def of(mod: nn.Module, ref: nn.Module) -> _Chain | None:
        """The chain ``mod`` is, or None (not a plain chain with ``ref``'s geometry, or too
        wide to solve in closed form)."""
        layers = [mod] if isinstance(mod, (nn.Conv2d, nn.Linear)) else (
            list(mod) if isinstance(mod, nn.Sequential) else [])
        kind = type(ref)
        if (not layers or kind not in (nn.Conv2d, nn.Linear)
                or not all(type(m) is kind for m in layers)
                or any(m.bias is not None for m in layers[:-1])
                or _dims(ref)[1] > MAX_DIM or _dims(layers[-1])[0] != _dims(ref)[0]):
            return None
        chain = _Chain(layers, ref)
        try:
            with torch.no_grad():
                k, hw = chain.compose(chain.params, len(layers))
        except RuntimeError:  # the layers do not chain up to the reference's shapes
            return None
        if kind is nn.Linear:
            want = tuple(k.shape) == (ref.out_features, ref.in_features)
        else:
            want = (tuple(k.shape[:2]) == (ref.out_channels, ref.in_channels)
                    and hw == chain._extent())
        return chain if want else None

    def _extent(self) -> tuple[tuple[int, int], ...]:
        (kh, kw), (dh, dw), (sh, sw) = self.ref.kernel_size, self.ref.dilation, self.ref.stride
        return ((dh * (kh - 1) + 1, sh), (dw * (kw - 1) + 1, sw))

    def compose(self, params: list[torch.Tensor], n: int
                ) -> tuple[torch.Tensor, tuple[tuple[int, int], ...] | None]:
        """The first ``n`` layers composed: ``O x C_in`` (Linear) or ``O x C_in x E_h x
        E_w`` with its ``((E_h, s_h), (E_w, s_w))``; ``n = 0``: the identity."""
        first, dtype = self.layers[0], params[0].dtype
        if isinstance(first, nn.Linear):
            k = torch.eye(first.in_features, dtype=dtype)
            for w in params[:n]:
                k = w @ k
            return k, None
        k = torch.eye(first.in_channels, dtype=dtype)[:, :, None, None]
        hw: tuple[tuple[int, int], ...] = ((1, 1), (1, 1))
        for i, (m, w) in enumerate(zip(self.layers[:n], params[:n])):
            plain = m.groups == 1 and tuple(m.dilation) == (1, 1)
            if i == 0 and plain:  # the identity composed with m is m
                k, hw = w, ((w.shape[2], m.stride[0]), (w.shape[3], m.stride[1]))
            elif plain and tuple(m.kernel_size) == (1, 1):  # a matrix product
                k = (w.flatten(1) @ k.flatten(1)).reshape(w.shape[0], *k.shape[1:])
                hw = ((hw[0][0], hw[0][1] * m.stride[0]), (hw[1][0], hw[1][1] * m.stride[1]))
            else:
                k, hw = _then(k, hw, m, w)
        return k, hw

    def _blocks(self, full: torch.Tensor, rows: int) -> torch.Tensor:
        """``(g rows) x (g d)`` -> the per-group diagonal blocks, ``g x rows x d``."""
        g, d = self.g, self.d
        full = full.reshape(g, rows, g, d)
        return torch.stack([full[j, :, j, :] for j in range(g)])

    def kernel(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The composite kernel with the bias appended when there is one: ``g x co x d'``."""
        params = self.params if params is None else params
        k, _ = self.compose(params, len(self.layers))
        if isinstance(self.ref, nn.Conv2d):
            k = k[:, :, ::self.ref.dilation[0], ::self.ref.dilation[1]]
        w = self._blocks(k.reshape(k.shape[0], -1), self.co)
        if self.bias:
            w = torch.cat([w, params[-1].reshape(self.g, self.co, 1)], -1)
        return w

    def last_operator(self) -> torch.Tensor:
        """``Q`` (``g x d x e``): the composite kernel is ``L Q^T`` for the last layer's
        weights ``L`` (``co x e`` per group): the layers before it composed, placed at
        the offset each tap of the last layer reads."""
        pre, hw = self.compose(self.params, len(self.layers) - 1)
        if hw is None:  # Linear
            return pre.mT[None]
        last = self.layers[-1]
        (kh, kw), (dh, dw) = last.kernel_size, last.dilation
        (eh, sh), (ew, sw) = hw
        q = pre.new_zeros(pre.shape[0], kh, kw, pre.shape[1], sh * dh * (kh - 1) + eh,
                          sw * dw * (kw - 1) + ew)
        for i in range(kh):
            for j in range(kw):
                q[:, i, j, :, sh * dh * i:sh * dh * i + eh, sw * dw * j:sw * dw * j + ew] = pre
        q = q.flatten(0, 2)[:, :, ::self.ref.dilation[0], ::self.ref.dilation[1]]
        return self._blocks(q.reshape(q.shape[0], -1), _dims(last)[1]).mT

    def store(self) -> None:
        """Write ``params`` into the module's layers (cast to their dtype)."""
        with torch.no_grad():
            for m, w in zip(self.layers, self.params):
                m.weight.copy_(w.reshape(m.weight.shape))
            if self.bias:
                self.layers[-1].bias.copy_(self.params[-1].reshape(-1))


# ---------------------------------------------------------------------------- moments


def _columns(ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x``'s patches as ``ref`` reads them, ``B x g x d x L`` (``L`` output positions
    per sample; im2col's own layout, so no copy beyond the unfolding)."""
    g, d, _ = _dims(ref)
    if isinstance(ref, nn.Linear):
        return x.reshape(-1, d).mT[None, None]
    (pt, pb), (pl, pr) = padding_pairs(ref)
    if pt or pb or pl or pr:
        x = F.pad(x, (pl, pr, pt, pb), mode=F_PAD_MODES[ref.padding_mode])
    if tuple(ref.kernel_size) == (1, 1):
        cols = x[:, :, ::ref.stride[0], ::ref.stride[1]].reshape(x.shape[0], x.shape[1], -1)
    else:
        cols = F.unfold(x, ref.kernel_size, dilation=ref.dilation, stride=ref.stride)
    return cols.reshape(cols.shape[0], g, d, -1)


def _outputs(ref: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``y`` as ``B x g x co x L``, positions in the order of :func:`_columns`."""
    g, _, co = _dims(ref)
    if isinstance(ref, nn.Linear):
        return y.reshape(-1, co).mT[None, None]
    return y.reshape(y.shape[0], g, co, -1)


def _pick(a: torch.Tensor, t: torch.Tensor, p: float, gen: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (positions) of columns ``a`` and outputs ``t``, each kept with probability
    ``p``: ``g x n x d`` and ``g x n x co``."""
    b, _, _, l_ = a.shape
    idx = (torch.rand(b * l_, generator=gen) < p).nonzero()[:, 0]
    return (a[idx // l_, :, :, idx % l_].transpose(0, 1),
            t[idx // l_, :, :, idx % l_].transpose(0, 1))


def _gather(ref: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`_pick` gives on :func:`_columns`, for a small ``p``: only the kept
    positions' patches are read (no unfolding of the rest)."""
    g, d, co = _dims(ref)
    if isinstance(ref, nn.Linear):
        x, y = x.reshape(-1, d), y.reshape(-1, co)
        idx = (torch.rand(len(x), generator=gen) < p).nonzero()[:, 0]
        return x[idx][None], y[idx][None]
    (pt, pb), (pl, pr) = padding_pairs(ref)
    if pt or pb or pl or pr:
        x = F.pad(x, (pl, pr, pt, pb), mode=F_PAD_MODES[ref.padding_mode])
    b, _, oh, ow = y.shape
    idx = (torch.rand(b * oh * ow, generator=gen) < p).nonzero()[:, 0]
    bi, hi, wi = idx // (oh * ow), idx // ow % oh, idx % ow
    (kh, kw), (sh, sw), (dh, dw) = ref.kernel_size, ref.stride, ref.dilation
    rows_h = hi[:, None] * sh + torch.arange(kh) * dh                 # n x kh
    rows_w = wi[:, None] * sw + torch.arange(kw) * dw                 # n x kw
    patches = x[bi[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                rows_h[:, None, :, None], rows_w[:, None, None, :]]   # n x C x kh x kw
    rows = patches.reshape(len(idx), g, d).transpose(0, 1)
    return rows, y[bi, :, hi, wi].reshape(len(idx), g, co).transpose(0, 1)


def _with_ones(rows: tuple[torch.Tensor, torch.Tensor], bias: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    a, t = rows
    return (torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1) if bias else a), t


@dataclass
class _Moments:
    """Moments of a regression, float64: ``gram`` (``g x d' x d'``; ``d'`` counts a ones
    column when the chain has a bias), ``cross`` (``g x d' x co``), and per output channel
    (``g x co``) the sums of the targets' squares ``yy`` and of the targets ``ys``, over
    ``n`` rows."""

    gram: torch.Tensor
    cross: torch.Tensor
    yy: torch.Tensor
    ys: torch.Tensor
    n: int

    @staticmethod
    def of(a: torch.Tensor, y: torch.Tensor, gram: torch.Tensor | None = None) -> _Moments:
        """Of rows ``a`` (``g x n x d'``) and targets ``y`` (``g x n x co``)."""
        return _Moments(sym_gram(a.mT).double() if gram is None else gram,
                        (a.mT @ y).double(), y.double().square().sum(1),
                        y.double().sum(1), y.shape[1])

    def norm2(self, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """``||scale * y + shift||^2`` over all rows and channels."""
        out = scale.square() * self.yy
        if shift is not None:
            out = out + 2.0 * scale * shift * self.ys + self.n * shift.square()
        return out.sum()


class _Sums:
    """Running sums over chunks of columns ``a`` (``g x d x n``) and outputs ``t``
    (``g x co x n``): float32 products per chunk, accumulated in float64."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] | None = None
        self.n = 0

    def add(self, a: torch.Tensor, t: torch.Tensor) -> None:
        parts = [sym_gram(a), a @ t.mT, t.square().sum(2), t.sum(2), a.sum(2)]
        parts = [p.double() for p in parts]
        self.parts = parts if self.parts is None else [
            s + p for s, p in zip(self.parts, parts)]
        self.n += a.shape[2]

    def moments(self, bias: bool) -> _Moments:
        gram, cross, yy, ys, asum = self.parts
        if bias:  # the ones column: its products are the sums and the count
            g, d = asum.shape
            top = torch.cat([gram, asum[:, :, None]], 2)
            bottom = torch.cat([asum, asum.new_full((g, 1), float(self.n))], 1)
            gram = torch.cat([top, bottom[:, None, :]], 1)
            cross = torch.cat([cross, ys[:, None, :]], 1)
        return _Moments(gram, cross, yy, ys, self.n)


def _moments(chain: _Chain, xs: list[torch.Tensor], ys: list[torch.Tensor], sample: int,
             name: str) -> tuple[_Moments, tuple[torch.Tensor, torch.Tensor] | None]:
    """One pass over the batches: the moments of all rows, or of about ``GRAM_ROWS`` (at
    least ``GRAM_PER_INPUT`` per input) of them drawn at random where there are more; and
    about ``sample`` rows drawn at random (``sample`` > 0), else None. Seeded draws."""
    ref = chain.ref
    total = sum(y.numel() // (chain.g * chain.co) for y in ys)
    thin = max(GRAM_ROWS, GRAM_PER_INPUT * (chain.d + int(chain.bias))) / max(1, total)
    keep = sample / max(1, total)
    gen = torch.Generator().manual_seed(0)
    sums = _Sums()
    picked: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y in zip(xs, ys):
        if thin < 1.0:  # only the drawn positions are read
            rows, trows = _gather(ref, x, y, thin, gen)
            sums.add(rows.mT, trows.mT)
            if keep > 0.0:
                picked.append(_pick(rows.mT[None], trows.mT[None], keep / thin, gen))
            continue
        per = max(1, x[:1].numel() * max(1, chain.d // max(1, x.shape[1] // chain.g)))
        step = max(1, CHUNK // per)
        for i in range(0, x.shape[0], step):
            a, t = _columns(ref, x[i:i + step]), _outputs(ref, y[i:i + step])
            # g x d x (B L): one large product per chunk
            sums.add(a.permute(1, 2, 0, 3).flatten(2), t.permute(1, 2, 0, 3).flatten(2))
            if keep > 0.0:
                picked.append(_pick(a, t, min(keep, 1.0), gen))
    mom = sums.moments(chain.bias)
    if not (torch.isfinite(mom.gram).all() and torch.isfinite(mom.cross).all()):
        raise DataError(f"{name}: the calibration activations reaching this layer are not "
                        f"finite (NaN/Inf); check the calibration data and the model")
    rows = None
    if picked:
        rows = _with_ones((torch.cat([p[0] for p in picked], 1),
                           torch.cat([p[1] for p in picked], 1)), chain.bias)
    return mom, rows


def _ridge(gram: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """``gram`` plus ``ridge`` times its mean diagonal."""
    level = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    return gram + ridge * level * torch.eye(gram.shape[-1], dtype=gram.dtype)
