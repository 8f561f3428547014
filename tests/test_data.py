"""Datasets and loaders on tiny synthetic folders/zips, plus the real shared data (fast)."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from compresscnn.io import data as D
from compresscnn.io.data import (
    CIFAR10_CLASSES,
    build_dataset,
    calibration_batches,
    imagenet_wnids,
    make_loaders,
    stratified_subset,
)
from compresscnn.errors import DataError

CIFAR_CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
             "num_classes": 10, "resize": None, "crop": None, "interpolation": "bilinear"}
IMNET_CFG = {"input_size": (3, 24, 24), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
             "num_classes": 1000, "resize": 28, "crop": 24, "interpolation": "bilinear"}


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _png(value: int, size: tuple[int, int] = (32, 32)) -> bytes:
    # PNG is lossless: lets tests check exact pixel values and labels
    return _jpeg((value, value, value), size, fmt="PNG")


def make_cifar_zip(path: Path, per_class: dict[str, int] | None = None,
                   splits: tuple[str, ...] = ("train", "test")) -> Path:
    per_class = per_class or {c: 2 for c in CIFAR10_CLASSES}
    with zipfile.ZipFile(path, "w") as zf:
        for split in splits:
            zf.writestr(f"{split}/", b"")
            for cls, n in per_class.items():
                label = CIFAR10_CLASSES.index(cls) if cls in CIFAR10_CLASSES else 0
                for i in range(n):
                    zf.writestr(f"{split}/{cls}/{i:04d}.png", _png(label * 20))
    return path


def make_cifar_folder(root: Path, per_class: dict[str, int]) -> Path:
    for split in ("train", "test"):
        for cls, n in per_class.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(_png(CIFAR10_CLASSES.index(cls) * 20))
    return root


def cfg(**kw: object) -> dict:
    base = {"dataset": "cifar10", "batch_size": 4, "eval_batch_size": 8}
    base.update(kw)
    return base


# ---------------------------------------------------------------- CIFAR-style


def test_cifar_zip_labels_follow_cifar_order(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {"truck": 2, "airplane": 3, "cat": 1})
    _, test = make_loaders(cfg(root=str(z)), CIFAR_CFG, train=False)
    assert len(test.dataset) == 6
    xs, ys = next(iter(test))
    assert xs.shape == (6, 3, 32, 32) and xs.dtype == torch.float32
    assert sorted(ys.tolist()) == [0, 0, 0, 3, 9, 9]
    # pixel value = 20 * label, normalised with mean 0.5 / std 0.5
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.mean(), torch.tensor((20 * int(y) / 255 - 0.5) / 0.5), atol=1e-3, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zip"]  # nothing extracted


def test_cifar_folder_and_zip_agree(tmp_path: Path) -> None:
    per = {"bird": 2, "ship": 2}
    folder = make_cifar_folder(tmp_path / "f", per)
    z = make_cifar_zip(tmp_path / "z.zip", per)
    a = build_dataset(cfg(root=str(folder), augment=False), CIFAR_CFG, train=True)
    b = build_dataset(cfg(root=str(z), augment=False), CIFAR_CFG, train=True)
    assert len(a) == len(b) == 4
    assert a.targets == b.targets == [2, 2, 8, 8]
    torch.testing.assert_close(a[0][0], b[0][0])


def test_cifar_split_is_cached_per_process(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {"dog": 2})
    a = build_dataset(cfg(root=str(z)), CIFAR_CFG, train=False)
    b = build_dataset(cfg(root=str(z)), CIFAR_CFG, train=False)
    assert a.images is b.images  # decoded once


def test_augment_keeps_shape_and_varies(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as zf:
        img = Image.linear_gradient("L").resize((32, 32)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        zf.writestr("train/cat/0.png", buf.getvalue())
    ds = build_dataset(cfg(root=str(tmp_path / "c.zip"), augment=True), CIFAR_CFG, train=True)
    torch.manual_seed(0)
    outs = [ds[0][0] for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    plain = build_dataset(cfg(root=str(tmp_path / "c.zip"), augment=False), CIFAR_CFG,
                          train=True)
    assert torch.equal(plain[0][0], plain[0][0])
    # the default is the recipe's (declared once, in the data section's model): augmented
    default = build_dataset(cfg(root=str(tmp_path / "c.zip")), CIFAR_CFG, train=True)
    assert any(not torch.equal(default[0][0], default[0][0]) for _ in range(8))


def test_resize_crop_auto_and_override(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {"cat": 1})
    at36 = dict(CIFAR_CFG, input_size=(3, 36, 36), resize=40, crop=36)
    assert build_dataset(cfg(root=str(z), resize=40), at36, train=False)[0][0].shape == (3, 36, 36)
    at16 = dict(CIFAR_CFG, input_size=(3, 16, 16))
    assert build_dataset(cfg(root=str(z)), at16, train=False)[0][0].shape == (3, 16, 16)
    assert build_dataset(cfg(root=str(z), crop=16), CIFAR_CFG, train=False,
                         input_size=(3, 16, 16))[0][0].shape == (3, 16, 16)


# torchvision's ImageNet preprocessing: resize 256, crop 224
TV_CFG = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
          "num_classes": 1000, "resize": 256, "crop": 224, "interpolation": "bilinear"}


def test_images_follow_the_model_input_size(tmp_path: Path) -> None:
    """A 224-pixel ImageNet model run at 32x32 (model.input_size) on 32x32 CIFAR images sees
    them as they are, not resized to 256 and cropped to 224 by its default preprocessing."""
    z = make_cifar_zip(tmp_path / "c.zip", {"cat": 2, "dog": 2})
    tr, te = make_loaders(cfg(root=str(z), augment=True), TV_CFG, input_size=(3, 32, 32))
    for loader in (tr, te):
        assert next(iter(loader))[0].shape[1:] == (3, 32, 32)
    x = te.dataset[0][0]
    raw = torch.full((3, 32, 32), 3 * 20 / 255)  # the cat image's grey value, unresampled
    mean, std = torch.tensor(TV_CFG["mean"]).view(3, 1, 1), torch.tensor(TV_CFG["std"]).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std, atol=1e-5, rtol=0)
    cal = calibration_batches(cfg(root=str(z)), TV_CFG, 1, input_size=(3, 32, 32))
    assert cal[0].shape[1:] == (3, 32, 32)


def test_image_size_mismatch_is_refused_or_resolved(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {"cat": 1})
    # CIFAR images at a 224 input: refused, not silently upsampled
    msg = _data_err(cfg(root=str(z)), TV_CFG)
    assert "32x32" in msg and "224x224" in msg and "model.input_size" in msg and "data.resize" in msg
    # ... unless asked for explicitly
    ds = build_dataset(cfg(root=str(z), resize=224), TV_CFG, train=False)
    assert ds[0][0].shape == (3, 224, 224)
    # explicit settings that do not give the input size: refused
    msg = _data_err(cfg(root=str(z), resize=None, crop=None), dict(CIFAR_CFG, input_size=(3, 28, 28)))
    assert "32x32" in msg and "28x28" in msg and "data.crop" in msg


def test_stratified_subset() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    sub = stratified_subset(labels, 10, seed=0)
    assert sub == sorted(sub) and len(sub) == 10
    counts = torch.bincount(torch.tensor([labels[i] for i in sub]))
    assert counts.tolist() == [5, 3, 2]
    assert stratified_subset(labels, 10, seed=0) == sub
    assert stratified_subset(labels, 10, seed=1) != sub
    assert stratified_subset(labels, 1000) == list(range(100))


def test_subset_in_loaders(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {c: 4 for c in CIFAR10_CLASSES})
    tr, te = make_loaders(cfg(root=str(z), train_subset=20, test_subset=10), CIFAR_CFG)
    assert len(tr.dataset) == 20 and len(te.dataset) == 10
    assert sorted(te.dataset.targets) == list(range(10))


def test_distributed_sampler(tmp_path: Path) -> None:
    import torch.distributed as dist

    z = make_cifar_zip(tmp_path / "c.zip", {"cat": 3, "dog": 3})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        tr, _ = make_loaders(cfg(root=str(z)), CIFAR_CFG, test=False, distributed=True)
        assert isinstance(tr.sampler, torch.utils.data.DistributedSampler)
        tr.sampler.set_epoch(1)
        assert sum(len(y) for _, y in tr) == 6
    finally:
        dist.destroy_process_group()


def test_last_batch_of_one_is_dropped_in_training(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {"cat": 5})
    tr, te = make_loaders(cfg(root=str(z)), CIFAR_CFG)  # batch_size 4: 4 + 1
    assert [len(y) for _, y in tr] == [4]
    assert sum(len(y) for _, y in te) == 5


def test_calibration_batches(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {c: 1 for c in CIFAR10_CLASSES})
    c = cfg(root=str(z), augment=True)
    a = calibration_batches(c, CIFAR_CFG, 2)
    b = calibration_batches(c, CIFAR_CFG, 2)
    assert [x.shape for x in a] == [(4, 3, 32, 32)] * 2
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # no augmentation, seeded order
    assert sum(len(x) for x in calibration_batches(c, CIFAR_CFG, 100)) == 10
    assert [len(x) for x in calibration_batches(c, CIFAR_CFG, 2, batch_size=3)] == [3, 3]


def test_workers_reopen_the_zip(tmp_path: Path) -> None:
    _, te = make_loaders({"dataset": "imagenet", "root": str(_imagenet_zip(tmp_path)), "workers": 1,
                          "eval_batch_size": 2}, IMNET_CFG, train=False)
    assert sum(len(y) for _, y in te) == 4


# ---------------------------------------------------------------- errors


def _data_err(c: dict, pcfg: dict = CIFAR_CFG, train: bool = False) -> str:
    with pytest.raises(DataError) as info:
        make_loaders(c, pcfg, train=train, test=not train)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path: Path) -> None:
    msg = _data_err(cfg(root=str(tmp_path / "nope.zip")))
    assert "not found" in msg and "nope.zip" in msg


def test_corrupt_zip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip" * 10)
    assert "bad.zip" in _data_err(cfg(root=str(bad)))


@pytest.mark.parametrize("member", ["../evil.png", "test/../../evil.png", "/abs/evil.png"])
def test_zip_member_escaping_refused(tmp_path: Path, member: str) -> None:
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("test/cat/0.png", _png(0))
        zf.writestr(zipfile.ZipInfo(member), _png(0))
    msg = _data_err(cfg(root=str(z)))
    assert "refusing" in msg and "evil.zip" in msg


def test_empty_split(tmp_path: Path) -> None:
    z = tmp_path / "empty.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("test/", b"")
        zf.writestr("test/cat/", b"")
        zf.writestr("test/readme.txt", b"hi")
    msg = _data_err(cfg(root=str(z)))
    assert "no images" in msg and "empty.zip" in msg


def test_missing_split(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {"cat": 1}, splits=("train",))
    msg = _data_err(cfg(root=str(z)))
    assert "'test'" in msg and "train" in msg


def test_unknown_class_folder(tmp_path: Path) -> None:
    z = make_cifar_zip(tmp_path / "c.zip", {"cat": 1, "unicorn": 1})
    msg = _data_err(cfg(root=str(z)))
    assert "unicorn" in msg and "c.zip" in msg


def test_corrupt_image(tmp_path: Path) -> None:
    z = tmp_path / "c.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("test/cat/0.jpg", b"not a jpeg")
    assert "test/cat/0.jpg" in _data_err(cfg(root=str(z)))


def test_unknown_dataset() -> None:
    msg = _data_err({"dataset": "mnist3d", "root": "x"})
    assert "mnist3d" in msg and "cifar10" in msg


def test_no_root_no_download(tmp_path: Path) -> None:
    msg = _data_err({"dataset": "cifar10", "download_dir": str(tmp_path / "dl")})
    assert "data.root" in msg and "download" in msg and "dl" in msg


# ---------------------------------------------------------------- ImageNet-style


def _imagenet_zip(tmp_path: Path, flat: bool = False) -> Path:
    w = imagenet_wnids()
    z = tmp_path / ("flat.zip" if flat else "nested.zip")
    with zipfile.ZipFile(z, "w") as zf:
        for wnid in (w[0], w[999]):
            for i, size in enumerate([(40, 30), (30, 50)]):
                name = f"{wnid}_img{i}.JPEG" if flat else f"{wnid}/ILSVRC2012_val_{i}.JPEG"
                zf.writestr(name, _jpeg((100, 50, 0), size))
    return z


def test_imagenet_wnids() -> None:
    w = imagenet_wnids()
    assert len(w) == 1000 and w == sorted(w) and w[0] == "n01440764"


@pytest.mark.parametrize("flat", [False, True])
def test_imagenet_layouts(tmp_path: Path, flat: bool) -> None:
    z = _imagenet_zip(tmp_path, flat)
    tr, te = make_loaders({"dataset": "imagenet", "root": str(z), "batch_size": 2,
                           "eval_batch_size": 4}, IMNET_CFG)
    for loader in (tr, te):  # no split folders: the whole archive is the split
        xs, ys = next(iter(loader))
        assert xs.shape[1:] == (3, 24, 24)
    assert sorted(te.dataset.targets) == [0, 0, 999, 999]


def test_imagenet_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "inet"
    w = imagenet_wnids()
    for split, wnid in (("train", w[5]), ("val", w[7])):
        d = root / split / wnid
        d.mkdir(parents=True)
        (d / "a.JPEG").write_bytes(_jpeg((1, 2, 3), (28, 28)))
    c = {"dataset": "imagenet", "root": str(root), "test_split": "val"}
    tr, te = make_loaders(c, IMNET_CFG)
    assert tr.dataset.targets == [5] and te.dataset.targets == [7]


def test_imagenet_per_split_roots(tmp_path: Path) -> None:
    c = {"dataset": "imagenet", "train_root": str(_imagenet_zip(tmp_path, flat=True)),
         "test_root": str(_imagenet_zip(tmp_path)), "train_subset": 2}
    tr, te = make_loaders(c, IMNET_CFG)
    assert len(tr.dataset) == 2 and sorted(tr.dataset.targets) == [0, 999]
    assert len(te.dataset) == 4


def test_imagenet_sizes_must_match_without_resize(tmp_path: Path) -> None:
    z = _imagenet_zip(tmp_path)
    msg = _data_err({"dataset": "imagenet", "root": str(z), "resize": None, "crop": None}, IMNET_CFG)
    assert "24x24" in msg and "nested.zip" in msg


def test_imagenet_unknown_class(tmp_path: Path) -> None:
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("n99999999/a.JPEG", _jpeg((0, 0, 0)))
    assert "n99999999" in _data_err({"dataset": "imagenet", "root": str(z)}, IMNET_CFG)
    z2 = tmp_path / "flat.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.writestr("dog.JPEG", _jpeg((0, 0, 0)))
    assert "dog.JPEG" in _data_err({"dataset": "imagenet", "root": str(z2)}, IMNET_CFG)


def test_imagenet_augment(tmp_path: Path) -> None:
    z = _imagenet_zip(tmp_path)
    tr, _ = make_loaders({"dataset": "imagenet", "root": str(z), "augment": True, "batch_size": 4},
                         IMNET_CFG, test=False)
    xs, _ = next(iter(tr))
    assert xs.shape == (4, 3, 24, 24)


# ---------------------------------------------------------------- Fashion-MNIST


def _idx(path: Path, arr: torch.Tensor) -> None:
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    path.write_bytes(gzip.compress(header + arr.to(torch.uint8).numpy().tobytes()))


FM_CFG = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,), "num_classes": 10,
          "resize": None, "crop": None, "interpolation": "bilinear"}


def test_fashion_idx_folder(tmp_path: Path) -> None:
    for prefix, n in (("train", 6), ("t10k", 4)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", torch.arange(n * 784).reshape(n, 28, 28) % 256)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", torch.arange(n) % 10)
    tr, te = make_loaders({"dataset": "fashion_mnist", "root": str(tmp_path), "batch_size": 3}, FM_CFG)
    assert len(tr.dataset) == 6 and len(te.dataset) == 4
    xs, ys = next(iter(te))
    assert xs.shape == (4, 1, 28, 28) and ys.tolist() == [0, 1, 2, 3]
    # a 3-channel model gets the grey image repeated
    x3 = build_dataset({"dataset": "fashion_mnist", "root": str(tmp_path)},
                       dict(FM_CFG, input_size=(3, 28, 28), mean=(0.5,) * 3, std=(0.5,) * 3),
                       train=False)[0][0]
    assert x3.shape == (3, 28, 28) and torch.equal(x3[0], x3[2])


def test_fashion_bad_files(tmp_path: Path) -> None:
    msg = _data_err({"dataset": "fashion_mnist", "root": str(tmp_path)}, FM_CFG)
    assert "t10k-images-idx3-ubyte.gz" in msg
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"junk")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    assert "idx" in _data_err({"dataset": "fashion_mnist", "root": str(tmp_path)}, FM_CFG)


@pytest.mark.skipif(not D.FASHION_MNIST_DIR.is_dir(),
                    reason=f"{D.FASHION_MNIST_DIR} not found (apt-get install dataset-fashion-mnist)")
def test_fashion_debian_default_root() -> None:
    _, te = make_loaders({"dataset": "fashion_mnist"}, FM_CFG, train=False)
    assert len(te.dataset) == 10_000
    assert torch.bincount(torch.tensor(te.dataset.targets)).tolist() == [1000] * 10
    xs, _ = next(iter(te))
    assert xs.shape == (256, 1, 28, 28)
    assert abs(float(xs.mean())) < 0.3  # roughly normalised


# ---------------------------------------------------------------- real shared data


@pytest.mark.shared
def test_shared_cifar10_test_split(shared_data: Path) -> None:
    root = str(shared_data / "cifar10-jpg.zip")
    ds = build_dataset({"dataset": "cifar10", "root": root}, CIFAR_CFG, train=False)
    assert len(ds) == 10_000
    assert torch.bincount(torch.tensor(ds.targets)).tolist() == [1000] * 10
    assert ds[0][0].shape == (3, 32, 32)
    sub = build_dataset({"dataset": "cifar10", "root": root, "test_subset": 1000}, CIFAR_CFG, train=False)
    assert len(sub) == 1000
    assert torch.bincount(torch.tensor(sub.targets)).tolist() == [100] * 10


@pytest.mark.shared
def test_shared_imagenet_val500(shared_data: Path) -> None:
    """The 224x224 validation copies reach a 224-pixel model as they are (no resize to 256 and
    crop), with the default settings: what `run` and `compare` both measure."""
    import numpy as np

    c = {"dataset": "imagenet", "root": str(shared_data / "imagenet-val500.zip"), "eval_batch_size": 50}
    _, te = make_loaders(c, TV_CFG, train=False)
    labels = te.dataset.targets
    assert len(labels) == 500 and len(set(labels)) == 10
    assert all(0 <= y < 1000 for y in labels)
    xs, _ = next(iter(te))
    assert xs.shape == (50, 3, 224, 224)
    ds = te.dataset
    name = ds.items[ds.indices[0]][0]
    raw = np.asarray(Image.open(io.BytesIO(ds.src.read(name))).convert("RGB"))
    mean, std = torch.tensor(TV_CFG["mean"]).view(3, 1, 1), torch.tensor(TV_CFG["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(raw.copy()).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(ds[0][0], expected, atol=1e-5, rtol=0)


@pytest.mark.shared
def test_shared_imagenet_train1000_flat(shared_data: Path) -> None:
    c = {"dataset": "imagenet", "root": str(shared_data / "imagenet-train1000.zip"), "batch_size": 4}
    ds = build_dataset(c, TV_CFG, train=True)
    assert len(ds) == 1000 and sorted(ds.targets) == list(range(1000))
    batches = calibration_batches(c, TV_CFG, 1)
    assert batches[0].shape == (4, 3, 224, 224)


# ---------------------------------------------------------------- sources


def test_sources_named_explicitly(tmp_path: Path) -> None:
    flat, nested = _imagenet_zip(tmp_path, flat=True), _imagenet_zip(tmp_path)
    c = {"dataset": "imagenet", "train": {"root": str(flat), "subset": 2},
         "eval": {"root": str(nested)}, "batch_size": 2}
    tr, te = make_loaders(c, IMNET_CFG)
    assert len(tr.dataset) == 2 and tr.dataset.src.path == flat
    assert te.dataset.src.path == nested and len(te.dataset) == 4
    assert D.source_of(D.resolve_data_cfg(c), "calibration")["root"] == str(flat)
    cal = calibration_batches(dict(c, calibration={"root": str(nested)}), IMNET_CFG, 1)
    assert cal[0].shape == (2, 3, 24, 24)
    assert D.eval_overlap(c, "train") == 0 and D.check_sources(c, train=True, calibrate=True) == []
    with pytest.raises(DataError, match="data.eval.split or its old spelling data.test_split"):
        D.resolve_data_cfg({"dataset": "imagenet", "test_split": "val", "eval": {"split": "test"}})


def test_training_on_eval_images_is_refused(tmp_path: Path) -> None:
    """A source without split folders serves the same images to every split: fine-tuning and
    calibration on it would train on the images the report measures accuracy on."""
    z = _imagenet_zip(tmp_path)
    c = {"dataset": "imagenet", "root": str(z)}
    assert D.eval_overlap(c, "train") == 4 and D.eval_overlap(c, "calibration") == 4
    for train, calibrate, what in ((True, False, "fine-tuning"), (False, True, "calibration")):
        with pytest.raises(DataError) as info:
            D.check_sources(c, train=train, calibrate=calibrate)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(what) and "nested.zip" in msg
        assert "allow_eval_overlap" in msg and "no split folders" in msg
    assert D.check_sources(c, train=False, calibrate=False) == []
    notes = D.check_sources(dict(c, allow_eval_overlap=True), train=True, calibrate=True)
    assert len(notes) == 2 and all("not a held-out measurement" in n for n in notes)
    # split folders keep the sources apart; the same split named twice does not
    cz = make_cifar_zip(tmp_path / "c.zip", {"cat": 2})
    assert D.check_sources(cfg(root=str(cz)), train=True, calibrate=True) == []
    assert D.eval_overlap(cfg(root=str(cz), eval={"split": "train"}), "train") == 2


def test_head_classes_must_match_the_data() -> None:
    with pytest.raises(DataError, match="1000-class head.*cifar10 has 10.*model.num_classes: 10"):
        D.check_classes({"dataset": "cifar10"}, 1000, "torchvision:resnet18")
    D.check_classes({"dataset": "imagenet"}, 1000, "torchvision:resnet18")
    D.check_classes({"dataset": "cifar10"}, 10, "cifar:resnet20")


@pytest.mark.parametrize("bad, words", [
    ({"batch_size": 0}, ["data.batch_size"]),
    ({"dataset": "mnist"}, ["data.dataset", "mnist"]),
    ({"eval": {"subset": -1}}, ["data.eval.subset"]),
    ({"trian": {}}, ["trian", "train"]),
    ({"train_split": "a", "train": {"split": "b"}}, ["train_split", "not both"]),
])
def test_api_data_dicts_validate_through_the_section_model(bad, words) -> None:
    with pytest.raises(DataError) as e:
        D.resolve_data_cfg(bad)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_api_data_defaults_are_the_recipes() -> None:
    from compresscnn.io.data.config import Data

    out = D.resolve_data_cfg({"dataset": "fmnist"})
    assert out["dataset"] == "fashion_mnist" and out["seed"] == 0
    for key, field in Data.model_fields.items():
        if not field.exclude and not isinstance(out[key], dict):
            assert out[key] == field.default or key in ("download_dir", "dataset"), key
