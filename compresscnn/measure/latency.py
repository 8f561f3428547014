"""Latency-aware planning: time what a layer would become, on the runtime it will run on.

Fewer MACs is not a faster model: a 1x1 -> kxk -> 1x1 chain launches three kernels where
the dense conv launched one, small ranks leave vector units idle, and depthwise convs are
memory-bound. So with ``objective: latency`` the planner does not trust the MAC count:

1. every budgeted layer's input is recorded at the serving batch (one forward pass);
2. the dense layer and a handful of candidate ranks (evenly spread in MACs, ranks rounded
   to the rule's ``round_to``, by default to the channel multiple the runtime rewards:
   :func:`~compresscnn.measure.latency_config.preferred_round_to`) are built as *skeletons* (the decomposition's exact module
   structure, random weights: no fit is paid for a rank that will not be used) and timed
   on the target runtime, interleaved round by round so that a noisy neighbour slows all
   candidates alike;
3. candidates that are not at least ``margin`` faster than the dense layer are dropped, so a
   layer where nothing is faster stays dense;
4. the budget (``target: {latency: f}``, a fraction of the whole model's measured latency,
   or a MAC / parameter budget) is met by the same greedy allocation as the MAC budget;
5. after the layers are swapped, :func:`ensure_not_slower` times the whole original and
   compressed models against each other and puts back original layers (least gain first)
   until the compressed model is not slower on that runtime.

Runtimes: ``onnxruntime`` (CPU provider, ``intra_op_num_threads = threads``; each module is
exported with the TorchScript-based exporter, which takes ~0.1 s for one layer against
~1 s for dynamo), ``openvino`` (CPU plugin, float32, the same exports; the ``runtimes``
extra), ``torch`` (eager, ``torch.set_num_threads(threads)``, CUDA when the
module lives there) and ``torch_bf16`` (eager CPU inference in bf16 autocast with
channels_last, for CPUs that compute bf16 natively).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from compresscnn.util.modules import (eval_mode, example_input, get_module, num_threads,
                                      record_inputs, set_module)
from compresscnn.core.ranks import Skip
from compresscnn.measure.latency_config import ROUND_TO, LatencyConfig, preferred_round_to
from compresscnn.measure.timing import (RUNTIMES, check_runtime, median_ms, module_runner,
                                         time_interleaved)
from compresscnn.util.progress import track

__all__ = ["LatencyConfig", "ROUND_TO", "preferred_round_to", "latency_config", "time_modules",
           "spread", "time_candidates", "ensure_not_slower", "layer_latency_table"]


def latency_config(v: LatencyConfig | dict[str, Any] | None) -> LatencyConfig:
    """``v`` as a :class:`LatencyConfig` (:meth:`LatencyConfig.from_any`), its runtime
    installed (a one-line error naming the extra that installs it, otherwise)."""
    cfg = LatencyConfig.from_any(v)
    check_runtime(cfg.runtime, "latency.runtime")
    return cfg


# ----------------------------------------------------------------------------- timing


def time_modules(modules: Sequence[nn.Module], x: torch.Tensor,
                 cfg: LatencyConfig) -> list[float]:
    """Median latency (ms) of each module on input ``x`` on ``cfg.runtime``, the modules
    timed against each other (:func:`compresscnn.measure.timing.time_interleaved`)."""
    if cfg.timer is not None:
        return [float(cfg.timer(m, x)) for m in modules]
    with num_threads(cfg.threads), eval_mode(*modules), torch.inference_mode():
        fns = [module_runner(m, x, cfg.runtime, cfg.threads, cfg.precision) for m in modules]
        samples = time_interleaved(fns, warmup=cfg.warmup, rounds=cfg.rounds,
                                   per_round=cfg.per_round)
    return [median_ms(s) for s in samples]


# ----------------------------------------------------------------------------- planning


def spread(n_total: int, k: int) -> list[int]:
    """``k`` indices in ``1..n_total-1`` spread evenly (all of them when there are fewer)."""
    idx = list(range(1, n_total))
    if len(idx) <= k:
        return idx
    step = (len(idx) - 1) / max(k - 1, 1)
    return sorted({idx[round(i * step)] for i in range(k)})


def time_candidates(dec, layer: nn.Module, ranks: Sequence[tuple[int, ...]],
                    options: dict[str, Any], x: torch.Tensor, cfg: LatencyConfig
                    ) -> tuple[float, list[float]]:
    """(dense ms, [ms of each rank's decomposition]) for ``layer`` on input ``x``."""
    dense = copy.deepcopy(layer)
    mods = [dense] + [dec.skeleton(layer, tuple(r), **options) for r in ranks]
    times = time_modules(mods, x, cfg)
    return times[0], times[1:]


def ensure_not_slower(original: nn.Module, compressed: nn.Module, plan_, cfg: LatencyConfig,
                      max_rounds: int = 8):
    """Time the whole original and compressed models against each other; while the
    compressed one is slower, put back the original layers whose measured gain was smallest
    (several per round on large plans). ``compressed`` is changed in place; returns a new
    plan (``dataclasses.replace`` of ``plan_``): the put-back rows skipped with the reason
    (kind :attr:`Skip.PUT_BACK <compresscnn.core.ranks.Skip>`), the measurements in
    ``latency_check`` and merged into ``latency``."""
    x = example_input(plan_.input_size, cfg.batch)
    t_o, t_c = time_modules([original, compressed], x, cfg)
    first = (t_o, t_c)
    reasons: dict[str, str] = {}
    rows = [r for r in plan_.replacements if r.applied]
    rows.sort(key=lambda r: ((r.latency_before or 0.0) - (r.latency_after or 0.0)))

    def put_back(reps, reason: str) -> None:
        for rep in reps:
            set_module(compressed, rep.name, copy.deepcopy(get_module(original, rep.name)))
            reasons[rep.name] = reason

    rounds = 0
    while t_c > t_o and rows and rounds < max_rounds:
        rounds += 1
        n = max(1, len(rows) // 4) if rounds > 2 else 1
        put_back(rows[:n], f"put back: the whole compressed model measured {t_c:.3g} ms vs "
                           f"{t_o:.3g} ms dense on {cfg.runtime}")
        rows = rows[n:]
        t_o, t_c = time_modules([original, compressed], x, cfg)
    if t_c > t_o and rows:
        # still slower after max_rounds: give up on every replacement rather than ship a
        # slower model
        put_back(rows, "put back: the compressed model was not faster")
        rows = []
        t_o, t_c = time_modules([original, compressed], x, cfg)
    new_rows = tuple(replace(r, skipped=reasons[r.name], skip=Skip.PUT_BACK)
                     if r.name in reasons else r for r in plan_.replacements)
    if not any(r.applied for r in new_rows):
        t_c = t_o  # every layer put back: the two models are the same network
    info = {"original_ms": t_o, "compressed_ms": t_c, "speedup": t_o / t_c if t_c else None,
            "first_check_ms": list(first), "reverted": list(reasons)}
    return replace(plan_, replacements=new_rows, latency={**(plan_.latency or {}), **info},
                   latency_check=info)


def layer_latency_table(original: nn.Module, compressed: nn.Module, names: Sequence[str],
                        input_size: Sequence[int], config: LatencyConfig | dict[str, Any] | None
                        = None, *, runtimes: Sequence[str] = RUNTIMES) -> list[dict[str, Any]]:
    """Per replaced layer: the dense layer (from ``original``) and its decomposition (from
    ``compressed``) timed against each other on the input the original layer sees, on each
    runtime, as ``config`` says (a :class:`LatencyConfig` or a mapping of its keys: the
    batch, threads, rounds; its ``runtime`` is each of ``runtimes`` in turn). Rows:
    ``layer, runtime, threads, batch, dense_ms, decomposed_ms, speedup``."""
    base = LatencyConfig.from_any(config)
    x = example_input(input_size, base.batch)
    ins = record_inputs(original, list(names), x)
    rows = []
    for rt in runtimes:
        cfg = latency_config({**base.describe(), "runtime": rt, "round_to": None,
                              "timer": base.timer})
        for n in track(names, f"time on {rt}", label=str):
            d, c = time_modules([get_module(original, n), get_module(compressed, n)], ins[n],
                                cfg)
            rows.append({"layer": n, "runtime": rt, "threads": cfg.threads, "batch": cfg.batch,
                         "dense_ms": d, "decomposed_ms": c, "speedup": d / c if c else None})
    return rows
