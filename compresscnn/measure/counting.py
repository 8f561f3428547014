"""Counting parameters and multiply-accumulates (MACs).

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on one input
sample: the counter sees every matmul and convolution the model really runs, so the
number is the same whichever way a layer is written. This is the convention of
torchvision's published ``_ops`` ("GFLOPS": it counts a multiply-add as one), which the
tests check for resnet18 (1.814) and alexnet (0.714).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compresscnn.errors import ModelError
from compresscnn.util.modules import eval_mode, hooks


#: inputs larger than this many values (4 GiB of float32) are refused before allocation
MAX_INPUT_VALUES = 1 << 30


def _example(model: nn.Module, input_size: Sequence[int], batch: int = 1) -> torch.Tensor:
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    if math.prod(int(d) for d in input_size) * batch > MAX_INPUT_VALUES:
        raise ModelError(f"input_size {list(input_size)}: more than {MAX_INPUT_VALUES:,} "
                         f"values in one input")
    return torch.zeros((batch, *input_size), dtype=dtype, device=device)


def _run_once(model: nn.Module, input_size: Sequence[int]) -> None:
    """One forward pass on a zero input; an input the model cannot take is a ModelError."""
    x = _example(model, input_size)
    try:
        model(x)
    except (RuntimeError, ValueError, IndexError) as exc:
        if x.device.type == "meta" or "meta" in str(exc):
            raise ModelError("the model's weights are on the meta device (no values); "
                             "load its weights before compressing it") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"input_size {list(input_size)}: the model cannot run on an input "
                         f"of this shape ({first})") from None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """``{"params", "macs"}`` of ``model`` for one input of shape ``input_size`` (C, H, W).

    The model is run once in eval mode (its train/eval state is restored).
    """
    with eval_mode(model), FlopCounterMode(display=False) as fc:
        _run_once(model, input_size)
    flops = fc.get_total_flops()
    return {"params": count_params(model), "macs": int(flops // 2)}


@dataclass
class LayerInfo:
    """What ``plan`` needs to know about one Conv2d/Linear of a model."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]   # one sample, without the batch dimension
    out_shape: tuple[int, ...]

    @property
    def in_hw(self) -> tuple[int, int] | None:
        if isinstance(self.module, nn.Conv2d):
            return (int(self.in_shape[-2]), int(self.in_shape[-1]))
        return None

    @property
    def tokens(self) -> int:
        """How many times per sample a Linear runs (1 on (N, C) input; H*W on (N, H, W, C))."""
        if isinstance(self.module, nn.Linear):
            n = 1
            for d in self.in_shape[:-1]:
                n *= int(d)
            return n
        return 1

    @property
    def type(self) -> str:
        return type(self.module).__name__


@torch.no_grad()
def trace_layers(model: nn.Module, input_size: Sequence[int],
                 types: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> dict[str, LayerInfo]:
    """Run one forward pass and record the input/output shape of every layer of ``types``.

    A layer that is never called (dead code in the graph) is left out. A layer called more
    than once keeps its first call's shapes.
    """
    infos: dict[str, LayerInfo] = {}

    def keep(name: str, mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if name not in infos and inputs and isinstance(inputs[0], torch.Tensor):
            infos[name] = LayerInfo(name, mod, tuple(inputs[0].shape[1:]),
                                    tuple(output.shape[1:]))

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    with hooks(layers, keep), eval_mode(model):
        _run_once(model, input_size)
    # keep the model's module order, not the call order
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(infos.items(), key=lambda kv: order[kv[0]]))
