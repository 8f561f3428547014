"""``auto``: the method chosen per layer, by measured error per MAC.

A rule with ``method: auto`` lets the planner choose, for every layer it matches, among the
low-rank methods in ``methods`` that can take the layer (CP here, spatial there, Tucker-2
elsewhere, SVD on Linear layers, or dense where nothing pays). For each method it builds
``ranks`` candidates evenly spread in cost (1/ranks, 2/ranks, ... of the dense layer's MACs)
and takes the relative error ``||W - W_hat||_F / ||W||_F`` each reaches
(:meth:`~compresscnn.core.decomposers.base.Decomposer.errors`): exactly, from the spectra, for
Tucker-2 (the kernel rotated into both modes' eigenbases holds every rank's error),
spatial and SVD; for CP by decomposing on small layers and from a few ALS sweeps on large
ones (an estimate the full fit only lowers), run at four of the ranks and interpolated
between them. These are the errors the decompositions reach,
not the single-method planner's spectral bounds, which are not comparable across methods
(Tucker-2's sums two modes' tails; CP's is that of its per-tap construction, which ALS beats
by a margin that varies from layer to layer). Only the candidate the plan keeps is then
decomposed in full.

With a global ``target`` the budget then picks per layer a method and a rank, or keeps the
layer dense, minimising the summed squared errors (:func:`compresscnn.core.ranks.allocate`, with
sensitivity weights when ``allocation: sensitivity``). With a ``macs`` or ``params`` policy
each layer gets the candidate with the lowest error within that fraction. A ``rank`` or
``energy`` means different things per method and is refused. Every method runs with its
default options; the plan rows name the method chosen.

Planning cost: spectra and a few ALS sweeps at four CP candidates on large layers; on
small ones (kernel size x rank below ``cp.EXACT_BELOW``) each CP candidate is fitted in
full (on one thread: the problems are too small to share), about a second per 3x3 conv of
a CIFAR ResNet at the default 12 candidates.
"""

from __future__ import annotations

from typing import Any, NoReturn

from torch import nn

from compresscnn.errors import MethodError
from compresscnn.core.decomposers.base import (Decomposer, Rank, get_decomposer, parse_options,
                                               register_decomposer)
from compresscnn.core.method_options import AUTO_CHOICES as CHOICES, AutoOptions


@register_decomposer("auto")
class Auto(Decomposer):
    layer_types = (nn.Conv2d, nn.Linear)
    rank_names = ()
    chooses = True

    Options = AutoOptions

    def members(self, layer: nn.Module, **options: Any) -> list[Decomposer]:
        """The methods of ``options`` that can take ``layer``, in the order given."""
        opt = parse_options(self, options)
        return [d for d in map(get_decomposer, dict.fromkeys(opt.methods))
                if d.supports(layer) is None]

    def supports(self, layer: nn.Module) -> str | None:
        reason = super().supports(layer)
        if reason is not None:
            return reason
        reasons = [get_decomposer(m).supports(layer) for m in CHOICES]
        if all(r is not None for r in reasons):
            return "; ".join(r for r in reasons if r is not None)
        return None

    def _planned_only(self) -> NoReturn:
        raise MethodError("method auto chooses a method per layer while planning "
                          "(compresscnn.compress / plan with a target or a macs/params "
                          "policy); decompose a layer with a concrete method")

    def max_rank(self, layer: nn.Module, **options: Any) -> Rank:
        self._planned_only()

    def cost(self, layer: nn.Module, rank: Rank, in_hw: tuple[int, int] | None,
             **options: Any) -> tuple[int, int]:
        self._planned_only()

    def spectra(self, layer: nn.Module, **options: Any) -> list:
        self._planned_only()

    def decompose(self, layer: nn.Module, rank: Rank, **options: Any) -> nn.Module:
        self._planned_only()
