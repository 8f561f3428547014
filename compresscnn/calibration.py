"""Calibration: what a few batches of training images do for a compressed model.

``recalibrate_bn`` re-estimates BatchNorm running statistics (a cumulative average over
the batches, as torch.optim.swa_utils.update_bn does) after layers were replaced: the
decomposed layers' outputs differ slightly from the original ones, so the statistics the
following BatchNorms hold no longer match what they see.
"""

from __future__ import annotations

from typing import Iterable

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


def reconstruct_outputs(original: nn.Module, compressed: nn.Module, names: list[str],
                        batches: list[torch.Tensor], *, steps: int = 200, lr: float = 1e-3,
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

    Returns, per layer, the relative output error ``||f(x) - y|| / ||y||`` before and after.
    Both models are left in eval mode.
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

        def rel_error() -> float:
            with torch.no_grad():
                num = sum(float((mod(x) - y).square().sum()) for x, y in zip(xs, ys))
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
                loss = (mod(xs[i]) - ys[i]).square().mean() / scale[i]
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
