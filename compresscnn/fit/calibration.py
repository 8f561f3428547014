"""Calibration: what a few batches of training images do for a compressed model.

``reconstruct_outputs`` fits each replaced layer to the original layer's output on the
compressed model's own activations, walking both models over the batches once
(:mod:`compresscnn.fit.response` fits each layer). ``recalibrate_bn`` re-estimates BatchNorm
running statistics (a cumulative average over the batches, as
torch.optim.swa_utils.update_bn does) after layers were replaced: the decomposed layers'
outputs differ slightly from the original ones, so the statistics the following
BatchNorms hold no longer match what they see. ``distill_outputs`` then trains the whole
compressed model to reproduce the original model's outputs on the same batches
(knowledge distillation without labels).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from compresscnn.core.decomposers import get_decomposer
from compresscnn.util.modules import (eval_mode, get_module, hooks, input_tensors, kd_divergence, module_mode,
                       set_module)
from compresscnn.core.ranks import Skip, tail_error
from compresscnn.fit.config import CalibrationDistill
from compresscnn.fit.response import Tail, fit_layer
from compresscnn.train.engine import Engine, KeepBest, build_optimizer, lr_schedule
from compresscnn.util.common import resolve_amp
from compresscnn.util.progress import track
from compresscnn.util.training import BestWeights, crop_batch, mix_batch, random_flip


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset and re-estimate every BatchNorm's running mean/var on ``batches``.

    Returns the number of BatchNorm layers updated (0 leaves the model as it was). The
    model's train/eval state is restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return 0
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    device = next(model.parameters()).device
    try:
        with module_mode(model, training=True):
            for x in batches:
                model(x.to(device))
    finally:
        for m in bns:
            m.momentum = momenta[m]
    return len(bns)


def _capture(model: nn.Module, name: str, batches: list[torch.Tensor], what: str
             ) -> list[torch.Tensor]:
    """The input (``what="in"``) or output (``"out"``) of submodule ``name`` per batch."""
    got: list[torch.Tensor] = []

    def keep(_name, _m, inputs, output):
        got.append((inputs[0] if what == "in" else output).detach())
        raise _Stop  # nothing after this layer is needed

    with hooks([(name, get_module(model, name))], keep), torch.no_grad():
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    return got


class _Stop(Exception):
    pass


@torch.no_grad()
def execution_order(model: nn.Module, x: torch.Tensor, types: tuple[type, ...]) -> list[str]:
    """Names of ``model``'s submodules of ``types`` in the order one forward pass on ``x``
    first calls them."""
    seen: list[str] = []

    def note(name, _m, _args):
        if name not in seen:
            seen.append(name)

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    with hooks(layers, note, pre=True), eval_mode(model):
        model(x)
    return seen


def following_ops(model: nn.Module, through: str = "activation") -> dict[str, Tail]:
    """``{layer name: tail}`` for every Conv/Linear whose output feeds, alone, a chain of a
    BatchNorm (``through="bn"``) and/or a ReLU/ReLU6 (``"activation"``, Zhang et al. 2015's
    nonlinear response reconstruction), found on a ``torch.fx`` trace. ``tail`` (a
    :class:`~compresscnn.fit.response.Tail`) applies that chain (BatchNorm with its running
    statistics, as in eval mode). Layers whose output goes anywhere else (a residual sum,
    two consumers) get no entry; models fx cannot trace give ``{}``."""
    if through == "layer":
        return {}
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no tails
        return {}
    mods = dict(gm.named_modules())
    relu, relu6 = (0.0, math.inf), (0.0, 6.0)
    acts = {F.relu: relu, torch.relu: relu, F.relu6: relu6}

    def step(node) -> nn.Module | tuple[float, float] | None:
        if node.op == "call_module":
            m = mods.get(node.target)
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                    and len(node.args) == 1):
                return model.get_submodule(node.target)
            if through == "activation" and isinstance(m, (nn.ReLU, nn.ReLU6)):
                return relu6 if isinstance(m, nn.ReLU6) else relu
        elif (through == "activation" and node.op == "call_function"
              and node.target in acts and len(node.args) == 1):
            return acts[node.target]
        elif through == "activation" and node.op == "call_method" and node.target == "relu":
            return relu
        return None

    out: dict[str, Tail] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target),
                                                      (nn.Conv2d, nn.Linear)):
            continue
        chain, cur = [], node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            f = step(nxt)
            if f is None:
                break
            chain.append(f)
            cur = nxt
        if chain:
            out[node.target] = Tail(chain)
    return out


@dataclass
class Reconstruction:
    """What :func:`reconstruct_outputs` did: per layer ``before``/``after`` (relative output
    errors after the tail), ``seconds``, ``solver``, ``iters``; in all, the wall time and
    the forward passes of a whole model over the calibration batches it took (a pass cut
    short after the last layer it needed counts as one)."""

    layers: dict[str, dict[str, Any]]
    forward_passes: int
    seconds: float
    solver: str
    walk: str

    def summary(self) -> dict[str, Any]:
        return {"solver": self.solver, "seconds": self.seconds,
                "forward_passes": self.forward_passes, "walk": self.walk,
                "layers": len(self.layers)}


class _Lockstep:
    """Both models' activations on every calibration batch, advanced together node by node
    of the original's fx graph (the compressed model has the same graph: its replacements
    sit at the original layers' paths). Segment by segment: every batch is run up to the
    next layer to fit, which gives its inputs (compressed model) and targets (the original
    layer on the original model's input); once fitted, the layer's output is computed and
    the walk goes on. One pass of each model in all."""

    walk = "lockstep"

    def __init__(self, original: nn.Module, compressed: nn.Module, names: list[str],
                 batches: list[torch.Tensor]) -> None:
        graph = fx.symbolic_trace(original).graph
        self.nodes = list(graph.nodes)
        self.at = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and n.target in names and n.target not in self.at:
                self.at[n.target] = i
        missing = [n for n in names if n not in self.at]
        if missing:
            raise LookupError(f"not called as modules in the trace: {missing}")
        self.last_use = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.roots = (original, compressed)
        self.envs = [({}, {}) for _ in batches]
        self.batches = batches
        self.pos = 0
        self.forward_passes = 2

    def order(self, names: list[str]) -> list[str]:
        return sorted(names, key=self.at.__getitem__)

    def collect(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        k = self.at[name]
        xs, ys = [], []
        for b, envs in enumerate(self.envs):
            for i in range(self.pos, k):
                for root, env in zip(self.roots, envs):
                    self._run(i, root, env, self.batches[b])
            node = self.nodes[k]
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), envs[0].__getitem__)
            xs.append(envs[1][node.args[0]])
            ys.append(self.roots[0].get_submodule(name)(*args, **kwargs))
        self.pos = k
        self._ys = ys
        return xs, ys

    def advance(self, name: str) -> None:
        """Record the fitted layer's output (and the original's) and step past it."""
        k = self.at[name]
        node = self.nodes[k]
        mod = self.roots[1].get_submodule(name)
        for (env_o, env_c), y in zip(self.envs, self._ys):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env_c.__getitem__)
            env_c[node] = mod(*args, **kwargs)
            env_o[node] = y
            for env in (env_o, env_c):
                self._free(k, node, env)
        self.pos = k + 1
        self._ys = []

    def _run(self, i: int, root: nn.Module, env: dict, batch: torch.Tensor) -> None:
        node = self.nodes[i]
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        if node.op == "placeholder":  # the batch; any further input takes its default
            env[node] = batch if node is self.nodes[0] else (args[0] if args else None)
        elif node.op == "get_attr":
            env[node] = _fetch(root, node.target)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_module":
            env[node] = root.get_submodule(node.target)(*args, **kwargs)
        self._free(i, node, env)

    def _free(self, i: int, node, env: dict) -> None:
        for a in node.all_input_nodes:
            if self.last_use.get(a) == i:
                env.pop(a, None)
        if not node.users:
            env.pop(node, None)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _PerLayer:
    """For models fx cannot trace: each layer's inputs and targets captured by running
    both models up to that layer (two passes, cut short, per layer)."""

    walk = "per layer"

    def __init__(self, original: nn.Module, compressed: nn.Module,
                 batches: list[torch.Tensor]) -> None:
        self.original, self.compressed, self.batches = original, compressed, batches
        self.forward_passes = 0

    def order(self, names: list[str]) -> list[str]:
        return list(names)

    def collect(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.forward_passes += 2
        return (_capture(self.compressed, name, self.batches, "in"),
                _capture(self.original, name, self.batches, "out"))

    def advance(self, name: str) -> None:
        pass


@torch.no_grad()
def reconstruct_outputs(original: nn.Module, compressed: nn.Module, names: list[str],
                        batches: list[torch.Tensor], *, solver: str = "closed_form",
                        steps: int = 300, lr: float = 3e-3,
                        tails: dict[str, Tail] | None = None) -> Reconstruction:
    """Data-aware refinement: fit each replaced layer to the original layer's *output*.

    Layer by layer in model order, the replacement is fitted so that, on the compressed
    model's own input to that layer, it reproduces what the original layer outputs on the
    original model's input. Using the compressed model's inputs but the original model's
    outputs is the "asymmetric" reconstruction of Zhang et al. (2015, "Accelerating very
    deep convolutional networks for classification and detection", sec. 3.3): each layer
    also corrects the error that the layers before it left.

    ``solver``: ``"closed_form"`` (least squares, with Zhang et al.'s alternation where the
    tail is non-linear) or ``"adam"`` (``steps`` Adam steps at ``lr`` per layer); see
    :mod:`compresscnn.fit.response`. ``tails`` (``{name: tail}``, see :func:`following_ops`)
    fits ``tail(layer(x))`` to ``tail(y)`` instead: the output after the BatchNorm (an error
    in a channel the BatchNorm divides by a small running std is amplified) and the ReLU (an
    error where both are negative does not matter) that follow the layer, which is what the
    rest of the network sees.

    The activations are advanced through both models together (one pass of each; models
    fx cannot trace are run up to each layer instead). Both models are left in eval mode.
    """
    original.eval()
    compressed.eval()
    t0 = time.perf_counter()
    try:
        walker: _Lockstep | _PerLayer = _Lockstep(original, compressed, names, batches)
    except Exception:  # noqa: BLE001 - fx cannot trace it: run each layer's prefix
        walker = _PerLayer(original, compressed, batches)
    layers: dict[str, dict[str, Any]] = {}
    for name in track(walker.order(names), "fit", label=str):
        xs, ys = walker.collect(name)
        layers[name] = fit_layer(compressed.get_submodule(name), xs, ys,
                                 (tails or {}).get(name),
                                 reference=original.get_submodule(name), solver=solver,
                                 adam=(steps, lr), name=name)
        walker.advance(name)
    return Reconstruction(layers, walker.forward_passes, time.perf_counter() - t0, solver,
                          walker.walk)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, probe, batches: Iterable[torch.Tensor], *,
                      fraction: float = 0.5, max_batches: int = 4) -> dict[str, float]:
    """Data-driven weights for the global budget (``plan(..., sensitivity=)``).

    The budget trades each layer's *weight* error (its spectral tail) per MAC saved; but a
    relative error of 0.3 in one layer can cost the network far more than in another.
    ``probe`` is the plan of the rules under a budget that keeps everything
    (``plan(model, rules, input_size, target={"macs": 1.0})``): its rows kept dense by the
    budget are the layers a budgeted rule (no rank policy) matches. For each, this replaces
    that layer alone by its decomposition at ``fraction`` of its rank, measures the
    relative change of the model's output on up to ``max_batches`` calibration batches,
    ``E = ||f'(x) - f(x)||^2 / ||f(x)||^2``, and returns ``E / e^2`` with ``e`` the
    spectral error at that rank: the factor that turns the layer's weight error into output
    error. The allocation then minimises the summed (first-order, additive) output error.
    """
    xs = input_tensors(batches)[:max_batches]
    if not xs:
        raise ValueError("layer_sensitivity needs at least one calibration batch")
    with eval_mode(model):
        ys = [model(x) for x in xs]
        den = sum(float(y.float().square().sum()) for y in ys)
        weights: dict[str, float] = {}
        # the layers the budget ranks (the others: refused by their method, or ranked by
        # their own rule)
        for rep in track([r for r in probe.replacements if r.skip is Skip.BUDGET],
                         "sensitivity", label=lambda r: r.name):
            layer = get_module(model, rep.name)
            dec, opts = get_decomposer(rep.method), rep.options
            if dec.chooses:  # auto: probe with the first method that takes the layer
                dec, opts = dec.members(layer, **opts)[0], {}
            r = dec.scale_rank(layer, fraction, **opts)
            e = tail_error(dec.spectra(layer, **opts), r)
            new = dec.decompose(layer, r, **opts).eval()
            set_module(model, rep.name, new)
            try:
                num = sum(float((model(x) - y).float().square().sum()) for x, y in zip(xs, ys))
            finally:
                set_module(model, rep.name, layer)
            weights[rep.name] = (num / max(den, 1e-30)) / max(e * e, 1e-12)
    return weights


def _logits_gap(student: nn.Module, xs: list[torch.Tensor], ts: list[torch.Tensor],
                temperature: float) -> tuple[float, float]:
    """Mean distillation loss and agreement of ``student`` with the teacher's logits ``ts``."""
    with torch.no_grad(), eval_mode(student):
        loss = agree = n = 0.0
        for x, t in track(zip(xs, ts), "agreement with the original, batch"):
            s = student(x).float()
            loss += float(kd_divergence(s, t, temperature)) * len(x)
            agree += float((s.argmax(1) == t.argmax(1)).sum())
            n += len(x)
    return loss / max(n, 1.0), 100.0 * agree / max(n, 1.0)


def _feature_gap(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Mean over layers of ``||s - t||^2 / ||t||^2``: each layer's output error relative to
    the original layer's output, so layers of every scale weigh alike."""
    terms = [(student[n].float() - t).square().sum() / t.square().sum().clamp_min(1e-12)
             for n, t in teacher.items()]
    return torch.stack(terms).mean()


def distill_outputs(original: nn.Module, compressed: nn.Module, batches: list[torch.Tensor],
                    config: CalibrationDistill | dict[str, Any] | None = None, *, seed: int = 0,
                    layers: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Train every parameter of ``compressed`` to reproduce ``original``'s outputs on the
    calibration ``batches`` (no labels), as ``config`` says
    (:class:`~compresscnn.fit.config.CalibrationDistill`, a mapping of its keys, or None for
    its defaults): ``epochs`` passes of Adam at ``lr`` with a cosine decay, loss
    ``T^2 KL(p_original || p_compressed)`` at ``temperature``, each batch mirrored
    left-right with probability 1/2 when ``flip``, and with ``mix`` mixed within itself
    (:func:`~compresscnn.util.training.mix_batch`, the original's outputs on the mixed images
    computed at each step: one more forward pass of the original per step). Both models stay
    in eval mode, so BatchNorm running statistics are not re-estimated from the few batches
    (their affine parameters are trained). Where the layer-wise fit makes each layer match
    on its own, this lets the layers correct one another's errors (the end-to-end stage of
    layer-wise-then-global schemes such as Zhang et al. 2015's). ``features`` > 0 adds, at
    that weight, the replaced ``layers``' output errors (each relative to the original
    layer's output, averaged over the layers; the original's outputs computed at each step):
    many more targets per image than the logits alone, a layer-wise distillation for when
    the images are few (the cross-distillation of Bai et al. 2020 without its mixing of the
    two networks). ``crop`` < 1 crops every image to a random box of at least that area
    fraction (:func:`~compresscnn.util.training.crop_batch`, before the mixing; the
    original's outputs computed on the crops) and ``warmup`` ramps the rate up over that
    fraction of the steps before the cosine decay, so Adam's first, poorly estimated steps
    do not undo the layer-wise fit. ``holdout`` > 0 keeps the last that many batches out of
    training: the KL on them is measured before training and after every pass, and the
    weights of the pass where it was lowest are restored at the end (pass 0: no
    distillation). Returns the loss and agreement on the batches before and after (the
    training batches; with a holdout also on the held-out ones, per pass), the pass kept,
    the steps and the seconds."""
    cfg = CalibrationDistill.coerce(config, "distill_outputs()")
    t0 = time.perf_counter()
    run = _Distillation(original, compressed, cfg, batches, layers)
    before = _logits_gap(compressed, run.batches, run.teacher, cfg.temperature)
    if run.held:
        run.keep.on_epoch_end(0, compressed)  # pass 0: the layer-wise fit alone
    steps = run.train(torch.Generator().manual_seed(int(seed)))
    held_stats: dict[str, Any] = {"holdout": len(run.held)}
    if run.held:
        run.best.restore(compressed)
        held_stats.update(kept_pass=run.best.epoch,
                          holdout_loss=[h["score"] for h in run.best.history],
                          holdout_agreement=run.agreement)
    after = _logits_gap(compressed, run.batches, run.teacher, cfg.temperature)
    return {**held_stats, "epochs": cfg.epochs, "steps": steps, "lr": cfg.lr,
            "temperature": cfg.temperature, "flip": cfg.flip, "mix": cfg.mix,
            "mix_alpha": cfg.mix_alpha, "amp": "bf16" if run.amp else "off",
            "features": cfg.features, "feature_layers": len(run.names), "crop": cfg.crop,
            "warmup": cfg.warmup,
            "loss_before": before[0], "loss_after": after[0],
            "agreement_before": before[1], "agreement_after": after[1],
            "seconds": time.perf_counter() - t0}


def _keep_output(store: dict[str, torch.Tensor]):
    def keep(name: str, _mod: nn.Module, _args: tuple, out: Any) -> None:
        store[name] = out.float().clone()  # a copy: an in-place activation may follow
    return keep


class _Distillation:
    """One :func:`distill_outputs` run: its batches (training and held out), the original's
    outputs on them, and the steps."""

    def __init__(self, original: nn.Module, compressed: nn.Module, cfg: CalibrationDistill,
                 batches: list[torch.Tensor], layers: list[str] | tuple[str, ...]) -> None:
        if not batches:
            raise ValueError("distill_outputs needs at least one calibration batch")
        n_held = int(cfg.holdout)
        if n_held >= len(batches):
            raise ValueError(f"distill holdout: {n_held} leaves none of the {len(batches)} "
                             "calibration batches to distil on")
        self.batches = list(batches[:len(batches) - n_held])
        self.held = list(batches[len(batches) - n_held:])
        self.original, self.compressed, self.cfg = original, compressed, cfg
        self.names = list(layers) if cfg.features > 0 else []
        if cfg.features > 0 and not self.names:
            raise ValueError("distill features: needs the names of the replaced layers to match")
        self.amp = resolve_amp(cfg.amp, torch.device("cpu")) is not None
        # the original runs on each step's own input when it is changed at every step
        self.live = cfg.mix != "none" or bool(self.names) or cfg.crop < 1.0
        with torch.no_grad(), eval_mode(original):
            self.teacher = [original(x).float()
                            for x in track(self.batches, "original's outputs, batch")]
            self.mirrored = ([original(x.flip(-1)).float() for x in
                              track(self.batches, "original's outputs, mirrored batch")]
                             if cfg.flip and not self.live else None)
            self.held_teacher = [original(x).float() for x in self.held]
        self.keep = KeepBest(self.held_loss, BestWeights(better=lambda new, old: new < old))
        self.best = self.keep.best
        self.agreement: list[float] = []
        self.target: dict[str, torch.Tensor] = {}  # this step's layer outputs, original
        self.got: dict[str, torch.Tensor] = {}     # and compressed

    def held_loss(self, model: nn.Module) -> float:
        """The KL on the held-out batches (:class:`~compresscnn.train.engine.KeepBest`'s
        score, lower is better); the agreement is recorded beside it."""
        loss, agree = _logits_gap(model, self.held, self.held_teacher, self.cfg.temperature)
        self.agreement.append(agree)
        return loss

    def inputs(self, i: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i`` as this step sees it (flipped, cropped, mixed) and its targets."""
        x, t, cfg = self.batches[i], self.teacher[i], self.cfg
        if self.live:  # the original's outputs (and layer outputs) on this very input
            if cfg.flip and random_flip(gen):
                x = x.flip(-1)
            x = crop_batch(x, cfg.crop, gen)
            x = mix_batch(x, cfg.mix, cfg.mix_alpha, gen)
            with torch.no_grad():
                t = self.original(x).float()
        elif self.mirrored is not None and random_flip(gen):
            x, t = x.flip(-1), self.mirrored[i]
        return x, t

    def loss(self, i: int, gen: torch.Generator) -> torch.Tensor:
        """The loss of one step on batch ``i`` (its forward pass under the engine's
        autocast)."""
        x, t = self.inputs(i, gen)
        with self.engine.autocast():
            out = self.compressed(x)
        loss = kd_divergence(out, t, self.cfg.temperature)
        if self.names:
            loss = loss + self.cfg.features * _feature_gap(self.got, self.target)
        return loss

    def train(self, gen: torch.Generator) -> int:
        """Every pass (held-out batches scored after each); the optimizer steps taken."""
        cfg, compressed, original = self.cfg, self.compressed, self.original
        steps = cfg.epochs * len(self.batches)
        opt = build_optimizer(compressed, "adam", lr=cfg.lr)
        device = self.batches[0].device.type
        self.engine = Engine(compressed, opt,
                             lr_schedule(opt, steps, warmup_steps=int(round(cfg.warmup * steps))),
                             amp=(device, torch.bfloat16 if self.amp and device == "cpu" else None),
                             callbacks=[self.keep] if self.held else ())

        def step(i: int) -> bool:
            self.engine.update(self.loss(i, gen))
            return False

        with eval_mode(compressed, original), \
                hooks([(n, get_module(original, n)) for n in self.names],
                      _keep_output(self.target)), \
                hooks([(n, get_module(compressed, n)) for n in self.names],
                      _keep_output(self.got)):
            for k in track(range(cfg.epochs), "distill epoch"):
                self.engine.run_epoch(torch.randperm(len(self.batches), generator=gen).tolist(),
                                      step)
                self.engine.end_epoch(k + 1)
        return self.engine.step
