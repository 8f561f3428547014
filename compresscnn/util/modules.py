"""Leaf helpers on ``nn.Module``: dotted-path get/set, a mode for the length of a block,
forward hooks for the length of a block, the inputs submodules receive, seeded example
inputs and torch's thread count for a block.

This module imports only torch and the standard library, so every other module of the
package may use it and it never takes part in an import cycle.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["get_module", "set_module", "module_mode", "eval_mode", "hooks", "record_inputs",
           "input_tensors", "module_device", "example_input", "num_threads", "parallel_iter", "parallel_map",
           "kd_divergence"]


# ----------------------------------------------------------------------- dotted paths
def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name`` (``"layer1.0.conv1"``, ``"features.3"``)."""
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (works inside Sequential/ModuleList)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


# ----------------------------------------------------------------------- modes and hooks
@contextlib.contextmanager
def module_mode(*models: nn.Module | None, training: bool) -> Iterator[None]:
    """Put ``models`` (``None`` entries are skipped) in train (``training=True``) or eval
    mode for the block; afterwards every submodule gets the mode it had back (a model in
    train mode with a frozen BatchNorm in eval mode stays so), also on an error."""
    modes = [[(sub, sub.training) for sub in m.modules()] for m in models if m is not None]
    try:
        for subs in modes:
            subs[0][0].train(training)
        yield
    finally:
        for subs in modes:
            for sub, was in subs:
                sub.training = was


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Give every submodule of ``model`` its train/eval mode, and every parameter its
    ``requires_grad``, back after the block (also on an error): what the API promises a
    caller's model (it reads the model, never changes it)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was
        for p, req in grads:
            if p.requires_grad != req:
                p.requires_grad_(req)


def eval_mode(*models: nn.Module | None) -> contextlib.AbstractContextManager[None]:
    """``module_mode(*models, training=False)``."""
    return module_mode(*models, training=False)


@contextlib.contextmanager
def hooks(modules: Iterable[tuple[str, nn.Module]], fn: Callable[..., Any], *,
          pre: bool = False) -> Iterator[None]:
    """Call ``fn(name, module, args, output)`` after every call of each ``(name, module)``
    during the block (``pre=True``: ``fn(name, module, args)`` before it); the hooks are
    removed afterwards, also on an error. What ``fn`` returns is ignored, so a hook never
    changes the inputs or outputs it sees; it may raise to cut a forward pass short."""
    handles = []

    def pre_hook(name: str) -> Callable[..., None]:
        def call(mod: nn.Module, args: tuple) -> None:
            fn(name, mod, args)
        return call

    def post_hook(name: str) -> Callable[..., None]:
        def call(mod: nn.Module, args: tuple, out: Any) -> None:
            fn(name, mod, args, out)
        return call

    try:
        for name, mod in modules:
            handles.append(mod.register_forward_pre_hook(pre_hook(name)) if pre
                           else mod.register_forward_hook(post_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def record_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """The first tensor input each named submodule receives in one eval-mode forward pass
    of ``model`` on ``x`` (copies, outside autograd)."""
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise KeyError(f"no submodule(s) {missing} in {type(model).__name__}")
    recorded: dict[str, torch.Tensor] = {}

    def keep(name: str, _mod: nn.Module, args: tuple) -> None:
        if name not in recorded and args and isinstance(args[0], torch.Tensor):
            recorded[name] = args[0].detach().clone()

    with hooks([(n, mods[n]) for n in names], keep, pre=True), eval_mode(model), \
            torch.inference_mode():
        model(x)
    not_called = [n for n in names if n not in recorded]
    if not_called:
        raise RuntimeError(f"submodule(s) {not_called} were not called in the forward pass")
    return recorded


def input_tensors(batches: Iterable[Any]) -> list[torch.Tensor]:
    """The input tensor of every batch: the batch itself, or the first item of an
    ``(input, label)`` pair."""
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]


# ----------------------------------------------------------------------- inputs, threads
def module_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (else buffer); ``None`` when it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def example_input(input_size: Sequence[int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A standard-normal float32 CPU tensor ``(batch, *input_size)``, the same for the same
    ``seed`` (what latency figures and export checks feed a model)."""
    return torch.randn((int(batch), *[int(s) for s in input_size]),
                       generator=torch.Generator().manual_seed(int(seed)))


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the duration of the block, then the old value back
    (``None`` or 0 leaves it as it is)."""
    old = torch.get_num_threads()
    if n is not None and n > 0:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def parallel_iter(fn: Callable[[Any], Any], items: Sequence[Any],
                  workers: int | None = None,
                  cost: Callable[[Any], float] | None = None) -> Iterator[Any]:
    """``fn(x)`` for each of ``items``, yielded in their order, up to ``workers`` calls at a
    time (default: torch's intra-op thread count) in threads of this process, torch on one
    intra-op thread until the last is yielded. For many independent small linear-algebra
    problems (the CP-ALS fits of a ResNet's convs at several ranks, matrices of a few hundred
    rows), which one thread runs about as fast as two: run side by side, every core works.
    ``cost`` (an estimate of each call's time) starts the longest calls first, so that the
    short ones fill the other workers' time instead of one long call ending alone (the
    results are still yielded in the items' order). The results are those sequential calls
    give, as long as each call seeds its own randomness; the first exception raised
    propagates (calls not started are cancelled). torch's thread count is restored."""
    n = min(torch.get_num_threads() if workers is None else int(workers), len(items))
    if n <= 1:
        for x in items:
            yield fn(x)
        return
    order = range(len(items)) if cost is None else sorted(
        range(len(items)), key=lambda i: -float(cost(items[i])))
    with num_threads(1):
        pool = ThreadPoolExecutor(n)
        try:
            futures = {i: pool.submit(fn, items[i]) for i in order}
            for i in range(len(items)):
                yield futures[i].result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any],
                 workers: int | None = None,
                 cost: Callable[[Any], float] | None = None) -> list[Any]:
    """``list(parallel_iter(fn, items, workers, cost))``: see :func:`parallel_iter`."""
    return list(parallel_iter(fn, items, workers, cost))


# ----------------------------------------------------------------------- distillation
def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` of the softmaxes at temperature ``T`` (Hinton et al. 2015),
    averaged over the batch (``batchmean``, the true mean of per-sample KL). Computed in
    float32 whatever the autocast dtype of the logits (a softmax at T=4 in bf16 loses most of
    the soft targets' information); the teacher's logits are detached."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                    F.log_softmax(teacher_logits.detach().float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
