"""Transforms on uint8 C x H x W tensors: the model's input geometry, augmentation, channels."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from compresscnn.errors import DataError
from compresscnn.io.zoos import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


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
    mean = tuple(float(m) for m in pcfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(s) for s in pcfg.get("std", IMAGENET_STD))
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
