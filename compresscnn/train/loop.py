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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from compresscnn.errors import CheckpointError, CompressError, DataError
from compresscnn.measure.evaluation import split_batch
from compresscnn.train.checkpoints import (BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_NAME,
                                           LOG_NAME, BestCheckpoint, CsvLog, SyncBNReverter,
                                           load_checkpoint, one_line, resume_model, rng_state,
                                           seed_loader, set_rng_state)
from compresscnn.train.config import MEMORY_FORMATS, Distill, Finetune, TrainConfig
from compresscnn.train.engine import (Engine, KeepBest, build_optimizer, factor_lr_scale,
                                      lr_schedule, param_groups)
from compresscnn.util.common import (atomic_torch_save, get_world_size, is_dist,
                                     is_main_process, lr_factor, resolve_amp, resolve_device,
                                     seed_everything)
from compresscnn.util.modules import kd_divergence
from compresscnn.util.progress import bar as progress_bar
from compresscnn.util.training import cutout, mixup_labels

__all__ = [
    "finetune",
    "TrainRun",
    "distillation_loss",
    "param_groups",
    "build_optimizer",
    "lr_factor",
    "load_checkpoint",
    "resolve_memory_format",
    "DEFAULT_DISTILL",
    "CHECKPOINT_NAME",
    "LOG_NAME",
]

log = logging.getLogger(__name__)

#: the distillation :func:`finetune` does with a ``teacher`` unless its config says otherwise
DEFAULT_DISTILL: dict[str, Any] = Distill().model_dump()


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


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainRun:
    """What one :func:`finetune` run is besides its settings: ``resume`` (continue from
    ``checkpoint_dir/last.pt``), ``seed`` (of the global RNGs and the loader's order), the
    per-step CSV log (``log_path``; default ``checkpoint_dir/finetune_log.csv`` or none),
    the progress bar, ``section``, the recipe section the messages name, and ``curve``, a
    score (e.g. top-1 on the test split) taken after every epoch for the learning curve
    only, with torch's RNG state put back after it (the training is the same with it or
    without); its points are kept in the checkpoint, so a resumed run's curve is whole."""

    resume: bool = False
    seed: int = 0
    log_path: str | Path | None = None
    progress: bool = True
    section: str = "finetune"
    curve: Callable[[nn.Module], float] | None = None


def finetune(
    student: nn.Module, train_loader: Iterable,
    config: TrainConfig | Mapping[str, Any] | None = None, *,
    teacher: nn.Module | None = None, evaluator: Callable[[nn.Module], float] | None = None,
    callbacks: Sequence[Any] = (), checkpoint_dir: str | Path | None = None,
    run: TrainRun | None = None,
) -> dict[str, Any]:
    """Train ``student`` in place on ``train_loader`` (batches of ``(images, labels)``) as
    ``config`` says: a :class:`~compresscnn.train.config.TrainConfig` (a recipe's
    :class:`~compresscnn.train.config.Finetune` or :class:`~compresscnn.train.config.Train`
    section), a mapping that validates into a ``Finetune``, or None for its defaults. With a
    ``teacher``, the student is distilled from it as the config's ``distill`` says
    (``Finetune``; a config without one distils with :class:`Distill`'s defaults).

    The run lasts ``epochs * len(train_loader)`` steps, or exactly ``max_steps`` steps when
    given (``max_steps`` overrides ``epochs``, as in HF Transformers; the last epoch may be
    partial). The peak rate is ``lr`` scaled from ``lr_batch`` to the global batch (the
    loader's ``batch_size`` times the world size; ``lr`` itself for a loader without one);
    the schedule spans the steps and is stepped per batch, and the factor chains of
    factorized layers train at ``factor_lr`` times it. ``student`` is left on the device in
    train mode, in contiguous memory format; ``teacher`` is moved there and kept in eval
    mode. The engine (:mod:`compresscnn.train.engine`) does the steps: amp, clipping,
    schedule, callbacks.

    ``callbacks``: objects with any of ``penalty() -> Tensor`` (added to the loss),
    ``after_step(step)`` (after each optimizer step, with the 1-based global step) and
    ``on_epoch_end(epoch, model) -> bool`` (True stops the run after that epoch).
    ``evaluator(model) -> score`` (higher is better, e.g. top-1 on held-out images) runs after
    every epoch; ``keep: best`` returns the student with the weights of its best epoch.

    With ``checkpoint_dir``, ``last.pt`` is written atomically at the end of every epoch,
    every ``checkpoint_every`` steps and at the end; ``run.resume`` continues from it (a
    missing, corrupt or mismatched checkpoint is a :class:`CheckpointError`). The per-step CSV
    log (``step,epoch,loss,kd_loss,ce_loss,lr,images_per_s``) goes to ``run.log_path``, or
    ``checkpoint_dir/finetune_log.csv``, or nowhere. A non-finite loss stops the run with a
    message naming the options (``section``.lr, warm-up, clipping, amp) that help.

    Returns ``{"steps", "epochs", "images", "seconds", "images_per_s", "final_loss",
    "log_csv", "checkpoint", "resumed_from_step", "total_steps", "amp", "memory_format",
    "compile", "device", "distill", "history", "curve", "best_epoch", "best_score", "kept",
    "stopped_early", "lr", "factor_lr"}``; ``steps`` is the global step reached (including
    steps done before a resume), ``images``/``seconds`` count this call only (all ranks),
    ``lr`` is the peak rate after the batch scaling.
    """
    run = run if run is not None else TrainRun()
    s = _settings(student, train_loader, teacher, _train_config(config), evaluator, run)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None
    if run.resume and ckpt_path is None:
        raise CheckpointError("finetune: resume=True needs a checkpoint_dir")
    csv_path = Path(run.log_path) if run.log_path is not None else (
        ckpt_dir / LOG_NAME if ckpt_dir else None)
    ck, match, forward, sync_bn = _prepare(student, teacher, s, ckpt_path, run)
    best = BestCheckpoint(ckpt_dir / BEST_NAME if ckpt_dir is not None else None,
                          ck.get("best") if ck is not None else None)
    loop = _Loop(student=student, forward=forward, teacher=teacher if s.use_kd else None,
                 loader=train_loader, engine=_engine(student, s, best, evaluator, callbacks),
                 s=s, run=run, ckpt_path=ckpt_path, match=match, best=best)
    if ck is not None:
        loop.resume(ck)
    loop.open_log(csv_path)
    t0 = time.perf_counter()
    try:
        loop.train()
    finally:
        if loop.bar is not None:
            loop.bar.close()
        if sync_bn is not None:
            sync_bn.revert()
        student.to(memory_format=torch.contiguous_format)
        if s.use_kd:
            teacher.to(memory_format=torch.contiguous_format)  # type: ignore[union-attr]
    if s.cfg.keep == "best" and best.weights is not None:
        student.load_state_dict(best.weights)
    return _result(loop, time.perf_counter() - t0, csv_path)


def _train_config(config: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    return Finetune.coerce(config, "finetune()")


@dataclass(frozen=True)
class _Settings:
    """The checked configuration of one :func:`finetune` run, as the loop reads it."""

    cfg: TrainConfig
    kd: Distill
    use_kd: bool
    dev: torch.device
    amp_dtype: torch.dtype | None
    mem: torch.memory_format
    lr: float
    steps_per_epoch: int
    total_steps: int
    section: str


def _settings(student: nn.Module, train_loader: Iterable, teacher: nn.Module | None,
              cfg: TrainConfig, evaluator: Callable[[nn.Module], float] | None,
              run: TrainRun) -> _Settings:
    """What the config and the loader say about this run (one-line errors naming the
    section's keys)."""
    section = run.section
    dev = resolve_device(cfg.device)
    if cfg.keep == "best" and evaluator is None:
        raise CompressError(f"{section}.keep: best needs held-out images to score each epoch")
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError("finetune needs a loader with a length (e.g. a DataLoader)") from exc
    if steps_per_epoch <= 0:
        raise DataError(f"{section}: the training loader is empty")
    total_steps = int(cfg.max_steps) if cfg.max_steps is not None else \
        int(cfg.epochs) * steps_per_epoch
    if total_steps <= 0:
        raise CompressError(f"{section}: nothing to train (epochs={cfg.epochs}, "
                            f"max_steps={cfg.max_steps})")
    batch = getattr(train_loader, "batch_size", None)
    lr = cfg.lr * (int(batch) * get_world_size()) / cfg.lr_batch if batch else cfg.lr
    kd = getattr(cfg, "distill", None) or Distill()
    return _Settings(cfg, kd, bool(kd.enabled and teacher is not None), dev,
                     resolve_amp(cfg.amp, dev), resolve_memory_format(cfg.memory_format, student),
                     lr, steps_per_epoch, total_steps, section)


def _prepare(student: nn.Module, teacher: nn.Module | None, s: _Settings,
             ckpt_path: Path | None, run: TrainRun
             ) -> tuple[dict[str, Any] | None, dict[str, Any], Callable, Any]:
    """Seed, move the models to the device and memory format, read the checkpoint to resume
    from (its weights loaded into ``student``), and wrap ``student`` for DDP / compile.
    Returns ``(checkpoint or None, the run's figures a checkpoint must match, the forward
    callable, the SyncBatchNorm reverter or None)``."""
    seed_everything(run.seed)
    student.to(s.dev)
    student.to(memory_format=s.mem)
    if s.use_kd:
        assert teacher is not None
        teacher.to(s.dev).eval()
        teacher.to(memory_format=s.mem)
    ck = load_checkpoint(ckpt_path) if run.resume and ckpt_path is not None else None
    match = {"total_steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch,
             "optimizer": s.cfg.optimizer, "world_size": get_world_size()}
    if ck is not None:
        resume_model(ck, ckpt_path, student, match)
    distributed = is_dist()
    sync_bn = SyncBNReverter(student) if (
        distributed and s.dev.type == "cuda" and dist.get_backend() == "nccl") else None
    model: nn.Module = student
    if distributed:
        model = DDP(student, device_ids=[s.dev.index] if s.dev.type == "cuda" else None)
    return ck, match, (torch.compile(model) if s.cfg.compile else model), sync_bn


def _engine(student: nn.Module, s: _Settings, best: BestCheckpoint,
            evaluator: Callable[[nn.Module], float] | None, callbacks: Sequence[Any]) -> Engine:
    """The optimizer (``factor_lr`` on the factor chains), its schedule over the run's steps,
    and the engine with keep-best scoring first among the epoch-end callbacks."""
    cfg = s.cfg
    opt = build_optimizer(student, cfg.optimizer, lr=s.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay,
                          lr_scale=factor_lr_scale(student, cfg.factor_lr))
    sched = lr_schedule(opt, s.total_steps, warmup_steps=cfg.warmup_steps,
                        schedule=cfg.schedule)

    def said(epoch: int, score: float) -> None:
        log.info("%s: epoch %d held-out score %.3f", s.section, epoch, score)

    keep = [KeepBest(evaluator, best, said)] if evaluator is not None else []
    return Engine(student, opt, sched, amp=(s.dev.type, s.amp_dtype),
                  clip_grad_norm=cfg.clip_grad_norm, callbacks=[*keep, *callbacks])


# --------------------------------------------------------------------------- epoch loop
@dataclass(eq=False)
class _Loop:
    """One fine-tuning run: what it trains with, and the position a checkpoint stores
    (global step, epoch, batch within it, RNG state to restore, early stop)."""

    student: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    teacher: nn.Module | None
    loader: Iterable
    engine: Engine
    s: _Settings
    run: TrainRun
    ckpt_path: Path | None
    match: dict[str, Any]
    best: BestCheckpoint
    logger: Any = None
    bar: Any = None
    epoch: int = 0
    pos: int = 0
    images: int = 0
    stopped: bool = False
    last_saved: int = -1
    resumed_from: int | None = None
    rng_to_restore: Mapping[str, Any] | None = None
    curve: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.main, self.world, self.distributed = is_main_process(), get_world_size(), is_dist()
        self.nan = torch.tensor(float("nan"), device=self.s.dev)

    @property
    def step(self) -> int:
        return self.engine.step

    def resume(self, ck: Mapping[str, Any]) -> None:
        """Continue from checkpoint ``ck`` (its model weights are already loaded)."""
        try:
            self.engine.load_state_dict(ck)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{self.ckpt_path}: optimizer state does not fit "
                                  f"({one_line(exc)})") from exc
        self.engine.step = int(ck["step"])
        self.epoch, self.pos = int(ck["epoch"]), int(ck["batch_in_epoch"])
        self.rng_to_restore = ck["rng"]
        log.info("resuming from %s at step %d (epoch %d, batch %d)", self.ckpt_path, self.step,
                 self.epoch, self.pos)
        self.resumed_from = self.last_saved = self.step
        self.stopped = bool(ck.get("stopped"))
        self.curve = [dict(p) for p in ck.get("curve", [])]

    def open_log(self, csv_path: Path | None) -> None:
        """The CSV log (rank 0; rows after a resumed step dropped) and the progress bar."""
        self.logger = CsvLog(csv_path if self.main else None, self.s.cfg.log_every,
                             resume_step=self.resumed_from)
        self.logger.section, self.logger.clip = self.s.section, self.s.cfg.clip_grad_norm
        amp = self.s.amp_dtype
        self.logger.amp = str(amp).replace("torch.", "") if amp is not None else None
        if self.run.progress and self.main:
            # a bar on a terminal; in a log, a line with the step, the loss and the time
            # left at least every progress.INTERVAL seconds
            self.bar = progress_bar(self.s.total_steps, self.s.section, initial=self.step,
                                    unit="steps")

    def checkpoint(self, next_epoch: int, next_pos: int) -> dict[str, Any]:
        """What ``last.pt`` holds (tensors and plain containers only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.student.state_dict(),
            **self.engine.state_dict(),
            "step": self.step,
            "epoch": next_epoch,
            "batch_in_epoch": next_pos,
            "config": self.match,
            "rng": rng_state(),
            "best": self.best.state(),
            "stopped": self.stopped,
            "curve": self.curve,
        }

    def save(self, next_epoch: int, next_pos: int) -> None:
        self.logger.flush()
        if self.ckpt_path is not None and self.main:
            atomic_torch_save(self.checkpoint(next_epoch, next_pos), self.ckpt_path, digest=True)
        if self.ckpt_path is not None and self.distributed:
            dist.barrier()
        self.last_saved = self.step

    def end_of_epoch(self, done_epoch: int) -> None:
        """The learning curve's point, keep-best scoring and the epoch-end callbacks (one may
        stop the run)."""
        if self.run.curve is not None:
            state, training = rng_state(), self.student.training
            score = float(self.run.curve(self.student))
            self.student.train(training)
            set_rng_state(state)
            self.curve.append({"epoch": done_epoch, "top1": score})
            log.info("%s: epoch %d curve %.3f", self.s.section, done_epoch, score)
        self.stopped = self.engine.end_epoch(done_epoch) or self.stopped

    def train(self) -> None:
        self.student.train()
        while self.step < self.s.total_steps and not self.stopped:
            self.train_epoch()
        self.logger.flush()

    def train_epoch(self) -> None:
        """The rest of epoch ``self.epoch`` from batch ``self.pos`` (the batches before it
        are drawn and discarded, then the saved RNG state is restored)."""
        seed_loader(self.loader, self.run.seed, self.epoch)
        if self.rng_to_restore is not None and self.pos == 0:
            set_rng_state(self.rng_to_restore)
            self.rng_to_restore = None
        it = iter(self.loader)
        skipped = sum(1 for _ in zip(range(self.pos), it))  # batches done before the interruption
        if skipped < self.pos:
            raise DataError(
                f"{self.s.section}: cannot resume at batch {self.pos} of epoch {self.epoch}: "
                f"the loader now yields only {skipped} batches"
            )
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore)
            self.rng_to_restore = None
        fetched = self.engine.run_epoch(it, self.train_step)
        if not fetched and self.step < self.s.total_steps:
            raise DataError(f"{self.s.section}: the training loader produced no batches in "
                            f"epoch {self.epoch}")
        if self.step < self.s.total_steps or self.pos >= self.s.steps_per_epoch:
            if self.last_saved != self.step:  # loader shorter than its len(): still an epoch end
                self.end_of_epoch(self.epoch + 1)
                self.save(self.epoch + 1, 0)
            self.epoch, self.pos = self.epoch + 1, 0

    def _inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The batch on the device, cut out and mixed (torch's global RNG: a resumed run
        draws the same numbers), in the run's memory format."""
        cfg = self.s.cfg
        x, y = split_batch(batch)
        x = x.to(self.s.dev, non_blocking=True)
        y = y.to(self.s.dev, non_blocking=True)
        if cfg.cutout:
            x = cutout(x, cfg.cutout)
        y2, lam = y, 1.0
        if cfg.mixup:
            x, y, y2, lam = mixup_labels(x, y, cfg.mixup)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.s.mem)
        return x, y, y2, lam

    def _loss(self, x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, kd, ce)``: cross-entropy (mixed when ``lam`` < 1), distilled from the
        teacher when there is one; the forward passes under the engine's autocast."""
        smoothing = self.s.cfg.label_smoothing
        with self.engine.autocast():
            s_logits = self.forward(x)
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(x)
        ce = F.cross_entropy(s_logits.float(), y, label_smoothing=smoothing)
        if lam != 1.0:
            ce = lam * ce + (1.0 - lam) * F.cross_entropy(
                s_logits.float(), y2, label_smoothing=smoothing)
        if self.teacher is None:
            return ce, self.nan, ce
        kd_cfg = self.s.kd
        _, kd, _ = distillation_loss(s_logits, t_logits, y, temperature=kd_cfg.temperature,
                                     alpha=kd_cfg.alpha)
        return kd_cfg.alpha * kd + (1.0 - kd_cfg.alpha) * ce, kd, ce

    def train_step(self, batch: Any) -> bool:
        """One optimizer step on ``batch``, its log row and the checkpoint or epoch end that
        falls on it; True when the epoch or the run ends with it."""
        x, y, y2, lam = self._inputs(batch)
        cur_lr = self.engine.lr  # the base rate, as scheduled
        loss, kd, ce = self._loss(x, y, y2, lam)
        loss = self.engine.update(loss)
        self.pos += 1
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
        every = self.s.cfg.checkpoint_every
        if (every and self.step % every == 0) or epoch_done or ended:
            self.save(self.epoch + 1 if epoch_done else self.epoch, 0 if epoch_done else self.pos)
        return ended or epoch_done


def _result(loop: _Loop, seconds: float, csv_path: Path | None) -> dict[str, Any]:
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
        "compile": bool(s.cfg.compile),
        "device": str(s.dev),
        "distill": s.kd.model_dump() if s.use_kd else None,
        "history": best.history,
        "curve": loop.curve if loop.run.curve is not None else None,
        "best_epoch": best.epoch,
        "best_score": best.score,
        "kept": s.cfg.keep if best.weights is not None else "last",
        "stopped_early": loop.stopped and loop.step < s.total_steps,
        "lr": s.lr,
        "factor_lr": s.cfg.factor_lr,
    }
