"""Folders and zips read in place, listed as relative POSIX paths; images decoded with their size checked first."""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from compresscnn.errors import DataError
from compresscnn.io.data.config import MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, _BYTES_PER_PIXEL, _HEADER_BYTES

log = logging.getLogger(__name__)


class _Source:
    """Read-only access to files under a folder or inside a zip (opened lazily per process)."""

    def __init__(self, path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.path = path
        self.max_pixels = int(max_pixels)
        self.is_zip = path.is_file()
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1
        self._lock = threading.Lock()
        if self.is_zip:
            self._names = self._zip_names()
        else:
            self._names = sorted(
                p.relative_to(path).as_posix()
                for p in path.rglob("*")
                if p.is_file()
            )

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():  # DataLoader workers fork
            try:
                self._zf = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{self.path} is not a readable zip file ({exc})") from None
            self._pid = os.getpid()
        return self._zf

    def _zip_names(self) -> list[str]:
        names = []
        for info in self._zip().infolist():
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise DataError(
                    f"{self.path}: refusing zip member {name!r} (absolute path or '..')"
                )
            if not info.is_dir():
                names.append(name)
        return sorted(names)

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> bytes:
        if self.is_zip:
            with self._lock:
                try:
                    size = self._zip().getinfo(name).file_size
                    limit = self.max_pixels * _BYTES_PER_PIXEL + _HEADER_BYTES
                    if size > limit:
                        raise DataError(
                            f"{self.path}: member {name!r} would decompress to {size:,} bytes, "
                            f"more than an image of data.max_image_pixels "
                            f"({self.max_pixels:,}) can take ({limit:,}); refused unread")
                    return self._zip().read(name)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise DataError(f"{self.path}: cannot read member {name!r} ({exc})") from None
        return (self.path / name).read_bytes()

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawn-started workers
        state = dict(self.__dict__)
        state["_zf"], state["_pid"], state["_lock"] = None, -1, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _open_source(root: str | os.PathLike[str], what: str,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> _Source:
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"{what}: path not found: {p}")
    if p.is_file() and not zipfile.is_zipfile(p):
        raise DataError(f"{what}: {p} is a file but not a readable zip archive (corrupt?)")
    return _Source(p, max_pixels)


def _is_image(name: str) -> bool:
    base = PurePosixPath(name).name
    return (
        name.lower().endswith(IMAGE_SUFFIXES)
        and not base.startswith(".")
        and "__MACOSX" not in name
    )


def _split_members(src: _Source, split: str) -> list[tuple[str, str]]:
    """(path inside the split, member name) of the images of ``split``: under ``<split>/`` if the source has that folder (at the top
    or one folder down, as in a zip of ``cifar10/train/...``), else the whole source."""
    images = [n for n in src.names() if _is_image(n)]
    for depth in (0, 1):
        hits = [n for n in images if len(PurePosixPath(n).parts) > depth + 1
                and PurePosixPath(n).parts[depth] == split]
        if hits:
            return [(str(PurePosixPath(*PurePosixPath(n).parts[depth + 1:])), n) for n in hits]
    splits = {"train", "test", "val", "valid", "validation"}
    tops = {PurePosixPath(n).parts[0] for n in images if len(PurePosixPath(n).parts) > 1}
    if tops & splits:
        raise DataError(
            f"{src.path}: no '{split}' split (the source has split folders: "
            f"{', '.join(sorted(tops & splits))})"
        )
    return [(n, n) for n in images]


def _decode(data: bytes, name: str, src: _Source, mode: str) -> Any:
    """Decode one image, once its header's size is checked against
    ``data.max_image_pixels`` (``Image.open`` reads only the header)."""
    try:
        with warnings.catch_warnings():  # the size is checked here, against the recipe's limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DataError(f"{src.path}: image {name!r} is larger than PIL decodes ({exc}); "
                        f"refused before decoding") from None
    except Exception as exc:
        raise DataError(f"{src.path}: cannot decode image {name!r} ({exc})") from None
    w, h = img.size
    if w * h > src.max_pixels:
        raise DataError(f"{src.path}: image {name!r} is {w}x{h} ({w * h:,} pixels), more than "
                        f"data.max_image_pixels ({src.max_pixels:,}); refused before decoding "
                        f"(shrink it, or raise data.max_image_pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return img.convert(mode)
    except Exception as exc:
        raise DataError(f"{src.path}: cannot decode image {name!r} ({exc})") from None
