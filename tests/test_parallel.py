"""Independent small decompositions run side by side (util.modules.parallel_iter): the same
results, in order, as one after the other; errors propagate; torch's threads restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.util import modules as um


def test_parallel_map_keeps_order_and_restores_threads():
    before = torch.get_num_threads()
    seen = []

    def f(x):
        seen.append(torch.get_num_threads())
        return x * x

    assert um.parallel_map(f, list(range(7)), workers=2) == [x * x for x in range(7)]
    assert set(seen) == {1}                     # one intra-op thread inside the pool
    assert torch.get_num_threads() == before
    assert um.parallel_map(f, [], workers=2) == []


def test_parallel_map_starts_the_costliest_calls_first_and_keeps_order():
    """With ``cost``, the calls start longest first (one worker: the order they run in) and
    the results come back in the items' order."""
    import threading
    started, lock, gate = [], threading.Lock(), threading.Event()

    def f(x):
        with lock:
            started.append(x)
            if len(started) == 2:
                gate.set()
        gate.wait(5)  # both workers busy before either returns
        return -x

    items = [3, 9, 1, 7, 5]
    assert um.parallel_map(f, items, workers=2, cost=float) == [-x for x in items]
    assert set(started[:2]) == {9, 7} and sorted(started[2:], reverse=True) == started[2:]


def test_parallel_map_propagates_the_first_error_and_restores_threads():
    before = torch.get_num_threads()

    def f(x):
        if x == 3:
            raise ValueError("three")
        return x

    with pytest.raises(ValueError, match="three"):
        um.parallel_map(f, list(range(6)), workers=2)
    assert torch.get_num_threads() == before


def test_cp_errors_side_by_side_equal_one_after_the_other(monkeypatch):
    """The estimated CP errors of a layer at several ranks do not depend on whether the
    fits ran side by side."""
    torch.manual_seed(0)
    layer = nn.Conv2d(64, 64, 3, padding=1)
    cp = get_decomposer("cp")
    ranks = [(r,) for r in (16, 32, 48, 64, 96, 128)]
    monkeypatch.setattr("compresscnn.core.decomposers.cp.EXACT_BELOW", 0)
    side = cp.errors(layer, ranks)
    import compresscnn.core.decomposers.cp as cp_module
    monkeypatch.setattr(cp_module, "parallel_map",
                        lambda fn, items, workers=None, cost=None: [fn(x) for x in items])
    alone = cp.errors(layer, ranks)
    assert side is not None and side == alone


def test_plan_layers_side_by_side_equal_one_after_the_other(monkeypatch):
    """The plan's layers are selected side by side, each on one intra-op thread: the same
    rows (methods, ranks, errors) as on one thread, torch's threads restored after it and
    after a refusal raised by one of its layers."""
    import threading
    import time

    from compresscnn.core import planning
    from compresscnn.core.planning import plan
    from compresscnn.errors import RankError

    seen, select = set(), planning._select

    def spy(*args, **kwargs):
        seen.add((threading.get_ident(), torch.get_num_threads()))
        time.sleep(0.05)  # long enough for the other worker to take the next layer
        return select(*args, **kwargs)

    monkeypatch.setattr(planning, "_select", spy)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 32, 3, padding=1), nn.Flatten(),
                          nn.Linear(32 * 8 * 8, 10)).eval()
    rules = [{"match": "*", "method": "auto"}]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        side = plan(model, rules, (3, 8, 8), target={"macs": 0.5})
        assert torch.get_num_threads() == 2
        assert {n for _, n in seen} == {1} and len({t for t, _ in seen}) == 2
        torch.set_num_threads(1)
        alone = plan(model, rules, (3, 8, 8), target={"macs": 0.5})
        torch.set_num_threads(2)
        with pytest.raises(RankError, match="rules\\[0\\] \\(2\\)"):
            plan(model, [{"match": ["2", "4"], "method": "tucker2", "rank": [20, 20]}],
                 (3, 8, 8))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    rows = lambda p: [(r.name, r.method, r.rank, r.rel_error) for r in p.replacements]  # noqa: E731
    assert rows(side) == rows(alone)
