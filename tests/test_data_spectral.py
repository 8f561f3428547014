"""``allocation: data_spectral``: SVD layers ranked by the spectrum of their outputs on
calibration inputs (``W C^(1/2)``), not of their weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.errors import RecipeError
from compresscnn.core.ranks import DATA_SAMPLES_PER_DIM, data_spectra, tail_error
from compresscnn.core.planning import plan
from compresscnn.core.surgery import plan_compression


def _best_rank_r_error(y: torch.Tensor, r: int) -> float:
    """Eckart-Young on the outputs themselves (columns = samples): the smallest relative
    error of any rank-r map's outputs, ``U_r U_r^T W`` reaching it."""
    u, s, _ = torch.linalg.svd(y, full_matrices=False)
    return float((y - u[:, :r] @ (u[:, :r].T @ y)).norm() / y.norm())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_data_spectra_is_the_best_output_error(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(12, 10, bias=False) if kind == "linear" else nn.Conv2d(12, 10, 1, bias=False)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ \
        torch.diag(torch.logspace(0, -2, 12, dtype=torch.float64))  # unequal directions
    w = layer.weight.detach().reshape(10, 12).double()
    y = w @ x.T
    gram = x.T @ x / x.shape[0]
    (spec,) = data_spectra(get_decomposer("svd"), layer, gram, samples=x.shape[0])
    for r in (1, 3, 6, 9):
        assert tail_error([spec.double()], (r,)) == pytest.approx(_best_rank_r_error(y, r),
                                                                  rel=1e-4, abs=1e-6)


def test_data_spectra_needs_enough_samples_and_an_svd_layer() -> None:
    layer = nn.Linear(8, 8)
    gram = torch.eye(8, dtype=torch.float64)
    svd = get_decomposer("svd")
    assert data_spectra(svd, layer, gram, samples=DATA_SAMPLES_PER_DIM * 8) is not None
    assert data_spectra(svd, layer, gram, samples=DATA_SAMPLES_PER_DIM * 8 - 1) is None
    assert data_spectra(get_decomposer("tucker2"), nn.Conv2d(8, 8, 3), gram, 1000) is None
    assert data_spectra(svd, layer, None, 1000) is None


class TwoBranches(nn.Module):
    """Two 1x1 convs on two halves of the channels, their outputs summed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 16, 1, bias=False)
        self.b = nn.Conv2d(16, 16, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :16]) + self.b(x[:, 16:])


def _batches(n: int = 3) -> list[torch.Tensor]:
    """Branch a sees inputs in a 3-dimensional subspace, branch b full-rank ones."""
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(16, 3, generator=g)
    out = []
    for _ in range(n):
        lo = torch.einsum("cr,nrhw->nchw", basis, torch.randn(4, 3, 8, 8, generator=g))
        out.append(torch.cat([lo, torch.randn(4, 16, 8, 8, generator=g)], 1))
    return out


def test_data_spectral_cuts_what_the_data_does_not_use() -> None:
    torch.manual_seed(0)
    model = TwoBranches().eval()
    rules = [{"match": "*", "method": "svd", "round_to": 1}]
    target = {"macs": 0.6}
    by_data = {r.name: r for r in plan_compression(model, rules, (32, 8, 8), target, _batches(), config={"allocation": "data_spectral"}).replacements}
    by_weight = {r.name: r for r in plan(model, rules, (32, 8, 8), target).replacements}
    # the weights alone look alike (both random): the spectral plan cuts them about equally
    assert abs(by_weight["a"].rank[0] - by_weight["b"].rank[0]) <= 2
    # on the data, branch a needs 3 directions at no error; the budget goes to branch b
    assert by_data["a"].rank[0] == 3 and by_data["a"].rel_error < 1e-5
    assert by_data["b"].rank is None or by_data["b"].rank[0] > by_weight["b"].rank[0]


def test_data_spectral_needs_calibration() -> None:
    model = TwoBranches()
    with pytest.raises(RecipeError, match="data_spectral needs calibration"):
        plan_compression(model, [{"match": "*", "method": "svd"}], (32, 8, 8), {"macs": 0.5}, None, config={"allocation": "data_spectral"})
    with pytest.raises(RecipeError, match="data_spectral needs calibration"):
        plan(model, [{"match": "*", "method": "svd"}], (32, 8, 8), {"macs": 0.5}, config={"allocation": "data_spectral"})
