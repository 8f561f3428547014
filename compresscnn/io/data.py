"""Datasets and loaders: CIFAR-10, ImageNet-style folders/zips, Fashion-MNIST.

Sources, by ``data.dataset``:

* ``cifar10``: a folder or ``.zip`` laid out ``<split>/<class>/*.jpg|png`` (class folder names
  are the CIFAR-10 names; labels follow CIFAR order), torchvision's ``cifar-10-batches-py``
  folder, or torchvision's download. Each split is decoded once per process into a uint8
  N x H x W x C tensor (the 50k training images are 150 MB) and transformed on the fly as
  tensors, which is much faster than decoding JPEGs every epoch.
* ``imagenet``: a folder or ``.zip`` of ``[<split>/]<wnid>/<file>.JPEG`` or flat
  ``[<split>/]<wnid>_<name>.JPEG``; the label is the wnid's position among the 1000 sorted
  ImageNet-1k wnids (timm's ``imagenet_synsets.txt``), so a 10-class subset is still scored
  against 1000-way predictions. Images are decoded lazily (a real ImageNet does not fit).
* ``fashion_mnist``: the four idx ``.gz`` files (Debian's ``dataset-fashion-mnist`` installs
  them in ``/usr/share/datasets/fashion-mnist``, the default root), a folder holding them
  (torchvision's ``FashionMNIST/raw`` too), or torchvision's download.

Three sources, each a root and a split: ``train`` (fine-tuning), ``calibration`` (data-aware
decomposition; by default the ``train`` source) and ``eval`` (accuracy). A root with split
folders (``train/``, ``test/``...) gives each source its split; a root without them is read
whole, so two sources on it are the same images: :func:`eval_overlap` counts them and
:func:`check_sources` refuses training or calibrating on evaluation images.

Images reach the model at its input size (``model.input_size``, else its own): ``resize:
auto`` feeds an image already at that size as it is and scales a larger one by the model's
resize/crop ratio before the crop; an image smaller than the input, or one that the explicit
``resize``/``crop`` would bring to another size, is refused with one line.

Zips are read in place, never extracted; a member with ``..`` or an absolute path is refused,
and so is one that would decompress to more than 8 bytes a pixel of ``data.max_image_pixels``
(a zip bomb), before it is read. An image's size is read from its header (PIL opens files
lazily) and one of more than ``data.max_image_pixels`` pixels is refused before it is
decoded. Fashion-MNIST labels outside 0-9 are refused.
Every problem a user can fix is a :class:`~compresscnn.errors.DataError` naming the path.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import logging
import os
import re
import struct
import threading
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from compresscnn.errors import DataError
from compresscnn.config import LEGACY_DATA_KEYS

log = logging.getLogger(__name__)

__all__ = [
    "make_loaders",
    "calibration_batches",
    "check_sources",
    "check_classes",
    "eval_overlap",
    "source_of",
    "DATASET_CLASSES",
    "build_dataset",
    "clear_cache",
    "resolve_data_cfg",
    "stratified_subset",
    "imagenet_wnids",
    "CIFAR10_CLASSES",
    "DATASETS",
    "FASHION_MNIST_DIR",
]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
DATASETS = ("cifar10", "imagenet", "fashion_mnist")
#: size of each dataset's label space (an ImageNet subset is still scored 1000-way)
DATASET_CLASSES = {"cifar10": 10, "imagenet": 1000, "fashion_mnist": 10}
ROLES = ("train", "calibration", "eval")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_WNID_RE = re.compile(r"^(n\d{8})(?:_|$)")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULTS: dict[str, Any] = {
    "dataset": "cifar10",
    "root": None,
    "train": {"root": None, "split": "train", "subset": None},
    "calibration": {"root": None, "split": None},
    "eval": {"root": None, "split": "test", "subset": None},
    "allow_eval_overlap": False,
    "download": False,
    "download_dir": "~/.cache/compresscnn",
    "batch_size": 128,
    "eval_batch_size": 256,
    "workers": 0,
    "augment": False,
    "resize": "auto",
    "crop": "auto",
    "max_image_pixels": 50_000_000,
    "seed": 0,
}
#: bytes an image file may take per pixel (16-bit RGBA, uncompressed): an archive member
#: larger than this times ``max_image_pixels`` is refused before it is decompressed
_BYTES_PER_PIXEL = 8
_HEADER_BYTES = 1 << 20


def _with_sources(raw: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled, each source a mapping of its own; the old flat keys (``test_split``,
    ``train_root``...) folded into their source (both spellings of one key: an error)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for k, v in raw.items():
        if k in ROLES:
            if not isinstance(v, dict):
                raise DataError(f"data.{k} must be a mapping (root, split...), got {v!r}")
            out[k].update(v)
        elif k not in LEGACY_DATA_KEYS:
            out[k] = v
    for old, (role, key) in LEGACY_DATA_KEYS.items():
        if raw.get(old) is None:
            continue
        if (raw.get(role) or {}).get(key) not in (None, raw[old]):
            raise DataError(f"give data.{role}.{key} or its old spelling data.{old}, not both")
        out[role][key] = raw[old]
    return out


def resolve_data_cfg(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Fill defaults for the recipe's ``data:`` section (unknown keys are kept as they are)."""
    out = _with_sources(dict(cfg or {}))
    ds = str(out["dataset"]).lower().replace("-", "_")
    ds = {"cifar": "cifar10", "cifar_10": "cifar10", "fmnist": "fashion_mnist",
          "fashionmnist": "fashion_mnist", "imagenet1k": "imagenet"}.get(ds, ds)
    if ds not in DATASETS:
        raise DataError(f"data.dataset: unknown dataset {out['dataset']!r}; known: {', '.join(DATASETS)}")
    out["dataset"] = ds
    for key in ("batch_size", "eval_batch_size"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise DataError(f"data.{key} must be a positive integer, got {out[key]!r}")
    for role in ("train", "eval"):
        n = out[role].get("subset")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise DataError(f"data.{role}.subset must be a positive integer or null, got {n!r}")
    return out


def source_of(cfg: dict[str, Any], role: str) -> dict[str, Any]:
    """``{"root", "split", "subset"}`` of source ``role`` of a resolved data section: its own
    root, else (calibration) the train source's, else ``data.root``; likewise the split."""
    if role not in ROLES:
        raise ValueError(f"unknown data source {role!r}; known: {', '.join(ROLES)}")
    sec = cfg[role]
    if role == "calibration":
        train = source_of(cfg, "train")
        return {"root": sec.get("root") or train["root"], "split": sec.get("split") or
                train["split"], "subset": None}
    split = sec.get("split")
    if not isinstance(split, str) or not split:
        raise DataError(f"data.{role}.split must be a folder name, got {split!r}")
    return {"root": sec.get("root") or cfg["root"], "split": split, "subset": sec.get("subset")}


# --------------------------------------------------------------------------------------
# sources: a folder or a zip, listed as relative POSIX paths


class _Source:
    """Read-only access to files under a folder or inside a zip (opened lazily per process)."""

    def __init__(self, path: Path, max_pixels: int = DEFAULTS["max_image_pixels"]) -> None:
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
                 max_pixels: int = DEFAULTS["max_image_pixels"]) -> _Source:
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


# --------------------------------------------------------------------------------------
# in-memory uint8 datasets (CIFAR-10, Fashion-MNIST)

_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the decoded CIFAR-10 / Fashion-MNIST splits held by this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_key(path: Path, split: str, kind: str) -> tuple[Any, ...]:
    st = path.stat()
    return (str(path.resolve()), split, kind, st.st_mtime_ns, st.st_size)


def _cifar_from_source(src: _Source, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of ``split`` into uint8 N x H x W x 3 + int64 labels."""
    members = _split_members(src, split)
    if not members:
        raise DataError(f"{src.path}: split '{split}' has no images")
    classes = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    items = []
    for rel, full in members:
        parts = PurePosixPath(rel).parts
        if len(parts) < 2:
            raise DataError(
                f"{src.path}: image {full!r} is not inside a class folder "
                f"(expected <split>/<class>/<file>)"
            )
        cls = parts[-2]
        if cls not in classes:
            raise DataError(
                f"{src.path}: unknown class folder {cls!r} (at {full!r}); "
                f"CIFAR-10 classes are {', '.join(CIFAR10_CLASSES)}"
            )
        items.append((full, classes[cls]))
    first = np.asarray(_decode(src.read(items[0][0]), items[0][0], src, "RGB"))
    out = np.empty((len(items),) + first.shape, dtype=np.uint8)
    for i, (name, _) in enumerate(items):
        arr = first if i == 0 else np.asarray(_decode(src.read(name), name, src, "RGB"))
        if arr.shape != first.shape:
            raise DataError(
                f"{src.path}: image {name!r} is {arr.shape[1]}x{arr.shape[0]}, "
                f"others are {first.shape[1]}x{first.shape[0]}"
            )
        out[i] = arr
    labels = torch.tensor([c for _, c in items], dtype=torch.int64)
    return torch.from_numpy(out), labels


def _torchvision_arrays(dataset: str, root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    train = split == "train"
    try:
        if dataset == "cifar10":
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
            return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.tensor(ds.targets, dtype=torch.int64)
        ds = torchvision.datasets.FashionMNIST(str(root), train=train, download=download)
        return ds.data.unsqueeze(-1).contiguous(), ds.targets.to(torch.int64)
    except DataError:
        raise
    except Exception as exc:
        verb = "download" if download else "read"
        raise DataError(f"could not {verb} {dataset} into {root} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


_MAX_IDX_BYTES = 1 << 31


def _read_idx(path: Path) -> torch.Tensor:
    """Parse an idx file (LeCun's MNIST format), gzipped or not, into a uint8 tensor."""
    try:  # streamed: a file that decompresses to more than its header declares is not read
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            magic = struct.unpack(">I", f.read(4))[0]
            if magic >> 8 != 0x08:  # 0x08 = unsigned byte
                raise ValueError(f"bad magic number {magic:#x}")
            ndim = magic & 0xFF
            dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
            n = 1
            for d in dims:
                n *= d
            if n > _MAX_IDX_BYTES:
                raise ValueError(f"its header declares {n:,} bytes of data, more than "
                                 f"{_MAX_IDX_BYTES:,}")
            body = f.read(n + 1)
        if len(body) != n:
            raise ValueError(f"expected {n} bytes of data, found "
                             f"{'more' if len(body) > n else len(body)}")
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a readable idx file ({exc})") from None
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _fashion_from_folder(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    for d in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for suffix in (".gz", ""):
            img = d / f"{prefix}-images-idx3-ubyte{suffix}"
            lab = d / f"{prefix}-labels-idx1-ubyte{suffix}"
            if img.is_file() and lab.is_file():
                x, y = _read_idx(img), _read_idx(lab)
                if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                    raise DataError(f"{img}: {tuple(x.shape)} images do not match {tuple(y.shape)} labels")
                if len(x) == 0:
                    raise DataError(f"{img}: split '{split}' has no images")
                bad = (y >= len(CIFAR10_CLASSES)).nonzero()
                if len(bad):
                    i = int(bad[0, 0])
                    raise DataError(f"{lab}: label {int(y[i])} of image {i} is out of range "
                                    f"(Fashion-MNIST labels are 0-9)")
                return x.unsqueeze(-1).contiguous(), y.to(torch.int64)
    raise DataError(
        f"{root}: no Fashion-MNIST idx files for split '{split}' "
        f"(expected {prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz)"
    )


def _load_arrays(cfg: dict[str, Any], split: str, root: Any,
                 where: str = "data.root") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x H x W x C images and labels for cifar10 / fashion_mnist, cached per process."""
    ds = cfg["dataset"]
    if root is None:
        if ds == "fashion_mnist" and FASHION_MNIST_DIR.is_dir():
            root = FASHION_MNIST_DIR
        else:
            # torchvision's layout in download_dir: downloaded now if asked, else already there
            ddir = Path(cfg["download_dir"]).expanduser()
            key = (str(ddir), split, ds + ":torchvision")
            with _CACHE_LOCK:
                if key in _CACHE:
                    return _CACHE[key]
                if cfg["download"]:
                    arrays = _torchvision_arrays(ds, ddir, split, download=True)
                else:
                    try:
                        arrays = _torchvision_arrays(ds, ddir, split, download=False)
                    except DataError:
                        hint = {
                            "cifar10": "a folder or .zip laid out <split>/<class>/*.jpg (or "
                                       "torchvision's cifar-10-batches-py folder)",
                            "fashion_mnist": "a folder with the idx .gz files (apt-get install "
                                             f"dataset-fashion-mnist puts them in {FASHION_MNIST_DIR})",
                        }[ds]
                        raise DataError(
                            f"data.root is not set for {ds} and {ddir} holds no download: set "
                            f"data.root to {hint}, or set data.download: true to let torchvision "
                            "download it into data.download_dir"
                        ) from None
                _CACHE[key] = arrays
                return arrays
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{where}: path not found: {path}")
    with _CACHE_LOCK:
        key = (*_cache_key(path, split, ds), cfg.get("max_image_pixels"))
        if key in _CACHE:
            return _CACHE[key]
        if ds == "fashion_mnist" and path.is_dir():
            arrays = _fashion_from_folder(path, split)
        elif ds == "cifar10" and path.is_dir() and (path / "cifar-10-batches-py").is_dir():
            arrays = _torchvision_arrays(ds, path, split, download=False)
        else:
            arrays = _cifar_from_source(_open_source(path, where, cfg.get("max_image_pixels",
                                                                DEFAULTS["max_image_pixels"])),
                                        split)
        _CACHE[key] = arrays
        return arrays


class TensorImageDataset(Dataset):
    """uint8 N x H x W x C images in memory; ``transform`` maps a uint8 C x H x W tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 indices: Sequence[int] | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.indices = list(range(len(labels))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        x = self.images[j].permute(2, 0, 1)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[j])

    @property
    def targets(self) -> list[int]:
        return self.labels[self.indices].tolist()


# --------------------------------------------------------------------------------------
# ImageNet-style (lazy)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in sorted order (index = class index).

    Read from timm's packaged ``imagenet_synsets.txt`` (timm is a dependency), so no copy is
    kept here.
    """
    global _WNIDS
    if _WNIDS is None:
        try:
            text = (importlib.resources.files("timm") / "data" / "_info" / "imagenet_synsets.txt").read_text()
        except Exception as exc:
            raise DataError(f"cannot read the ImageNet wnid list from timm ({exc})") from None
        wnids = [w.strip() for w in text.split() if w.strip()]
        if len(wnids) != 1000 or wnids != sorted(wnids):
            raise DataError("timm's imagenet_synsets.txt is not the 1000 sorted ImageNet-1k wnids")
        _WNIDS = wnids
    return _WNIDS


_WNIDS: list[str] | None = None


class ImageFolderDataset(Dataset):
    """Lazily decoded images from a folder or zip, labelled by ImageNet wnid."""

    def __init__(self, src: _Source, items: list[tuple[str, int]],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 indices: Sequence[int] | None = None, mode: str = "RGB") -> None:
        self.src, self.items, self.transform, self.mode = src, items, transform, mode
        self.indices = list(range(len(items))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        name, label = self.items[self.indices[i]]
        img = _decode(self.src.read(name), name, self.src, self.mode)
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        if self.transform is not None:
            x = self.transform(x)
        return x, label

    @property
    def targets(self) -> list[int]:
        return [self.items[j][1] for j in self.indices]


def _imagenet_items(src: _Source, split: str) -> list[tuple[str, int]]:
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    members = _split_members(src, split)
    if not members:
        raise DataError(f"{src.path}: split '{split}' has no images")
    items = []
    for rel, full in members:
        parts = PurePosixPath(rel).parts
        if len(parts) >= 2:  # <wnid>/<file>
            wnid = parts[-2]
            if wnid not in index:
                raise DataError(
                    f"{src.path}: unknown class folder {wnid!r} (at {full!r}); expected an "
                    "ImageNet-1k WordNet id such as n01440764"
                )
        else:  # flat <wnid>_<name>.JPEG
            match = _WNID_RE.match(parts[-1])
            if not match or match.group(1) not in index:
                raise DataError(
                    f"{src.path}: cannot tell the class of {full!r}: expected <wnid>/<file> "
                    "or <wnid>_<name>.JPEG with an ImageNet-1k wnid"
                )
            wnid = match.group(1)
        items.append((full, index[wnid]))
    return items


# --------------------------------------------------------------------------------------
# transforms (on uint8 C x H x W tensors)


def _interp(name: str) -> Any:
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        return InterpolationMode.BILINEAR


def _size_opt(value: Any, key: str) -> Any:
    if value == "auto" or value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"data.{key} must be 'auto', null or a positive integer, got {value!r}")
    return value


def _hw(size: Any) -> str:
    return "x".join(str(int(v)) for v in size)


class _Geometry:
    """Where an image must end up (the model's input H x W) and how it gets there, from the
    data section's ``resize``/``crop`` and the model's ``pretrained_cfg``."""

    def __init__(self, cfg: dict[str, Any], pcfg: dict[str, Any], where: str) -> None:
        size = pcfg.get("input_size")
        self.target = tuple(int(v) for v in size[-2:]) if size else None
        self.resize = _size_opt(cfg.get("resize", "auto"), "resize")
        crop = _size_opt(cfg.get("crop", "auto"), "crop")
        self.crop = self.target if crop == "auto" else (None if crop is None else (crop, crop))
        r, c = pcfg.get("resize"), pcfg.get("crop")
        self.ratio = float(r) / float(c) if isinstance(r, int) and isinstance(c, int) and c else 1.0
        self.interp = _interp(pcfg.get("interpolation", "bilinear"))
        self.where = where

    def mismatch(self, got: tuple[int, int]) -> DataError:
        return DataError(
            f"{self.where}: images would reach the model at {_hw(got)} but its input is "
            f"{_hw(self.target)} (model.input_size): set data.resize / data.crop to give "
            f"{_hw(self.target)}, or model.input_size to the data's size")


class _AutoResize(torch.nn.Module):
    """``resize: auto``: an image already at ``size`` passes unchanged (ImageNet validation
    copies stored at 224x224 are fed as they are); a larger one is scaled to cover ``size`` x
    the model's resize/crop ratio (torchvision's resize-256 for a 224 crop); a smaller one is
    refused: upsampling must be asked for."""

    def __init__(self, geo: _Geometry, size: tuple[int, int]) -> None:
        super().__init__()
        self.geo, self.size = geo, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        th, tw = self.size
        if (h, w) == (th, tw):
            return x
        if h < th or w < tw:
            raise DataError(
                f"{self.geo.where}: images are {_hw((h, w))}, smaller than the model's input "
                f"{_hw((th, tw))}: set model.input_size to the data's size ([C, {h}, {w}]), or "
                "data.resize to an int to upsample")
        if th == tw:  # the shorter side, exactly as torchvision's Resize(int)
            out = [int(round(th * self.geo.ratio))]
        else:
            s = self.geo.ratio * max(th / h, tw / w)
            out = [max(th, int(round(h * s))), max(tw, int(round(w * s)))]
        return TF.resize(x, out, interpolation=self.geo.interp, antialias=True)


class _CheckSize(torch.nn.Module):
    """The last geometric step: an image not at the model's input size is refused."""

    def __init__(self, geo: _Geometry) -> None:
        super().__init__()
        self.geo = geo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.geo.target:
            raise self.geo.mismatch(tuple(x.shape[-2:]))
        return x


def _geometry_ops(geo: _Geometry, *, augment: bool, lazy: bool) -> list[Any]:
    """Resize / crop (and train-time augmentation) on uint8 C x H x W tensors."""
    size = geo.crop or geo.target
    if augment and lazy and size is not None:  # natural images: Inception-style crops
        return [v2.RandomResizedCrop(size, interpolation=geo.interp, antialias=True),
                v2.RandomHorizontalFlip()]
    ops: list[Any] = []
    if geo.resize == "auto" and size is not None:
        ops.append(_AutoResize(geo, size))
    elif isinstance(geo.resize, int):
        ops.append(v2.Resize(geo.resize, interpolation=geo.interp, antialias=True))
    if geo.crop is not None:
        ops.append(v2.CenterCrop(geo.crop))
    if augment and size is not None:  # small images: pad-and-crop + flip (He et al.'s CIFAR)
        ops += [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
    elif augment:
        ops.append(v2.RandomHorizontalFlip())
    if geo.target is not None:
        ops.append(_CheckSize(geo))
    return ops


def _build_transform(cfg: dict[str, Any], pcfg: dict[str, Any], *, augment: bool, lazy: bool,
                     where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    in_ch = int(tuple(pcfg.get("input_size", (3,)))[0])
    mean = tuple(float(m) for m in pcfg.get("mean", _IMAGENET_MEAN))
    std = tuple(float(s) for s in pcfg.get("std", _IMAGENET_STD))
    if len(mean) != in_ch or len(std) != in_ch:
        raise DataError(f"pretrained_cfg mean/std have {len(mean)} values for {in_ch} input channels")
    ops = _geometry_ops(_Geometry(cfg, pcfg, where), augment=augment, lazy=lazy)
    ops += [v2.ToDtype(torch.float32, scale=True), _Channels(in_ch), v2.Normalize(mean, std)]
    return v2.Compose(ops)


class _Channels(torch.nn.Module):
    """Match the model's input channels: grey -> RGB by repetition, RGB -> grey by luma."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if c == self.channels:
            return x
        if c == 1:
            return x.expand(*x.shape[:-3], self.channels, *x.shape[-2:]).contiguous()
        if self.channels == 1 and c == 3:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
            return (x * w).sum(-3, keepdim=True)
        raise DataError(f"images have {c} channels but the model takes {self.channels}")


# --------------------------------------------------------------------------------------
# subsets and loaders


def stratified_subset(labels: Sequence[int] | torch.Tensor, n: int, seed: int = 0) -> list[int]:
    """A deterministic class-stratified subset of ``n`` indices (sorted).

    Each class gets ``n`` times its share of the data (largest remainders round up, ties to
    the lower class index); inside a class, indices are taken in a seeded random order.
    """
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    total = len(labels_t)
    if n >= total:
        return list(range(total))
    classes, counts = torch.unique(labels_t, return_counts=True)
    quota = [n * int(c) / total for c in counts]
    take = [int(q) for q in quota]
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]), i))
    for i in order[: n - sum(take)]:
        take[i] += 1
    g = torch.Generator().manual_seed(int(seed))
    chosen: list[int] = []
    for cls, k in zip(classes.tolist(), take):
        idx = torch.nonzero(labels_t == cls).flatten()
        perm = idx[torch.randperm(len(idx), generator=g)]
        chosen += perm[:k].tolist()
    return sorted(chosen)


def _root_key(cfg: dict[str, Any], role: str) -> str:
    """The recipe key a source's root comes from (for messages)."""
    if cfg[role].get("root"):
        return f"data.{role}.root"
    if role == "calibration" and cfg["train"].get("root"):
        return "data.train.root"
    return "data.root"


def _at_size(pretrained_cfg: dict[str, Any] | None,
             input_size: Sequence[int] | None) -> dict[str, Any]:
    """The model's preprocessing at the size it is run at (``model.input_size`` wins)."""
    pcfg = dict(pretrained_cfg or {})
    if input_size is not None:
        pcfg["input_size"] = tuple(int(v) for v in input_size)
    return pcfg


def build_dataset(cfg: dict[str, Any], pretrained_cfg: dict[str, Any] | None, *,
                  train: bool | None = None, role: str | None = None, augment: bool | None = None,
                  subset: bool = True, input_size: Sequence[int] | None = None) -> Dataset:
    """The dataset of source ``role`` (``train``, ``calibration``, ``eval``; or ``train=``
    True/False for train/eval) of a ``data:`` section, fed at ``input_size`` (default: the
    model's ``pretrained_cfg["input_size"]``). Its first image is transformed here, so a
    size or decoding problem is reported now, as one line, not in the middle of a run."""
    cfg = resolve_data_cfg(cfg)
    role = role or ("train" if train else "eval")
    pcfg = _at_size(pretrained_cfg, input_size)
    src = source_of(cfg, role)
    root, split, key = src["root"], src["split"], _root_key(cfg, role)
    where = f"data.{role} ({root or cfg['dataset'] + ' download'})"
    aug = (bool(cfg["augment"]) and role == "train") if augment is None else augment
    n_sub = src["subset"] if subset else None
    lazy = cfg["dataset"] == "imagenet"
    tf = _build_transform(cfg, pcfg, augment=aug, lazy=lazy, where=where)
    if lazy:
        if root is None:
            raise DataError(
                f"{key} is not set for imagenet: set it to a folder or .zip of "
                "<wnid>/<file>.JPEG or <wnid>_<name>.JPEG images (no download exists)"
            )
        folder = _open_source(root, key, cfg.get("max_image_pixels",
                                                 DEFAULTS["max_image_pixels"]))
        items = _imagenet_items(folder, split)
        idx = stratified_subset([c for _, c in items], n_sub, cfg["seed"]) if n_sub else None
        ds: Dataset = ImageFolderDataset(folder, items, tf, idx)
    else:
        images, labels = _load_arrays(cfg, split, root, key)
        if len(labels) == 0:
            raise DataError(f"{root}: split '{split}' has no images")
        idx = stratified_subset(labels, n_sub, cfg["seed"]) if n_sub else None
        ds = TensorImageDataset(images, labels, tf, idx)
    if len(ds):
        with torch.random.fork_rng(devices=[]):  # augmentation draws leave no trace
            shape = tuple(ds[0][0].shape)
        log.debug("%s: split '%s', %d images, fed as %s (resize %s, crop %s)", where, split,
                  len(ds), "x".join(map(str, shape)), cfg["resize"], cfg["crop"])
    return ds


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(x.shape) for x, _ in batch}
    if len(shapes) > 1:
        raise DataError(
            f"images of different sizes in one batch ({', '.join(map(str, sorted(shapes)[:3]))}); "
            "set data.resize / data.crop to an integer (or 'auto')"
        )
    return torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch], dtype=torch.int64)


def _loader(ds: Dataset, cfg: dict[str, Any], *, batch_size: int, shuffle: bool,
            distributed: bool = False) -> DataLoader:
    workers = int(cfg.get("workers") or 0)
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    sampler = None
    n = len(ds)
    if distributed:
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=int(cfg["seed"]))
        n = sampler.num_samples
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        # a last batch of one sample would break BatchNorm in train mode
        drop_last=shuffle and n % batch_size == 1 and n > 1,
        generator=g,
        collate_fn=_collate,
    )


def make_loaders(cfg: dict[str, Any], pretrained_cfg: dict[str, Any] | None, *,
                 train: bool = True, test: bool = True, distributed: bool = False,
                 input_size: Sequence[int] | None = None,
                 ) -> tuple[DataLoader | None, DataLoader | None]:
    """``(train_loader, eval_loader)`` of the ``data.train`` and ``data.eval`` sources; None
    where not asked. Every evaluation (a run's stages, ``compresscnn compare``) goes
    through here, so a model sees the same images the same way wherever it is measured.

    The train loader shuffles with a generator seeded by ``data.seed`` (or, when
    ``distributed``, uses a :class:`DistributedSampler` seeded likewise: the trainer calls
    ``loader.sampler.set_epoch(epoch)``). Images are brought to ``input_size`` (default: the
    model's ``pretrained_cfg["input_size"]``) as the module docstring says, with the model's
    ``mean``/``std``/``interpolation``.
    """
    cfg = resolve_data_cfg(cfg)
    train_loader = test_loader = None
    if train:
        ds = build_dataset(cfg, pretrained_cfg, role="train", input_size=input_size)
        train_loader = _loader(ds, cfg, batch_size=cfg["batch_size"], shuffle=True,
                               distributed=distributed)
    if test:
        ds = build_dataset(cfg, pretrained_cfg, role="eval", input_size=input_size)
        test_loader = _loader(ds, cfg, batch_size=cfg["eval_batch_size"], shuffle=False)
    return train_loader, test_loader


def calibration_batches(cfg: dict[str, Any], pretrained_cfg: dict[str, Any] | None,
                        n_batches: int, *, batch_size: int | None = None,
                        input_size: Sequence[int] | None = None) -> list[torch.Tensor]:
    """``n_batches`` input batches (``batch_size`` each, default ``data.batch_size``; the
    recipe's ``calibration.batch_size``) from the ``data.calibration`` source (no subset, no
    augmentation), in a seeded random order so every batch mixes classes (for data-aware
    decomposition and BatchNorm re-estimation). Fewer if the source is smaller."""
    if n_batches < 1:
        raise DataError(f"calibration needs at least one batch, got {n_batches}")
    cfg = resolve_data_cfg(cfg)
    ds = build_dataset(cfg, pretrained_cfg, role="calibration", augment=False, subset=False,
                       input_size=input_size)
    bs = int(batch_size or cfg["batch_size"])
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    order = torch.randperm(len(ds), generator=g)[: n_batches * bs].tolist()
    batches = []
    for start in range(0, len(order), bs):
        xs, _ = _collate([ds[i] for i in order[start:start + bs]])
        batches.append(xs)
    return batches


# --------------------------------------------------------------------------------------
# what a run may do with its sources


def _split_count(cfg: dict[str, Any], root: Any, a: str, b: str) -> int:
    """Shared images of splits ``a`` and ``b`` of a source split by file (torchvision's
    CIFAR-10 batches, Fashion-MNIST idx files): all of them when both read the same file."""
    if (a == "train") != (b == "train"):
        return 0
    return len(_load_arrays(cfg, b, root)[1])


def eval_overlap(cfg: dict[str, Any], role: str) -> int:
    """How many images source ``role`` (``train`` or ``calibration``) shares with the
    ``eval`` source: the same root read whole (no split folders) or at the same split shares
    them all; different files or splits share none. A root that does not exist counts 0
    (loading it reports it)."""
    cfg = resolve_data_cfg(cfg)
    a, b = source_of(cfg, role), source_of(cfg, "eval")
    if a["root"] is None or b["root"] is None:
        if a["root"] is None and b["root"] is None:  # a download or Debian's Fashion-MNIST
            return _split_count(cfg, None, a["split"], b["split"])
        return 0
    pa, pb = Path(a["root"]).expanduser(), Path(b["root"]).expanduser()
    if not (pa.exists() and pb.exists()) or pa.resolve() != pb.resolve():
        return 0
    if pa.is_dir() and (cfg["dataset"] == "fashion_mnist"
                        or (pa / "cifar-10-batches-py").is_dir()):
        return _split_count(cfg, pa, a["split"], b["split"])
    src = _open_source(pa, _root_key(cfg, "eval"))
    shared = {n for _, n in _split_members(src, a["split"])}
    return len(shared & {n for _, n in _split_members(src, b["split"])})


def check_sources(cfg: dict[str, Any], *, train: bool, calibrate: bool) -> list[str]:
    """Refuse fine-tuning (``train``) and calibration (``calibrate``) on images of the eval
    source, with one line naming both sources and the way out. With
    ``data.allow_eval_overlap`` return instead the warnings a report starts with."""
    cfg = resolve_data_cfg(cfg)
    notes = []
    for role, what, hit, used in (("train", "fine-tuning", "fine-tuned", train),
                                  ("calibration", "calibration", "zero-shot and fine-tuned",
                                   calibrate)):
        n = eval_overlap(cfg, role) if used else 0
        if not n:
            continue
        a, b = source_of(cfg, role), source_of(cfg, "eval")
        how = ("it has no split folders" if a["split"] != b["split"]
               else f"both read split '{b['split']}'")
        same = (f"data.{role} and data.eval are the same {n} images of "
                f"{b['root'] or cfg['dataset'] + ' download'} ({how})")
        if not cfg["allow_eval_overlap"]:
            raise DataError(f"{what} would use the images accuracy is measured on: {same}; "
                            f"point data.{role}.root at other images (a train split or archive), "
                            f"or set "
                            f"data.allow_eval_overlap: true to do it anyway")
        notes.append(f"{what} used the images accuracy is measured on ({same}; "
                     f"data.allow_eval_overlap: true): the {hit} accuracy is not a held-out "
                     f"measurement")
    return notes


def check_classes(cfg: dict[str, Any], num_classes: int | None, model: str) -> None:
    """Refuse a model whose classifier has another number of classes than the data's label
    space (an ImageNet head scored on CIFAR-10 labels 0..9 gives numbers that mean nothing)."""
    ds = resolve_data_cfg(cfg)["dataset"]
    n = DATASET_CLASSES[ds]
    if num_classes is not None and int(num_classes) != n:
        raise DataError(f"model {model} has a {num_classes}-class head but data.dataset {ds} "
                        f"has {n} classes: set model.num_classes: {n} to replace the head by a "
                        f"new one (trained by fine-tuning), or use a model trained on {ds}")
