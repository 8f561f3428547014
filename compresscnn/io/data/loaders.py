"""Subsets, datasets and loaders for the three sources; calibration batches."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from compresscnn.errors import DataError
from compresscnn.io.data.arrays import TensorImageDataset, _load_arrays
from compresscnn.io.data.config import MAX_IMAGE_PIXELS, resolve_data_cfg, source_of
from compresscnn.io.data.imagenet import ImageFolderDataset, _imagenet_items
from compresscnn.io.data.sources import _open_source
from compresscnn.io.data.transforms import _build_transform

log = logging.getLogger(__name__)


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
                                                 MAX_IMAGE_PIXELS))
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
