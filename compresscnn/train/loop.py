"""Fine-tune a compressed network, distilling from the original (Hinton et al., 2015).

The loss is ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y)`` with ``p = softmax(z / T)``
for teacher logits ``t`` and student logits ``s``. ``KL(p_t || p_s)`` differs from Hinton's
soft-target cross-entropy only by the teacher's entropy, a constant, so the gradients are the
same; the KL form is 0 when the student matches the teacher, which makes the logged number
readable. The ``T^2`` factor keeps the soft-target gradients on the same scale as the hard
ones when ``T`` changes (Hinton et al., §2).

Training state and exact resume
-------------------------------
``checkpoint_dir/last.pt`` holds model, optimizer, LR scheduler and grad-scaler state, the
global step, the epoch and the position within it, and the RNG states (torch, CUDA, NumPy,
Python). It contains only tensors and plain containers, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs when a checkpoint is read). Its
sha256 is written beside it (``last.pt.sha256``, :func:`compresscnn.util.common.atomic_torch_save`)
and checked before it is read: a checkpoint with one bit changed is refused, naming it.

A resumed run ends with the same weights as an uninterrupted one, provided the loader yields
the same batches in an epoch given the epoch number. This module makes that true for ordinary
``DataLoader``s: at the start of every epoch it calls ``sampler.set_epoch(epoch)`` when the
sampler has it (``DistributedSampler``), else gives a ``RandomSampler``-like sampler (one with a
``generator`` attribute) a fresh ``torch.Generator`` seeded ``seed + epoch``, and gives the
``DataLoader`` itself a generator derived from the same numbers (it seeds the workers). On
resume, the batches already done in the interrupted epoch are drawn and discarded (data loading
only, no compute), then the RNG states are restored, so random augmentations done in the main
process (``num_workers=0``) or in (non-persistent) workers continue exactly. Loaders with
``persistent_workers=True`` and random augmentation, or custom iterables with their own
randomness, resume correctly but not bit-exactly. Under DDP, model and optimizer resume
exactly, and every rank restores rank 0's RNG state.

Distributed data parallel
-------------------------
The launcher (``torchrun``) initialises the process group; this function only detects it.
The student is wrapped in ``DistributedDataParallel`` (BatchNorm converted to SyncBatchNorm
when training on CUDA with NCCL, and converted back before returning), the teacher is not
wrapped. Only rank 0 writes checkpoints and the CSV log.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from compresscnn.train.config import MEMORY_FORMATS, OPTIMIZERS, Distill
from compresscnn.errors import CheckpointError, CompressError, DataError
from compresscnn.measure.evaluation import split_batch
from compresscnn.io.models.checkpoints import check_state_dict, load_torch_file
from compresscnn.util.modules import kd_divergence
from compresscnn.util.training import BestWeights, cutout, mixup_labels
from compresscnn.util.common import (
    SCHEDULES,
    atomic_torch_save,
    atomic_write_text,
    check_digest,
    digest_path,
    get_world_size,
    is_dist,
    is_main_process,
    lr_factor,
    resolve_amp,
    resolve_device,
    seed_everything,
)

__all__ = [
    "finetune",
    "distillation_loss",
    "param_groups",
    "build_optimizer",
    "lr_factor",
    "load_checkpoint",
    "DEFAULT_DISTILL",
    "CHECKPOINT_NAME",
    "LOG_NAME",
]

log = logging.getLogger(__name__)

#: the ``distill`` default of :func:`finetune`: the recipe's ``finetune.distill`` defaults
DEFAULT_DISTILL: dict[str, Any] = Distill().model_dump()
CHECKPOINT_NAME = "last.pt"
BEST_NAME = "best.pt"
LOG_NAME = "finetune_log.csv"
CHECKPOINT_FORMAT = "compresscnn.finetune/1"
LOG_COLUMNS = ("step", "epoch", "loss", "kd_loss", "ce_loss", "lr", "images_per_s")


# --------------------------------------------------------------------------- loss
def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kd, ce)``: ``loss = alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y)``
    (:func:`compresscnn.util.modules.kd_divergence`, in float32 whatever the autocast dtype)."""
    kd = kd_divergence(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits.float(), targets)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def _distill_config(distill: Mapping[str, Any] | bool | None) -> dict[str, Any]:
    if distill is None or distill is False:
        return {**DEFAULT_DISTILL, "enabled": False}
    if distill is True:
        return dict(DEFAULT_DISTILL)
    unknown = sorted(set(distill) - set(DEFAULT_DISTILL))
    if unknown:
        raise CompressError(
            f"distill: unknown key {unknown[0]!r} (known: {', '.join(sorted(DEFAULT_DISTILL))})"
        )
    cfg = {**DEFAULT_DISTILL, **distill}
    if not (0.0 <= float(cfg["alpha"]) <= 1.0):
        raise CompressError(f"distill.alpha: must be in [0, 1], got {cfg['alpha']!r}")
    if not float(cfg["temperature"]) > 0:
        raise CompressError(f"distill.temperature: must be > 0, got {cfg['temperature']!r}")
    cfg["alpha"], cfg["temperature"] = float(cfg["alpha"]), float(cfg["temperature"])
    cfg["enabled"] = bool(cfg["enabled"])
    return cfg


# --------------------------------------------------------------------------- optimiser
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
    """SGD (momentum, ``nesterov=False``) or AdamW (``betas=(momentum, 0.999)`` when
    ``momentum`` is given as 0.9, i.e. the usual defaults), over :func:`param_groups`; a
    group with an ``lr_scale`` starts at ``lr`` times it (schedules scale every group alike)."""
    key = str(name).lower()
    groups = param_groups(model, weight_decay, lr_scale)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise CompressError(f"optimizer: unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


# --------------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(py_version), "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------- loader
def _seed_loader(loader: Any, seed: int, epoch: int) -> None:
    """Make the loader's order (and worker seeds) a function of ``(seed, epoch)`` only."""
    samplers = []
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        s = getattr(owner, "sampler", None)
        if s is not None and all(s is not t for t in samplers):
            samplers.append(s)
    for s in samplers:
        if hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
        elif hasattr(s, "generator"):
            s.generator = torch.Generator().manual_seed(seed + epoch)
    if isinstance(loader, torch.utils.data.DataLoader):
        # The DataLoader draws its workers' base seed from this generator (or from the global
        # torch RNG when it is None) each time an iterator is created.
        loader.generator = torch.Generator().manual_seed((seed + epoch) * 7919 + 104729)


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a fine-tuning checkpoint safely (``weights_only=True``) and check its format.

    Raises :class:`CheckpointError` naming ``path`` when it is missing, unreadable, corrupt,
    needs unsafe unpickling, or is not a compresscnn fine-tuning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    _check_digest(path)
    ck = load_torch_file(path)  # corrupt, truncated or unsafe: one line naming the file
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        found = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(
            f"{path}: not a compresscnn fine-tuning checkpoint (format {found!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng") if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    _check_fields(path, ck)
    return ck


def _check_digest(path: Path) -> None:
    """A checkpoint is read only when its content hash matches the one written beside it
    (``last.pt.sha256``): torch does not check its zip's CRCs, so a flipped bit would load.
    One written without (an older version) is read with a warning."""
    if not check_digest(path):
        log.warning("%s has no %s beside it (written by an older version?): read without "
                    "checking its content hash", path, digest_path(path).name)


def _check_fields(path: Path, ck: dict[str, Any]) -> None:
    """The types of a checkpoint's fields, and that its RNG state can be restored (tried,
    then this process's state is put back), so a crafted file is a one-line error."""
    for key in ("step", "epoch", "batch_in_epoch"):
        v = ck[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{path}: checkpoint field {key!r} is {v!r}, expected an int >= 0")
    for key in ("model", "optimizer", "scheduler", "rng", "config"):
        if not isinstance(ck.get(key, {}), dict):
            raise CheckpointError(f"{path}: checkpoint field {key!r} is a "
                                  f"{type(ck[key]).__name__}, expected a mapping")
    bad = [k for k, v in ck["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: checkpoint field 'model' holds a non-tensor at {bad[0]!r}")
    opt = ck["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"{path}: checkpoint field 'optimizer' is not an optimizer state")
    current = _rng_state()
    try:
        _set_rng_state(ck["rng"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: checkpoint field 'rng' cannot be restored "
                              f"({_one_line(exc)})") from None
    finally:
        _set_rng_state(current)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class _SyncBNReverter:
    """Convert BatchNorm to SyncBatchNorm in place, and back (sharing the parameters)."""

    def __init__(self, model: nn.Module) -> None:
        self.swapped: list[tuple[nn.Module, str, nn.Module]] = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    sync = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                    setattr(parent, name, sync)
                    self.swapped.append((parent, name, child))

    def revert(self) -> None:
        for parent, name, original in self.swapped:
            sync = getattr(parent, name)
            # parameters are shared objects; buffers may have been re-assigned
            for bname, buf in sync.named_buffers(recurse=False):
                if buf is not None:
                    setattr(original, bname, buf)
            original.train(sync.training)
            setattr(parent, name, original)
        self.swapped.clear()


# --------------------------------------------------------------------------- CSV log
class _CsvLog:
    """Buffers per-step losses as device tensors; writes them every ``every`` steps so that
    training on a GPU does not synchronise after each step."""

    def __init__(self, path: Path | None, every: int, *, resume_step: int | None) -> None:
        self.path = path
        self.every = max(1, int(every))
        self.rows: list[tuple[int, int, float, torch.Tensor, int]] = []
        self.window_start = time.perf_counter()
        self.last: dict[str, float | None] = {}
        self.section, self.clip, self.amp = "finetune", None, None  # for the non-finite message
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.is_file():
            # Drop rows logged after the checkpoint by the interrupted run: they are redone.
            with path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
            lines = [",".join(LOG_COLUMNS)] + [",".join(r.get(c) or "" for c in LOG_COLUMNS) for r in kept]
            atomic_write_text(path, "\n".join(lines) + "\n")
        else:
            atomic_write_text(path, ",".join(LOG_COLUMNS) + "\n")

    def add(self, step: int, epoch: int, lr: float, losses: torch.Tensor, images: int) -> bool:
        self.rows.append((step, epoch, lr, losses, images))
        return len(self.rows) >= self.every

    def flush(self) -> None:
        if not self.rows:
            return
        now = time.perf_counter()
        values = torch.stack([r[3] for r in self.rows]).float().cpu().tolist()  # one sync
        ips = sum(r[4] for r in self.rows) / max(now - self.window_start, 1e-9)
        self.window_start = now
        lines = []
        for (step, epoch, lr, _, _), (loss, kd, ce) in zip(self.rows, values):
            if not math.isfinite(loss):
                self.rows.clear()
                raise CompressError(
                    f"{self.section}: loss became {loss} at step {step} (lr {lr:.3g}); lower "
                    f"{self.section}.lr, add {self.section}.warmup_steps or set "
                    f"{self.section}.clip_grad_norm (now {self.clip})"
                    + (f", or set {self.section}.amp: off (now {self.amp})" if self.amp else "")
                )
            kd_s = "" if math.isnan(kd) else f"{kd:.6g}"
            lines.append(f"{step},{epoch},{loss:.6g},{kd_s},{ce:.6g},{lr:.6g},{ips:.1f}")
        self.last = {"loss": values[-1][0], "kd_loss": values[-1][1], "ce_loss": values[-1][2]}
        self.rows.clear()
        if self.path is not None:
            with self.path.open("a", newline="") as f:
                f.write("\n".join(lines) + "\n")


def resolve_memory_format(memory_format: str, model: nn.Module) -> torch.memory_format:
    """``auto``: channels_last for a model with 2-D convolutions (oneDNN and cuDNN run NHWC
    convolutions without layout conversions; measured 1.1-2x faster per CPU training step,
    BENCHMARKS.md), contiguous otherwise."""
    key = str(memory_format).lower()
    if key not in MEMORY_FORMATS:
        raise CompressError(f"memory_format: unknown value {memory_format!r} "
                            f"(known: {', '.join(MEMORY_FORMATS)})")
    if key == "auto":
        key = "channels_last" if any(isinstance(m, nn.Conv2d) for m in model.modules()) \
            else "contiguous"
    return torch.channels_last if key == "channels_last" else torch.contiguous_format


class _Best(BestWeights):
    """Keeps the weights that scored best on the held-out evaluation (``keep: best``), in
    memory and as ``best.pt`` beside ``last.pt`` (so that a resumed run still knows them)."""

    def __init__(self, path: Path | None, state: Mapping[str, Any] | None) -> None:
        super().__init__(on_new_best=self._save)
        self.path, self.main = path, is_main_process()
        if state:
            self.score, self.epoch = state.get("score"), state.get("epoch")
            self.history = [dict(h) for h in state.get("history", [])]
            if path is not None and path.is_file() and self.score is not None:
                _check_digest(path)
                self.weights = load_torch_file(path)

    def _save(self, weights: dict[str, torch.Tensor]) -> None:
        if self.path is not None and self.main:
            atomic_torch_save(weights, self.path, digest=True)

    def state(self) -> dict[str, Any]:
        return {"score": self.score, "epoch": self.epoch, "history": self.history}


def _callbacks(callbacks: Sequence[Any], name: str) -> list[Callable[..., Any]]:
    return [getattr(c, name) for c in callbacks if callable(getattr(c, name, None))]


# --------------------------------------------------------------------------- training
def finetune(
    student: nn.Module, train_loader: Iterable, *, teacher: nn.Module | None = None,
    epochs: int = 1, max_steps: int | None = None, optimizer: str = "sgd", lr: float = 0.01,
    momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "cosine",
    warmup_steps: int = 0, distill: Mapping[str, Any] | bool | None = DEFAULT_DISTILL,
    device: str | torch.device = "auto", amp: str | bool | None = "auto",
    memory_format: str = "auto", compile: bool = False, label_smoothing: float = 0.0,
    clip_grad_norm: float | None = None, mixup: float = 0.0, cutout: int = 0,
    callbacks: Sequence[Any] = (), evaluator: Callable[[nn.Module], float] | None = None,
    keep: str = "last", checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None, resume: bool = False, log_every: int = 50,
    log_path: str | Path | None = None, seed: int = 0, progress: bool = True,
    section: str = "finetune", lr_scale: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Train ``student`` in place on ``train_loader`` (batches of ``(images, labels)``),
    distilling from ``teacher`` when given and ``distill["enabled"]``.

    The run lasts ``epochs * len(train_loader)`` steps, or exactly ``max_steps`` steps when
    given (``max_steps`` overrides ``epochs``, as in HF Transformers; the last epoch may be
    partial). The LR schedule spans those steps and is stepped per batch. ``student`` is left
    on ``device`` in train mode, in contiguous memory format; ``teacher`` is moved to
    ``device`` and kept in eval mode.

    Speed: ``amp="auto"`` is bf16 autocast on CUDA devices that support it and on CPUs that
    compute bf16 in hardware (:func:`compresscnn.util.common.cpu_bf16_native`), fp32 elsewhere;
    ``memory_format="auto"`` trains conv nets in channels_last; ``compile=True`` wraps the
    forward pass in ``torch.compile``.

    Regularisation: ``label_smoothing`` (cross-entropy term), ``mixup`` (Beta(a, a) mixing of
    batch pairs, 0 = off), ``cutout`` (square side in pixels, 0 = off), ``clip_grad_norm``
    (global L2 norm of the gradients, None = off).

    ``lr_scale``: module name -> multiplier of the learning rate of the parameters under it
    (:func:`param_groups`); the schedule scales every group alike.

    ``callbacks``: objects with any of ``penalty() -> Tensor`` (added to the loss),
    ``after_step(step)`` (after each optimizer step, with the 1-based global step) and
    ``on_epoch_end(epoch, model) -> bool`` (True stops the run after that epoch).
    ``evaluator(model) -> score`` (higher is better, e.g. top-1 on held-out images) runs after
    every epoch; ``keep="best"`` returns the student with the weights of its best epoch.

    With ``checkpoint_dir``, ``last.pt`` is written atomically at the end of every epoch,
    every ``checkpoint_every`` steps and at the end; ``resume=True`` continues from it (a
    missing, corrupt or mismatched checkpoint is a :class:`CheckpointError`). The per-step CSV
    log (``step,epoch,loss,kd_loss,ce_loss,lr,images_per_s``) goes to ``log_path``, or
    ``checkpoint_dir/finetune_log.csv``, or nowhere. A non-finite loss stops the run with a
    message naming the options (``section``.lr, warm-up, clipping, amp) that help.

    Returns ``{"steps", "epochs", "images", "seconds", "images_per_s", "final_loss",
    "log_csv", "checkpoint", "resumed_from_step", "total_steps", "amp", "memory_format",
    "compile", "device", "distill", "history", "best_epoch", "best_score", "kept",
    "stopped_early"}``; ``steps`` is the global step reached (including steps done before a
    resume), ``images``/``seconds`` count this call only (all ranks).
    """
    s = _settings(student, train_loader, teacher, epochs=epochs, max_steps=max_steps,
                  schedule=schedule, distill=distill, device=device, amp=amp,
                  memory_format=memory_format, keep=keep, evaluator=evaluator,
                  checkpoint_every=checkpoint_every, section=section)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None
    if resume and ckpt_path is None:
        raise CheckpointError("finetune: resume=True needs a checkpoint_dir")
    csv_path = Path(log_path) if log_path is not None else (ckpt_dir / LOG_NAME if ckpt_dir else None)
    ck, config, forward, sync_bn = _prepare(student, teacher, s, ckpt_path, resume=resume,
                                            optimizer=optimizer, seed=seed, compile=compile)
    opt, sched, scaler = _build_schedule(student, s, optimizer, lr=lr, momentum=momentum,
                                        weight_decay=weight_decay, warmup_steps=warmup_steps,
                                        lr_scale=lr_scale)
    loop = _Loop(student=student, forward=forward,
                 teacher=teacher if s.use_kd else None, loader=train_loader, opt=opt,
                 sched=sched, scaler=scaler, s=s, ckpt_path=ckpt_path, config=config,
                 best=_Best(ckpt_dir / BEST_NAME if ckpt_dir is not None else None,
                            ck.get("best") if ck is not None else None),
                 callbacks=callbacks, evaluator=evaluator, seed=seed, section=section,
                 checkpoint_every=checkpoint_every, label_smoothing=label_smoothing,
                 clip_grad_norm=clip_grad_norm, mixup=mixup, cutout=cutout)
    if ck is not None:
        loop.resume(ck)
    loop.open_log(csv_path, log_every, progress)
    t0 = time.perf_counter()
    try:
        loop.run()
    finally:
        if loop.bar is not None:
            loop.bar.close()
        if sync_bn is not None:
            sync_bn.revert()
        student.to(memory_format=torch.contiguous_format)
        if s.use_kd:
            teacher.to(memory_format=torch.contiguous_format)  # type: ignore[union-attr]
    if keep == "best" and loop.best.weights is not None:
        student.load_state_dict(loop.best.weights)
    return _result(loop, time.perf_counter() - t0, keep=keep, compile=compile,
                   csv_path=csv_path)


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of :func:`finetune` that the loop reads."""

    dev: torch.device
    amp_dtype: torch.dtype | None
    kd_cfg: dict[str, Any]
    use_kd: bool
    schedule: str
    mem: torch.memory_format
    steps_per_epoch: int
    total_steps: int


def _settings(student: nn.Module, train_loader: Iterable, teacher: nn.Module | None, *,
              epochs: int, max_steps: int | None, schedule: str,
              distill: Mapping[str, Any] | bool | None, device: str | torch.device,
              amp: str | bool | None, memory_format: str, keep: str,
              evaluator: Callable[[nn.Module], float] | None, checkpoint_every: int | None,
              section: str) -> _Settings:
    """Check :func:`finetune`'s arguments (one-line errors naming ``section``'s keys)."""
    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    kd_cfg = _distill_config(distill)
    schedule = str(schedule).lower()
    if schedule not in SCHEDULES:
        raise CompressError(f"schedule: unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if keep not in ("last", "best"):
        raise CompressError(f"{section}.keep: must be 'last' or 'best', got {keep!r}")
    if keep == "best" and evaluator is None:
        raise CompressError(f"{section}.keep: best needs held-out images to score each epoch")
    mem = resolve_memory_format(memory_format, student)
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError("finetune needs a loader with a length (e.g. a DataLoader)") from exc
    if steps_per_epoch <= 0:
        raise DataError(f"{section}: the training loader is empty")
    total_steps = int(max_steps) if max_steps is not None else int(epochs) * steps_per_epoch
    if total_steps <= 0:
        raise CompressError(f"{section}: nothing to train (epochs={epochs}, max_steps={max_steps})")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise CompressError(f"checkpoint_every: must be a positive number of steps, got {checkpoint_every}")
    return _Settings(dev, amp_dtype, kd_cfg, bool(kd_cfg["enabled"] and teacher is not None),
                     schedule, mem, steps_per_epoch, total_steps)


def _prepare(student: nn.Module, teacher: nn.Module | None, s: _Settings,
             ckpt_path: Path | None, *, resume: bool, optimizer: str, seed: int,
             compile: bool) -> tuple[dict[str, Any] | None, dict[str, Any], Callable, Any]:
    """Seed, move the models to the device and memory format, read the checkpoint to resume
    from (its weights loaded into ``student``), and wrap ``student`` for DDP / compile.
    Returns ``(checkpoint or None, the run's config a checkpoint must match, the forward
    callable, the SyncBatchNorm reverter or None)``."""
    seed_everything(seed)
    student.to(s.dev)
    student.to(memory_format=s.mem)
    if s.use_kd:
        assert teacher is not None
        teacher.to(s.dev).eval()
        teacher.to(memory_format=s.mem)
    ck = load_checkpoint(ckpt_path) if resume and ckpt_path is not None else None
    config = {"total_steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch,
              "optimizer": str(optimizer).lower(), "world_size": get_world_size()}
    if ck is not None:
        _resume_model(ck, ckpt_path, student, config)
    distributed = is_dist()
    sync_bn = _SyncBNReverter(student) if (
        distributed and s.dev.type == "cuda" and dist.get_backend() == "nccl") else None
    model: nn.Module = student
    if distributed:
        model = DDP(student, device_ids=[s.dev.index] if s.dev.type == "cuda" else None)
    return ck, config, (torch.compile(model) if compile else model), sync_bn


def _build_schedule(student: nn.Module, s: _Settings, optimizer: str, *, lr: float,
                   momentum: float, weight_decay: float, warmup_steps: int,
                   lr_scale: Mapping[str, float] | None = None,
                   ) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """The optimizer, its per-step LR schedule over ``s.total_steps`` and the grad scaler
    (active for fp16 autocast only)."""
    opt = build_optimizer(student, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                          lr_scale=lr_scale)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, s.total_steps, warmup_steps=warmup_steps, schedule=s.schedule)
    )
    scaler = torch.amp.GradScaler(s.dev.type, enabled=s.amp_dtype == torch.float16)
    return opt, sched, scaler


# --------------------------------------------------------------------------- checkpoint I/O
def _resume_model(ck: Mapping[str, Any], ckpt_path: Path | None, student: nn.Module,
                  config: Mapping[str, Any]) -> None:
    """Check that ``ck`` was written by a run of the same length and world size, and load its
    weights into ``student``."""
    for key, value in config.items():
        if ck.get("config", {}).get(key) != value:
            raise CheckpointError(
                f"{ckpt_path}: checkpoint was written with {key}={ck.get('config', {}).get(key)!r}, "
                f"this run has {key}={value!r}"
            )
    check_state_dict(ck["model"], student.state_dict(), f"checkpoint {ckpt_path}")
    try:
        student.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the model ({_one_line(exc)})") from exc


def _resume_optimization(ck: Mapping[str, Any], ckpt_path: Path | None, opt: Any, sched: Any,
                         scaler: Any) -> None:
    try:
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_path}: optimizer state does not fit ({_one_line(exc)})") from exc


# --------------------------------------------------------------------------- epoch loop
@dataclass(eq=False)
class _Loop:
    """One fine-tuning run: what it trains with, and the position a checkpoint stores
    (global step, epoch, batch within it, RNG state to restore, early stop)."""

    student: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    teacher: nn.Module | None
    loader: Iterable
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    s: _Settings
    ckpt_path: Path | None
    config: dict[str, Any]
    best: _Best
    callbacks: Sequence[Any]
    evaluator: Callable[[nn.Module], float] | None
    seed: int
    section: str
    checkpoint_every: int | None
    label_smoothing: float
    clip_grad_norm: float | None
    mixup: float
    cutout: int
    logger: Any = None
    bar: Any = None
    step: int = 0
    epoch: int = 0
    pos: int = 0
    images: int = 0
    stopped: bool = False
    last_saved: int = -1
    resumed_from: int | None = None
    rng_to_restore: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        self.main, self.world, self.distributed = is_main_process(), get_world_size(), is_dist()
        self.after_step = _callbacks(self.callbacks, "after_step")
        self.penalties = _callbacks(self.callbacks, "penalty")
        self.nan = torch.tensor(float("nan"), device=self.s.dev)

    def resume(self, ck: Mapping[str, Any]) -> None:
        """Continue from checkpoint ``ck`` (its model weights are already loaded)."""
        _resume_optimization(ck, self.ckpt_path, self.opt, self.sched, self.scaler)
        self.step, self.epoch, self.pos = int(ck["step"]), int(ck["epoch"]), int(ck["batch_in_epoch"])
        self.rng_to_restore = ck["rng"]
        log.info("resuming from %s at step %d (epoch %d, batch %d)", self.ckpt_path, self.step,
                 self.epoch, self.pos)
        self.resumed_from = self.last_saved = self.step
        self.stopped = bool(ck.get("stopped"))

    def open_log(self, csv_path: Path | None, log_every: int, progress: bool) -> None:
        """The CSV log (rank 0; rows after a resumed step dropped) and the progress bar."""
        self.logger = _CsvLog(csv_path if self.main else None, log_every,
                              resume_step=self.resumed_from)
        self.logger.section, self.logger.clip = self.section, self.clip_grad_norm
        amp = self.s.amp_dtype
        self.logger.amp = str(amp).replace("torch.", "") if amp is not None else None
        if progress and self.main:
            self.bar = tqdm(total=self.s.total_steps, initial=self.step, desc=self.section,
                            disable=None, dynamic_ncols=True)

    def checkpoint(self, next_epoch: int, next_pos: int) -> dict[str, Any]:
        """What ``last.pt`` holds (tensors and plain containers only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.student.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": next_epoch,
            "batch_in_epoch": next_pos,
            "config": self.config,
            "rng": _rng_state(),
            "best": self.best.state(),
            "stopped": self.stopped,
        }

    def save(self, next_epoch: int, next_pos: int) -> None:
        self.logger.flush()
        if self.ckpt_path is not None and self.main:
            atomic_torch_save(self.checkpoint(next_epoch, next_pos), self.ckpt_path, digest=True)
        if self.ckpt_path is not None and self.distributed:
            dist.barrier()
        self.last_saved = self.step

    def end_of_epoch(self, done_epoch: int) -> None:
        if self.evaluator is not None:
            score = float(self.evaluator(self.student))
            self.best.update(done_epoch, score, self.student)
            self.student.train()
            log.info("%s: epoch %d held-out score %.3f", self.section, done_epoch, score)
        for hook in _callbacks(self.callbacks, "on_epoch_end"):
            self.stopped = bool(hook(done_epoch, self.student)) or self.stopped

    def run(self) -> None:
        self.student.train()
        while self.step < self.s.total_steps and not self.stopped:
            self.run_epoch()
        self.logger.flush()

    def run_epoch(self) -> None:
        """The rest of epoch ``self.epoch`` from batch ``self.pos`` (the batches before it
        are drawn and discarded, then the saved RNG state is restored)."""
        _seed_loader(self.loader, self.seed, self.epoch)
        if self.rng_to_restore is not None and self.pos == 0:
            _set_rng_state(self.rng_to_restore)
            self.rng_to_restore = None
        it = iter(self.loader)
        skipped = sum(1 for _ in zip(range(self.pos), it))  # batches done before the interruption
        if skipped < self.pos:
            raise DataError(
                f"{self.section}: cannot resume at batch {self.pos} of epoch {self.epoch}: the "
                f"loader now yields only {skipped} batches"
            )
        if self.rng_to_restore is not None:
            _set_rng_state(self.rng_to_restore)
            self.rng_to_restore = None
        fetched = False
        for batch in it:
            fetched = True
            if self.train_step(batch):
                break
        if not fetched and self.step < self.s.total_steps:
            raise DataError(f"{self.section}: the training loader produced no batches in epoch {self.epoch}")
        if self.step < self.s.total_steps or self.pos >= self.s.steps_per_epoch:
            if self.last_saved != self.step:  # loader shorter than its len(): still an epoch end
                self.end_of_epoch(self.epoch + 1)
                self.save(self.epoch + 1, 0)
            self.epoch, self.pos = self.epoch + 1, 0

    def _inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        x, y = split_batch(batch)
        x = x.to(self.s.dev, non_blocking=True)
        y = y.to(self.s.dev, non_blocking=True)
        if self.cutout:
            x = cutout(x, self.cutout)
        y2, lam = y, 1.0
        if self.mixup:
            x, y, y2, lam = mixup_labels(x, y, self.mixup)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.s.mem)
        return x, y, y2, lam

    def _loss(self, x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.s
        with torch.autocast(s.dev.type, dtype=s.amp_dtype or torch.float32,
                            enabled=s.amp_dtype is not None):
            s_logits = self.forward(x)
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(x)
        ce = F.cross_entropy(s_logits.float(), y, label_smoothing=self.label_smoothing)
        if lam != 1.0:
            ce = lam * ce + (1.0 - lam) * F.cross_entropy(
                s_logits.float(), y2, label_smoothing=self.label_smoothing)
        if self.teacher is not None:
            alpha = s.kd_cfg["alpha"]
            _, kd, _ = distillation_loss(s_logits, t_logits, y,
                                         temperature=s.kd_cfg["temperature"], alpha=alpha)
            loss = alpha * kd + (1.0 - alpha) * ce
        else:
            loss, kd = ce, self.nan
        for pen in self.penalties:
            loss = loss + pen()
        return loss, kd, ce

    def train_step(self, batch: Any) -> bool:
        """One optimizer step on ``batch``, its log row and the checkpoint or epoch end that
        falls on it; True when the epoch or the run ends with it."""
        x, y, y2, lam = self._inputs(batch)
        group = self.opt.param_groups[0]
        cur_lr = group["lr"] / group.get("lr_scale", 1.0)  # the base rate, as scheduled
        loss, kd, ce = self._loss(x, y, y2, lam)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.step += 1
        self.pos += 1
        for hook in self.after_step:
            hook(self.step)
        n = int(x.shape[0]) * self.world
        self.images += n
        if self.logger.add(self.step, self.epoch, cur_lr,
                           torch.stack([loss.detach(), kd.detach(), ce.detach()]), n):
            self.logger.flush()
            if self.bar is not None and self.logger.last:
                self.bar.set_postfix(loss=f"{self.logger.last['loss']:.4f}", lr=f"{cur_lr:.3g}")
        if self.bar is not None:
            self.bar.update(1)
        epoch_done = self.pos >= self.s.steps_per_epoch
        if epoch_done:
            self.logger.flush()  # a non-finite loss stops the run before it is scored
            self.end_of_epoch(self.epoch + 1)
        ended = self.step >= self.s.total_steps
        if (self.checkpoint_every and self.step % self.checkpoint_every == 0) or epoch_done or ended:
            self.save(self.epoch + 1 if epoch_done else self.epoch, 0 if epoch_done else self.pos)
        return ended or epoch_done


def _result(loop: _Loop, seconds: float, *, keep: str, compile: bool,
            csv_path: Path | None) -> dict[str, Any]:
    """:func:`finetune`'s return value."""
    s, best = loop.s, loop.best
    return {
        "steps": loop.step,
        "epochs": loop.step / s.steps_per_epoch,
        "images": loop.images,
        "seconds": seconds,
        "images_per_s": loop.images / seconds if seconds > 0 and loop.images else 0.0,
        "final_loss": loop.logger.last.get("loss") if loop.logger.last else None,
        "log_csv": str(csv_path) if csv_path is not None else None,
        "checkpoint": str(loop.ckpt_path) if loop.ckpt_path is not None else None,
        "resumed_from_step": loop.resumed_from,
        "total_steps": s.total_steps,
        "amp": loop.logger.amp,
        "memory_format": "channels_last" if s.mem == torch.channels_last else "contiguous",
        "compile": bool(compile),
        "device": str(s.dev),
        "distill": s.kd_cfg if s.use_kd else None,
        "history": best.history,
        "best_epoch": best.epoch,
        "best_score": best.score,
        "kept": keep if best.weights is not None else "last",
        "stopped_early": loop.stopped and loop.step < s.total_steps,
    }
