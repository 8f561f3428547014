"""The decomposer contract and its registry.

A decomposer turns one pretrained layer into a sequence of plain ``nn.Conv2d`` /
``nn.Linear`` modules initialised from the layer's weights. Everything that plans ranks
(``compresscnn.core.ranks``) or budgets (``compresscnn.core.surgery``) talks to decomposers only
through this interface:

* ``supports(layer)``        -> ``None`` or the reason this method cannot take the layer;
* ``max_rank(layer)``        -> the rank tuple at which ``decompose`` is exact;
* ``scale_rank(layer, t)``   -> a rank tuple for ``t`` in (0, 1], monotone in ``t``,
  ``t = 1`` giving ``max_rank``; this one-parameter family is what fractions and budgets
  search over;
* ``cost(layer, rank, in_hw)`` -> ``(params, macs)`` of the result, analytically, for an
  input of spatial size ``in_hw`` (``None`` for Linear layers);
* ``spectra(layer)``         -> one 1-D tensor of singular values per rank component
  (descending), used by energy and EVBMF rank selection and to estimate error;
* ``decompose(layer, rank, **options)`` -> ``nn.Module``.

Ranks are always tuples of ints once resolved; what a rank a user writes means (an int, a
tuple, ``"full"``, a fraction of parameters or MACs, energy, EVBMF, a budget) lives in
:mod:`compresscnn.core.ranks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from pydantic import ValidationError
from torch import nn

from compresscnn.config import MethodOptions, first_error, fmt_path
from compresscnn.errors import MethodError, ModelError
from compresscnn.core.method_options import declare

Rank = tuple[int, ...]


class Decomposer:
    """Base class; subclasses register themselves with :func:`register_decomposer`."""

    name: str = ""
    #: the layer types this method can take (checked before ``supports``)
    layer_types: tuple[type, ...] = (nn.Conv2d,)
    #: names of the rank components, in order (e.g. ``("r_in", "r_out")``), for messages
    rank_names: tuple[str, ...] = ("r",)
    #: options ``decompose`` accepts besides ``rank``: their types, defaults and docs (the
    #: model recipes, ``--set``, the Python API and ``decompose`` all validate them with)
    Options: type[MethodOptions] = MethodOptions
    #: True for a method that picks another method per layer while planning (``auto``): it
    #: has ``members(layer, **options)``, the methods it picks among, and decomposes nothing
    chooses: bool = False

    def supports(self, layer: nn.Module) -> str | None:
        if not isinstance(layer, self.layer_types):
            kinds = "/".join(t.__name__ for t in self.layer_types)
            return f"{self.name} takes {kinds}, not {type(layer).__name__}"
        return None

    def max_rank(self, layer: nn.Module, **options: Any) -> Rank:
        raise NotImplementedError

    def scale_rank(self, layer: nn.Module, t: float, **options: Any) -> Rank:
        """Default: every component scaled by ``t`` (at least 1)."""
        full = self.max_rank(layer, **options)
        return tuple(max(1, min(m, int(math.ceil(t * m)))) for m in full)

    def cost(self, layer: nn.Module, rank: Rank, in_hw: tuple[int, int] | None,
             **options: Any) -> tuple[int, int]:
        """(params, MACs) of the decomposition at ``rank`` for an input of ``in_hw``.
        Default: those of the convs :meth:`chain_specs` chains."""
        specs = self.chain_specs(layer, rank, **options)
        if specs is None:
            raise NotImplementedError
        assert in_hw is not None, "a Conv2d needs its input size"
        return chain_cost(specs, in_hw)

    def spectra(self, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        raise NotImplementedError

    def errors(self, layer: nn.Module, ranks: Sequence[Rank], **options: Any
               ) -> list[float] | None:
        """The relative weight error ``||W - W_hat|| / ||W||`` that ``decompose`` reaches at
        each of ``ranks``, computed without building the modules (from the spectra where
        that is exact, a few iterations where the method iterates), or None where only
        decomposing tells (the caller then decomposes at each rank)."""
        return None

    def one_thread(self, layer: nn.Module, rank: Rank, **options: Any) -> bool:
        """Whether ``decompose`` at ``rank`` runs on one intra-op thread whatever torch's
        setting (problems too small for a second thread to pay): such decompositions of
        several ranks or layers are run side by side (:func:`~compresscnn.util.modules.
        parallel_map`) so that every core works. False: it uses every thread it is given."""
        return False

    def chain_specs(self, layer: nn.Module, rank: Rank, **options: Any) -> list[ConvSpec] | None:
        """The plain convs ``decompose`` chains at ``rank``, or None where the result is not
        a plain chain of convs (then :meth:`skeleton` falls back to ``decompose``)."""
        return None

    def skeleton(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        """A module with exactly the structure ``decompose(layer, rank)`` builds but random
        weights: what latency-aware planning times, without paying for a fit per candidate
        rank."""
        specs = self.chain_specs(layer, rank, **options)
        if specs is None:
            return self.decompose(layer, rank, **options)
        gen = torch.Generator().manual_seed(0)
        mods = []
        for s in specs:
            kh, kw = s.kernel_size
            w = torch.randn(s.out_channels, s.in_channels // s.groups, kh, kw, generator=gen)
            b = torch.zeros(s.out_channels) if s.bias else None
            mods.append(s.build(w, b, layer))
        return nn.Sequential(*mods)


_REGISTRY: dict[str, Decomposer] = {}


def register_decomposer(name: str) -> Callable[[type[Decomposer]], type[Decomposer]]:
    """Class decorator: ``@register_decomposer("tucker2")``. A duplicate name is an error."""

    def wrap(cls: type[Decomposer]) -> type[Decomposer]:
        if name in _REGISTRY:
            raise ValueError(f"decomposer {name!r} is already registered")
        cls.name = name
        declare(name, cls.rank_names, cls.Options, cls.chooses)  # what recipes validate with
        _REGISTRY[name] = cls()
        return cls

    return wrap


def get_decomposer(name: str) -> Decomposer:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise MethodError(f"unknown method {name!r}; known methods: {known}") from None


def list_decomposers() -> list[str]:
    return sorted(_REGISTRY)


def layer_cost(layer: nn.Module, in_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(params, macs) of an undecomposed Conv2d or Linear for one input sample."""
    params = sum(p.numel() for p in layer.parameters())
    if isinstance(layer, nn.Linear):
        return params, layer.in_features * layer.out_features
    if isinstance(layer, nn.Conv2d):
        assert in_hw is not None, "a Conv2d needs its input size"
        return params, ConvSpec.of(layer).macs(in_hw)
    raise TypeError(type(layer).__name__)


def check_weights(layer: nn.Module, label: str) -> None:
    """Refuse a layer whose parameters cannot be factorized: on the meta device (no values)
    or holding NaN/Inf (the SVDs fail to converge or return NaN factors). ``label`` names the
    layer in the :class:`ModelError`."""
    for pname, t in layer.named_parameters():
        if t.is_meta:
            raise ModelError(f"{label}: {pname} is on the meta device (no values); load the "
                             f"weights before decomposing it")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ModelError(f"{label}: {pname} contains {kind} values; it cannot be "
                             f"decomposed")


# ---------------------------------------------------------------------------------------
# Helpers shared by the implementations (added with the methods; nothing above changed).
# A decomposer describes the convs it will build as ConvSpecs, so that ``cost`` and
# ``decompose`` read the same description and can never disagree.
# ---------------------------------------------------------------------------------------

def parse_options(dec: Decomposer, options: dict[str, Any]) -> MethodOptions:
    """``options`` as ``dec.Options`` (defaults filled); an option ``dec`` does not take or a
    bad value is a :class:`MethodError` naming the option."""
    try:
        return dec.Options.model_validate(options)
    except ValidationError as e:
        path, msg = first_error(e)
        raise MethodError(f"{dec.name} option {fmt_path(path)}: {msg}") from None


#: ``F.pad`` mode for each ``nn.Conv2d`` padding_mode
F_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
               "circular": "circular"}


def padding_pairs(layer: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per axis ``(before, after)`` zero/replica padding the layer applies (resolves
    ``'same'`` the way PyTorch does: the odd extra element goes after)."""
    out = []
    for ax in range(2):
        if isinstance(layer.padding, str):
            if layer.padding == "valid":
                out.append((0, 0))
            else:
                total = layer.dilation[ax] * (layer.kernel_size[ax] - 1)
                out.append((total // 2, total - total // 2))
        else:
            p = int(layer.padding[ax])
            out.append((p, p))
    return out[0], out[1]


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of one plain ``nn.Conv2d`` a decomposer will build."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, layer: nn.Conv2d) -> "ConvSpec":
        """The geometry of an existing ``layer``."""
        return cls(layer.in_channels, layer.out_channels, tuple(layer.kernel_size),
                   tuple(layer.stride), layer.padding if isinstance(layer.padding, str)
                   else tuple(layer.padding), tuple(layer.dilation), layer.groups,
                   layer.bias is not None, layer.padding_mode)

    def out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """Output spatial size for input size ``in_hw`` (``'same'`` keeps it)."""
        out = []
        for ax in range(2):
            k, s, d = self.kernel_size[ax], self.stride[ax], self.dilation[ax]
            if isinstance(self.padding, str):
                if self.padding == "same":
                    out.append(in_hw[ax])
                    continue
                p = 0
            else:
                p = self.padding[ax]
            out.append((in_hw[ax] + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    def params(self) -> int:
        kh, kw = self.kernel_size
        return (self.out_channels * (self.in_channels // self.groups) * kh * kw
                + (self.out_channels if self.bias else 0))

    def macs(self, in_hw: tuple[int, int]) -> int:
        oh, ow = self.out_hw(in_hw)
        kh, kw = self.kernel_size
        return oh * ow * self.out_channels * (self.in_channels // self.groups) * kh * kw

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module
              ) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this geometry on ``like``'s dtype/device, holding
        ``weight`` (and ``bias``), copied without autograd history."""
        ref = next(iter(like.parameters()))
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         stride=self.stride, padding=self.padding, dilation=self.dilation,
                         groups=self.groups, bias=self.bias, padding_mode=self.padding_mode,
                         device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight.reshape(conv.weight.shape))
            if self.bias:
                assert bias is not None
                conv.bias.copy_(bias)
        return conv


def chain_cost(specs: Sequence[ConvSpec], in_hw: tuple[int, int]) -> tuple[int, int]:
    """(params, macs) of convs applied one after the other to an input of size ``in_hw``."""
    params = macs = 0
    hw = in_hw
    for spec in specs:
        params += spec.params()
        macs += spec.macs(hw)
        hw = spec.out_hw(hw)
    return params, macs


def fit_info(weight: torch.Tensor, approx: torch.Tensor, term_energy: float | None = None,
             iters: int = 0) -> dict[str, Any]:
    """``module.fit_info``: ``rel_error`` = ||W - W_hat||_F / ||W||_F of the dense kernel
    the module computes; ``norm_ratio`` = sqrt(sum_r ||term_r||^2) / ||W||_F over the
    rank-1 (or orthogonal) terms of the factorisation (= ||W_hat|| / ||W|| <= 1 for the
    orthogonal methods; >> 1 flags a degenerate CP with cancelling terms); ``iters`` the
    iterations of the iterative solver (0 for closed forms)."""
    w = weight.double()
    a = approx.double().reshape(w.shape)
    wn = float(torch.linalg.vector_norm(w))
    err = float(torch.linalg.vector_norm(w - a))
    te = float(torch.linalg.vector_norm(a)) if term_energy is None else term_energy
    if wn == 0.0:
        return {"rel_error": 0.0 if err == 0.0 else math.inf, "norm_ratio": 0.0,
                "iters": int(iters)}
    return {"rel_error": err / wn, "norm_ratio": te / wn, "iters": int(iters)}


def tail_errors(s: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """``sqrt(sum_{i >= r} s_i^2 / sum_i s_i^2)`` for each ``r`` of ``ranks``: the relative
    error of keeping the leading ``r`` of orthogonal terms of norms ``s`` (descending), each
    tail summed on its own (no difference of large sums)."""
    e = s.double().square()
    total = float(e.sum())
    if total <= 0.0:
        return [0.0 for _ in ranks]
    tails = e.flip(0).cumsum(0).flip(0)                 # tails[i] = sum of e[i:]
    tails = torch.cat([tails, tails.new_zeros(1)])
    return [math.sqrt(max(float(tails[min(int(r), len(e))]), 0.0) / total) for r in ranks]


def work_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as float64 (numerics run in double; results cast back)."""
    w = layer.weight.detach()
    return w.to(torch.float64) if w.device.type != "mps" else w.float()


def split_axes(layer: nn.Conv2d) -> tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]:
    """(stride, padding, dilation) of a k_h x 1 conv and of a 1 x k_w conv that together
    carry ``layer``'s geometry (Jaderberg's scheme: the vertical conv takes the first
    components, the horizontal one the second). String padding ('same'/'valid') applies
    per axis as it is."""
    (s0, s1), (d0, d1) = layer.stride, layer.dilation
    if isinstance(layer.padding, str):
        pv = ph = layer.padding
    else:
        pv, ph = (layer.padding[0], 0), (0, layer.padding[1])
    return ((s0, 1), pv, (d0, 1)), ((1, s1), ph, (1, d1))
