"""Cuttlefish (Wang, Sreenivasan, Rajput, Vishwakarma, Agarwal, Sohn & Papailiopoulos, MLSys
2023, "Cuttlefish: Low-rank model training without all the tuning", sec. 3): train dense,
track each layer's stable rank per epoch (:class:`StableRankMonitor`), and once they all stop
moving, factorize the trained weights at ranks scaled from their stable ranks. The switch is
a callback of the one training loop (:class:`SwitchPoint`, ``on_epoch_end``): the dense and
the factorized phase are two :func:`compresscnn.train.loop.finetune` runs.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.core.rules import POLICY_KEYS
from compresscnn.core.surgery import Plan, Skip, apply, measured, plan
from compresscnn.errors import CheckpointError, MethodError, RecipeError
from compresscnn.train.engine import Factor
from compresscnn.util.common import atomic_write_text, unwrap_model
from compresscnn.util.modules import get_module

__all__ = ["stable_rank", "planned_layers", "StableRankMonitor", "SwitchPoint"]


def _matrix(f: Factor) -> torch.Tensor:
    """The layer's weight as ``(out, in/groups * k_h * k_w)`` (a view)."""
    return f.weight.reshape(f.weight.shape[0], -1)


def stable_rank(weight: torch.Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2`` of the ``(out, in/groups * k_h * k_w)`` unfolding (a
    Linear weight as it is): between 1 and the rank, insensitive to tiny singular values
    (Cuttlefish, sec. 3.1). 0.0 for a zero matrix. In float64 on the CPU, from the largest
    eigenvalue of the smaller Gram matrix."""
    m = weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64)
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    top = float(torch.linalg.eigvalsh(g)[-1])
    return float(m.square().sum()) / top if top > 0 else 0.0


def _ema(x: Sequence[float], span: int) -> np.ndarray:
    """Exponential moving average with weight 2 / (span + 1) (Cuttlefish's smoothing)."""
    w = 2.0 / (span + 1)
    out = np.empty(len(x))
    out[0] = x[0]
    for i in range(1, len(x)):
        out[i] = w * x[i] + (1 - w) * out[i - 1]
    return out


def _selection_rules(rules: Sequence[Any]) -> list[Any]:
    """The rules with their rank policies replaced by ``rank: full`` (and no latency
    timing): they then only say which layers, which method and which options."""
    drop = set(POLICY_KEYS) | {"objective"}
    return [{**{k: v for k, v in r.items() if k not in drop}, "rank": "full"}
            if isinstance(r, dict) else r for r in rules]


def planned_layers(model: nn.Module, rules: Sequence[dict[str, Any]],
                   input_size: Sequence[int]) -> list[str]:
    """The layers ``rules`` factorize (whatever their rank policies), in model order: what
    a :class:`StableRankMonitor` for :meth:`StableRankMonitor.switch` should watch."""
    p = plan(model, _selection_rules(rules), input_size)
    return [r.name for r in p.replacements if r.applied]


class StableRankMonitor:
    """Cuttlefish's switch point and ranks (Wang et al. 2023, sec. 3; their code:
    ``hwang595/Cuttlefish``, ``utils.py``, ``rank_estimation`` /
    ``layer_rank_stable_detector``).

    Construct it on the dense model *at initialisation* (it records each layer's initial
    stable rank ``s_0``); call :meth:`update` at the end of every epoch of dense training.
    A layer has settled once its stable-rank trace stops moving: after more than ``window``
    measurements, the mean absolute derivative (``np.gradient``, per epoch) of the trace
    smoothed by an exponential moving average of span ``window`` (weight 2/(window+1)),
    over the last ``window`` epochs, is at most ``tol`` (an absolute rate, in rank units
    per epoch, as in the paper and code; their CIFAR runs use window 15, tol 0.1). As in
    their code the last layers to settle get a looser test (``tol * relax`` when two are
    left, ``2 * tol * relax`` when one is), and a settled layer stays settled. Unlike
    their code, the trace is the unrounded stable rank.

    :meth:`ranks`: the *scaled* stable rank ``ceil(s * r_full / s_0)`` (the ratio of full
    to stable rank at init undoes how far a random matrix's stable rank sits below its
    rank), within ``[max(1, ceil(min_fraction * r_full)), r_full]``; ``r_full =
    min(rows, cols)`` of the unfolding. Their ImageNet code also bounds it below by 1/5 of
    the full rank (``min_fraction=0.2``); their CIFAR code does not (the default, 0).

    ``names``: the layers to watch (:func:`planned_layers` gives those the rules would
    factorize); None: every Conv2d and Linear.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None, tol: float = 0.1,
                 window: int = 15, relax: float = 1.0, min_fraction: float = 0.0) -> None:
        self._check(tol, window, relax, min_fraction)
        self.tol, self.window, self.relax = float(tol), int(window), float(relax)
        self.min_fraction = float(min_fraction)
        net = unwrap_model(model)
        if names is None:
            names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.layers: dict[str, Factor] = {}
        for n in names:
            try:
                mod = get_module(net, n)
            except AttributeError:
                raise MethodError(f"{n}: no such module in the model") from None
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                raise MethodError(f"{n}: a {type(mod).__name__}, not a Conv2d or Linear")
            self.layers[n] = mod
        self.full = {n: min(_matrix(m).shape) for n, m in self.layers.items()}
        self.initial = {n: stable_rank(m.weight) for n, m in self.layers.items()}
        self.epochs: list[int] = []
        self.trace: dict[str, list[float]] = {n: [] for n in self.layers}
        self.settled: dict[str, int | None] = {n: None for n in self.layers}

    @staticmethod
    def _check(tol: Any, window: Any, relax: Any, min_fraction: Any) -> None:
        def num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not num(tol) or tol <= 0:
            raise RecipeError(f"stable rank tol: expected a number > 0, got {tol!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise RecipeError(f"stable rank window: expected an int >= 2, got {window!r}")
        if not num(relax) or relax < 1:
            raise RecipeError(f"stable rank relax: expected a number >= 1, got {relax!r}")
        if not num(min_fraction) or not 0 <= min_fraction <= 1:
            raise RecipeError(f"stable rank min_fraction: expected a number in [0, 1], "
                              f"got {min_fraction!r}")

    @property
    def done(self) -> bool:
        """Whether every watched layer has settled."""
        return bool(self.layers) and all(e is not None for e in self.settled.values())

    def _flat(self, trace: Sequence[float], tol: float) -> bool:
        if len(trace) <= self.window:
            return False
        slope = np.abs(np.gradient(_ema(trace, self.window)))
        return float(slope[-self.window:].mean()) <= tol

    def update(self, epoch: int) -> bool:
        """Measure the stable ranks after ``epoch``; True once every layer has settled."""
        left = sum(e is None for e in self.settled.values())
        tol = self.tol * {2: self.relax, 1: 2 * self.relax}.get(left, 1.0)
        self.epochs.append(int(epoch))
        for n, layer in self.layers.items():
            self.trace[n].append(stable_rank(layer.weight))
            if self.settled[n] is None and self._flat(self.trace[n], tol):
                self.settled[n] = int(epoch)
        return self.done

    def ranks(self) -> dict[str, int]:
        """Per layer, the scaled stable rank of the latest measurement (of the initial
        weights before any :meth:`update`)."""
        out = {}
        for n, full in self.full.items():
            s0 = self.initial[n]
            s = self.trace[n][-1] if self.trace[n] else s0
            r = math.ceil(s * full / s0 - 1e-9) if s0 > 0 else full
            lo = max(1, math.ceil(self.min_fraction * full - 1e-9))
            out[n] = int(min(full, max(lo, r)))
        return out

    def switch(self, model: nn.Module, rules: Sequence[dict[str, Any]],
               input_size: Sequence[int]) -> tuple[nn.Module, Plan]:
        """Factorize the trained dense ``model`` at :meth:`ranks`: ``(new_model, plan)``
        (``model`` is left untouched). ``rules`` choose the layers, methods and options;
        their rank policies are ignored. Every layer they take must be watched. A layer's
        rank ``r`` of ``r_full`` becomes the method's rank ``scale_rank(r / r_full)``: for
        svd and tucker2's output rank exactly ``r`` (the same unfolding), for the other
        components the same fraction of their own full rank. A layer whose factorized form
        would have no fewer parameters than the dense one stays dense (the plan row says
        why). The trained weights are decomposed by the method's ``decompose`` (SVD,
        HOSVD, ALS...)."""
        ranks = self.ranks()
        net = unwrap_model(model)
        chosen = plan(net, _selection_rules(rules), input_size)
        explicit = []
        for rep in chosen.replacements:
            if not rep.applied:
                continue
            if rep.name not in ranks:
                raise MethodError(f"{rep.name}: the rules factorize it but the stable rank "
                                  f"monitor does not watch it")
            t = min(1.0, ranks[rep.name] / self.full[rep.name]) * (1 - 1e-9)
            r = get_decomposer(rep.method).scale_rank(get_module(net, rep.name), t,
                                                      **rep.options)
            explicit.append({"match": rep.name, "method": rep.method, "rank": list(r),
                             **rep.options})
        p = plan(net, explicit, input_size)
        rows = []
        for rep in p.replacements:
            rep = replace(rep, policy=f"stable rank {ranks[rep.name]} of {self.full[rep.name]}")
            if rep.applied and rep.params_after >= rep.params_before:
                rep = replace(rep, skip=Skip.NO_SMALLER, skipped=(
                    f"no smaller than dense at stable rank {ranks[rep.name]} of "
                    f"{self.full[rep.name]}"))
            rows.append(rep)
        p = replace(p, replacements=tuple(rows))
        new = apply(copy.deepcopy(net), p)
        return new, measured(p, new)

    def rewind(self, epoch: int) -> None:
        """Forget the measurements of ``epoch`` and later (a resumed run redoes them)."""
        keep = sum(e < epoch for e in self.epochs)
        self.epochs = self.epochs[:keep]
        self.trace = {n: t[:keep] for n, t in self.trace.items()}
        self.settled = {n: (e if e is not None and e < epoch else None)
                        for n, e in self.settled.items()}

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to resume (plain lists and numbers)."""
        return {"epochs": list(self.epochs), "initial": dict(self.initial),
                "trace": {n: list(t) for n, t in self.trace.items()},
                "settled": dict(self.settled)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state.get("initial", {})) != sorted(self.layers):
            raise MethodError("stable rank monitor state: it watches other layers "
                              f"({sorted(state.get('initial', {}))[:4]}...)")
        self.epochs = [int(e) for e in state["epochs"]]
        self.initial = {n: float(v) for n, v in state["initial"].items()}
        self.trace = {n: [float(x) for x in t] for n, t in state["trace"].items()}
        self.settled = {n: (None if e is None else int(e)) for n, e in state["settled"].items()}


class SwitchPoint:
    """When a Cuttlefish run switches from dense to factorized training, as a training-loop
    callback (``on_epoch_end``), and the wall time of every epoch of both phases.

    In the dense phase each epoch end updates ``monitor`` and stops the run once every
    watched layer has settled, or at the end of epoch ``max_epochs`` at the latest
    (``epoch`` and ``reason``, ``"settled"`` or ``"max_epochs"``, then say which). After
    :meth:`start_factorized` it only times the epochs of the factorized phase. With ``path``
    the state (the monitor's, the switch, the epoch times) is written there as JSON after
    every epoch (when ``write``) and read back when the file exists, so a resumed run
    continues where the interrupted one was; an epoch redone after a resume replaces its
    measurements. An epoch's time runs from the previous epoch end (or the start of the
    phase) to its end, without the stable-rank measurements.
    """

    def __init__(self, monitor: StableRankMonitor, max_epochs: int,
                 path: str | Path | None = None, write: bool = True) -> None:
        self.monitor, self.max_epochs = monitor, int(max_epochs)
        self.path, self.write = (Path(path) if path is not None else None), write
        self.epoch: int | None = None
        self.reason: str | None = None
        self.phase = "dense"
        self.seconds: dict[str, dict[int, float]] = {"dense": {}, "factorized": {}}
        if self.path is not None and self.path.is_file():
            self._load()
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> bool:
        self.seconds[self.phase][int(epoch)] = time.perf_counter() - self._t
        stop = False
        if self.phase == "dense":
            self.monitor.rewind(epoch)
            settled = self.monitor.update(epoch)
            if settled or epoch >= self.max_epochs:
                self.epoch, self.reason = int(epoch), "settled" if settled else "max_epochs"
                stop = True
        self.save()
        self._t = time.perf_counter()
        return stop

    def start_factorized(self) -> None:
        """From now on, time the epochs of the factorized phase."""
        self.phase = "factorized"
        self._t = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "epoch": self.epoch,
                "reason": self.reason, "max_epochs": self.max_epochs,
                "seconds": {k: {str(e): s for e, s in v.items()}
                            for k, v in self.seconds.items()}}

    def save(self) -> None:
        if self.path is not None and self.write:
            atomic_write_text(self.path, json.dumps(self.state_dict(), indent=1) + "\n")

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            self.monitor.load_state_dict(state["monitor"])
            self.epoch, self.reason = state["epoch"], state["reason"]
            self.seconds = {k: {int(e): float(s) for e, s in state["seconds"][k].items()}
                            for k in ("dense", "factorized")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: not a readable stable-rank switch state "
                                  f"({type(e).__name__}: {e})") from None

    def report(self) -> dict[str, Any]:
        """The switch as the run report records it."""
        m = self.monitor
        return {"epoch": self.epoch, "reason": self.reason, "max_epochs": self.max_epochs,
                "window": m.window, "tol": m.tol, "min_fraction": m.min_fraction,
                "ranks": m.ranks(), "full_ranks": dict(m.full),
                "stable_ranks": {n: (t[-1] if t else None) for n, t in m.trace.items()},
                "initial_stable_ranks": dict(m.initial), "settled": dict(m.settled),
                "seconds_per_epoch": {k: [v[e] for e in sorted(v)]
                                      for k, v in self.seconds.items()}}
