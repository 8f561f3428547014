"""ImageNet-style folders and zips, decoded lazily; labels by wnid."""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from compresscnn.errors import DataError
from compresscnn.io.data.config import _WNID_RE
from compresscnn.io.data.sources import _Source, _decode, _split_members

log = logging.getLogger(__name__)


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
