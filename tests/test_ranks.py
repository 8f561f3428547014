"""Rank policies: energy, EVBMF, rounding, and the global-budget allocation."""

import pytest
import torch

from compresscnn.errors import RankError
from compresscnn.core.ranks import (BudgetItem, Candidate, allocate, energy_rank, evbmf_rank,
                               round_rank, tail_error)


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3


@pytest.mark.parametrize("true_rank", [3, 8])
def test_evbmf_recovers_the_rank_of_a_noisy_low_rank_matrix(true_rank):
    g = torch.Generator().manual_seed(0)
    L, M = 40, 120
    U = torch.linalg.qr(torch.randn(L, true_rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(M, true_rank, generator=g, dtype=torch.float64))[0]
    signal = U @ torch.diag(torch.linspace(60, 30, true_rank, dtype=torch.float64)) @ V.T
    Y = signal + torch.randn(L, M, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(Y)
    assert evbmf_rank(s, L, M) == true_rank


def test_evbmf_pure_noise_returns_zero():
    g = torch.Generator().manual_seed(1)
    s = torch.linalg.svdvals(torch.randn(30, 90, generator=g, dtype=torch.float64))
    assert evbmf_rank(s, 30, 90) == 0


def test_round_rank_only_where_cheap():
    assert round_rank((13, 5), (64, 16), 8) == (16, 5)
    assert round_rank((3, 64), (64, 64), 8) == (8, 64)
    assert round_rank((61,), (64,), 8) == (64,)
    assert round_rank((13,), (64,), 1) == (13,)


def test_tail_error_is_exact_for_svd():
    s = torch.tensor([4.0, 2.0, 1.0])
    assert tail_error([s], (1,)) == pytest.approx(((4 + 1) / 21) ** 0.5)
    assert tail_error([s], (3,)) == 0.0


def _item(name, dense, steps):
    cands = [Candidate(None, dense, dense, 0.0)]
    for i, (c, e) in enumerate(steps):
        cands.append(Candidate((i + 1,), c, c, e))
    return BudgetItem(name, cands)


def test_allocate_meets_budget_and_prefers_cheap_error():
    a = _item("a", 100, [(80, 0.01), (50, 0.02), (20, 0.5)])
    b = _item("b", 100, [(80, 0.3), (50, 0.6), (20, 0.9)])
    allocate([a, b], "macs", 130)
    total = a.candidates[a.choice].macs + b.candidates[b.choice].macs
    assert total <= 130
    assert a.candidates[a.choice].macs == 50  # the cheap-error layer is cut first
    assert b.candidates[b.choice].macs == 80


def test_allocate_unreachable_budget():
    a = _item("a", 100, [(50, 0.1)])
    with pytest.raises(RankError, match="cannot be reached"):
        allocate([a], "macs", 10)


def test_log_energy_penalty_never_cuts_a_layer_to_nothing():
    """Two equal layers; the cheapest candidate of each loses (almost) all its energy.
    Squared errors (bounded by 1) find wiping one layer out as cheap as halving both;
    the product of kept energies (Zhang et al. 2015) spreads the cut over both."""
    from compresscnn.core.ranks import BudgetItem, Candidate, allocate

    def item(name):
        return BudgetItem(name, [Candidate(None, 100, 100, 0.0),
                                 Candidate((2,), 50, 50, 0.72),    # e^2 = 0.52
                                 Candidate((1,), 1, 1, 0.999)])    # e^2 ~ 1
    for penalty, expect in (("squared", {0, 2}), ("log_energy", {1})):
        items = [item("a"), item("b")]
        allocate(items, "macs", 101, penalty=penalty)
        assert {it.choice for it in items} == expect, penalty
        assert sum(it.candidates[it.choice].macs for it in items) <= 101


def test_squared_errors_above_one_still_rank_candidates():
    """Tucker-2's error bound sums two modes and can exceed 1: it must not be clipped, or
    two very different cuts tie."""
    from compresscnn.core.ranks import BudgetItem, Candidate, allocate

    items = [BudgetItem("a", [Candidate(None, 100, 100, 0.0), Candidate((1, 1), 50, 50, 1.3)]),
             BudgetItem("b", [Candidate(None, 100, 100, 0.0), Candidate((1, 1), 50, 50, 1.1)])]
    allocate(items, "macs", 150)
    assert [it.choice for it in items] == [0, 1]


def test_measured_candidates_score_on_the_layers_inputs_when_given_them():
    from torch import nn

    from compresscnn.core.decomposers import get_decomposer
    from compresscnn.core.ranks import measured_candidates

    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    svd = get_decomposer("svd")
    by_weight = measured_candidates(svd, layer, None, {}, steps=6)
    # white inputs excite every direction alike: the output error is the weight error
    white = measured_candidates(svd, layer, None, {}, steps=6, probe=torch.randn(4096, 32))
    assert [c.rank for c in white] == [c.rank for c in by_weight]
    for a, b in zip(white, by_weight):  # up to the bias, which no candidate changes
        assert a.error <= b.error * 1.05
    # inputs confined to the layer's top right-singular directions: a rank that keeps those
    # directions reproduces the outputs exactly, whatever its weight error
    u, sv, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    narrow = torch.randn(512, 4) @ vh[:4]
    on_data = measured_candidates(svd, layer, None, {}, steps=6, probe=narrow)
    kept = [(c, w) for c, w in zip(on_data, by_weight) if c.rank[0] >= 4]
    assert kept and all(c.error < 1e-4 < w.error for c, w in kept)


def test_output_allocation_spends_the_budget_where_the_data_excites_the_weights():
    from torch import nn

    from compresscnn import plan
    from compresscnn.core.planning import Measured
    from compresscnn.errors import RecipeError

    torch.manual_seed(0)

    class Two(nn.Module):  # the first layer's inputs lie in its top 3 input directions
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(48, 48), nn.Linear(48, 48)
            vh = torch.linalg.svd(self.a.weight.detach(), full_matrices=False)[2]
            self.basis = nn.Parameter(vh[:3].clone(), requires_grad=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x[:, :3] @ self.basis)))

    m = Two()
    rules = [{"match": ["a", "b"], "method": "svd", "round_to": 1}]
    probe = torch.randn(256, 48)
    spectral = plan(m, rules, (48,), target={"params": 0.5})
    output = plan(m, rules, (48,), target={"params": 0.5}, config={"allocation": "output"}, measured=Measured(probe=probe))
    ranks = lambda p: {r.name: (r.rank or [48])[0] for r in p.replacements}  # noqa: E731
    assert ranks(output)["a"] < ranks(spectral)["a"]  # a rank that covers the 3 directions
    assert ranks(output)["b"] > ranks(spectral)["b"]  # and the rest spent on b
    assert output.params_after <= 0.5 * output.total_params
    a = next(r for r in output.replacements if r.name == "a")
    assert a.rel_error < 1e-4  # the error the plan records is the output error
    with pytest.raises(RecipeError, match="allocation: output needs calibration batches"):
        plan(m, rules, (48,), target={"params": 0.5}, config={"allocation": "output"})
