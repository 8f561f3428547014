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

import importlib
from typing import Any

#: public name -> the submodule that defines it, imported when the name is first used (the
#: recipe reads the ``data`` section's model without loading torch)
_EXPORTS = {
    "clear_cache": "arrays", "check_classes": "checks", "check_sources": "checks",
    "eval_overlap": "checks", "CIFAR10_CLASSES": "config", "DATASET_CLASSES": "config",
    "DATASETS": "config", "FASHION_MNIST_DIR": "config", "resolve_data_cfg": "config",
    "source_of": "config", "imagenet_wnids": "imagenet", "build_dataset": "loaders",
    "calibration_batches": "loaders", "make_loaders": "loaders", "stratified_subset": "loaders",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

