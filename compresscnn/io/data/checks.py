"""What a run may do with its sources: evaluation images never trained or calibrated on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


from compresscnn.errors import DataError
from compresscnn.io.data.arrays import _load_arrays
from compresscnn.io.data.config import DATASET_CLASSES, resolve_data_cfg, source_of
from compresscnn.io.data.loaders import _root_key
from compresscnn.io.data.sources import _open_source, _split_members

log = logging.getLogger(__name__)


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
