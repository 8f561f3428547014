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


#: where the classes of quantized, QAT and observed modules live (their layers are not the
#: float Conv2d/Linear a decomposition takes)
_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized",
              "torch.nn.intrinsic.quantized", "torch.ao.nn.qat", "torch.nn.qat",
              "torch.ao.nn.intrinsic.qat", "torch.ao.quantization", "torch.quantization")


def check_supported(model: nn.Module, where: str = "model") -> None:
    """Refuse, with one line saying what to do instead, the models whose layers cannot be
    swapped for their decompositions: TorchScript modules (scripted or traced), torch.fx
    GraphModules (their generated code, not their modules, decides what runs) and quantized,
    QAT or observed modules."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{where}: a TorchScript module ({type(model).__name__}) is not "
                         f"supported: its layers cannot be replaced; compress the nn.Module it "
                         f"was scripted or traced from, then script or trace the result")
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):
        raise ModelError(f"{where}: a torch.fx GraphModule is not supported: its generated "
                         f"code, not its modules, decides what runs; compress the nn.Module "
                         f"it was traced from, then trace the result")
    found = [(n or "(the model)", type(m).__name__) for n, m in model.named_modules()
             if type(m).__module__.startswith(_QUANTIZED)]
    if found or any(getattr(t, "is_quantized", False) for t in model.state_dict().values()
                    if isinstance(t, torch.Tensor)):
        names = ", ".join(f"{n} ({k})" for n, k in found[:3]) or "quantized tensors"
        raise ModelError(f"{where}: quantized modules are not supported ({names}"
                         f"{', ...' if len(found) > 3 else ''}); compress the float model, "
                         f"then quantize the result")


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
    check_supported(model)
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
    #: calls in one forward pass (a layer applied twice runs, and costs, twice)
    calls: int = 1
    #: a later call's input or output shape differed from the first's
    varying: bool = False
    #: the other names the same module is registered under (``self.b = self.a``)
    aliases: tuple[str, ...] = ()

    @property
    def in_hw(self) -> tuple[int, int] | None:
        if isinstance(self.module, nn.Conv2d):
            return (int(self.in_shape[-2]), int(self.in_shape[-1]))
        return None

    @property
    def tokens(self) -> int:
        """How many times per sample the layer's kernel runs at its first call's shapes:
        a Linear on (N, C) input once, on (N, H, W, C) H*W times; times the calls in one
        forward pass (a conv applied twice costs twice its MACs)."""
        n = 1
        if isinstance(self.module, nn.Linear):
            for d in self.in_shape[:-1]:
                n *= int(d)
        return n * self.calls

    @property
    def type(self) -> str:
        return type(self.module).__name__


@torch.no_grad()
def trace_layers(model: nn.Module, input_size: Sequence[int],
                 types: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> dict[str, LayerInfo]:
    """Run one forward pass and record the input/output shape of every layer of ``types``.

    A layer that is never called (dead code in the graph) is left out. A layer called more
    than once keeps its first call's shapes, the number of calls (``calls``) and whether a
    later call had other shapes (``varying``). A module registered under several names is
    traced once, under its first name, with the others in ``aliases``.
    """
    infos: dict[str, LayerInfo] = {}

    def keep(name: str, mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        shapes = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))
        info = infos.get(name)
        if info is None:
            infos[name] = LayerInfo(name, mod, *shapes)
        else:
            info.calls += 1
            info.varying = info.varying or shapes != (info.in_shape, info.out_shape)

    check_supported(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    with hooks(layers, keep), eval_mode(model):
        _run_once(model, input_size)
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    for name, info in infos.items():
        info.aliases = tuple(n for n in names.get(id(info.module), []) if n != name)
    # keep the model's module order, not the call order
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(infos.items(), key=lambda kv: order[kv[0]]))
