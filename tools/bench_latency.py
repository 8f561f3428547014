"""Realised speed vs MAC reduction: MAC-planned vs latency-planned Tucker-2.

For each model (torchvision, random weights: latency does not depend on the weights' values;
the ranks a MAC budget picks do, through the spectra, so read the MAC-planned ranks as
those of an untrained net) and each MAC fraction kept:

- ``uniform``: every matched layer keeps the same fraction of its MACs (how most tools
  are used; the stem and classifier stay dense, so the model-level ratio is smaller);
- ``macs``: the global MAC budget over every 3x3 conv but the stem;
- ``latency``: the same budget with ``objective="latency"``: candidate ranks timed on
  onnxruntime at the serving batch, slower-than-dense candidates dropped, and the whole model
  checked not slower than the original.

Each model is compressed by ``compresscnn.compress`` (the orchestrator ``compresscnn run``
uses), data-free.

Then the original and both compressed models are exported to ONNX and timed against each
other, interleaved round by round (``compresscnn.measure.latency.time_modules``), on the CPU
provider at each batch and thread count (``--runtime torch`` / ``torch_bf16``: in PyTorch
eager, float32 / bf16 autocast with channels_last, instead). Prints original/compressed latency ratios beside
the MAC ratio; ``--json`` keeps everything.

    python tools/bench_latency.py --models resnet18 vgg16 --macs 0.5 0.333 --batches 1 8 \\
        --threads 2 --json tools/results/latency_ort.json

``--recipe FILE...`` instead plans each shipped recipe as ``compresscnn run`` does (its
rules, target and latency section; random weights) and times it at the recipe's batch:

    python tools/bench_latency.py --recipe recipes/resnet18_imagenet_2x_batch1.yaml \\
        recipes/vgg16_imagenet_2x_batch1.yaml --rounds 7 --json lat.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from compresscnn import (LatencyConfig, compress, count, example_input, load_model, load_recipe,
                         onnx_bytes, time_modules)

RULES = {
    "resnet18": [{"match": "layer*.conv*", "method": "tucker2"}],
    "resnet50": [{"match": "layer*.conv2", "method": "tucker2"}],
    "vgg16": [{"match": "features.*", "exclude": "features.0", "method": "tucker2"}],
}


def _unblocked_convs(ops: dict[str, int]) -> int:
    """Convs that onnxruntime's optimiser left outside its blocked NCHWc layout (plain
    ``Conv``/``FusedConv``; see :func:`ort_optimized_ops`)."""
    return ops.get("Conv", 0) + ops.get("com.microsoft.FusedConv", 0)


def _plan_info(p, base: dict, compressed: dict, plan_seconds: float) -> dict:
    """What a row keeps of one plan: its ratios to the original's counts, ranks, latency."""
    return {"plan_seconds": round(plan_seconds, 1),
            "macs_ratio": base["macs"] / compressed["macs"],
            "params_ratio": base["params"] / compressed["params"],
            "layers_decomposed": len(p.ranks()), "layers_matched": len(p.replacements),
            "ranks": p.ranks(), "latency_plan": p.latency}


def ort_optimized_ops(model: bytes, threads: int = 1) -> dict[str, int]:
    """How many nodes of each op type the graph ``model`` (serialized ONNX) has after
    onnxruntime's CPU optimisations (all graph optimisations, as the toolkit times with),
    keyed ``domain.op_type`` outside the default domain: ``com.microsoft.nchwc.Conv`` counts
    the convs that run in the blocked NCHWc layout, a plain ``Conv`` or
    ``com.microsoft.FusedConv`` one that does not (on onnxruntime 1.32: one whose input
    channels are not a multiple of 4, e.g. an unrounded rank),
    ``com.microsoft.nchwc.ReorderInput``/``ReorderOutput`` the layout conversions."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _ort_ops(models: list, x: torch.Tensor, runtime: str, threads: int) -> list:
    """Each model's onnxruntime-optimised op counts (None each off onnxruntime)."""
    if runtime != "onnxruntime":
        return [None] * len(models)
    return [ort_optimized_ops(onnx_bytes(m, x), threads) for m in models]


def _row(common: dict, original_ms: float, ms: float, info: dict, original_ops, ops) -> dict:
    """One timed comparison: original against a compressed model."""
    row = {**common, "original_ms": original_ms, "compressed_ms": ms,
           "speedup": original_ms / ms, **info, "original_ort_ops": original_ops,
           "ort_ops": ops}
    row["speedup_over_mac_ratio"] = row["speedup"] / row["macs_ratio"]
    return row


def _recipe_row(path: Path, args: argparse.Namespace) -> dict:
    """One recipe planned as ``compresscnn run`` plans it (``compress()`` with the recipe's
    rules, target and latency section), the model randomly initialised (nothing is
    downloaded; latency does not depend on the weights' values, the ranks a budget picks do,
    through the spectra), timed against the original on the recipe's runtime."""
    recipe = load_recipe(path)
    torch.manual_seed(0)
    original = load_model(recipe["model"]["spec"], None).eval()
    size = tuple(recipe["model"].get("input_size") or (3, args.size, args.size))
    lat = dict(recipe["latency"])
    t0 = time.time()
    m, p = compress(original, recipe["rules"], size, target=recipe["target"],
                    config={"latency": lat})
    info = _plan_info(p, count(original, size), count(m.eval(), size), time.time() - t0)
    cfg = LatencyConfig(runtime=lat["runtime"], threads=lat["threads"], batch=lat["batch"],
                        rounds=args.rounds, per_round=args.per_round, warmup=2)
    x = example_input(size, lat["batch"])
    times = time_modules([original, m], x, cfg)
    ops = _ort_ops([original, m], x, lat["runtime"], lat["threads"])
    common = {"model": recipe["model"]["spec"], "recipe": str(path),
              "target_macs": (recipe["target"] or {}).get("macs"), "plan": "recipe",
              "batch": lat["batch"], "threads": lat["threads"], "runtime": lat["runtime"],
              "round_to": sorted({r.get("round_to") for r in recipe["rules"]})}
    row = _row(common, times[0], times[1], info, ops[0], ops[1])
    print(f"{path}: MACs x{row['macs_ratio']:.2f}  latency {times[0]:.1f} -> {times[1]:.1f} ms "
          f"(x{row['speedup']:.2f}, {row['speedup_over_mac_ratio']:.2f} of the MAC ratio)",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "vgg16"], choices=sorted(RULES))
    ap.add_argument("--macs", nargs="+", type=float, default=[0.5, 0.333])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds of the whole models")
    ap.add_argument("--per-round", type=int, default=5,
                    help="timed consecutive calls per model per round (after three untimed "
                         "ones)")
    ap.add_argument("--round-to", nargs="+", type=int, default=[8],
                    help="the rules' round_to (rank rounding); several values: each plan once "
                         "per value, all timed in the same interleaved run")
    ap.add_argument("--plan-rounds", type=int, default=3,
                    help="timing rounds per layer while latency-planning")
    ap.add_argument("--plans", nargs="+", default=["uniform", "macs", "latency"],
                    choices=["uniform", "macs", "latency"])
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "torch",
                                                                  "torch_bf16"],
                    help="what the whole models are timed on (latency planning too)")
    ap.add_argument("--recipe", nargs="+", type=Path, default=None,
                    help="instead of --models/--macs/--plans: plan each recipe's model (random "
                         "weights) with its rules, target and latency section through "
                         "compress(), and time it against the original at the recipe's "
                         "latency batch and threads")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    input_size = (3, args.size, args.size)
    rows = [] if args.recipe is None else [_recipe_row(r, args) for r in args.recipe]
    for name in ([] if args.recipe else args.models):
        torch.manual_seed(0)
        original = getattr(torchvision.models, name)(weights=None).eval()
        base = count(original, input_size)
        for frac in args.macs:
            for batch in args.batches:
                cfg = LatencyConfig(runtime=args.runtime, threads=args.threads, batch=batch,
                                    rounds=args.rounds, per_round=args.per_round, warmup=2)
                models, info = [original], {}
                variants = [(how, rt) for rt in args.round_to for how in args.plans]
                for how, rt in variants:
                    t0 = time.time()
                    rules, kw = RULES[name], {"target": {"macs": frac}}
                    rules = [{**r, "round_to": rt} for r in rules]
                    if how == "uniform":  # every matched layer keeps the same MAC share
                        rules, kw = [{**r, "macs": frac} for r in rules], {}
                    elif how == "latency":
                        kw["objective"] = "latency"
                        kw["config"] = {"latency": LatencyConfig(
                            runtime=args.runtime, threads=args.threads, batch=batch,
                            rounds=args.plan_rounds, per_round=1, max_candidates=6)}
                    m, p = compress(original, rules, input_size, **kw)
                    info[how, rt] = {"round_to": rt, **_plan_info(
                        p, base, count(m, input_size), time.time() - t0)}
                    models.append(m.eval())
                x = example_input(input_size, batch)
                times = time_modules(models, x, cfg)
                ops = _ort_ops(models, x, args.runtime, args.threads)
                for i, ((how, rt), ms) in enumerate(zip(variants, times[1:])):
                    common = {"model": name, "target_macs": frac, "plan": how, "batch": batch,
                              "threads": args.threads, "runtime": args.runtime}
                    row = _row(common, times[0], ms, info[how, rt], ops[0], ops[1 + i])
                    rows.append(row)
                    print(f"{name} macs {frac:g} batch {batch} {how:7s} round_to {rt}: MACs x"
                          f"{row['macs_ratio']:.2f}  latency {times[0]:.1f} -> {ms:.1f} ms "
                          f"(x{row['speedup']:.2f}, {row['speedup_over_mac_ratio']:.2f} of the "
                          f"MAC ratio), {row['layers_decomposed']}/{row['layers_matched']} "
                          f"layers decomposed"
                          + (f", {_unblocked_convs(row['ort_ops'])} convs outside onnxruntime's "
                             f"blocked layout (original {_unblocked_convs(ops[0])})"
                             if ops[0] else ""),
                          flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "input_size": list(input_size)}
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n| model | MACs kept | plan | round_to | batch | MAC ratio | original ms | "
          "compressed ms | speed-up | speed-up / MAC ratio | unblocked convs |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        unblocked = _unblocked_convs(r["ort_ops"]) if r["ort_ops"] else "-"
        print(f"| {r['model']} | {r['target_macs']:g} | {r['plan']} | {r['round_to']} | "
              f"{r['batch']} | {r['macs_ratio']:.2f}x | {r['original_ms']:.1f} | "
              f"{r['compressed_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['speedup_over_mac_ratio']:.2f} | {unblocked} |")
    return rows


if __name__ == "__main__":
    main()
