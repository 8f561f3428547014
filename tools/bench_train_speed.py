"""Training throughput (images/s) of the training loop in fp32 vs bf16 autocast, NCHW vs
channels_last (and optionally torch.compile), for the CIFAR nets of the from-scratch
experiments and ResNet-20 compressed to 2x fewer MACs. Every configuration runs through
``compresscnn.train.loop.finetune`` (the loop ``compresscnn run`` uses) on random 32x32
batches, and the models and configurations are interleaved round by round so that machine
noise hits all of them alike (ratios between models, too, come from one interleaved run);
the result is the median over rounds of each step's images/s (first two steps of every
round dropped: kernel selection).

    python tools/bench_train_speed.py --threads 2 --rounds 3 --json tools/results/train_speed.json

``--profile`` says where a step's time goes instead: the same loop under ``torch.profiler``,
each op's self CPU time summed into categories (convolution forward and backward,
BatchNorm, ReLU and the residual adds, autocast casts and copies, optimizer, the rest), in
ms per step, per model and configuration (median over interleaved rounds):

    python tools/bench_train_speed.py --profile --models resnet20 resnet20_spatial --configs bf16_cl --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import compresscnn as cc
from compresscnn import TrainRun, cpu_bf16_native, finetune

MODELS = ["resnet20", "resnet20_cp", "resnet20_tucker2", "resnet20_spatial", "alexnet",
          "squeezenet1_0", "squeezenet1_1"]
CONFIGS = {"fp32": ("off", "contiguous", False), "fp32_cl": ("off", "channels_last", False),
           "bf16_cl": ("bf16", "channels_last", False)}


def build(name: str) -> torch.nn.Module:
    base, _, method = name.partition("_") if name.startswith("resnet") else (name, "", "")
    model = cc.load_model(f"cifar:{base}", None)
    if method:  # the ResNet-20 compressions of the headline: 2x fewer MACs
        model, _ = cc.compress(model, [{"match": "layer*.conv*", "method": method}],
                               (3, 32, 32), target={"macs": 0.5})
    return model


# op-name fragments -> category, first match wins (self CPU time, so nothing counts twice)
CATEGORIES = [
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("convolution", "conv2d")),
    ("batchnorm", ("batch_norm",)),
    ("optimizer", ("_foreach", "sgd", "addcmul", "lerp")),
    ("relu / add", ("relu", "threshold", "add", "hardtanh", "clamp")),
    ("casts / copies", ("_to_copy", "aten::to", "copy_", "clone", "contiguous", "empty_like")),
    ("loss / softmax", ("softmax", "nll_loss", "cross_entropy")),
    ("linear / pooling", ("addmm", "mm", "linear", "pool", "mean")),
]


def category(op: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in op for k in keys):
            return cat
    return "other"


def step_profile(model: torch.nn.Module, cfg: tuple[str, str, bool], batch: int, steps: int
                 ) -> dict[str, float]:
    """ms of self CPU time per training step in each category (``steps`` steps profiled
    after two unprofiled warm-up steps)."""
    step_rates(model, cfg, batch, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_rates(model, cfg, batch, steps)
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        cat = category(ev.key)
        out[cat] = out.get(cat, 0.0) + ev.self_cpu_time_total / 1e3 / steps
    return out


def step_rates(model: torch.nn.Module, cfg: tuple[str, str, bool], batch: int, steps: int
               ) -> list[float]:
    amp, fmt, compiled = cfg
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch * steps, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (batch * steps,), generator=g))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.csv"
        finetune(model, DataLoader(data, batch_size=batch),
                 {"max_steps": steps, "device": "cpu", "amp": amp, "memory_format": fmt,
                  "compile": compiled, "log_every": 1},
                 run=TrainRun(log_path=log, progress=False))
        with log.open() as f:
            rows = list(csv.DictReader(f))
    return [float(r["images_per_s"]) for r in rows[2:]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also bf16 + channels_last + compile")
    ap.add_argument("--configs", nargs="+", default=None,
                    help=f"only these configurations (of {', '.join(CONFIGS)}, "
                         "bf16_cl_compile); default: all")
    ap.add_argument("--profile", action="store_true",
                    help="ms per step by op category instead of images/s")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    configs = dict(CONFIGS)
    if a.compile:
        configs["bf16_cl_compile"] = ("bf16", "channels_last", True)
    if a.configs:
        unknown = sorted(set(a.configs) - set(configs))
        if unknown:
            ap.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(configs)})")
        configs = {k: configs[k] for k in a.configs}
    models = {name: build(name) for name in a.models}
    if a.profile:
        rows, extra = profile_rows(models, configs, a), {"steps": a.steps, "rounds": a.rounds}
    else:
        rows, extra = rate_rows(models, configs, a), {}
    if a.json:
        a.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor(),
            "cpu_bf16_native": cpu_bf16_native(), "torch": torch.__version__,
            "threads": a.threads, "batch": a.batch, **extra,
            ("profile" if a.profile else "rows"): rows}, indent=1) + "\n")
    return 0


def interleaved(models: dict[str, torch.nn.Module], configs: dict[str, tuple[str, str, bool]],
                rounds: int, measure: Any) -> dict[tuple[str, str], list[Any]]:
    """``measure(model, cfg)`` for every model and configuration in turn, round by round
    (machine noise hits all of them alike); the results per (model, configuration)."""
    out: dict[tuple[str, str], list[Any]] = {(n, k): [] for n in models for k in configs}
    for _ in range(rounds):
        for name, model in models.items():
            for key, cfg in configs.items():
                out[name, key].append(measure(model, cfg))
    return out


def rate_rows(models: dict[str, torch.nn.Module], configs: dict[str, tuple[str, str, bool]],
              a: argparse.Namespace) -> list[dict[str, Any]]:
    """Median images/s over the rounds' steps, per model and configuration."""
    rates = interleaved(models, configs, a.rounds,
                        lambda m, cfg: step_rates(m, cfg, a.batch, a.steps))
    rows = []
    for name in models:
        row = {"model": name, **{k: statistics.median(
            [r for run in rates[name, k] for r in run]) for k in configs}}
        if "bf16_cl" in row and "fp32" in row:
            row["speedup_bf16_cl"] = row["bf16_cl"] / row["fp32"]
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
    return rows


def profile_rows(models: dict[str, torch.nn.Module], configs: dict[str, tuple[str, str, bool]],
                 a: argparse.Namespace) -> list[dict[str, Any]]:
    """Each category's median ms per step over the rounds, per model and configuration."""
    runs_of = interleaved(models, configs, a.rounds,
                          lambda m, cfg: step_profile(m, cfg, a.batch, a.steps))
    rows = []
    for (name, key), runs in runs_of.items():
        ms = {c: statistics.median(r.get(c, 0.0) for r in runs) for c in {c for r in runs for c in r}}
        ms = dict(sorted(ms.items(), key=lambda kv: -kv[1]))
        rows.append({"model": name, "config": key, "total_ms": sum(ms.values()), "ms": ms})
        print(f"{name} {key}: {rows[-1]['total_ms']:.1f} ms/step  " + "  ".join(
            f"{k}={v:.1f}" for k, v in ms.items()), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
