"""Fold eval-mode BatchNorm and Fire's channel reorder into convs, before export.

Why: ONNX exporters fold a BatchNorm only into a Conv that feeds it directly. After a
substitution the channels a BatchNorm normalises may come from several convs, concatenated
and reordered (Fire's ``cat`` then ``index_select``: an ONNX Concat then Gather), and such a
BatchNormalization stays in the graph as a standalone node. Runtimes then rewrite that graph
on their own, and not always right: OpenVINO 2026.4's CPU plugin applies the *inverse*
permutation when it merges a channel Gather into the Conv that follows it (directly or
through a ReLU), which gave a Fire-substituted ResNet-18 a relative error of 1.4
(BENCHMARKS.md) where onnxruntime and OpenCV agree with PyTorch to 1e-6. So the exported
copy has neither:

* **BatchNorm**: in eval mode ``bn(x)_j = a_j x_j + c_j`` with ``a_j = gamma_j /
  sqrt(var_j + eps)`` and ``c_j = beta_j - mean_j a_j``. When ``x_j`` is output channel
  ``o`` of a conv (``W_o * u + b_o``), ``bn(x)_j = (a_j W_o) * u + (a_j b_o + c_j)``: scale
  that conv's row ``o`` and set its bias. A Concat along channels or a Gather by a fixed
  index list between them only says which conv channel becomes BatchNorm channel ``j``; a
  plain chain (the ``nn.Sequential`` of convs the other methods build) needs nothing
  special, since a ``torch.fx`` trace goes through it to its last conv.
* **Fire's reorder** where it reaches one ``groups=1`` conv through elementwise activations
  only (ResNet's ``conv1 -> bn1 -> relu -> conv2``): that conv reads channel ``perm[c]``
  where it read channel ``c``, so its input channels are permuted instead and the Gather
  goes. A reorder that feeds a residual sum stays (a Gather no runtime here gets wrong).

Both are computed in float64 and cast back, so the folded model agrees with the original to
float32 round-off. A pair is folded only when every node between the two has that one
consumer and each module is called once in the trace. Models that ``torch.fx`` cannot
trace as a whole are traced child by child.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from compresscnn.core.decomposers.fire import FireModule
from compresscnn.util.modules import set_module

__all__ = ["fold_for_export", "foldable_batchnorms", "foldable_gathers"]

#: (conv name, output channel of that conv) for each channel of a BatchNorm's input
Sources = list[tuple[str, int]]

_CAT = (torch.cat, torch.concat, torch.concatenate)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout)
_ELEMENTWISE_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu6)


def _traces(module: nn.Module, prefix: str = ""
            ) -> Iterator[tuple[str, nn.Module, fx.GraphModule]]:
    """``(name prefix, module, trace)`` of ``module``, or of its children where it cannot be
    traced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: go one level down
        for name, child in module.named_children():
            yield from _traces(child, f"{prefix}{name}.")
        return
    yield prefix, module, gm


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How often the trace calls each submodule."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _is_conv(m: Any) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _is_bn(m: Any) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None)


def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _gather_index(node: fx.Node, gm: fx.GraphModule
                  ) -> tuple[fx.Node, torch.Tensor, str] | None:
    """``(input, index, index attribute name)`` of an ``index_select`` along dim 1 with a
    fixed (buffer) index."""
    is_method = node.op == "call_method" and node.target == "index_select"
    is_fn = node.op == "call_function" and node.target is torch.index_select
    if not (is_method or is_fn):
        return None
    src, dim, index = _arg(node, 0, "input"), _arg(node, 1, "dim"), _arg(node, 2, "index")
    if dim != 1 or not isinstance(index, fx.Node) or index.op != "get_attr":
        return None
    value = functools.reduce(getattr, index.target.split("."), gm)
    if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.is_floating_point():
        return None
    return src, value, index.target


def _sources(node: Any, gm: fx.GraphModule, mods: dict[str, nn.Module],
             calls: dict[str, int]) -> Sources | None:
    """Which conv channel each channel of ``node``'s output is, or None when some channel is
    not a conv's own output (or a node on the way has another consumer)."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.op == "call_module":
        m = mods.get(node.target)
        if _is_conv(m) and calls[node.target] == 1:
            return [(node.target, c) for c in range(m.out_channels)]
        return None
    if node.op == "call_function" and node.target in _CAT:
        parts, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if dim != 1 or not isinstance(parts, (list, tuple)):
            return None
        out: Sources = []
        for part in parts:
            got = _sources(part, gm, mods, calls)
            if got is None:
                return None
            out += got
        return out
    gather = _gather_index(node, gm)
    if gather is not None:
        got = _sources(gather[0], gm, mods, calls)
        index = [int(i) for i in gather[1]]
        if got is None or any(not 0 <= i < len(got) for i in index):
            return None
        return [got[i] for i in index]
    return None


def foldable_batchnorms(model: nn.Module) -> dict[str, Sources]:
    """``{BatchNorm name: sources}`` for every BatchNorm (with running statistics) whose
    input is, channel by channel, the output of convs that feed nothing else."""
    found: dict[str, Sources] = {}
    for prefix, _, gm in _traces(model):
        mods = dict(gm.named_modules())
        calls = _call_counts(gm)
        for node in gm.graph.nodes:
            if node.op != "call_module" or not _is_bn(mods.get(node.target)) \
                    or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
                continue
            srcs = _sources(node.args[0], gm, mods, calls)
            if srcs is None or len(srcs) != mods[node.target].num_features \
                    or len(set(srcs)) != len(srcs):
                continue
            found[prefix + node.target] = [(prefix + name, c) for name, c in srcs]
    return found


@torch.no_grad()
def _fold_bn(model: nn.Module, bn_name: str, srcs: Sources) -> None:
    bn = model.get_submodule(bn_name)
    var = bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)
    c = beta - bn.running_mean.double() * a
    per_conv: dict[str, tuple[list[int], list[int]]] = {}
    for j, (name, o) in enumerate(srcs):
        rows, chans = per_conv.setdefault(name, ([], []))
        rows.append(o)
        chans.append(j)
    for name, (rows, chans) in per_conv.items():
        conv = model.get_submodule(name)
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else w.new_zeros(w.shape[0])
        scale = a[chans].to(w.device)
        w[rows] = w[rows] * scale.view(-1, *[1] * (w.ndim - 1))
        b[rows] = b[rows] * scale + c[chans].to(w.device)
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype),
                                     requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(b.to(conv.bias.dtype))
    set_module(model, bn_name, nn.Identity())


def _passes_channels(node: fx.Node, cur: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Whether ``node`` applies one function to every element of ``cur`` alone (so it
    commutes with a reordering of channels)."""
    if not node.args or node.args[0] is not cur \
            or any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return False
    if node.op == "call_module":
        return isinstance(mods.get(node.target), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def foldable_gathers(model: nn.Module) -> dict[str, str]:
    """``{Fire module name: conv name}`` for every Fire channel reorder (``index_select``
    by its ``perm`` buffer) whose result reaches, through elementwise activations only, one
    ``groups=1`` conv alone: that conv can read the channels in the unpermuted order."""
    found: dict[str, str] = {}
    for prefix, traced, gm in _traces(model):
        # the trace holds only the modules it calls: look the Fire module up in the model
        mods = dict(gm.named_modules())
        calls = _call_counts(gm)
        for node in gm.graph.nodes:
            gather = _gather_index(node, gm)
            owner, _, attr = gather[2].rpartition(".") if gather else ("", "", "")
            if gather is None or attr != "perm" \
                    or not isinstance(traced.get_submodule(owner), FireModule):
                continue
            perm, cur = gather[1], node
            while len(cur.users) == 1 and _passes_channels(next(iter(cur.users)), cur, mods):
                cur = next(iter(cur.users))
            nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
            conv = mods.get(nxt.target) if nxt is not None and nxt.op == "call_module" else None
            if (_is_conv(conv) and calls[nxt.target] == 1 and conv.groups == 1
                    and len(nxt.args) == 1 and nxt.args[0] is cur and not nxt.kwargs
                    and torch.equal(perm.sort().values, torch.arange(conv.in_channels))):
                found[prefix + owner] = prefix + nxt.target
    return found


@torch.no_grad()
def _fold_gather(model: nn.Module, fire_name: str, conv_name: str) -> None:
    """Drop the Fire module's reorder; the conv reads channel ``perm[c]`` where it read
    channel ``c``: its input channel ``k`` takes the weights of input channel
    ``argsort(perm)[k]``."""
    fire = model.get_submodule(fire_name)
    conv = model.get_submodule(conv_name)
    inv = torch.argsort(fire.perm).to(conv.weight.device)
    conv.weight.copy_(conv.weight[:, inv])
    fire.perm = None


def fold_for_export(model: nn.Module) -> tuple[nn.Module, dict[str, list[str]]]:
    """A copy of ``model`` in eval mode with every foldable BatchNorm (see
    :func:`foldable_batchnorms`) folded into the convs before it and replaced by
    ``nn.Identity``, and then every foldable Fire reorder (:func:`foldable_gathers`) folded
    into the conv after it; and ``{"batchnorms": [...], "gathers": [...]}``, the names of
    what was folded. When there is nothing to fold, ``model`` itself is returned. ``model``
    is never changed."""
    if not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, FireModule))
               for m in model.modules()):
        return model, {"batchnorms": [], "gathers": []}
    folded = copy.deepcopy(model).eval()
    bns = foldable_batchnorms(folded)
    for bn_name, srcs in bns.items():
        _fold_bn(folded, bn_name, srcs)
    gathers = foldable_gathers(folded)
    for fire_name, conv_name in gathers.items():
        _fold_gather(folded, fire_name, conv_name)
    done = {"batchnorms": sorted(bns), "gathers": sorted(gathers)}
    return (folded if bns or gathers else model), done
