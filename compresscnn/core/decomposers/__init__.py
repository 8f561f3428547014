"""Low-rank decomposers: one module per method, all registered on import.

Methods: ``tucker2`` (Kim et al. 2016), ``cp`` (Lebedev et al. 2015), ``spatial``
(Jaderberg et al. 2014 / Tai et al. 2016), ``svd`` (Sainath et al. 2013), ``fire``
(Iandola et al. 2016); ``auto`` chooses among the low-rank ones per layer, by measured
error per MAC. See :mod:`compresscnn.core.decomposers.base` for the contract, and
:mod:`compresscnn.core.ranks` for what a rank means (``compresscnn.decompose`` lives there).
"""

from __future__ import annotations

from compresscnn.core.decomposers.base import (Decomposer, get_decomposer, layer_cost, list_decomposers,
                   register_decomposer)
from compresscnn.core.decomposers import auto, cp, fire, spatial, svd, tucker2  # noqa: F401  (registration side effect)

__all__ = ["Decomposer", "get_decomposer", "layer_cost", "list_decomposers",
           "register_decomposer"]
