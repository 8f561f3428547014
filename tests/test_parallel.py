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
