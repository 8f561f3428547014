"""Run folders: what a run may create, replace and delete, and when it may resume.

A run is assembled in ``<out>.partial`` and renamed to ``<out>`` once complete. The toolkit
deletes or replaces only folders it can prove it wrote: every ``.partial`` folder it creates
(and so every run folder) holds the marker file ``.compresscnn-run`` (JSON: the run's id,
host, pid, state and the recipe keys that decide its result). A folder without the marker
is never deleted or replaced, whatever the flags (an *empty* folder may be replaced with
``--overwrite``: removing it loses nothing).

- ``--overwrite`` replaces atomically: the new run is built in ``.partial``, swapped with the
  old one in one ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames, which the next
  run completes if a crash falls between them), and the old one, moved to ``<out>.replaced``,
  is deleted. A crash at any point leaves the old or the new complete run at ``<out>``.
- ``<out>.lock`` (PID and host, held with ``flock``) refuses a second run on the same output;
  a lock left behind by a process that died is taken over.
- A ``.partial`` that holds a fine-tuning checkpoint is an interrupted run: ``--resume``
  continues it if the recipe keys that decide the result are unchanged (else it is refused,
  naming the changed keys), ``--overwrite`` starts again, and a plain rerun is refused.
- Paths a run cannot use are refused before anything is written: ``/``, the current folder
  or one holding it, symbolic links, names too long for the ``.partial`` suffix, read-only
  or non-folder parents.
- The marker is also the run's manifest: the sha256 of the files the run wrote
  (``files``: ``recipe.yaml``, ``model.safetensors``, ``model.onnx``) and its own
  (``sha256``, over the rest of its content): :func:`read_manifest` and :func:`check_file`
  tell a run folder edited by hand from the one the run wrote.
- Inputs are never outputs (:func:`check_inputs_outside`, the one rule every command uses):
  no file or folder a command reads (recipe, weights, data roots, calibration sources, run
  folders to compare) may lie inside a folder it will write, replace or delete (``<out>``,
  ``<out>.partial``, ``<out>.replaced``) or be a file it writes, and no output may lie
  inside a folder it reads; a clash is a one-line :class:`OutputError` before anything is
  touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from compresscnn.errors import CheckpointError, NoSpaceError, OutputError
from compresscnn.config import fmt_path as _fmt_path
from compresscnn.recipe.schema import RESUME_FREE
from compresscnn.util.common import atomic_write_text, sha256_file

__all__ = ["RunDir", "MARKER", "result_keys", "check_inputs_outside", "recipe_inputs",
           "read_manifest", "check_file"]

MARKER = ".compresscnn-run"
FORMAT = "compresscnn.run/1"
CHECKPOINT = Path("checkpoints") / "last.pt"
_SUFFIXES = (".partial", ".replaced", ".lock")
_HOST = socket.gethostname()


# --------------------------------------------------------------------------- markers

def _marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder compresscnn made (a real folder, not a link), else None."""
    f = folder / MARKER
    if folder.is_symlink() or not folder.is_dir() or f.is_symlink() or not f.is_file():
        return None
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def _self_digest(info: Mapping[str, Any]) -> str:
    """The sha256 of a marker's content without its own ``sha256`` key."""
    body = {k: v for k, v in info.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a run folder as its manifest, or None when it has none (a folder written
    by an older version, or assembled by hand). A marker whose content does not match its
    own ``sha256`` (edited by hand) is a :class:`CheckpointError` naming it."""
    path = Path(folder) / MARKER
    info = _marker(Path(folder))
    if info is None:
        if path.is_file() or path.is_symlink():
            raise CheckpointError(f"{path}: not a compresscnn run marker (not the JSON a run "
                                  f"writes); it was edited or damaged")
        return None
    if "sha256" in info and info["sha256"] != _self_digest(info):
        raise CheckpointError(f"{path}: edited after the run wrote it (its content does not "
                              f"match its own sha256), so the run folder cannot be trusted; "
                              f"restore it or rerun")
    return info


def check_file(folder: str | os.PathLike, name: str, manifest: Mapping[str, Any] | None
               ) -> bool | None:
    """Check ``folder/name`` against the sha256 the manifest records for it. True: it
    matches; None: nothing recorded for it; False: it differs (the caller decides whether
    that is an error: :func:`compresscnn.runs.loading.load_compressed` tells a recipe edited
    only in comments from one whose content changed)."""
    rec = ((manifest or {}).get("files") or {}).get(name)
    if not isinstance(rec, Mapping) or not isinstance(rec.get("sha256"), str):
        return None
    return sha256_file(Path(folder) / name) == rec["sha256"]


def _empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


def _remove(folder: Path) -> bool:
    """Delete a folder of ours, or an empty one; anything else stays. The marker goes last,
    so a deletion cut short leaves a folder still known to be ours. True when it is gone."""
    if _marker(folder) is not None:
        for child in folder.iterdir():
            if child.name == MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()
        if [c for c in folder.iterdir() if c.name != MARKER]:
            return False
        with contextlib.suppress(OSError):
            (folder / MARKER).unlink()
    with contextlib.suppress(OSError):
        if _empty_dir(folder):
            folder.rmdir()
    return not (folder.exists() or folder.is_symlink())


def result_keys(recipe: Mapping[str, Any], plan_rules: Sequence[Mapping[str, Any]] = ()
                ) -> dict[str, Any]:
    """The resolved recipe as ``{"finetune.lr": 0.01, "rules[0].rank": 0.5, ...}`` without
    the :data:`RESUME_FREE` keys, plus the exact rank of every replaced layer
    (``plan[conv2]``): what an interrupted run and its resumption must agree on."""
    flat: dict[str, Any] = {}

    def walk(v: Any, path: tuple) -> None:
        if isinstance(v, Mapping) and v:
            for k, x in v.items():
                walk(x, path + (str(k),))
        elif isinstance(v, (list, tuple)) and any(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                walk(x, path + (i,))
        else:
            key = _fmt_path(path)
            if not any(key == f or key.startswith(f + ".") for f in RESUME_FREE):
                flat[key] = v

    walk(recipe, ())
    for r in plan_rules:
        flat[f"plan[{r['match']}]"] = {k: v for k, v in r.items() if k != "match"}
    return json.loads(json.dumps(flat, default=str))


_ABSENT = object()


def _short(v: Any) -> str:
    s = "absent" if v is _ABSENT else json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# --------------------------------------------------------------------------- inputs vs outputs

def _real(path: str | os.PathLike) -> Path:
    """``path`` absolute, ``~`` expanded and every symbolic link resolved (the file it
    names, wherever the link lives)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_inputs_outside(reads: Sequence[tuple[str, Any]], *,
                         folders: Sequence[str | os.PathLike] = (),
                         files: Sequence[str | os.PathLike] = (), command: str = "run") -> None:
    """The one rule of what a command may read and write: no input (``reads``: ``(what,
    path)`` pairs; None and missing paths are skipped) lies in one of the ``folders`` the
    command writes, replaces or deletes, or is one of the ``files`` it writes; and no output
    lies inside an input folder (the command would write into what it reads). Paths are
    compared resolved (``~``, relative parts and links), so a relative path given from
    another working directory or a link into an output is seen for what it is. A clash is a
    one-line :class:`OutputError` naming both; call it before anything is written."""
    outs = [(_real(f), True) for f in folders] + [(_real(f), False) for f in files]
    for what, path in reads:
        if path is None or isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
            continue
        try:
            raw = os.path.expanduser(os.fspath(path))
            if not (os.path.exists(raw) or os.path.islink(raw)):
                continue
            src = _real(raw)
            is_dir = src.is_dir()
        except (OSError, ValueError):
            continue
        for out, folder in outs:
            if (_within(src, out) if folder else src == out):
                verb = "would replace or delete" if folder else "would overwrite"
                raise OutputError(f"{command}: {what} {path} is inside the output {out}, which "
                                  f"this {command} {verb}; move it out or choose another "
                                  f"output" if folder else
                                  f"{command}: {what} {path} is the output file {out}, which "
                                  f"this {command} {verb}; choose another output")
            if is_dir and _within(out, src):
                raise OutputError(f"{command}: the output {out} is inside the {what} {path}, "
                                  f"which this {command} reads; it would write into its own "
                                  f"input: choose an output outside it")


def recipe_inputs(recipe: Mapping[str, Any], recipe_path: str | os.PathLike | None = None
                  ) -> list[tuple[str, Any]]:
    """Every path a run of ``recipe`` reads, as ``(key, path)``: the recipe file, the weights
    file and the data roots (each source's and ``data.root``)."""
    reads: list[tuple[str, Any]] = [("recipe", recipe_path),
                                    ("model.weights", (recipe.get("model") or {}).get("weights"))]
    data = recipe.get("data") or {}
    reads.append(("data.root", data.get("root")))
    for role in ("train", "calibration", "eval"):
        reads.append((f"data.{role}.root", (data.get(role) or {}).get("root")))
    return reads


# --------------------------------------------------------------------------- the lock

def _try_flock(fd: int) -> bool | None:
    """True: this process now holds the lock; False: another one does; None: the file
    system has no ``flock`` (the PID in the file decides then)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _alive(holder: Mapping[str, Any] | None) -> bool:
    if not holder or holder.get("host") != _HOST or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode("utf-8")) if data else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (``os.path.exists`` does not raise on
    names past the file system's limit, ``Path.exists`` does)."""
    probe = path.parent
    while not os.path.exists(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


# --------------------------------------------------------------------------- the run folder

class RunDir:
    """The output folder of one run: checks, lock, staging, commit and clean-up.

    ``prepare`` (before anything is written) checks the path, takes the lock and returns the
    staging folder; ``commit`` puts the complete run in place; on failure ``abandon``
    removes what this process created (never a checkpoint it could resume from); ``release``
    drops the lock. Only the writing process (``main``) locks, creates or deletes.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(os.path.abspath(os.fspath(out)))
        name = self.out.name or "_"
        self.staging, self.trash, self.lock = (self.out.parent / (name + s) for s in _SUFFIXES)
        self.run_id = uuid.uuid4().hex
        self.keys: dict[str, Any] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self._fd: int | None = None
        self._created = False
        self._parents: list[Path] = []

    # ---- checks that need no lock (every process runs them)
    def _fail(self, what: str) -> OutputError:
        return OutputError(f"output {self.out}: {what}")

    def check_inputs(self, reads: Sequence[tuple[str, Any]]) -> None:
        """No input inside the folders this run writes, replaces or deletes
        (:func:`check_inputs_outside`)."""
        check_inputs_outside(reads, folders=(self.out, self.staging, self.trash),
                             files=(self.lock,), command="run")

    def _check_path(self) -> None:
        out = self.out
        if not out.name:
            raise self._fail("the file system root cannot be a run folder; give a new folder")
        self._check_names()  # first: a name past the limit fails every stat
        for p in (out, self.staging, self.trash, self.lock):
            if p.is_symlink():
                raise self._fail(f"{p} is a symbolic link; a run writes and deletes only real "
                                 f"folders (give the path it points to, or another --out)")
        if out.exists() and not out.is_dir():
            raise self._fail("exists and is not a directory")
        cwd = Path.cwd().resolve()
        if out.is_dir() and (cwd == out.resolve() or out.resolve() in cwd.parents):
            raise self._fail("is the current folder or holds it; give a new folder")
        probe = _existing_ancestor(out)
        if not probe.is_dir():
            raise self._fail(f"{probe} is a file, not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise self._fail(f"{probe} is not writable")

    def _check_names(self) -> None:
        probe = _existing_ancestor(self.out)
        try:
            name_max = os.pathconf(probe, "PC_NAME_MAX")
            path_max = os.pathconf(probe, "PC_PATH_MAX")
        except (OSError, ValueError):
            name_max, path_max = 255, 4096
        extra = max(len(s) for s in _SUFFIXES)
        for part in self.out.parts[1:-1]:
            if len(os.fsencode(part)) > name_max:
                raise self._fail(f"the folder name {part[:24]!r}... is "
                                 f"{len(os.fsencode(part))} bytes, past the {name_max}-byte "
                                 f"limit of file names here")
        n = len(os.fsencode(self.out.name))
        if n + extra > name_max:
            raise self._fail(f"the name is {n} bytes; with the suffixes a run adds beside it "
                             f"('.replaced', '.partial') it passes the {name_max}-byte limit "
                             f"of file names here; use at most {name_max - extra} bytes")
        if len(os.fsencode(str(self.out))) + extra + 64 > path_max:
            raise self._fail(f"the path is too long for this file system ({path_max} bytes "
                             f"with the files a run writes inside it)")

    # ---- preparing (the writing process, under the lock)
    def prepare(self, recipe: Mapping[str, Any], plan_rules: Sequence[Mapping[str, Any]] = (),
                *, resume: bool = False, overwrite: bool = False, main: bool = True,
                recipe_path: str | os.PathLike | None = None) -> Path:
        """Check everything, lock, and return the staging folder (created, with its marker,
        unless resuming). ``plan_rules``: the exact rank of each replaced layer."""
        self._check_path()
        self.check_inputs(recipe_inputs(recipe, recipe_path))
        self.keys = result_keys(recipe, plan_rules)
        if not main:
            if resume and not (self.staging / CHECKPOINT).is_file():
                raise CheckpointError(f"--resume: no checkpoint at {self.staging / CHECKPOINT}")
            return self.staging
        self.acquire()
        self._recover()
        self._check_out(overwrite)
        if self._reuse_staging(resume, overwrite):
            return self.staging
        self.staging.mkdir()
        self._created = True
        self._write_marker("staging")
        return self.staging

    def acquire(self) -> None:
        """Create the folders above ``out`` that are missing and take the lock (refused
        with one line while another process holds it)."""
        self._make_parents()
        self._take_lock()

    def _make_parents(self) -> None:
        missing = []
        p = self.out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._parents.append(d)

    def _take_lock(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(20):
            try:
                fd = os.open(self.lock, flags, 0o666)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpaceError(f"no space left on {self.lock.parent}") from None
                raise self._fail(f"cannot create the lock file {self.lock} "
                                 f"({exc.strerror})") from None
            got = _try_flock(fd)
            holder = _read_fd(fd)
            if got and not _same_file(fd, self.lock):  # its owner removed it meanwhile
                os.close(fd)
                continue
            if got is False or (got is None and _alive(holder)) or \
                    (got and holder and holder.get("host") != _HOST):
                os.close(fd)
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, since "
                       f"{holder.get('started')}" if holder else "another process")
                gone = (f"; if that run is gone, delete {self.lock}"
                        if got and holder and holder.get("host") != _HOST else "")
                raise self._fail(f"another run is writing it ({who}); wait for it to finish "
                                 f"or choose another --out{gone}")
            info = {"pid": os.getpid(), "host": _HOST, "run_id": self.run_id,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise self._fail(f"could not take the lock {self.lock}")

    def _recover(self) -> None:
        """Finish what a crash between the two renames of a non-atomic replace left: the
        old run in ``.replaced`` and no run at ``out``."""
        if not (self.trash.exists() or self.trash.is_symlink()):
            return
        if _marker(self.trash) is None and not _empty_dir(self.trash):
            raise self._fail(f"{self.trash} exists and was not made by compresscnn (no "
                             f"{MARKER}); move it away")
        if not self.out.exists():
            new = _marker(self.staging)
            src = self.staging if new and new.get("state") == "complete" else self.trash
            os.rename(src, self.out)
        if self.trash.exists():
            _remove(self.trash)

    def _check_out(self, overwrite: bool) -> None:
        if not self.out.exists():
            return
        if _marker(self.out) is None and not _empty_dir(self.out):
            raise self._fail(f"already exists and is not a compresscnn run directory (no "
                             f"{MARKER} marker), so it is never replaced, even with "
                             f"--overwrite; choose another --out")
        if not overwrite:
            raise self._fail("already exists (use --overwrite to replace it, or --out for "
                             "another directory)")

    def _reuse_staging(self, resume: bool, overwrite: bool) -> bool:
        """True when resuming the run in ``.partial``; else clears a stale one of ours."""
        ck = self.staging / CHECKPOINT
        if not self.staging.exists():
            if resume:
                raise CheckpointError(f"--resume: no checkpoint at {ck}")
            return False
        info = _marker(self.staging)
        if info is None:
            raise self._fail(f"{self.staging} exists and was not made by compresscnn (no "
                             f"{MARKER}); it is left alone: move it away or choose another "
                             f"--out")
        if resume:
            if not ck.is_file():
                raise CheckpointError(f"--resume: no checkpoint at {ck}")
            try:
                read_manifest(self.staging)
            except CheckpointError as e:
                raise CheckpointError(f"--resume: {e}") from None
            self._check_same_recipe(info)
            self.run_id = info.get("run_id", self.run_id)
            return True
        if ck.is_file() and info.get("state") != "complete" and not overwrite:
            raise self._fail(f"an interrupted run is in {self.staging} (fine-tuning checkpoint "
                             f"{CHECKPOINT}); use --resume or --overwrite")
        if not _remove(self.staging):  # ours, and nothing in it is to be resumed
            raise self._fail(f"cannot remove the stale {self.staging}")
        return False

    def _check_same_recipe(self, info: Mapping[str, Any]) -> None:
        old = info.get("recipe")
        if not isinstance(old, dict):
            raise CheckpointError(f"--resume: {self.staging / MARKER} does not record the "
                                  f"recipe the run was started with; start again with "
                                  f"--overwrite")
        changed = sorted(k for k in set(old) | set(self.keys)
                         if old.get(k, _ABSENT) != self.keys.get(k, _ABSENT))
        if not changed:
            return
        shown = ", ".join(f"{k} ({_short(old.get(k, _ABSENT))} -> "
                          f"{_short(self.keys.get(k, _ABSENT))})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise CheckpointError(f"--resume: the recipe differs from the one the interrupted run "
                              f"in {self.staging} was started with: {shown}{more}; resume with "
                              f"that recipe, or start again with --overwrite")

    def record(self, name: str, **info: Any) -> None:
        """Put ``name`` (a file in the staging folder) in the manifest with its sha256 and
        ``info``; the marker written at :meth:`commit` holds it."""
        self.files[name] = {"sha256": sha256_file(self.staging / name), **info}

    def _write_marker(self, state: str) -> None:
        info: dict[str, Any] = {"format": FORMAT, "run_id": self.run_id, "state": state,
                                "host": _HOST, "pid": os.getpid(),
                                "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "recipe": self.keys}
        if self.files:
            info["files"] = self.files
        info["sha256"] = _self_digest(info)
        atomic_write_text(self.staging / MARKER, json.dumps(info, indent=1) + "\n")

    # ---- the end of a run
    def commit(self) -> None:
        """Put the complete run at ``out``: a rename, or an atomic swap with the old run
        (checked again: it may have changed during the run), which is then deleted."""
        self._write_marker("complete")
        if not self.out.exists():
            os.rename(self.staging, self.out)
            return
        if _marker(self.out) is None and not _empty_dir(self.out):
            raise self._fail(f"was changed during the run and is no longer a compresscnn run "
                             f"directory, so it is not replaced; the new run is in "
                             f"{self.staging}")
        if (self.trash.exists() or self.trash.is_symlink()) and not _remove(self.trash):
            raise self._fail(f"{self.trash} is in the way and was not made by compresscnn; "
                             f"the new run is in {self.staging}")
        if _exchange(self.staging, self.out):  # the new run is in place: the rest is tidying
            with contextlib.suppress(OSError):
                os.rename(self.staging, self.trash)
        else:
            os.rename(self.out, self.trash)
            os.rename(self.staging, self.out)
        _remove(self.trash)

    def resumable(self) -> bool:
        return (self.staging / CHECKPOINT).is_file()

    def abandon(self) -> None:
        """After a failure: remove the staging folder this process created, unless it holds
        a checkpoint to resume from."""
        info = _marker(self.staging) if self._created else None
        if info and info.get("run_id") == self.run_id and info.get("state") != "complete" \
                and not self.resumable():
            _remove(self.staging)

    def release(self) -> None:
        """Drop the lock (and folders this process created above ``out`` that stayed empty)."""
        if self._fd is not None:
            try:
                if _same_file(self._fd, self.lock):
                    os.unlink(self.lock)
            finally:
                os.close(self._fd)
                self._fd = None
        for d in reversed(self._parents):
            if _empty_dir(d):
                with contextlib.suppress(OSError):
                    d.rmdir()

    def no_space(self, exc: BaseException) -> NoSpaceError | None:
        """A :class:`NoSpaceError` for a run that failed because the disk filled up."""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            exc = NoSpaceError(f"no space left on {self.staging} ({exc.strerror})")
        if not isinstance(exc, NoSpaceError):
            return None
        if self.resumable():
            return NoSpaceError(f"{exc}; the run's last checkpoint is kept in {self.staging}: "
                                f"free some space, then rerun with --resume")
        return exc
