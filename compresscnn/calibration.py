"""Calibration: what a few batches of training images do for a compressed model.

``recalibrate_bn`` re-estimates BatchNorm running statistics (a cumulative average over
the batches, as torch.optim.swa_utils.update_bn does) after layers were replaced: the
decomposed layers' outputs differ slightly from the original ones, so the statistics the
following BatchNorms hold no longer match what they see.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


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
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    try:
        for x in batches:
            model(x.to(device))
    finally:
        for m in bns:
            m.momentum = momenta[m]
        model.train(was_training)
    return len(bns)


def _capture(model: nn.Module, name: str, batches: list[torch.Tensor], what: str
             ) -> list[torch.Tensor]:
    """The input (``what="in"``) or output (``"out"``) of submodule ``name`` per batch."""
    mod = model.get_submodule(name)
    got: list[torch.Tensor] = []

    def hook(_m, inputs, output):
        got.append((inputs[0] if what == "in" else output).detach())
        raise _Stop  # nothing after this layer is needed

    h = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        h.remove()
    return got


class _Stop(Exception):
    pass


@torch.no_grad()
def execution_order(model: nn.Module, x: torch.Tensor, types: tuple[type, ...]) -> list[str]:
    """Names of ``model``'s submodules of ``types`` in the order one forward pass on ``x``
    first calls them."""
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n) if n not in seen
                                         else None)
             for n, m in model.named_modules() if isinstance(m, types)]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen


def following_ops(model: nn.Module, through: str = "activation"
                  ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """``{layer name: tail}`` for every Conv/Linear whose output feeds, alone, a chain of a
    BatchNorm (``through="bn"``) and/or a ReLU/ReLU6 (``"activation"``, Zhang et al. 2015's
    nonlinear response reconstruction), found on a ``torch.fx`` trace. ``tail`` applies that
    chain (BatchNorm with its running statistics, as in eval mode). Layers whose output goes
    anywhere else (a residual sum, two consumers) get no entry; models fx cannot trace give
    ``{}``."""
    import torch.nn.functional as F
    from torch import fx

    if through == "layer":
        return {}
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no tails
        return {}
    mods = dict(gm.named_modules())
    acts = {F.relu: torch.relu, torch.relu: torch.relu, F.relu6: F.relu6}

    def step(node) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if node.op == "call_module":
            m = mods.get(node.target)
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                    and len(node.args) == 1):
                bn = model.get_submodule(node.target)
                return lambda t: F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight,
                                              bn.bias, False, 0.0, bn.eps)
            if through == "activation" and isinstance(m, nn.ReLU):
                return torch.relu
            if through == "activation" and isinstance(m, nn.ReLU6):
                return F.relu6
        elif (through == "activation" and node.op == "call_function"
              and node.target in acts and len(node.args) == 1):
            return acts[node.target]
        elif through == "activation" and node.op == "call_method" and node.target == "relu":
            return torch.relu
        return None

    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
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
            out[node.target] = _compose(chain)
    return out


def _compose(fs: list[Callable[[torch.Tensor], torch.Tensor]]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    def tail(t: torch.Tensor) -> torch.Tensor:
        for f in fs:
            t = f(t)
        return t
    return tail


def reconstruct_outputs(original: nn.Module, compressed: nn.Module, names: list[str],
                        batches: list[torch.Tensor], *, steps: int = 200, lr: float = 1e-3,
                        tails: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                        ) -> dict[str, dict[str, float]]:
    """Data-aware refinement: fit each replaced layer to the original layer's *output*.

    Layer by layer in model order, the replacement's parameters are fitted (Adam on the
    mean squared error) so that, on the compressed model's own input to that layer, it
    reproduces what the original layer outputs on the original model's input. Using the
    compressed model's inputs but the original model's outputs is the "asymmetric"
    reconstruction of Zhang et al. (2015, "Accelerating very deep convolutional networks
    for classification and detection", sec. 3.3): each layer also corrects the error that
    the layers before it left. It optimises the same objective as their closed form (the
    layer's response error) and works for every method, Fire's ReLU included.

    ``tails`` (``{name: f}``, see :func:`following_ops`) fits ``f(layer(x))`` to ``f(y)``
    instead: the output after the BatchNorm (an error in a channel the BatchNorm divides by a
    small running std is amplified) and the ReLU (an error where both are negative does not
    matter) that follow the layer, which is what the rest of the network sees.

    Returns, per layer, the relative output error ``||f(x) - y|| / ||y||`` (after the tail,
    when one is given) before and after. Both models are left in eval mode.
    """
    original.eval()
    compressed.eval()
    out: dict[str, dict[str, float]] = {}
    for name in names:
        xs = _capture(compressed, name, batches, "in")
        ys = _capture(original, name, batches, "out")
        mod = compressed.get_submodule(name)
        params = [p for p in mod.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)

        tail = (tails or {}).get(name) or (lambda t: t)
        with torch.no_grad():
            ys = [tail(y) for y in ys]

        def rel_error() -> float:
            with torch.no_grad():
                num = sum(float((tail(mod(x)) - y).square().sum()) for x, y in zip(xs, ys))
                den = sum(float(y.square().sum()) for y in ys)
            return (num / max(den, 1e-30)) ** 0.5

        before = rel_error()
        best = (before, {k: v.clone() for k, v in mod.state_dict().items()})
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        scale = [float(y.square().mean()) + 1e-12 for y in ys]
        with torch.enable_grad():
            for step in range(steps):
                i = step % len(xs)
                loss = (tail(mod(xs[i])) - ys[i]).square().mean() / scale[i]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        after = rel_error()
        if not after < best[0]:  # never make a layer worse than its data-free init
            mod.load_state_dict(best[1])
            after = best[0]
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        out[name] = {"before": before, "after": after}
    return out


@torch.no_grad()
def layer_sensitivity(model: nn.Module, rules, input_size, batches: Iterable[torch.Tensor], *,
                      fraction: float = 0.5, max_batches: int = 4) -> dict[str, float]:
    """Data-driven weights for the global budget (``plan(..., sensitivity=)``).

    The budget trades each layer's *weight* error (its spectral tail) per MAC saved; but a
    relative error of 0.3 in one layer can cost the network far more than in another. For
    every layer a budgeted rule (no rank policy) matches, this replaces that layer alone by
    its decomposition at ``fraction`` of its rank, measures the relative change of the
    model's output on up to ``max_batches`` calibration batches,
    ``E = ||f'(x) - f(x)||^2 / ||f(x)||^2``, and returns ``E / e^2`` with ``e`` the
    spectral error at that rank: the factor that turns the layer's weight error into output
    error. The allocation then minimises the summed (first-order, additive) output error.
    """
    from .decomposers import get_decomposer
    from .ranks import tail_error
    from .surgery import get_module, plan, set_module

    p = plan(model, rules, input_size, target={"macs": 1.0})
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches][:max_batches]
    if not xs:
        raise ValueError("layer_sensitivity needs at least one calibration batch")
    was = model.training
    model.eval()
    try:
        ys = [model(x) for x in xs]
        den = sum(float(y.float().square().sum()) for y in ys)
        weights: dict[str, float] = {}
        for rep in p.replacements:
            if rep.skipped != "kept dense by the budget":
                continue  # refused by its method, or ranked by its own rule
            layer = get_module(model, rep.name)
            dec = get_decomposer(rep.method)
            r = dec.scale_rank(layer, fraction, **rep.options)
            e = tail_error(dec.spectra(layer, **rep.options), r)
            new = dec.decompose(layer, r, **rep.options).eval()
            set_module(model, rep.name, new)
            try:
                num = sum(float((model(x) - y).float().square().sum()) for x, y in zip(xs, ys))
            finally:
                set_module(model, rep.name, layer)
            weights[rep.name] = (num / max(den, 1e-30)) / max(e * e, 1e-12)
    finally:
        model.train(was)
    return weights
