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

Zips are read in place, never extracted; a member with ``..`` or an absolute path is refused.
Every problem a user can fix is a :class:`~compresscnn.errors.DataError` naming the path.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import threading
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from compresscnn.errors import DataError

__all__ = [
    "make_loaders",
    "calibration_batches",
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
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_WNID_RE = re.compile(r"^(n\d{8})(?:_|$)")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULTS: dict[str, Any] = {
    "dataset": "cifar10",
    "root": None,
    "train_root": None,  # optional per-split roots (e.g. imagenet train1000.zip / val500.zip)
    "test_root": None,
    "download": False,
    "download_dir": "~/.cache/compresscnn",
    "train_split": "train",
    "test_split": "test",
    "train_subset": None,
    "test_subset": None,
    "batch_size": 128,
    "eval_batch_size": 256,
    "workers": 0,
    "augment": False,
    "resize": "auto",
    "crop": "auto",
    "seed": 0,
}


def resolve_data_cfg(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Fill defaults for the recipe's ``data:`` section (unknown keys are kept as they are)."""
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (cfg or {}).items()})
    ds = str(out["dataset"]).lower().replace("-", "_")
    ds = {"cifar": "cifar10", "cifar_10": "cifar10", "fmnist": "fashion_mnist",
          "fashionmnist": "fashion_mnist", "imagenet1k": "imagenet"}.get(ds, ds)
    if ds not in DATASETS:
        raise DataError(f"data.dataset: unknown dataset {out['dataset']!r}; known: {', '.join(DATASETS)}")
    out["dataset"] = ds
    for key in ("batch_size", "eval_batch_size"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise DataError(f"data.{key} must be a positive integer, got {out[key]!r}")
    for key in ("train_subset", "test_subset"):
        if out[key] is not None and (not isinstance(out[key], int) or out[key] < 1):
            raise DataError(f"data.{key} must be a positive integer or null, got {out[key]!r}")
    return out


# --------------------------------------------------------------------------------------
# sources: a folder or a zip, listed as relative POSIX paths


class _Source:
    """Read-only access to files under a folder or inside a zip (opened lazily per process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
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


def _open_source(root: str | os.PathLike[str], what: str) -> _Source:
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"{what}: path not found: {p}")
    if p.is_file() and not zipfile.is_zipfile(p):
        raise DataError(f"{what}: {p} is a file but not a readable zip archive (corrupt?)")
    return _Source(p)


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
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
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
    import numpy as np

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
    import numpy as np
    import torchvision

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


def _read_idx(path: Path) -> torch.Tensor:
    """Parse an idx file (LeCun's MNIST format), gzipped or not, into a uint8 tensor."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        magic = struct.unpack(">I", raw[:4])[0]
        if magic >> 8 != 0x08:  # 0x08 = unsigned byte
            raise ValueError(f"bad magic number {magic:#x}")
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        n = 1
        for d in dims:
            n *= d
        body = raw[4 + 4 * ndim:]
        if len(body) != n:
            raise ValueError(f"expected {n} bytes of data, found {len(body)}")
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
                return x.unsqueeze(-1).contiguous(), y.to(torch.int64)
    raise DataError(
        f"{root}: no Fashion-MNIST idx files for split '{split}' "
        f"(expected {prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz)"
    )


def _load_arrays(cfg: dict[str, Any], split: str, root: Any) -> tuple[torch.Tensor, torch.Tensor]:
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
        raise DataError(f"data.root: path not found: {path}")
    with _CACHE_LOCK:
        key = _cache_key(path, split, ds)
        if key in _CACHE:
            return _CACHE[key]
        if ds == "fashion_mnist" and path.is_dir():
            arrays = _fashion_from_folder(path, split)
        elif ds == "cifar10" and path.is_dir() and (path / "cifar-10-batches-py").is_dir():
            arrays = _torchvision_arrays(ds, path, split, download=False)
        else:
            arrays = _cifar_from_source(_open_source(path, "data.root"), split)
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
            import importlib.resources

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
        import numpy as np

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
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        return InterpolationMode.BILINEAR


def _size_opt(value: Any, auto: Any, key: str) -> int | None:
    if value == "auto":
        return None if auto is None else int(auto)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"data.{key} must be 'auto', null or a positive integer, got {value!r}")
    return value


def _build_transform(cfg: dict[str, Any], pcfg: dict[str, Any], *, augment: bool,
                     image_size: tuple[int, int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    ds = cfg["dataset"]
    resize = _size_opt(cfg.get("resize", "auto"), pcfg.get("resize"), "resize")
    crop = _size_opt(cfg.get("crop", "auto"), pcfg.get("crop"), "crop")
    interp = _interp(pcfg.get("interpolation", "bilinear"))
    in_ch = int(tuple(pcfg.get("input_size", (3,)))[0])
    mean = tuple(float(m) for m in pcfg.get("mean", _IMAGENET_MEAN))
    std = tuple(float(s) for s in pcfg.get("std", _IMAGENET_STD))

    ops: list[Any] = []
    if augment and ds == "imagenet":
        size = crop or int(tuple(pcfg.get("input_size", (3, 224, 224)))[-1])
        ops += [v2.RandomResizedCrop(size, interpolation=interp, antialias=True),
                v2.RandomHorizontalFlip()]
    else:
        if resize is not None:
            ops.append(v2.Resize(resize, interpolation=interp, antialias=True))
        if crop is not None:
            ops.append(v2.CenterCrop(crop))
        if augment:  # small images: pad-and-crop + flip (the CIFAR recipe of He et al.)
            size = crop or (image_size[0] if image_size else None)
            if size is not None:
                ops.append(v2.RandomCrop(size, padding=4))
            ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    ops.append(_Channels(in_ch))
    if len(mean) != in_ch or len(std) != in_ch:
        raise DataError(f"pretrained_cfg mean/std have {len(mean)} values for {in_ch} input channels")
    ops.append(v2.Normalize(mean, std))
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


def _split_name(cfg: dict[str, Any], train: bool) -> str:
    split = cfg["train_split"] if train else cfg["test_split"]
    if not isinstance(split, str) or not split:
        raise DataError(f"data.{'train' if train else 'test'}_split must be a folder name, got {split!r}")
    return split


def build_dataset(cfg: dict[str, Any], pretrained_cfg: dict[str, Any] | None, *, train: bool,
                  augment: bool | None = None, subset: bool = True) -> Dataset:
    """The train or test dataset for a resolved ``data:`` section (see :func:`make_loaders`)."""
    cfg = resolve_data_cfg(cfg)
    pcfg = dict(pretrained_cfg or {})
    split = _split_name(cfg, train)
    root = cfg["train_root" if train else "test_root"] or cfg["root"]
    aug = (bool(cfg["augment"]) and train) if augment is None else augment
    n_sub = cfg["train_subset" if train else "test_subset"] if subset else None

    if cfg["dataset"] == "imagenet":
        if root is None:
            raise DataError(
                "data.root is not set for imagenet: set it to a folder or .zip of "
                "<wnid>/<file>.JPEG or <wnid>_<name>.JPEG images (no download exists)"
            )
        src = _open_source(root, "data.root")
        items = _imagenet_items(src, split)
        tf = _build_transform(cfg, pcfg, augment=aug, image_size=None)
        idx = stratified_subset([c for _, c in items], n_sub, cfg["seed"]) if n_sub else None
        return ImageFolderDataset(src, items, tf, idx)

    images, labels = _load_arrays(cfg, split, root)
    if len(labels) == 0:
        raise DataError(f"{root}: split '{split}' has no images")
    tf = _build_transform(cfg, pcfg, augment=aug, image_size=tuple(images.shape[1:3]))
    idx = stratified_subset(labels, n_sub, cfg["seed"]) if n_sub else None
    return TensorImageDataset(images, labels, tf, idx)


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


def make_loaders(cfg: dict[str, Any], pretrained_cfg: dict[str, Any] | None, *, train: bool = True,
                 test: bool = True, distributed: bool = False) -> tuple[DataLoader | None, DataLoader | None]:
    """``(train_loader, test_loader)`` for the recipe's ``data:`` section; None where not asked.

    The train loader shuffles with a generator seeded by ``data.seed`` (or, when
    ``distributed``, uses a :class:`DistributedSampler` seeded likewise: the trainer calls
    ``loader.sampler.set_epoch(epoch)``). Preprocessing comes from ``pretrained_cfg``
    (``resize``/``crop``/``mean``/``std``/``interpolation``) unless ``data.resize`` /
    ``data.crop`` override it.
    """
    cfg = resolve_data_cfg(cfg)
    train_loader = test_loader = None
    if train:
        ds = build_dataset(cfg, pretrained_cfg, train=True)
        train_loader = _loader(ds, cfg, batch_size=cfg["batch_size"], shuffle=True,
                               distributed=distributed)
    if test:
        ds = build_dataset(cfg, pretrained_cfg, train=False)
        test_loader = _loader(ds, cfg, batch_size=cfg["eval_batch_size"], shuffle=False)
    return train_loader, test_loader


def calibration_batches(cfg: dict[str, Any], pretrained_cfg: dict[str, Any] | None,
                        n_batches: int, *, batch_size: int | None = None) -> list[torch.Tensor]:
    """``n_batches`` input batches (``batch_size`` each, default ``data.batch_size``; the
    recipe's ``calibration.batch_size``) from the train split (``data.train_subset`` ignored), no
    augmentation, in a seeded random order so every batch mixes classes (for data-aware
    decomposition and BatchNorm re-estimation). Fewer if the split is smaller."""
    if n_batches < 1:
        raise DataError(f"calibration needs at least one batch, got {n_batches}")
    cfg = resolve_data_cfg(cfg)
    ds = build_dataset(cfg, pretrained_cfg, train=True, augment=False, subset=False)
    bs = int(batch_size or cfg["batch_size"])
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    order = torch.randperm(len(ds), generator=g)[: n_batches * bs].tolist()
    batches = []
    for start in range(0, len(order), bs):
        xs, _ = _collate([ds[i] for i in order[start:start + bs]])
        batches.append(xs)
    return batches
