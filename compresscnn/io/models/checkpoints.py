"""Weights files read as data: ``torch.load(weights_only=True)``, safetensors, TensorFlow Lite
(by :mod:`compresscnn.io.models.tflite_weights`); every failure a one-line
:class:`~compresscnn.errors.CheckpointError` naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load, load_file
from torch import nn

from compresscnn.errors import CheckpointError

__all__ = ["Checkpoint", "read_checkpoint", "load_torch_file", "load_weights", "check_state_dict"]


@dataclass
class Checkpoint:
    """A weights file read into memory: a flat state_dict and what else the file said."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""


# torch's advice to load a refused file with weights_only=False: never repeated to a user
_UNSAFE_ADVICE = re.compile(r"weights_only\W{0,3}(=|set to|to)\W{0,3}False|arbitrary code", re.I)


def _one_line(exc: BaseException) -> str:
    text = [ln for ln in str(exc).strip().splitlines() if not _UNSAFE_ADVICE.search(ln)]
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _weights_only_detail(text: str) -> str:
    """The informative line of torch's long weights_only error ("Unsupported operand 103")."""
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not _UNSAFE_ADVICE.search(ln)]
    for ln in lines:
        if any(w in ln for w in ("Unsupported", "unsupported", "GLOBAL", "Unpickler error:")) \
                and not ln.startswith("Please file"):
            return ln[:200]
    return lines[-1][:200] if lines else "unknown error"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _load_safetensors(p: Path, metadata: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its metadata into ``metadata``. safetensors opens
    only paths that are valid UTF-8: a file under a non-UTF-8 name is read as bytes."""
    try:
        os.fsencode(p).decode("utf-8")
    except UnicodeDecodeError:
        data = p.read_bytes()
        obj = safetensors_load(data)
        n = struct.unpack("<Q", data[:8])[0]
        metadata.update(json.loads(data[8:8 + n]).get("__metadata__") or {})
        return obj
    obj = load_file(str(p), device="cpu")
    with safe_open(str(p), framework="pt") as f:
        metadata.update(f.metadata() or {})
    return obj


def load_torch_file(p: Path) -> Any:
    """``torch.load(p, weights_only=True)`` on CPU; a one-line :class:`CheckpointError` naming
    ``p`` when the file is truncated, corrupt or would need unsafe unpickling. The message
    never suggests loading it unsafely."""
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(p):
        raise CheckpointError(
            f"checkpoint {p} is truncated or corrupt (an incomplete zip archive: "
            "torch.save's format with its end missing)"
        )
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "unsupported operand" in text.lower() or "weights only load failed" not in text.lower():
            raise CheckpointError(
                f"checkpoint {p} is corrupt or not a torch.save file (cannot unpickle with "
                f"weights_only=True: {_weights_only_detail(text)})"
            ) from None
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"it would call or build {glob.group(1)}" if glob else _weights_only_detail(text)
        raise CheckpointError(
            f"checkpoint {p} was refused as unsafe: {what}, not tensors (torch.load "
            "weights_only=True); if you trust its source, re-save it as a state_dict of tensors"
        ) from None
    except (EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {p} is truncated or corrupt ({type(exc).__name__}: {_one_line(exc)})"
        ) from None
    except Exception as exc:  # RuntimeError from the zip reader, ValueError, ...
        raise CheckpointError(
            f"checkpoint {p} is truncated or corrupt (torch.load failed: {_one_line(exc)})"
        ) from None
    return obj


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a weights file into a flat ``{name: tensor}`` state_dict.

    Accepts a plain state_dict, ``{"state_dict": ...}``, ``{"model": ...}`` (and
    ``model_state_dict``), keys prefixed by ``module.`` (DataParallel/DDP), and
    ``.safetensors`` files. Non-tensor entries beside the weights (``best_prec1``,
    ``epoch``, ...) become ``metadata``. Never unpickles anything but tensors and
    containers: ``weights_only=True``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {p}")

    metadata: dict[str, Any] = {}
    if p.suffix.lower() == ".safetensors":
        try:
            obj: Any = _load_safetensors(p, metadata)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                f"checkpoint {p} is not a readable safetensors file (truncated or corrupt?): "
                f"{_one_line(exc)}"
            ) from None
    else:
        obj = load_torch_file(p)

    state = obj
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in ("state_dict", "model", "model_state_dict", "net", "params"):
            if _is_tensor_dict(obj.get(key)):
                state = obj[key]
                metadata.update(
                    {k: v for k, v in obj.items() if k != key and isinstance(v, (int, float, str))}
                )
                break
    if not _is_tensor_dict(state):
        what = type(obj).__name__
        keys = f" (top-level keys: {', '.join(map(str, list(obj)[:8]))})" if isinstance(obj, dict) else ""
        raise CheckpointError(f"checkpoint {p} contains no tensors: a {what}{keys}")

    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):  # DataParallel/DDP, torch.compile
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return Checkpoint(path=p, state_dict=tensors, metadata=metadata, sha256=_sha256(p))


def _fmt_keys(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, spec: str = "") -> Checkpoint:
    """Read ``path`` and load it into ``model`` strictly; return the :class:`Checkpoint`.

    Checks before loading (:func:`check_state_dict`), each a one-line CheckpointError naming
    the file. BatchNorm's ``num_batches_tracked`` counters may be absent (old checkpoints).
    """
    ckpt = read_checkpoint(path)
    sd = ckpt.state_dict
    own = model.state_dict()
    what = f" for {spec}" if spec else ""
    check_state_dict(sd, own, f"checkpoint {ckpt.path}", what)
    full = dict(sd)
    for k in own:  # fill absent BatchNorm counters with the model's own
        full.setdefault(k, own[k])
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as exc:  # e.g. dtype that cannot be copied
        raise CheckpointError(f"checkpoint {ckpt.path} cannot be loaded{what}: {_one_line(exc)}") from None
    return ckpt


def check_state_dict(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str,
                     what: str = "") -> None:
    """Raise a one-line :class:`CheckpointError` (``where``: "checkpoint <path>") unless
    ``sd`` fits ``own`` (a model's state_dict): the same keys (up to 5 missing and 5
    unexpected are named, with the counts; ``num_batches_tracked`` may be absent), and for
    each tensor, the first bad one named: the model's shape, a floating-point dtype where the
    model's tensor is floating point (an integer, bool or complex tensor would be cast
    silently) and an integer one where it is an integer, and finite values."""
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_fmt_keys(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_fmt_keys(unexpected)})")
        raise CheckpointError(f"{where} does not match the model{what}: keys " + "; ".join(parts))
    for k, v in sd.items():
        mine = own[k]
        if tuple(v.shape) != tuple(mine.shape):
            raise CheckpointError(
                f"{where} does not match the model{what}: '{k}' has shape "
                f"{tuple(v.shape)} in the file but {tuple(mine.shape)} in the model"
            )
        if mine.is_floating_point() != v.is_floating_point() or v.is_complex() \
                or (v.dtype == torch.bool) != (mine.dtype == torch.bool):
            kind = "a floating-point" if mine.is_floating_point() else f"a {mine.dtype}"
            raise CheckpointError(f"{where}: tensor '{k}' has dtype {v.dtype}, expected {kind} "
                                  f"tensor")
        if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all()):
            kind = "NaN" if bool(torch.isnan(v).any()) else "Inf"
            raise CheckpointError(f"{where}: tensor '{k}' contains {kind} values")
