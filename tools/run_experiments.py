"""Run the measured experiments as users would: each job is one ``compresscnn run RECIPE
--set ...`` command (resumed with ``--resume`` when an interrupted run is found), and its
report is summarised into ``tools/results/<job>.json`` (with the command, date, commit and
machine) as soon as it lands. Jobs whose JSON exists are skipped, so the script can be
stopped and started again, and run in several processes on disjoint ``--jobs``.

    python tools/run_experiments.py --list
    python tools/run_experiments.py --jobs scratch_resnet20_dense scratch_squeezenet1_1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results"
SCRATCH = "recipes/cifar10_scratch.yaml"
LOWRANK = "recipes/cifar10_scratch_lowrank.yaml"
R20 = "recipes/resnet20_cifar10_2x.yaml"
R56 = "recipes/resnet56_cifar10_2x.yaml"
R20_3X = "recipes/resnet20_cifar10_3x.yaml"
R56_3X = "recipes/resnet56_cifar10_3x.yaml"
SQ = "recipes/squeezenet1_1_val500.yaml"
MNV2 = "recipes/mobilenet_v2_tflite_val500.yaml"
#: the 3x recipes' overrides for 5x fewer MACs (more calibration images, longer distillation)
FIVE_X = ["target.macs=0.2", "calibration.batches=128", "calibration.distill.epochs=8"]
#: 10x fewer MACs on the 3x recipes' 4,096 calibration images, zero-shot
TEN_X = ["target.macs=0.1", "calibration.distill.epochs=8", "finetune.enabled=false"]
#: the 2x recipes' overrides for the dense model given the same fine-tuning
DENSE = ["rules=[]", "target=null", "calibration=null"]
CP = ["rules.0.method=cp"]  # the 3x recipes' rule with CP ranks from spectral estimates
#: AlexNet-CIFAR factorized as recipes/cifar10_alexnet_to_squeezenet_size.yaml does it
ALEXNET_RULES = ('rules=[{match: "classifier.*", method: svd}, '
                 "{match: [features.3, features.6, features.8, features.10], method: cp}]")

#: job -> (recipe, --set overrides). One schedule per experiment (see the recipes).
JOBS: dict[str, tuple[str, list[str]]] = {
    # SqueezeNet vs AlexNet at CIFAR scale, from scratch
    "scratch_alexnet": (SCRATCH, ["model.spec=cifar:alexnet"]),
    "scratch_squeezenet1_0": (SCRATCH, ["model.spec=cifar:squeezenet1_0"]),
    "scratch_squeezenet1_1": (SCRATCH, ["model.spec=cifar:squeezenet1_1"]),
    # the trained AlexNet-CIFAR compressed to SqueezeNet 1.0's size (after scratch_alexnet),
    # and the same factorized architecture trained from scratch
    "alexnet_to_squeezenet_size": ("recipes/cifar10_alexnet_to_squeezenet_size.yaml", []),
    "scratch_alexnet_factorized": (SCRATCH, [ALEXNET_RULES, "target.params=0.0484"]),
    "scratch_alexnet_factorized_spectral": (SCRATCH, [
        ALEXNET_RULES, "target.params=0.0484", "train.init=spectral"]),
    "scratch_alexnet_factorized_semiorth": (SCRATCH, [
        ALEXNET_RULES, "target.params=0.0484", "train.semi_orthogonal=4"]),
    # the second seed of the rows whose gap is smallest (dense vs compressed AlexNet)
    "scratch_alexnet_seed1": (SCRATCH, ["model.spec=cifar:alexnet", "seed=1"]),
    "alexnet_to_squeezenet_size_seed1": ("recipes/cifar10_alexnet_to_squeezenet_size.yaml", [
        "model.weights=runs/experiments/scratch_alexnet_seed1/model.safetensors", "seed=1"]),
    "scratch_alexnet_factorized_seed1": (SCRATCH, [
        ALEXNET_RULES, "target.params=0.0484", "seed=1"]),
    # Cuttlefish on AlexNet: two dense epochs (its loss leaves ln 10 only at the end of the
    # first), then the same layers factorized at their stable ranks for the other three
    "scratch_alexnet_cuttlefish": (SCRATCH, [ALEXNET_RULES, "train.switch.max_epochs=2"]),
    # ResNet-20 at 2x fewer MACs: dense vs factorized from the start
    "scratch_resnet20_dense": (LOWRANK, ["rules=[]", "target=null"]),
    "scratch_resnet20_spatial_kaiming": (LOWRANK, []),
    "scratch_resnet20_spatial_spectral": (LOWRANK, ["train.init=spectral"]),
    "scratch_resnet20_spatial_semiorth": (LOWRANK, ["train.semi_orthogonal=4"]),
    # the second seed of the dense start and of the closest factorized one
    "scratch_resnet20_dense_seed1": (LOWRANK, ["rules=[]", "target=null", "seed=1"]),
    "scratch_resnet20_spatial_spectral_seed1": (LOWRANK, ["train.init=spectral", "seed=1"]),
    # Cuttlefish: one dense epoch, then factorized at the stable ranks for the other three
    "scratch_resnet20_spatial_cuttlefish": (LOWRANK, ["train.switch.max_epochs=1"]),
    # the shared pretrained weights decomposed (data-aware) and fine-tuned for as many epochs
    "pretrained_resnet20_spatial_ft": (R20, ["rules.0.method=spatial", "finetune.epochs=4"]),
    # the same comparison at five times the budget (20 epochs): dense, the closest
    # factorized start, per-factor Kaiming, and Cuttlefish switching after at most 5 epochs
    "scratch_resnet20_dense_e20": (LOWRANK, ["rules=[]", "target=null", "train.epochs=20"]),
    "scratch_resnet20_spatial_spectral_e20": (LOWRANK, ["train.init=spectral", "train.epochs=20"]),
    "scratch_resnet20_spatial_kaiming_e20": (LOWRANK, ["train.epochs=20"]),
    "scratch_resnet20_spatial_cuttlefish_e20": (LOWRANK, [
        "train.epochs=20", "train.switch.max_epochs=5", "train.switch.window=2"]),
    # ResNet-56, the same comparison: dense and factorized from the start, and the shared
    # pretrained weights decomposed and fine-tuned for as many epochs
    "scratch_resnet56_dense": (LOWRANK, ["model.spec=cifar:resnet56", "rules=[]",
                                         "target=null"]),
    "scratch_resnet56_spatial_kaiming": (LOWRANK, ["model.spec=cifar:resnet56"]),
    "scratch_resnet56_spatial_spectral": (LOWRANK, ["model.spec=cifar:resnet56",
                                                    "train.init=spectral"]),
    "scratch_resnet56_spatial_semiorth": (LOWRANK, ["model.spec=cifar:resnet56",
                                                    "train.semi_orthogonal=4"]),
    # Cuttlefish at this budget: one dense epoch, then factorized at the stable ranks
    "scratch_resnet56_spatial_cuttlefish": (LOWRANK, ["model.spec=cifar:resnet56",
                                                      "train.switch.max_epochs=1"]),
    "pretrained_resnet56_spatial_ft": (R56, ["rules.0.method=spatial", "finetune.enabled=true",
                                             "finetune.epochs=4"]),
    # headline: pretrained ResNets at 2x fewer MACs, data-aware (zero-shot and one epoch)
    "resnet20_cp_2x": (R20, []),
    "resnet20_cp_2x_fp32": (R20, ["finetune.amp=off"]),
    "resnet20_spatial_2x": (R20, ["rules.0.method=spatial", "finetune.enabled=false"]),
    "resnet20_tucker2_2x": (R20, ["rules.0.method=tucker2", "finetune.enabled=false"]),
    "resnet56_cp_2x": (R56, []),
    "resnet20_dense_1ep": (R20, DENSE),
    "resnet56_dense_1ep": (R56, [*DENSE, "finetune.enabled=true"]),
    # 3x and 5x fewer MACs: layer-wise fit on 4,096 images, then distilled on them (no
    # labels), then one epoch of fine-tuning
    "resnet20_cp_3x": (R20_3X, CP),
    "resnet20_cp_5x": (R20_3X, [*CP, *FIVE_X]),
    "resnet56_cp_3x": (R56_3X, CP),
    "resnet56_cp_5x": (R56_3X, [*CP, *FIVE_X]),
    # the fine-tuning epoch at 3x: learning rate, and distillation mixed with the labels
    "resnet20_cp_3x_lr005": (R20_3X, [*CP, "finetune.lr=0.005"]),
    "resnet20_cp_3x_lr02": (R20_3X, [*CP, "finetune.lr=0.02"]),
    "resnet20_cp_3x_kd05": (R20_3X, [
        *CP, "finetune.distill.enabled=true", "finetune.distill.alpha=0.5"]),
    # the lower fine-tuning rate, compressed and dense alike
    "resnet56_cp_3x_lr005": (R56_3X, [*CP, "finetune.lr=0.005"]),
    "resnet56_dense_1ep_lr005": (R56, [*DENSE, "finetune.enabled=true", "finetune.lr=0.005"]),
    "resnet20_dense_1ep_lr005": (R20, [*DENSE, "finetune.lr=0.005"]),
    # mixed methods per layer: method and rank chosen by measured error per MAC
    "resnet20_auto_3x": (R20_3X, ["rules.0.method=auto"]),
    "resnet56_auto_3x": (R56_3X, ["rules.0.method=auto"]),
    "resnet56_auto_5x": (R56_3X, ["rules.0.method=auto", *FIVE_X]),
    # the calibration distillation with the replaced layers' outputs matched too
    "resnet20_auto_3x_feat": (R20_3X, [
        "rules.0.method=auto", "calibration.distill.features=1.0"]),
    # the epoch at a quarter of the rate: a factorized layer moves its kernel faster than
    # a dense one at the same rate, in the directions it can move
    "resnet20_auto_3x_lr0025": (R20_3X, ["rules.0.method=auto", "finetune.lr=0.0025"]),
    "resnet20_auto_5x_lr0025": (R20_3X, [
        "rules.0.method=auto", *FIVE_X, "finetune.lr=0.0025"]),
    "resnet56_auto_5x_lr0025": (R56_3X, [
        "rules.0.method=auto", *FIVE_X, "finetune.lr=0.0025"]),
    "resnet20_dense_1ep_lr0025": (R20, [*DENSE, "finetune.lr=0.0025"]),
    "resnet20_auto_5x": (R20_3X, ["rules.0.method=auto", *FIVE_X]),
    # the epoch with the factors alone at 0.3 of the rate (BatchNorm, stem and classifier
    # at the full rate): the factors' own speed-up along the low-rank directions taken out
    "resnet20_auto_3x_flr03": (R20_3X, ["rules.0.method=auto", "finetune.factor_lr=0.3"]),
    "resnet56_auto_3x_flr03": (R56_3X, ["rules.0.method=auto", "finetune.factor_lr=0.3"]),
    "resnet20_auto_3x_output": (R20_3X, ["rules.0.method=auto", "allocation=output"]),
    # the epoch with a linear warm-up over its first fifth (78 of 391 steps), both models
    "resnet20_auto_3x_warm": (R20_3X, ["rules.0.method=auto", "finetune.warmup_steps=78"]),
    "resnet20_dense_1ep_warm": (R20, [*DENSE, "finetune.warmup_steps=78"]),
    "resnet56_auto_3x_flr03_seed1": (R56_3X, [
        "rules.0.method=auto", "finetune.factor_lr=0.3", "seed=1"]),
    "resnet20_auto_5x_flr03": (R20_3X, [
        "rules.0.method=auto", *FIVE_X, "finetune.factor_lr=0.3"]),
    # a second seed of the closest after-one-epoch comparison (ResNet-56 at 3x)
    "resnet56_dense_1ep_seed1": (R56, [*DENSE, "finetune.enabled=true", "seed=1"]),
    "resnet56_auto_3x_seed1": (R56_3X, ["rules.0.method=auto", "seed=1"]),
    "resnet56_auto_3x_seed2": (R56_3X, ["rules.0.method=auto", "seed=2"]),
    # a third seed of it, with the factor rate of the two-seed comparison
    "resnet56_dense_1ep_seed2": (R56, [*DENSE, "finetune.enabled=true", "seed=2"]),
    "resnet56_auto_3x_flr03_seed2": (R56_3X, [
        "rules.0.method=auto", "finetune.factor_lr=0.3", "seed=2"]),
    # the epoch spent first: the dense model given the epoch, then compressed without labels
    # (needs the dense job's run directory)
    "resnet20_epoch_first_3x": (R20_3X, [
        *CP, "model.weights=runs/experiments/resnet20_dense_1ep/model.safetensors",
        "finetune.enabled=false"]),
    "resnet56_epoch_first_3x": (R56_3X, [
        *CP, "model.weights=runs/experiments/resnet56_dense_1ep/model.safetensors",
        "finetune.enabled=false"]),
    # the 3x budget with one method on every layer: which factorization the epoch trains best
    "resnet20_spatial_3x": (R20_3X, ["rules.0.method=spatial"]),
    "resnet20_tucker2_3x": (R20_3X, ["rules.0.method=tucker2"]),
    # three epochs instead of one, compressed and dense: what the epochs close, and what not
    "resnet20_auto_3x_3ep": (R20_3X, ["finetune.epochs=3"]),
    "resnet20_dense_3ep": (R20, [*DENSE, "finetune.epochs=3"]),
    "resnet20_auto_5x_3ep": (R20_3X, [*FIVE_X, "finetune.epochs=3"]),
    "resnet56_auto_5x_3ep": (R56_3X, [*FIVE_X, "finetune.epochs=3"]),
    "resnet56_dense_3ep": (R56, [*DENSE, "finetune.enabled=true", "finetune.epochs=3"]),
    # ten epochs, compressed and dense (the same schedule and seed): does the gap close?
    "resnet20_dense_10ep": (R20, [*DENSE, "finetune.epochs=10"]),
    "resnet20_auto_3x_10ep": (R20_3X, ["finetune.epochs=10"]),
    "resnet20_auto_5x_10ep": (R20_3X, [*FIVE_X, "finetune.epochs=10"]),
    "resnet56_auto_5x_10ep": (R56_3X, [*FIVE_X, "finetune.epochs=10"]),
    "resnet56_dense_10ep": (R56, [*DENSE, "finetune.enabled=true", "finetune.epochs=10"]),
    # 10x fewer MACs without labels: 4,096 calibration images, 8 distillation passes
    "resnet20_auto_10x": (R20_3X, TEN_X),
    "resnet56_auto_10x": (R56_3X, TEN_X),
    "squeezenet1_1_auto_1.5x": (SQ, ["rules.0.method=auto"]),
    "squeezenet1_1_auto_1.5x_b31": (SQ, [
        "rules.0.method=auto", "calibration.batches=31"]),
    "squeezenet1_1_auto_1.5x_mixup": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 12, lr: 1.0e-4, mix: mixup}"]),
    # the budget weighted by each layer's measured output sensitivity
    "squeezenet1_1_auto_1.5x_sensitivity": (SQ, [
        "rules.0.method=auto", "allocation=sensitivity"]),
    # the mixup distillation scored on 6 held-out batches (192 images), its best pass kept
    "squeezenet1_1_auto_1.5x_mixup_holdout": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 12, lr: 1.0e-4, mix: mixup, holdout: 6}"]),
    # the same scored distillation in float32 at a thirtieth of the rate, 4 passes
    "squeezenet1_1_auto_1.5x_holdout_fp32": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 4, lr: 3.0e-6, mix: mixup, holdout: 6, amp: off}"]),
    # its pass 0: the fit on the 25 batches that the holdout of 6 leaves (the same images)
    "squeezenet1_1_auto_1.5x_b25": (SQ, [
        "rules.0.method=auto", "calibration.batches=25"]),
    "squeezenet1_1_auto_1.5x_holdout_fp32_e8": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 8, lr: 3.0e-6, mix: mixup, holdout: 6, amp: off}"]),
    # the budget on each candidate's error on the layer's outputs for the first calibration
    # batch (allocation: output) instead of its weight error
    "squeezenet1_1_auto_1.5x_output": (SQ, [
        "rules.0.method=auto", "allocation=output"]),
    # the recipe with other calibration images drawn (the seed draws the 256 fitted on)
    "squeezenet1_1_auto_1.5x_seed1": (SQ, ["seed=1"]),
    "squeezenet1_1_auto_1.5x_seed2": (SQ, ["seed=2"]),
    # the classifier (a 1x1 conv, a quarter of the MACs) among the budgeted layers too
    "squeezenet1_1_auto_1.5x_all": (SQ, [
        "rules.0.method=auto", "rules.0.match='*'"]),
    # the distillation with a warm-up and Inception-style crops (new views at every step)
    "squeezenet1_1_auto_1.5x_crop_mixup": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 24, lr: 3.0e-5, warmup: 0.1, crop: 0.35, mix: mixup, "
        "holdout: 6}"]),
    "squeezenet1_1_auto_1.5x_crop": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 24, lr: 3.0e-5, warmup: 0.1, crop: 0.35, holdout: 6}"]),
    # the same distillation with the replaced layers' outputs matched too (layer-wise)
    "squeezenet1_1_auto_1.5x_feat": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 4, lr: 1.0e-4, features: 1.0}"]),
    "squeezenet1_1_auto_1.5x_feat_mixup": (SQ, [
        "rules.0.method=auto", "calibration.batches=31",
        "calibration.distill={epochs: 12, lr: 1.0e-4, mix: mixup, features: 1.0}"]),
    "squeezenet1_1_cp_1.5x": (SQ, ["rules.0.method=cp"]),
    # distilled on the 1,000 unlabelled training images, mixed pairwise at every step
    "squeezenet1_1_cp_1.5x_mixup": (SQ, [
        "rules.0.method=cp", "calibration.batches=31",
        "calibration.distill={epochs: 12, lr: 1.0e-4, mix: mixup}"]),
    # MobileNetV2 1.0 from the shared TFLite file: SVD on the 1x1 convs, ranks from the
    # spectra of their weights (energy, the recipe) or of their outputs (data_spectral)
    "mobilenet_v2_svd_1.2x_energy": (MNV2, []),
    "mobilenet_v2_svd_1.5x_energy": (MNV2, ["target.macs=0.667"]),
    "mobilenet_v2_svd_1.2x": (MNV2, ["allocation=data_spectral"]),
    "mobilenet_v2_svd_1.5x": (MNV2, ["allocation=data_spectral", "target.macs=0.667"]),
    "mobilenet_v2_svd_late_1.2x": (MNV2, [
        "allocation=data_spectral", 'rules=[{match: "features.1[2-8].*", method: svd}]']),
    "mobilenet_v2_tucker2_1.2x": (MNV2, ["rules.0.method=tucker2", "allocation=energy"]),
    "mobilenet_v2_tucker2_1.5x": (MNV2, ["rules.0.method=tucker2", "allocation=energy",
                                         "target.macs=0.667"]),
    "mobilenet_v2_auto_1.2x": (MNV2, ["rules.0.method=auto", "allocation=spectral"]),
    "demo": ("recipes/demo.yaml", []),
}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores"


def summarise(job: str, cmd: list[str], run_dir: Path, wall: float, threads: int) -> dict:
    rep = json.loads((run_dir / "report.json").read_text())
    stats = rep.get("finetune") or {}
    stage = rep.get("trained") or rep.get("finetuned") or {}
    zero = rep.get("compressed") or {}
    return {
        "job": job, "command": " ".join(cmd), "date": time.strftime("%Y-%m-%d"),
        "commit": _git("rev-parse", "--short", "HEAD"), "machine": cpu_model(),
        "threads": str(threads),
        "model": rep.get("model"), "top1": stage.get("top1"), "top5": stage.get("top5"),
        "agreement": stage.get("agreement"),
        "baseline_top1": (rep.get("baseline") or {}).get("top1"),
        "zero_shot_top1": zero.get("top1"), "zero_shot_agreement": zero.get("agreement"),
        "params": zero.get("params"), "macs": zero.get("macs"),
        "baseline_params": (rep.get("baseline") or {}).get("params"),
        "baseline_macs": (rep.get("baseline") or {}).get("macs"),
        "timings": rep.get("timings"), "calibration": rep.get("calibration"),
        "epochs": stats.get("epochs"), "train_seconds": stats.get("seconds"),
        "images_per_s": stats.get("images_per_s"), "amp": stats.get("amp"),
        "memory_format": stats.get("memory_format"), "wall_seconds": wall,
        "resumed_from_step": stats.get("resumed_from_step"),
        "latency": rep.get("latency"), "onnx_bytes": (rep.get("onnx") or {}).get("bytes"),
        "switch": rep.get("switch"),
    }


def add_compress_options(ap: argparse.ArgumentParser, out: str) -> None:
    """The options the recipe-looping benchmarks share: the data-aware fit, the budget's
    allocation, threads and where runs and results go."""
    ap.add_argument("--calibrate", type=int, default=8, metavar="BATCHES",
                    help="calibration batches of the data-aware fit (0: data-free)")
    ap.add_argument("--solver", choices=["closed_form", "adam"], default="closed_form")
    ap.add_argument("--fit-through", choices=["layer", "bn", "activation"],
                    default="activation")
    ap.add_argument("--refit-dense", action="store_true")
    ap.add_argument("--bn-recalibrate", action="store_true")
    ap.add_argument("--allocation", choices=["spectral", "energy", "sensitivity"],
                    default="spectral")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / out)
    ap.add_argument("--json", type=Path, required=True)


def compress_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides for :func:`add_compress_options`' options."""
    sets = [f"allocation={args.allocation}"]
    if not args.calibrate:
        return sets + ["calibration=null"]
    flag = {True: "true", False: "false"}
    return sets + [f"calibration.batches={args.calibrate}", f"calibration.solver={args.solver}",
                   f"calibration.fit_through={args.fit_through}",
                   f"calibration.refit_dense={flag[args.refit_dense]}",
                   f"calibration.bn_recalibrate={flag[args.bn_recalibrate]}"]


def run_recipe(job: str, recipe: str, sets: list[str], out_root: Path, threads: int) -> dict:
    """``compresscnn run recipe --set ...`` into ``out_root/job`` (resumed when an interrupted
    run left a checkpoint), and its report summarised."""
    out = out_root / job
    cmd = ["compresscnn", "run", recipe, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    resume = (out_root / f"{job}.partial" / "checkpoints" / "last.pt").is_file()
    if not resume and out.exists():
        cmd.append("--overwrite")  # a finished run of the same job: measured again
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    exe = [sys.executable, "-m", "compresscnn", *cmd[1:]] + (["--resume"] if resume else [])
    subprocess.run(exe, cwd=ROOT, env=env, check=True)
    return summarise(job, cmd, out, time.perf_counter() - t0, threads)


def run_job(job: str, out_root: Path, threads: int) -> Path:
    recipe, sets = JOBS[job]
    row = run_recipe(job, recipe, sets, out_root, threads)
    path = RESULTS / f"{job}.json"
    path.write_text(json.dumps(row, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for job, (recipe, sets) in JOBS.items():
            print(f"{job}: compresscnn run {recipe} " + " ".join(f"--set {s}" for s in sets))
        return 0
    failed = []
    for job in a.jobs:
        if (RESULTS / f"{job}.json").is_file():
            print(f"[{job}] done already ({RESULTS / f'{job}.json'})")
            continue
        print(f"[{job}] running", flush=True)
        try:
            print(f"[{job}] wrote {run_job(job, a.out, a.threads)}", flush=True)
        except subprocess.CalledProcessError as exc:  # the next jobs still run
            failed.append(job)
            print(f"[{job}] failed (exit {exc.returncode}); rerunning the job resumes it",
                  flush=True)
    if failed:
        print(f"failed: {' '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
