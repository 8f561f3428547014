"""The one training engine: what fine-tuning, training from scratch, the Cuttlefish switch
(:func:`compresscnn.train.loop.finetune`) and label-free distillation on calibration images
(:func:`compresscnn.fit.calibration.distill_outputs`) share. Each caller brings its loss and
its callbacks; the engine holds the rest:

* the optimizer's parameter groups (no weight decay on biases and norms, ``factor_lr`` for
  the factor chains the decomposers build) and the optimizers (:func:`build_optimizer`);
* the per-step learning-rate schedule with linear warm-up (:func:`lr_schedule`, one
  ``LambdaLR`` over :func:`compresscnn.util.common.lr_factor`);
* autocast (bf16 or fp16, with a grad scaler for fp16) and gradient clipping;
* the step loop with its callbacks (:class:`Engine`: ``penalty()`` added to the loss,
  ``after_step(step)``, ``on_epoch_end(epoch, model) -> stop``);
* the weights of the best-scoring epoch (:class:`KeepBest`, over
  :class:`compresscnn.util.training.BestWeights`).

It knows nothing of data sets, checkpoints files or models' sources, so that the fit (below
the training room) can use it. Imports torch, ``train.config``, ``util`` and ``errors``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from compresscnn.errors import CompressError, MethodError
from compresscnn.train.config import OPTIMIZERS
from compresscnn.util.common import lr_factor, unwrap_model
from compresscnn.util.training import BestWeights

__all__ = ["Factor", "factor_chain", "factorized_layers", "factor_lr_scale", "param_groups",
           "build_optimizer", "lr_schedule", "hooks_named", "Engine", "KeepBest"]

Factor = nn.Conv2d | nn.Linear


# --------------------------------------------------------------------------- factor chains
def factor_chain(module: nn.Module, name: str) -> list[Factor]:
    """The factors of a factorized layer: an ``nn.Sequential`` of at least two plain
    ``nn.Conv2d`` (or two ``nn.Linear``) modules, as the chain decomposers build it."""
    kids = list(module.children()) if isinstance(module, nn.Sequential) else []
    if len(kids) >= 2 and (all(type(k) is nn.Conv2d for k in kids)
                           or all(type(k) is nn.Linear for k in kids)):
        return kids
    raise MethodError(f"{name}: a {type(module).__name__} is not a factorized layer (an "
                      f"nn.Sequential of plain Conv2d or Linear factors, what tucker2, cp, "
                      f"spatial and svd build)")


def factorized_layers(model: nn.Module) -> list[str]:
    """Names of the factorized layers of ``model``: every ``nn.Sequential`` of two or more
    plain Conv2d (or Linear) modules and nothing else."""
    out = []
    for name, mod in unwrap_model(model).named_modules():
        if name and isinstance(mod, nn.Sequential):
            try:
                factor_chain(mod, name)
            except MethodError:
                continue
            out.append(name)
    return out


def factor_lr_scale(model: nn.Module, factor_lr: float) -> dict[str, float]:
    """``factor_lr`` for every factorized layer of ``model`` (:func:`param_groups`'
    ``lr_scale``)."""
    return {name: factor_lr for name in factorized_layers(model)}


# --------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float,
                 lr_scale: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Weights that decay, and 1-D parameters (biases, BatchNorm/LayerNorm scales and
    shifts) that do not — decaying a BN scale towards 0 only fights the normalisation (the
    convention of timm's ``param_groups_weight_decay`` and of most ImageNet recipes).

    ``lr_scale`` maps module names to a multiplier of the learning rate for the parameters
    under them (e.g. the factors of decomposed layers); each distinct multiplier other than
    1 gets its own pair of groups, with the multiplier under the key ``"lr_scale"``."""
    scales = {str(k): float(v) for k, v in (lr_scale or {}).items()}
    for name, mult in scales.items():
        if not (math.isfinite(mult) and mult > 0):
            raise CompressError(f"lr scale of {name!r}: must be a positive number, got {mult!r}")

    def scale_of(param_name: str) -> float:
        for prefix, mult in scales.items():
            if param_name == prefix or param_name.startswith(prefix + "."):
                return mult
        return 1.0

    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        buckets.setdefault((scale_of(name), p.ndim <= 1), []).append(p)
    groups = []
    for (mult, no_decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] != 1.0, kv[0])):
        group: dict[str, Any] = {"params": params,
                                 "weight_decay": 0.0 if no_decay else float(weight_decay)}
        if mult != 1.0:
            group["lr_scale"] = mult
        groups.append(group)
    if not groups:
        raise CompressError("finetune: the model has no trainable parameters")
    return groups


def build_optimizer(
    model: nn.Module, name: str = "sgd", *, lr: float = 0.01, momentum: float = 0.9,
    weight_decay: float = 5e-4, lr_scale: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """SGD (momentum, ``nesterov=False``) or AdamW (``betas=(momentum, 0.999)``), over
    :func:`param_groups`; a group with an ``lr_scale`` starts at ``lr`` times it (schedules
    scale every group alike). ``"adam"``: plain Adam (torch's defaults) over every trainable
    parameter in one group, what calibration distillation trains with."""
    key = str(name).lower()
    if key == "adam":
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    groups = param_groups(model, weight_decay, lr_scale)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise CompressError(f"optimizer: unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


def lr_schedule(opt: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's rate times :func:`~compresscnn.util.common.lr_factor` of the 0-based
    step (warm-up, then ``schedule`` to ``total_steps``), stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, total_steps, warmup_steps=warmup_steps, schedule=schedule))


# --------------------------------------------------------------------------- the loop
def hooks_named(callbacks: Sequence[Any], name: str) -> list[Callable[..., Any]]:
    """The callables named ``name`` of the callbacks that have one, in order."""
    return [getattr(c, name) for c in callbacks if callable(getattr(c, name, None))]


class Engine:
    """The steps of one training run. ``model``: what is trained (its parameters are
    clipped, its epoch-end callbacks see it); ``opt`` and ``sched``: from
    :func:`build_optimizer` and :func:`lr_schedule`; ``amp``: ``(device type, dtype or
    None)`` of :meth:`autocast` (fp16 adds a grad scaler); ``clip_grad_norm``: the global L2
    norm of the gradients, None or 0: off. ``callbacks``: objects with any of ``penalty() ->
    Tensor`` (added to every step's loss), ``after_step(step)`` (after each optimizer step,
    with the 1-based step) and ``on_epoch_end(epoch, model) -> bool`` (True: stop after it).

    A caller's step computes its loss (the forward passes it wants autocast inside
    :meth:`autocast`) and hands it to :meth:`update`; :meth:`run_epoch` walks a pass of
    batches with such a step, :meth:`end_epoch` runs the epoch-end callbacks."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, *,
                 amp: tuple[str, torch.dtype | None] = ("cpu", None),
                 clip_grad_norm: float | None = None, callbacks: Sequence[Any] = ()) -> None:
        self.model, self.opt, self.sched = model, opt, sched
        self.device_type, self.amp_dtype = amp
        self.scaler = torch.amp.GradScaler(self.device_type,
                                           enabled=self.amp_dtype == torch.float16)
        self.clip_grad_norm = clip_grad_norm
        self.penalties = hooks_named(callbacks, "penalty")
        self.after_step = hooks_named(callbacks, "after_step")
        self.epoch_end = hooks_named(callbacks, "on_epoch_end")
        self.step = 0

    def autocast(self) -> torch.autocast:
        """The forward passes' precision (a no-op without amp)."""
        return torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    @property
    def lr(self) -> float:
        """The base rate of the next step, as scheduled (before any group's ``lr_scale``)."""
        group = self.opt.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """One optimizer step on ``loss`` plus the callbacks' penalties (returned): backward
        (scaled under fp16), clipping, the step, the schedule, then ``after_step``."""
        for pen in self.penalties:
            loss = loss + pen()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.step += 1
        for hook in self.after_step:
            hook(self.step)
        return loss

    @staticmethod
    def run_epoch(batches: Iterable[Any], step: Callable[[Any], bool]) -> bool:
        """``step(batch)`` for each batch until one returns True; whether any batch came."""
        fetched = False
        for batch in batches:
            fetched = True
            if step(batch):
                break
        return fetched

    def end_epoch(self, epoch: int) -> bool:
        """The ``on_epoch_end`` callbacks after 1-based ``epoch``; True when one stops."""
        stop = False
        for hook in self.epoch_end:
            stop = bool(hook(epoch, self.model)) or stop
        return stop

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class KeepBest:
    """Keep-best as an epoch-end callback: ``score(model)`` after every epoch goes to
    ``best`` (a :class:`~compresscnn.util.training.BestWeights`: higher is better by
    default), which keeps the weights of the best epoch; the model's train/eval mode is
    restored after scoring. ``on_score(epoch, score)`` (if given) sees every score."""

    def __init__(self, score: Callable[[nn.Module], float], best: BestWeights | None = None,
                 on_score: Callable[[int, float], Any] | None = None) -> None:
        self.score, self.on_score = score, on_score
        self.best = best if best is not None else BestWeights()

    def on_epoch_end(self, epoch: int, model: nn.Module) -> bool:
        training = model.training
        value = float(self.score(model))
        self.best.update(epoch, value, model)
        model.train(training)
        if self.on_score is not None:
            self.on_score(epoch, value)
        return False
