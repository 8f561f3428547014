"""CIFAR-10 and Fashion-MNIST decoded once per process into uint8 tensors."""

from __future__ import annotations

import gzip
import logging
import struct
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from compresscnn.errors import DataError
from compresscnn.io.data.config import CIFAR10_CLASSES, MAX_IMAGE_PIXELS, FASHION_MNIST_DIR
from compresscnn.io.data.sources import _Source, _decode, _open_source, _split_members

log = logging.getLogger(__name__)


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
                                                                MAX_IMAGE_PIXELS)),
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
