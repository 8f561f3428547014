"""Size and init scale of a model factorized before training (``compresscnn.train.scratch``).

For a randomly initialised model, per method: parameters and MACs of the factorized model
at a global MAC target, and how far each init keeps the dense model's activation scale:

* ``layer_ms``: per factorized layer, mean square of its output over that of the dense
  (Kaiming) layer it replaces, on the same input (the dense model's activations), as
  median [min, max] over layers; ``white_ms`` the same on white Gaussian input of that
  shape (what the Kaiming scaling is exact for);
* ``logits_std``: std of the whole model's output in eval mode (fresh BatchNorm is the
  identity there, so nothing renormalises the scale).

Inits: ``kaiming`` and ``spectral`` (``factorize``), and for comparison ``relu_every``
(the ReLU gain on every factor, what per-factor Kaiming without the chain correction gives).

    python tools/lowrank_init_scale.py --model cifar:resnet20 --macs 0.5 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch
from torch import nn

from compresscnn import count, factorize, factorized_layers, load_model

INITS = ("kaiming", "spectral", "relu_every")


def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named layer of ``model`` sees on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].detach())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def relu_every(model: nn.Module, seed: int) -> None:
    """Re-draw every factor with the ReLU gain (the uncorrected per-factor Kaiming)."""
    gen = torch.Generator().manual_seed(seed)
    for name in factorized_layers(model):
        for f in model.get_submodule(name):
            w = torch.empty(f.weight.shape)
            nn.init.kaiming_normal_(w, nonlinearity="relu", generator=gen)
            with torch.no_grad():
                f.weight.copy_(w)


def measure(dense: nn.Module, method: str, init: str, macs: float, x: torch.Tensor,
            seed: int) -> dict[str, Any]:
    rules = [{"match": "layer*", "method": method}]
    new, p = factorize(dense, rules, tuple(x.shape[1:]), target={"macs": macs},
                       init="kaiming" if init == "relu_every" else init, seed=seed)
    if init == "relu_every":
        relu_every(new, seed)
    names = list(p.ranks())
    inputs = layer_inputs(dense, names, x)
    gen = torch.Generator().manual_seed(seed)
    ratios: dict[str, list[float]] = {"layer_ms": [], "white_ms": []}
    with torch.no_grad():
        for n in names:
            for key, xi in (("layer_ms", inputs[n]),
                            ("white_ms", torch.randn(inputs[n].shape, generator=gen))):
                ref = dense.get_submodule(n)(xi).square().mean()
                ratios[key].append(float(new.get_submodule(n)(xi).square().mean() / ref))
        logits = new.eval()(x)
    c = count(new, tuple(x.shape[1:]))
    row = {"method": method, "init": init, "params": c["params"], "macs": c["macs"],
           "layers": len(names), "logits_std": float(logits.std())}
    for key, r in ratios.items():
        row.update({f"{key}_median": statistics.median(r), f"{key}_min": min(r),
                    f"{key}_max": max(r)})
    return row


def fmt(r: dict[str, Any]) -> str:
    line = (f"{r['method']:8s} {r['init']:10s} params {r['params']:>8,} MACs {r['macs']:>11,}"
            f"  logits std {r['logits_std']:.4g}")
    for key in ("layer_ms", "white_ms"):
        if f"{key}_median" in r:
            line += (f"  {key} {r[key + '_median']:.3f} [{r[key + '_min']:.3f}, "
                     f"{r[key + '_max']:.3f}]")
    return line


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar:resnet20")
    ap.add_argument("--methods", nargs="+", default=["tucker2", "cp", "spatial"])
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--macs", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dense = load_model(args.model, None).eval()
    size = tuple(dense.pretrained_cfg.get("input_size", (3, 32, 32)))
    x = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(args.seed))
    c = count(dense, size)
    with torch.no_grad():
        rows = [{"method": "dense", "init": "model", "params": c["params"], "macs": c["macs"],
                 "logits_std": float(dense(x).std())}]
    for method in args.methods:
        for init in args.inits:
            rows.append(measure(dense, method, init, args.macs, x, args.seed))
    for r in rows:
        print(fmt(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
