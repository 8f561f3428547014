"""What makes a training run resumable: ``last.pt`` (model, optimizer, schedule, grad scaler,
position, RNG states; see :mod:`compresscnn.train.loop` for what exact resume means),
``best.pt`` (the kept-best weights), the per-step CSV log, the loader seeding that makes an
epoch's batches a function of ``(seed, epoch)``, and the SyncBatchNorm swap of a DDP run.
Imports the checkpoint reader of ``io.models``, ``util`` and ``errors``.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from compresscnn.errors import CheckpointError, CompressError
from compresscnn.io.models.checkpoints import check_state_dict, load_torch_file
from compresscnn.util.common import (atomic_torch_save, atomic_write_text, check_digest,
                                     digest_path, is_main_process)
from compresscnn.util.training import BestWeights

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "LOG_NAME", "CHECKPOINT_FORMAT", "LOG_COLUMNS",
           "load_checkpoint", "rng_state", "set_rng_state", "seed_loader", "resume_model",
           "one_line", "SyncBNReverter", "CsvLog", "BestCheckpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
BEST_NAME = "best.pt"
LOG_NAME = "finetune_log.csv"
CHECKPOINT_FORMAT = "compresscnn.finetune/1"
LOG_COLUMNS = ("step", "epoch", "loss", "kd_loss", "ce_loss", "lr", "images_per_s")


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: Mapping[str, Any]) -> None:
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
def seed_loader(loader: Any, seed: int, epoch: int) -> None:
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
    current = rng_state()
    try:
        set_rng_state(ck["rng"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: checkpoint field 'rng' cannot be restored "
                              f"({one_line(exc)})") from None
    finally:
        set_rng_state(current)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class SyncBNReverter:
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
class CsvLog:
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


class BestCheckpoint(BestWeights):
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


# --------------------------------------------------------------------------- checkpoint I/O
def resume_model(ck: Mapping[str, Any], ckpt_path: Path | None, student: nn.Module,
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
        raise CheckpointError(f"{ckpt_path}: weights do not fit the model ({one_line(exc)})") from exc
