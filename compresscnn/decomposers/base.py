"""The decomposer contract and its registry.

A decomposer turns one pretrained layer into a sequence of plain ``nn.Conv2d`` /
``nn.Linear`` modules initialised from the layer's weights. Everything that plans ranks
(``compresscnn.ranks``) or budgets (``compresscnn.surgery``) talks to decomposers only
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

Ranks are always tuples of ints once resolved. :func:`resolve_rank` turns what a user writes
(an int, a tuple, ``"full"`` or a float in (0, 1] meaning the fraction of the layer's
parameters to keep) into such a tuple, with a :class:`RankError` naming the layer and the
limit when it is impossible.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import MethodError, RankError

Rank = tuple[int, ...]


class Decomposer:
    """Base class; subclasses register themselves with :func:`register_decomposer`."""

    name: str = ""
    #: the layer types this method can take (checked before ``supports``)
    layer_types: tuple[type, ...] = (nn.Conv2d,)
    #: names of the rank components, in order (e.g. ``("r_in", "r_out")``), for messages
    rank_names: tuple[str, ...] = ("r",)
    #: options ``decompose`` accepts besides ``rank`` (validated by recipes)
    options: dict[str, type | tuple[type, ...]] = {}

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
        raise NotImplementedError

    def spectra(self, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        raise NotImplementedError


_REGISTRY: dict[str, Decomposer] = {}


def register_decomposer(name: str) -> Callable[[type[Decomposer]], type[Decomposer]]:
    """Class decorator: ``@register_decomposer("tucker2")``. A duplicate name is an error."""

    def wrap(cls: type[Decomposer]) -> type[Decomposer]:
        if name in _REGISTRY:
            raise ValueError(f"decomposer {name!r} is already registered")
        cls.name = name
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
        oh, ow = conv_out_hw(layer, in_hw)
        kh, kw = layer.kernel_size
        macs = oh * ow * layer.out_channels * (layer.in_channels // layer.groups) * kh * kw
        return params, macs
    raise TypeError(type(layer).__name__)


def conv_out_hw(layer: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    """Output spatial size of ``layer`` for input size ``in_hw`` (handles padding='same')."""
    out = []
    for ax in range(2):
        k, s, d = layer.kernel_size[ax], layer.stride[ax], layer.dilation[ax]
        if isinstance(layer.padding, str):
            if layer.padding == "same":
                out.append(in_hw[ax])  # 'same' requires stride 1
                continue
            p = 0  # 'valid'
        else:
            p = layer.padding[ax]
        out.append((in_hw[ax] + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def _layer_label(layer: nn.Module) -> str:
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
    label = _layer_label(layer)
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
    r = resolve_rank(dec, layer, rank, in_hw=(32, 32) if isinstance(layer, nn.Conv2d) else None,
                     **options)
    return dec.decompose(layer, r, **options)


def rank_as_list(rank: Sequence[int]) -> list[int]:
    return [int(r) for r in rank]
