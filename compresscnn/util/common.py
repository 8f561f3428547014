"""Small shared helpers: atomic writes, seeding, timing, devices, distributed rank, and the
one format of counts and sizes in tables.

Nothing here touches global state at import time. Every writer goes through a temporary file
in the *same directory* as the target followed by :func:`os.replace`, which is atomic on POSIX
and Windows: a reader (or a crash) sees either the old file or the complete new one, never a
half-written file (the "nothing half-written" rule of DESIGN.md §11).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import numbers
import os
import shutil
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from compresscnn.errors import CompressError, NoSpaceError, CheckpointError

if TYPE_CHECKING:  # torch is imported where it is used (it takes seconds to load)
    import torch

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "atomic_path",
    "sha256_file",
    "digest_path",
    "check_digest",
    "file_mode",
    "out_of_space",
    "seed_everything",
    "Timer",
    "resolve_amp",
    "lr_factor",
    "SCHEDULES",
    "resolve_device",
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "unwrap_model",
]


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success move it onto ``path``.

    The temporary name starts with ``.`` and contains ``.tmp`` so that a crashed writer leaves
    an obviously stale file, never a plausible-looking result. On an exception the temporary
    file is removed and the target is left untouched. ``suffix`` lets writers that care about
    the extension (e.g. ONNX tools) see the right one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}",
                                   dir=path.parent)
    except OSError as exc:
        if out_of_space(exc, path.parent):
            raise NoSpaceError(f"no space left on {path.parent} (writing {path.name})") from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.chmod(tmp_path, file_mode())  # mkstemp makes 0600; a result follows the umask
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = out_of_space(exc, path.parent)  # before the partial file is removed
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if full:
            raise NoSpaceError(f"no space left on {path.parent} (writing {path.name})") from None
        raise


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (0644 under umask 022)."""
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def out_of_space(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write to ``folder`` ran out of disk space (or quota). Writers that
    hide the errno (torch.save reports "unexpected pos ...") are recognised by the file
    system's free space, read before their partial file is removed."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, Exception):
        return False
    if "No space left" in str(exc) or "Disk quota exceeded" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _fsync_file(path: Path) -> None:
    # Flush file contents to disk before the rename so that a power loss cannot leave the new
    # name pointing at an empty file (ext4 delayed allocation).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir + ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Newlines are written as given (no translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, digest: bool = False) -> Path:
    """``torch.save(obj, path)`` atomically; with ``digest``, its sha256 beside it in
    ``<path>.sha256`` (:func:`digest_path`), also written atomically: while the new file
    replaces the old one the digest file lists both, so a crash at any point leaves a file
    whose digest is listed (:func:`check_digest`)."""
    import torch

    new = None
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        if digest:
            new = sha256_file(tmp)
            _write_digests(path, [new, *_listed(path)])
    if new is not None:
        _write_digests(path, [new])
    return Path(path)


# --------------------------------------------------------------------------- content hashes
DIGEST_SUFFIX = ".sha256"


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_path(path: str | os.PathLike) -> Path:
    """``<path>.sha256``: the file's sha256 in ``sha256sum`` format (``sha256sum -c`` checks
    it from its folder)."""
    p = Path(path)
    return p.with_name(p.name + DIGEST_SUFFIX)


def _listed(path: str | os.PathLike) -> list[str]:
    """The hashes ``<path>.sha256`` lists for ``path`` (none when it is missing or unreadable)."""
    try:
        text = digest_path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in text.splitlines():
        h = line.split(maxsplit=1)[0].lower() if line.strip() else ""
        if len(h) == 64 and all(c in "0123456789abcdef" for c in h):
            out.append(h)
    return out


def _write_digests(path: str | os.PathLike, hashes: list[str]) -> None:
    name = Path(path).name
    lines = "".join(f"{h}  {name}\n" for h in dict.fromkeys(hashes[:3]))
    atomic_write_text(digest_path(path), lines)


def check_digest(path: str | os.PathLike) -> bool:
    """Check ``path`` against the sha256 in ``<path>.sha256``: a
    :class:`~compresscnn.errors.CheckpointError` naming the file when they differ (one bit
    flipped, a truncated copy, a file from another run). False when there is no digest file
    to check against (a file written by an older version), True when it matches."""
    p = Path(path)
    side = digest_path(p)
    if not side.is_file():
        return False
    listed = _listed(p)
    if not listed:
        raise CheckpointError(f"{side}: not a sha256 digest file (expected '<64 hex digits>  "
                              f"{p.name}'); it was edited or damaged")
    actual = sha256_file(p)
    if actual not in listed:
        raise CheckpointError(f"{p}: its content does not match the sha256 recorded in "
                              f"{side.name} when it was written ({actual[:12]}... vs "
                              f"{listed[0][:12]}...): the file is corrupt or was replaced")
    return True


# --------------------------------------------------------------------------- formatting
def fmt_quantity(value: Any, unit: str = "", *, missing: str = "-") -> str:
    """A count or a size with a decimal SI prefix, as every table of the project writes it:
    ``fmt_quantity(25_557_032)`` is ``25.56 M``, ``fmt_quantity(4.1e9)`` is ``4.10 G``,
    ``fmt_quantity(1_234_567, "B")`` is ``1.23 MB``, ``fmt_quantity(512, "B")`` is ``512 B``.
    ``missing`` for None, a boolean or a non-finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        return missing
    x = float(value)
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


# --------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    This does not switch on deterministic algorithms (that costs speed on GPU and is a
    process-wide choice for the caller to make).
    """
    import numpy as np
    import torch

    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily)


# --------------------------------------------------------------------------- timing
class Timer:
    """Context manager measuring wall-clock seconds.

    ``with Timer("finetune", timings): ...`` adds the elapsed seconds to ``timings["finetune"]``
    (accumulating, so a stage entered twice reports its total). ``Timer(timings, "finetune")``
    is accepted too (the arguments are told apart by type). The elapsed time is also on
    ``timer.seconds``. ``sync_cuda=True`` synchronises CUDA at both ends so that GPU work
    launched inside the block is counted.
    """

    def __init__(
        self,
        name: str | dict[str, float] | None = None,
        timings: dict[str, float] | str | None = None,
        *,
        sync_cuda: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(name, dict) or isinstance(timings, str):
            name, timings = timings, name  # Timer(timings, "stage")
        self.name: str | None = name  # type: ignore[assignment]
        self.timings: dict[str, float] | None = timings  # type: ignore[assignment]
        self.sync_cuda = sync_cuda
        self._clock = clock
        self.seconds: float = 0.0
        self._start: float | None = None

    def _sync(self) -> None:
        if not self.sync_cuda:
            return
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __enter__(self) -> "Timer":
        self._sync()
        self._start = self._clock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sync()
        assert self._start is not None
        self.seconds = self._clock() - self._start
        if self.timings is not None and self.name is not None:
            self.timings[self.name] = self.timings.get(self.name, 0.0) + self.seconds


# --------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` → the launcher's ``LOCAL_RANK``
    device under ``torchrun`` (else the current device); ``"cpu"``/``"cuda:1"`` as given.

    Asking for CUDA on a machine without it is a user error (:class:`CompressError`).
    """
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            if local is not None and local.isdigit():
                return torch.device("cuda", int(local) % max(torch.cuda.device_count(), 1))
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        raise CompressError(
            f"device: unknown device {device!r} (use 'auto', 'cpu', 'cuda' or 'cuda:N')"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CompressError(f"device: {device!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CompressError(
                f"device: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s)"
            )
        if dev.index is None:  # a concrete device, so that DDP's device_ids make sense
            return resolve_device("auto")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise CompressError(f"device: unsupported device type {dev.type!r}")
    return dev


def cpu_bf16_native() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), as torch reports
    it; then bf16 autocast trains CIFAR-sized conv nets 2-4x faster than float32
    (BENCHMARKS.md). Elsewhere bf16 is emulated and no faster, so ``amp: auto`` stays fp32."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:  # pragma: no cover - a build without the CPU feature probes
        return False


def resolve_amp(amp: Any, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on device ``dev`` (None: float32): ``auto``
    is bf16 on CPUs that compute it in hardware (:func:`cpu_bf16_native`) and on CUDA
    devices that support it, fp16 on older CUDA devices, float32 elsewhere; ``off``,
    ``bf16``, ``fp16`` (CUDA only) as named. The one reading of the setting for training and
    for the calibration distillation."""
    import torch

    key = str(amp).lower() if amp is not None else "off"
    if key in ("off", "none", "no", "false", "fp32", "float32"):
        return None
    if key in ("auto", "true", "on"):
        if dev.type == "cpu":
            return torch.bfloat16 if cpu_bf16_native() else None
        if dev.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if key in ("bf16", "bfloat16"):
        return torch.bfloat16
    if key in ("fp16", "float16", "half"):
        if dev.type != "cuda":
            raise CompressError(f"amp: fp16 needs a CUDA device (device is {dev}); use 'bf16' or 'off'")
        return torch.float16
    raise CompressError(f"amp: unknown value {amp!r} (use 'auto', 'bf16', 'fp16' or 'off')")


# --------------------------------------------------------------------------- distributed
def is_dist() -> bool:
    """True when ``torch.distributed`` is available *and* a process group is initialised
    (never before torch is imported: this module does not import it, so that recipes are
    checked and ``--help`` answers without loading torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    if is_dist():
        return sys.modules["torch.distributed"].get_rank()
    return 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    if is_dist():
        return sys.modules["torch.distributed"].get_world_size()
    return 1


def is_main_process() -> bool:
    """True on rank 0 (and always when not distributed): the process that writes files."""
    return get_rank() == 0


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` / compiled wrapper."""
    import torch

    while True:
        if isinstance(
            model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


#: learning-rate schedules after warm-up (:func:`lr_factor`)
SCHEDULES: tuple[str, ...] = ("cosine", "onecycle", "linear", "constant", "step")


def lr_factor(step: int, total_steps: int, *, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Multiplier of the base LR for 0-based ``step``: linear warmup from ``1/warmup`` to 1
    over ``warmup_steps``, then cosine (to 0 at ``total_steps``), linear decay to 0, step
    decay (×0.1 at 50 % and again at 75 % of the post-warmup steps, the classic ResNet
    schedule), or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # Smith & Topin 2019, linear: up to the peak at 30%, down to 0
        return 0.04 + 0.96 * progress / 0.3 if progress < 0.3 else (1.0 - progress) / 0.7
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "step":
        return 1.0 if progress < 0.5 else (0.1 if progress < 0.75 else 0.01)
    raise CompressError(f"schedule: unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
