"""The leaf helpers (dotted paths, modes, hooks, inputs, threads) and the timing engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresscnn.util.modules import (eval_mode, example_input, get_module, hooks, module_mode,
                                  num_threads, record_inputs, set_module)
from compresscnn.measure.timing import median_ms, summarize, time_interleaved


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5)))


def test_dotted_paths_inside_sequentials():
    net = _net()
    assert get_module(net, "3.1") is net[3][1]
    new = nn.Linear(4 * 6 * 6, 5)
    set_module(net, "3.1", new)
    assert net[3][1] is new
    set_module(net, "2", nn.Identity())
    assert isinstance(net[2], nn.Identity)


def test_modes_come_back_also_after_an_error():
    net, ref = _net().train(), _net().eval()
    with pytest.raises(ZeroDivisionError):
        with eval_mode(net, None, ref):
            assert not net.training and not net[1].training
            1 / 0
    assert net.training and net[1].training and not ref.training
    with module_mode(ref, training=True):
        assert ref.training
    assert not ref.training


def test_hooks_see_calls_and_are_removed_also_after_an_error():
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    order: list[str] = []
    shapes: dict[str, tuple] = {}
    with hooks([("0", net[0]), ("3.1", net[3][1])], lambda n, m, a: order.append(n), pre=True), \
            hooks([("3.1", net[3][1])], lambda n, m, a, out: shapes.setdefault(n, out.shape)):
        y = net(x)
    assert order == ["0", "3.1"] and shapes["3.1"] == y.shape
    with pytest.raises(RuntimeError, match="stop"):
        with hooks([("0", net[0])], lambda *a: (_ for _ in ()).throw(RuntimeError("stop"))):
            net(x)
    assert not net[0]._forward_hooks and not net[0]._forward_pre_hooks
    net(x)  # no hook left behind to raise


def test_record_inputs_and_example_input():
    net = _net().train()
    x = example_input((3, 8, 8), batch=2, seed=3)
    assert torch.equal(x, example_input((3, 8, 8), 2, 3)) and x.shape == (2, 3, 8, 8)
    ins = record_inputs(net, ["0", "3.1"], x)
    assert torch.equal(ins["0"], x) and ins["3.1"].shape == (2, 144)
    assert net.training
    with pytest.raises(KeyError):
        record_inputs(net, ["nope"], x)


def test_num_threads_restores_the_count():
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_time_interleaved_runs_round_robin_after_warmup():
    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    samples = time_interleaved(fns, warmup=1, rounds=2, per_round=2, settle=0)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert [len(s) for s in samples] == [4, 4] and all(t >= 0 for s in samples for t in s)
    # by default each turn starts with three untimed calls (a warm runner); never for one
    calls.clear()
    samples = time_interleaved(fns, warmup=0, rounds=2, per_round=2)
    assert calls == ["a"] * 5 + ["b"] * 5 + ["a"] * 5 + ["b"] * 5
    assert [len(s) for s in samples] == [4, 4]
    calls.clear()
    assert len(time_interleaved(fns[:1], warmup=0, rounds=3)[0]) == 3 and calls == ["a"] * 3
    s = summarize([0.001, 0.002, 0.003, 0.004])
    assert s["median_ms"] == pytest.approx(2.5) and s["min_ms"] == pytest.approx(1.0)
    assert s["p10_ms"] == pytest.approx(1.3) and median_ms([0.002]) == pytest.approx(2.0)
