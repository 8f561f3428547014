"""SqueezeNet vs AlexNet at CIFAR-10 scale, trained from scratch with the same budget, and
AlexNet compressed by compresscnn to SqueezeNet's size (Iandola et al. 2016, at 32x32).

Steps (each model gets the same optimiser, schedule, batch and augmentation):

1. train ``cifar:alexnet``, ``cifar:squeezenet1_0`` and ``cifar:squeezenet1_1`` from random
   init for ``--epochs`` epochs on the CIFAR-10 JPEG train set (SGD, cosine, crop + flip);
2. compress the trained AlexNet-CIFAR (SVD on its FC layers, Tucker-2 on conv2-5, global
   parameter budget: ``surgery.compress(..., target={"params": f})``) to SqueezeNet-CIFAR
   1.0's parameter count and to 2x/5x/10x fewer parameters (``--fractions``), then fine-tune
   each for ``--ft-epochs`` with distillation from the trained AlexNet;
3. train the same factorized architecture from random init (every Conv2d/Linear
   re-initialised) for ``--epochs + --ft-epochs`` epochs: the same total budget the
   compressed model had (AlexNet training + fine-tuning), without the teacher;
4. optionally (``--sweep-sr``, ``--sweep-pct3x3``) SqueezeNet 1.0 with other squeeze ratios /
   3x3 shares (the paper's Fig. 3), same budget as step 1.

Every model is written to ``OUT/<name>/``: ``model.safetensors``; compressed models also get
``recipe.yaml`` (exact ranks) and ``report.json``, so they are run directories that
``compresscnn.pipeline.load_compressed`` and ``compresscnn compare`` read. The results go to
``OUT/results.json`` (rewritten after each model, so a long run can be watched) and
``OUT/results.md``, and ``OUT/compare.yaml`` is a compare recipe of everything produced:

    python tools/cifar_squeezenet_vs_alexnet.py --epochs 30 --ft-epochs 5 --device cuda
    compresscnn compare --recipe runs/cifar_squeezenet_vs_alexnet/compare.yaml

Smoke test (seconds): ``--max-steps 2 --train-subset 256 --test-subset 256 --hidden 64
--fractions 0.1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresscnn.counting import count
from compresscnn.data import make_loaders
from compresscnn.evaluate import evaluate
from compresscnn.finetune import finetune
from compresscnn.models import load_model
from compresscnn.pipeline import exact_rules
from compresscnn.recipe import dump_resolved, validate
from compresscnn.surgery import compress

SHARED = Path(os.environ.get("COMPRESSCNN_SHARED_DATA",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
INPUT = (3, 32, 32)
ALEX_CONVS = ["features.3", "features.6", "features.8", "features.10"]


def compression_rules() -> list[dict[str, Any]]:
    """SVD on the three FC layers, Tucker-2 on conv2-5 (conv1 has 3 input channels); ranks
    from the global parameter budget."""
    return [{"match": "classifier.*", "method": "svd"},
            {"match": ALEX_CONVS, "method": "tucker2"}]


def reinit(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameterised layer (PyTorch's default init), keeping buffers
    such as a Fire module's fixed channel permutation."""
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters") and any(
                True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    return model


def save_weights(model: nn.Module, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    return folder / "model.safetensors"


def save_run_dir(folder: Path, spec: str, plan: Any, report: dict[str, Any]) -> None:
    """recipe.yaml with the exact ranks + report.json: a directory load_compressed reads."""
    recipe = validate({"name": folder.name, "output": str(folder), "model": {"spec": spec},
                       "rules": exact_rules(plan), "target": None,
                       "finetune": {"enabled": False},
                       "evaluate": {"baseline": False, "zero_shot": False},
                       "export": {"onnx": False}, "report": {"latency": False}})
    dump_resolved(recipe, folder / "recipe.yaml")
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED / "cifar10-jpg.zip",
                    help="CIFAR-10 folder or zip (train/ and test/ class folders)")
    ap.add_argument("--out", type=Path, default=Path("runs/cifar_squeezenet_vs_alexnet"))
    ap.add_argument("--models", nargs="+", default=["alexnet", "squeezenet1_0", "squeezenet1_1"])
    ap.add_argument("--epochs", type=int, default=30, help="from-scratch training epochs")
    ap.add_argument("--ft-epochs", type=int, default=5, help="distillation epochs after compression")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="cap every training phase at this many steps (smoke tests)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05, help="peak SGD lr, from scratch")
    ap.add_argument("--ft-lr", type=float, default=0.01, help="peak SGD lr, fine-tuning")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=2048, help="AlexNet-CIFAR hidden FC width")
    ap.add_argument("--fractions", nargs="*", default=["squeezenet", "0.5", "0.2", "0.1"],
                    help="parameter fractions of AlexNet-CIFAR kept; 'squeezenet' = SqueezeNet-"
                         "CIFAR 1.0's count")
    ap.add_argument("--no-scratch", action="store_true",
                    help="skip training the factorized architectures from random init")
    ap.add_argument("--sweep-sr", type=float, nargs="*", default=[],
                    help="extra SqueezeNet 1.0 squeeze ratios, e.g. 0.25 0.5 0.75 1.0")
    ap.add_argument("--sweep-pct3x3", type=float, nargs="*", default=[],
                    help="extra SqueezeNet 1.0 3x3 shares, e.g. 0.01 0.25 0.75 0.99")
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = {"dataset": "cifar10", "root": str(args.data), "augment": True,
            "batch_size": args.batch_size, "eval_batch_size": 500, "workers": args.workers,
            "train_subset": args.train_subset, "test_subset": args.test_subset,
            "seed": args.seed}
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    results: list[dict[str, Any]] = []
    meta = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__, "python": platform.python_version(),
            "device": args.device, "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}

    loaders: dict[str, Any] = {}

    def get_loaders(model: nn.Module) -> tuple[Any, Any]:
        if not loaders:
            tr, te = make_loaders(data, model.pretrained_cfg)
            loaders.update(train=tr, test=te)
        return loaders["train"], loaders["test"]

    def train(model: nn.Module, epochs: int, lr: float, teacher: nn.Module | None,
              tag: str) -> dict[str, Any]:
        tr, _ = get_loaders(model)
        t0 = time.perf_counter()
        stats = finetune(model, tr, teacher=teacher, epochs=epochs, max_steps=args.max_steps,
                         optimizer="sgd", lr=lr, momentum=args.momentum,
                         weight_decay=args.weight_decay, schedule="cosine",
                         warmup_steps=args.warmup_steps,
                         distill={"enabled": teacher is not None, "temperature": 4.0,
                                  "alpha": 0.9},
                         device=args.device, amp=args.amp, seed=args.seed, progress=not args.quiet,
                         log_path=out / f"{tag}.train_log.csv")
        return {"steps": stats["steps"], "seconds": round(time.perf_counter() - t0, 1),
                "final_loss": stats["final_loss"]}

    def test(model: nn.Module) -> dict[str, Any]:
        _, te = get_loaders(model)
        r = evaluate(model, te, topk=(1, 5), device=args.device, progress=False)
        model.cpu()
        return {"top1": r["top1"], "top5": r.get("top5"), "n": r["n"]}

    def record(row: dict[str, Any]) -> None:
        results.append(row)
        (out / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                     indent=2, default=str) + "\n")
        log(f"[{row['name']}] params {row['params']:,}  MACs {row['macs']:,}  "
            f"top1 {row['top1']}")

    def dense(name: str, spec: str, seed_offset: int) -> nn.Module:
        torch.manual_seed(args.seed + seed_offset)
        model = load_model(spec)
        c = count(model, INPUT)
        tr = train(model, args.epochs, args.lr, None, name)
        model = model.cpu().eval()
        save_weights(model, out / name)
        record({"name": name, "spec": spec, "kind": "from scratch", "epochs": args.epochs,
                **c, **test(model), "train": tr,
                "weights": str(out / name / "model.safetensors")})
        return model

    specs = {"alexnet": f"cifar:alexnet?hidden={args.hidden}",
             "squeezenet1_0": "cifar:squeezenet1_0", "squeezenet1_1": "cifar:squeezenet1_1"}
    trained: dict[str, nn.Module] = {}
    for i, name in enumerate(args.models):
        if name not in specs:
            ap.error(f"--models: unknown {name!r} (known: {', '.join(specs)})")
        trained[name] = dense(name, specs[name], i)

    for sr in args.sweep_sr:
        dense(f"squeezenet1_0_sr{sr:g}", f"cifar:squeezenet1_0?sr={sr:g}", 10)
    for pct in args.sweep_pct3x3:
        dense(f"squeezenet1_0_pct3x3_{pct:g}", f"cifar:squeezenet1_0?pct3x3={pct:g}", 20)

    if "alexnet" in trained and args.fractions:
        teacher = trained["alexnet"]
        total = count(teacher, INPUT)["params"]
        sq = count(load_model("cifar:squeezenet1_0"), INPUT)["params"]
        for ftxt in args.fractions:
            f = sq / total if ftxt == "squeezenet" else float(ftxt)
            tag = "squeezenet_size" if ftxt == "squeezenet" else f"{1 / f:g}x"
            name = f"alexnet_svd_tucker2_{tag}"
            t0 = time.perf_counter()
            student, p = compress(teacher, compression_rules(), INPUT, target={"params": f})
            student.pretrained_cfg = dict(teacher.pretrained_cfg)
            plan_s = round(time.perf_counter() - t0, 1)
            c = count(student, INPUT)
            zero = test(student.eval())
            tr = train(student, args.ft_epochs, args.ft_lr, teacher, name)
            student = student.cpu().eval()
            acc = test(student)
            save_weights(student, out / name)
            rep = {"name": name, "model": specs["alexnet"], "kind": "compressed + distilled",
                   "target": {"params": f},
                   "baseline": {**count(teacher, INPUT), **test(teacher)},
                   "compressed": {**c, **zero}, "finetuned": {**c, **acc}, "finetune": tr}
            save_run_dir(out / name, specs["alexnet"], p, rep)
            record({"name": name, "spec": specs["alexnet"], "kind": "compressed + distilled",
                    "target_params": f, **c, **acc, "zero_shot_top1": zero["top1"],
                    "train": tr, "plan_seconds": plan_s, "run_dir": str(out / name),
                    "epochs": args.epochs + args.ft_epochs})
            if not args.no_scratch:
                sname = f"{name}_scratch"
                scratch = reinit(copy.deepcopy(student), args.seed + 100)
                tr = train(scratch, args.epochs + args.ft_epochs, args.lr, None, sname)
                scratch = scratch.cpu().eval()
                acc = test(scratch)
                save_weights(scratch, out / sname)
                save_run_dir(out / sname, specs["alexnet"], p,
                             {"name": sname, "model": specs["alexnet"],
                              "kind": "factorized, from scratch",
                              "compressed": {**c, "top1": None},
                              "finetuned": {**c, **acc}, "finetune": tr})
                record({"name": sname, "spec": specs["alexnet"],
                        "kind": "factorized, from scratch", "target_params": f, **c, **acc,
                        "train": tr, "run_dir": str(out / sname),
                        "epochs": args.epochs + args.ft_epochs})

    # Markdown table and a compare recipe of everything produced
    lines = ["# SqueezeNet vs AlexNet, CIFAR-10 (JPEG copy), trained here", "",
             f"Budget: {args.epochs} epochs from scratch (compressed: + {args.ft_epochs} "
             f"distillation epochs; factorized-from-scratch: {args.epochs + args.ft_epochs}); "
             f"SGD lr {args.lr} (fine-tune {args.ft_lr}) cosine, momentum {args.momentum}, "
             f"wd {args.weight_decay}, batch {args.batch_size}, crop + flip"
             + (f", max {args.max_steps} steps per phase" if args.max_steps else "") + ".", "",
             "| Model | Kind | Params | MACs | Top-1 % | Top-5 % |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['kind']} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['top1']:.2f} | {r['top5'] if r['top5'] is None else round(r['top5'], 2)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    entries = []
    for r in results:
        if "run_dir" in r:
            entries.append({"run": str(Path(r["run_dir"]).resolve()), "label": r["name"]})
        else:
            entries.append({"model": r["spec"], "weights": str(Path(r["weights"]).resolve()),
                            "label": r["name"]})
    import yaml

    (out / "compare.yaml").write_text(
        "# written by tools/cifar_squeezenet_vs_alexnet.py: compresscnn compare --recipe THIS\n"
        + yaml.safe_dump({"title": "SqueezeNet vs AlexNet (CIFAR-10, trained here)",
                          "compare": entries,
                          "data": {"cifar10": {"root": str(Path(args.data).resolve()),
                                               **({"test_subset": args.test_subset}
                                                  if args.test_subset else {})}},
                          "latency_batches": [1, 32], "threads": 2,
                          "output": str(out / "compare")}, sort_keys=False))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'compare.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
