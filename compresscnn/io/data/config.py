"""The ``data`` section: datasets, sources and their defaults."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping


from pydantic import ValidationError, create_model, model_validator

from compresscnn.config import (AutoOrInt, Bool, Closed, Enum, Int, Nullable, PathStr, Str, bad,
                                doc, first_error, fmt_path, one_line, section)
from compresscnn.errors import DataError

log = logging.getLogger(__name__)


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


#: bytes an image file may take per pixel (16-bit RGBA, uncompressed): an archive member
#: larger than this times ``max_image_pixels`` is refused before it is decompressed
_BYTES_PER_PIXEL = 8
_HEADER_BYTES = 1 << 20


#: spellings of ``data.dataset`` read as the dataset they name
DATASET_ALIASES = {"cifar": "cifar10", "cifar_10": "cifar10", "fmnist": "fashion_mnist",
                   "fashionmnist": "fashion_mnist", "imagenet1k": "imagenet"}


def resolve_data_cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``data`` section validated by :class:`Data` (the one declaration of its keys and
    defaults), as plain values, plus ``seed`` (the subsets' and shuffles' seed, default 0).
    ``dataset`` defaults to ``cifar10`` and accepts the spellings of ``DATASET_ALIASES``.
    A bad value is a one-line :class:`DataError` naming the key."""
    raw = dict(cfg or {})
    seed = raw.pop("seed", 0)
    ds = str(raw.get("dataset", "cifar10")).lower().replace("-", "_")
    raw["dataset"] = DATASET_ALIASES.get(ds, ds)
    try:
        out = Data.model_validate(raw).model_dump()
    except ValidationError as e:
        path, msg = first_error(e)
        raise DataError(one_line(f"data.{fmt_path(path)}: {msg}" if path else f"data: {msg}")) \
            from None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"data seed must be an integer, got {seed!r}")
    out["seed"] = seed
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
# the typed section (the recipe's `data:`, the API's data dicts)


def _source_model(name: str, text: str, split: str) -> type[Closed]:
    """A ``data`` source with its own root, split and subset (``train``, ``eval``)."""
    return create_model(
        name, __base__=Closed, __doc__=text,
        root=(Nullable(PathStr(recipe_relative=True)),
              doc("Folder or archive (a *path*); null: `data.root`.", None)),
        split=(Str(), doc("Split sub-folder to read (a root without split folders is read "
                          "whole).", split)),
        subset=(Nullable(Int(1)), doc("Use only this many images (class-stratified, seeded).",
                                      None)))


TrainSource = _source_model("TrainSource", "The fine-tuning source.", "train")
EvalSource = _source_model("EvalSource", "The evaluation source (baseline, zero-shot and "
                                         "fine-tuned accuracy).", "test")


class CalibrationSource(Closed):
    """The source of the calibration batches (the top-level `calibration` section)."""

    root: Nullable(PathStr(recipe_relative=True)) = doc(
        "Folder or archive (a *path*); null: the `train` source's.", None)
    split: Nullable(Str()) = doc("Split sub-folder; null: the `train` source's.", None)


#: old flat ``data`` keys -> (source, key) of the new spelling; read and folded into it
LEGACY_DATA_KEYS: dict[str, tuple[str, str]] = {
    "train_root": ("train", "root"), "test_root": ("eval", "root"),
    "train_split": ("train", "split"), "test_split": ("eval", "split"),
    "train_subset": ("train", "subset"), "test_subset": ("eval", "subset"),
}
_LEGACY_TYPES = {"root": Nullable(PathStr(recipe_relative=True)), "split": Nullable(Str()),
                 "subset": Nullable(Int(1))}


class _DataBase(Closed):
    """Where the images come from and how they reach the model. Three sources: `train`
    (fine-tuning), `calibration` (data-aware decomposition; by default the `train` source)
    and `eval` (every accuracy in the report). A run never trains or calibrates on the images
    it evaluates on: when a source shares images with `eval` (e.g. one archive without split
    folders serves both), fine-tuning and calibration are refused unless
    `allow_eval_overlap` is true. Required when `finetune.enabled`, `evaluate.baseline` or
    `evaluate.zero_shot` is true or `calibration` is set."""

    dataset: Enum("cifar10", "imagenet", "fashion_mnist") = doc(
        "Which dataset format (and label space: 10, 1000 and 10 classes).")
    root: Nullable(PathStr(recipe_relative=True)) = doc(
        "Folder (or archive) of every source that names no root of its own (a *path*): a "
        "source reads its split's sub-folder when the root has split folders, else the whole "
        "root. null: `download_dir`.", None)
    train: TrainSource = section()
    calibration: CalibrationSource = section()
    eval: EvalSource = section()
    allow_eval_overlap: Bool = doc(
        "Let fine-tuning and calibration use images of the `eval` source. The report then says "
        "so in its first lines: its accuracies are not held-out measurements.", False)
    download: Bool = doc("Download the dataset if it is missing (CIFAR-10 and Fashion-MNIST "
                         "only).", False)
    download_dir: PathStr(recipe_relative=False) = doc(
        "Where downloads go; `~` and `${VAR}` are expanded, a relative path is relative to the "
        "current working directory.", "~/.cache/compresscnn")
    batch_size: Int(1) = doc("Training batch size.", 128)
    eval_batch_size: Int(1) = doc("Evaluation batch size.", 256)
    workers: Int(0) = doc("DataLoader worker processes (0: load in the main process).", 0)
    augment: Bool = doc("Random crop/flip augmentation while fine-tuning.", True)
    resize: AutoOrInt = doc(
        "`auto`: an image already at the model's input size is fed as it is; a larger one is "
        "scaled to cover the input size times the model's resize/crop ratio (256/224 for "
        "torchvision's ImageNet models), then cropped; a smaller one is refused (give an int "
        "to upsample). An int: resize the shorter side to it. null: no resize.", "auto")
    crop: AutoOrInt = doc(
        "Center (eval) / random (train) crop size; `auto`: the model's input size "
        "(`model.input_size`, else the model's own); null: no crop. Whatever resize and crop "
        "say, an image that would reach the model at another size than its input size is "
        "refused.", "auto")
    max_image_pixels: Int(1) = doc(
        "Largest image accepted, in pixels (width x height). The size is read from the "
        "file's header before anything is decoded: a larger image is refused with its name "
        "and size, never decoded; an archive member that would decompress to more than 8 "
        "bytes a pixel of it is refused unread.", 50_000_000)

    @model_validator(mode="after")
    def _fold_legacy(self) -> "_DataBase":
        """Move the old flat keys (``test_split``...) into their source sections, so the
        resolved recipe has one spelling; giving both spellings of one key is an error."""
        for old, (role, key) in LEGACY_DATA_KEYS.items():
            value = getattr(self, old)
            if value is None:
                continue
            src = getattr(self, role)
            if key in src.model_fields_set:
                raise bad(f"give data.{role}.{key} or its old spelling data.{old}, not both",
                          (old,))
            setattr(src, key, value)
            setattr(self, old, None)
        return self


Data = create_model("Data", __base__=_DataBase, __doc__=_DataBase.__doc__, **{
    old: (_LEGACY_TYPES[key], doc(f"Old spelling of `data.{role}.{key}`: still read, written "
                                  "back as the new key.", None, exclude=True))
    for old, (role, key) in LEGACY_DATA_KEYS.items()})


#: the default of every key of the ``data`` section, as :func:`resolve_data_cfg` fills them
MAX_IMAGE_PIXELS: int = Data.model_fields["max_image_pixels"].default
