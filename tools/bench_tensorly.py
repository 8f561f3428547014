"""Time to decompose every 3x3 convolution of a torchvision model: compresscnn vs TensorLy.

Random weights (``torch.manual_seed(0)`` before building the model), one thread, rank about
C/4 chosen exactly as in ``tools/bench_decompose_time.py`` (Tucker-2 ``(C_in/4, C_out/4)``,
CP ``min(C_in, C_out)/4``). Both libraries get the same float32 kernel, layer by layer
(interleaved, so load on the machine hits both alike); only the decomposition call is timed:

* compresscnn: ``get_decomposer(method).decompose(conv, rank)`` with its defaults (Tucker-2:
  truncated HOSVD; CP: ALS from an HOSVD init, 100 sweeps, tol 1e-6, degeneracy control).
  The timed call also builds the nn.Sequential and computes ``fit_info``.
* TensorLy (pytorch backend) with its defaults: Tucker-2 = ``partial_tucker(w, rank=[r_out,
  r_in], modes=[0, 1])`` (HOOI from an SVD init, n_iter_max=100, tol=1e-4); CP =
  ``parafac(w, rank=r, init='svd')`` (ALS, n_iter_max=100, tol=1e-8); ``random_state=0``
  only seeds the random columns TensorLy appends where r exceeds a mode's size (3 for a
  3x3 kernel).

Reported per model and method: total seconds of each, the ratio tensorly/compresscnn
("speed-up") and the mean over layers of ||W - W_hat||_F / ||W||_F of each (float64).

    python tools/bench_tensorly.py --models vgg16 --json tools/results/tensorly_vgg16.json
    python tools/bench_tensorly.py --hooi 3 ...   # compresscnn Tucker-2 with 3 HOOI sweeps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

try:  # not a dependency of the package: the bench (and dev) extra installs it
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker
except ImportError:
    sys.exit("tools/bench_tensorly.py needs TensorLy: pip install -e '.[bench]'")

from compresscnn import get_decomposer


def quarter_rank(dec, m: nn.Conv2d, fraction: float) -> tuple[int, ...]:
    """Rank ~ fraction * channels, clipped to the method's maximum (as
    tools/bench_decompose_time.py chooses it)."""
    full = dec.max_rank(m)
    if dec.name == "tucker2":
        want = (m.in_channels // m.groups, m.out_channels // m.groups)
    else:
        want = (min(m.in_channels, m.out_channels),)
    return tuple(max(1, min(f, int(w * fraction))) for w, f in zip(want, full))


def rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float64."""
    w = w.double()
    a = approx.double().reshape(w.shape)
    return float(torch.linalg.vector_norm(w - a) / torch.linalg.vector_norm(w))


def module_kernel(mod: nn.Module, conv: nn.Conv2d) -> torch.Tensor:
    """The dense kernel a decomposed module computes, read off its response to a Dirac
    input; only used when a decomposer did not set ``fit_info`` (assumes stride 1,
    dilation 1, groups 1, zero padding, as in VGG)."""
    cin = conv.in_channels
    kh, kw = conv.kernel_size
    x = torch.zeros(cin, cin, 2 * kh - 1, 2 * kw - 1, dtype=conv.weight.dtype)
    x[torch.arange(cin), torch.arange(cin), kh - 1, kw - 1] = 1.0
    with torch.no_grad():
        y = mod(x)
        if conv.bias is not None:
            y = y - conv.bias.view(1, -1, 1, 1)
    # y[c, o, p + kh-1 - a, p + kw-1 - b] = W[o, c, a, b] (p = padding); y is kh+2p tall
    oh0, ow0 = (y.shape[2] - kh) // 2, (y.shape[3] - kw) // 2
    y = y[:, :, oh0:oh0 + kh, ow0:ow0 + kw]
    return y.flip(2, 3).transpose(0, 1).contiguous()


def run_compresscnn(dec, conv: nn.Conv2d, rank: tuple[int, ...], **options: Any
                    ) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    new = dec.decompose(conv, rank, **options)
    secs = time.perf_counter() - t0
    info = getattr(new, "fit_info", None) or {}
    err = info.get("rel_error")
    if err is None:
        err = rel_error(conv.weight.detach(), module_kernel(new, conv))
    return secs, float(err), int(info.get("iters", 0))


def run_tensorly(method: str, w: torch.Tensor, rank: tuple[int, ...]) -> tuple[float, float, int]:
    if method == "tucker2":
        r_in, r_out = rank
        t0 = time.perf_counter()
        (core, factors), errors = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1])
        secs = time.perf_counter() - t0
        approx = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
        return secs, rel_error(w, approx), len(errors)
    if method == "cp":
        (r,) = rank
        t0 = time.perf_counter()
        # return_errors adds no work here (the errors are computed anyway since tol is set)
        cp, errors = parafac(w, rank=r, init="svd", random_state=0, return_errors=True)
        secs = time.perf_counter() - t0
        return secs, rel_error(w, tl.cp_to_tensor(cp)), len(errors)
    raise ValueError(f"no TensorLy counterpart for method {method!r}")


def warm_up(methods: list[str], opts: dict[str, dict[str, Any]]) -> None:
    """One untimed small decomposition per library and method (lazy imports, dispatch)."""
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    for method in methods:
        dec = get_decomposer(method)
        rank = quarter_rank(dec, conv, 0.25)
        run_compresscnn(dec, conv, rank, **opts.get(method, {}))
        run_tensorly(method, conv.weight.detach().clone(), rank)


def bench_model(name: str, methods: list[str], fraction: float, max_layers: int | None,
                opts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)]
    rows = []
    for method in methods:
        dec = get_decomposer(method)
        taken = [(n, m) for n, m in convs if dec.supports(m) is None]
        if max_layers is not None:
            taken = taken[:max_layers]
        layers = []
        for lname, m in taken:
            rank = quarter_rank(dec, m, fraction)
            w = m.weight.detach().clone()                    # float32, same for both
            c_s, c_err, c_it = run_compresscnn(dec, m, rank, **opts.get(method, {}))
            t_s, t_err, t_it = run_tensorly(method, w, rank)
            layers.append({"layer": lname, "shape": list(w.shape), "rank": list(rank),
                           "compresscnn_s": round(c_s, 4), "tensorly_s": round(t_s, 4),
                           "compresscnn_rel_error": round(c_err, 5),
                           "tensorly_rel_error": round(t_err, 5),
                           "compresscnn_iters": c_it, "tensorly_iters": t_it})
        c_tot = sum(x["compresscnn_s"] for x in layers)
        t_tot = sum(x["tensorly_s"] for x in layers)
        n = max(1, len(layers))
        row = {"model": name, "method": method, "compresscnn_options": opts.get(method, {}),
               "convs": len(layers),
               "compresscnn_seconds": round(c_tot, 3), "tensorly_seconds": round(t_tot, 3),
               "speedup_tensorly_over_compresscnn": round(t_tot / c_tot, 2) if c_tot else None,
               "compresscnn_mean_rel_error":
                   round(sum(x["compresscnn_rel_error"] for x in layers) / n, 5),
               "tensorly_mean_rel_error":
                   round(sum(x["tensorly_rel_error"] for x in layers) / n, 5),
               "layers": layers}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "layers"}, flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| model | method | convs | compresscnn s | tensorly s | speed-up | "
           "compresscnn mean rel err | tensorly mean rel err |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['convs']} | "
                   f"{r['compresscnn_seconds']:.3f} | {r['tensorly_seconds']:.3f} | "
                   f"{r['speedup_tensorly_over_compresscnn']}x | "
                   f"{r['compresscnn_mean_rel_error']:.4f} | {r['tensorly_mean_rel_error']:.4f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vgg16"])
    ap.add_argument("--methods", nargs="+", default=["tucker2", "cp"],
                    choices=["tucker2", "cp"])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-layers", type=int, default=None,
                    help="only the first N 3x3 convs of each model (quick runs)")
    ap.add_argument("--hooi", type=int, default=0,
                    help="HOOI sweeps for compresscnn's Tucker-2 (default 0: its default, "
                         "plain HOSVD; TensorLy's partial_tucker always runs HOOI)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    opts = {"tucker2": {"hooi": args.hooi}} if args.hooi else {}
    torch.set_num_threads(args.threads)
    tl.set_backend("pytorch")
    # parafac's SVD init asks the 3-row spatial unfoldings for r > 3 singular vectors
    # (then pads with random columns): expected, not worth a warning per layer
    warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs",
                            category=UserWarning)
    warm_up(args.methods, opts)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.methods, args.fraction, args.max_layers, opts)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "tensorly": tl.__version__,
            "tensorly_backend": tl.get_backend(), "dtype": "float32",
            "fraction": args.fraction, "max_layers": args.max_layers,
            "compresscnn_tucker2_hooi": args.hooi,
            "python": sys.version.split()[0]}
    result = {"meta": meta, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(markdown(rows), flush=True)
    return result


if __name__ == "__main__":
    main()
