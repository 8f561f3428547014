"""Model loading by spec, checkpoint safety and errors, pretrained_cfg (fast; no network)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from compresscnn.errors import CheckpointError, CompressError, ModelError
from compresscnn.io.models import load_model, load_weights, model_names, parse_spec, read_checkpoint
from compresscnn.io.models.cifar_resnet import PadShortcut, cifar_resnet

CFG_KEYS = {"input_size", "mean", "std", "num_classes", "resize", "crop", "interpolation", "published"}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- specs and names


def test_parse_spec() -> None:
    assert parse_spec("torchvision:resnet18") == ("torchvision", "resnet18")
    assert parse_spec("cifar:resnet20") == ("cifar", "resnet20")
    with pytest.raises(ModelError, match="source:name"):
        parse_spec("resnet18")
    with pytest.raises(ModelError, match="did you mean 'timm'"):
        parse_spec("tim:resnet18")


def test_model_names() -> None:
    names = model_names()
    assert "cifar:resnet20" in names and "fmnist:cnn" in names
    assert "torchvision:squeezenet1_1" in names and "timm:resnet18" in names
    assert model_names("cifar") == ["cifar:resnet20", "cifar:resnet32", "cifar:resnet44", "cifar:resnet56"]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("torchvision:resnet81", "did you mean 'torchvision:resnet18'"),
        ("timm:resnt18", "'timm:resnet18'"),
        ("cifar:resnet21", "cifar:resnet20"),
        ("fmnist:cnn2", "fmnist:cnn"),
        ("keras:resnet18", "unknown model source"),
    ],
)
def test_unknown_names(spec: str, fragment: str) -> None:
    with pytest.raises(ModelError) as info:
        load_model(spec)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_weights_name() -> None:
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):
        load_model("torchvision:resnet18", "IMAGENET1K_V9")


# ---------------------------------------------------------------- cifar resnets


@pytest.mark.parametrize("depth, params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_cifar_resnet_params(depth: int, params: int) -> None:
    assert n_params(cifar_resnet(depth)) == params


def test_cifar_resnet_shapes_and_shortcut() -> None:
    m = load_model("cifar:resnet20")
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    shortcuts = [mod for mod in m.modules() if isinstance(mod, PadShortcut)]
    assert len(shortcuts) == 2 and all(not list(s.parameters()) for s in shortcuts)
    names = dict(m.named_modules())
    for name in ("conv1", "bn1", "layer1.0.conv1", "layer3.2.bn2", "linear"):
        assert name in names
    cfg = m.pretrained_cfg
    assert CFG_KEYS <= set(cfg)
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["resize"] is None and cfg["crop"] is None
    assert cfg["published"] == {} and cfg["reference"]["acc@1"] == 91.78


def test_cifar_resnet_exports_to_onnx(tmp_path: Path) -> None:
    # the option-A shortcut is a plain module (Slice + Pad), so the whole net exports
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    m = load_model("cifar:resnet20")
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "r20.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), m(x), atol=1e-4, rtol=1e-4)


@pytest.mark.shared
def test_resnet20_shared_weights_accuracy(shared_data: Path) -> None:
    from compresscnn.io.data import make_loaders

    path = shared_data / "weights/cifar10-resnet-akamaster/resnet20-12fca82f.th"
    m = load_model("cifar:resnet20", str(path))
    assert m.pretrained_cfg["published"]["acc@1"] == 91.78
    assert m.pretrained_cfg["weights"] == str(path)
    # 500 test images, 50 per class (the zip lists classes in order, so "the first 500"
    # would all be airplanes)
    _, test = make_loaders(
        {"dataset": "cifar10", "root": str(shared_data / "cifar10-jpg.zip"), "test_subset": 500},
        m.pretrained_cfg, train=False)
    correct = total = 0
    with torch.no_grad():
        for x, y in test:
            correct += int((m(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 500
    assert correct / total > 0.70


@pytest.mark.shared
def test_squeezenet_shared_weights(shared_data: Path) -> None:
    m = load_model("torchvision:squeezenet1_1",
                   str(shared_data / "weights/imagenet-squeezenet1_1/squeezenet1_1.pth"))
    cfg = m.pretrained_cfg
    assert cfg["published"]["acc@1"] == 56.34  # the ONNX zoo's figure for these weights
    assert cfg["reference"]["acc@1"] == pytest.approx(58.178)  # torchvision's own weights
    assert cfg["resize"] == 256 and cfg["crop"] == 224
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


# ---------------------------------------------------------------- torchvision / timm / fmnist


def test_torchvision_random_init_cfg_from_metadata() -> None:
    m = load_model("torchvision:resnet18")  # no weights: nothing is downloaded
    cfg = m.pretrained_cfg
    assert CFG_KEYS <= set(cfg)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["resize"] == 256 and cfg["crop"] == 224 and cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert cfg["num_classes"] == 1000
    assert cfg["published"] == {}  # random weights have no published figures
    ref = cfg["reference"]
    assert ref["acc@1"] == pytest.approx(69.758) and ref["acc@5"] == pytest.approx(89.078)
    assert ref["gflops"] == pytest.approx(1.814) and ref["file_size_mb"] > 40


@pytest.mark.filterwarnings("ignore:The default weight initialization of inception_v3")
def test_torchvision_inception_preprocessing() -> None:
    cfg = load_model("torchvision:inception_v3").pretrained_cfg
    assert cfg["resize"] == 342 and cfg["crop"] == 299 and cfg["input_size"] == (3, 299, 299)


def test_timm_random_init() -> None:
    m = load_model("timm:resnet18")
    cfg = m.pretrained_cfg
    assert CFG_KEYS <= set(cfg)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop"] == 224
    assert cfg["resize"] >= 224 and cfg["num_classes"] == 1000
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_local_weights(tmp_path: Path) -> None:
    import timm

    src = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "r18.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = load_model("timm:resnet18", str(path))
    torch.testing.assert_close(m.state_dict()["fc.weight"], src.state_dict()["fc.weight"])


def test_fmnist_default_packaged_weights() -> None:
    m = load_model("fmnist:cnn", "DEFAULT")
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28)
    assert cfg["mean"] == (0.2860,) and cfg["std"] == (0.3530,)
    assert cfg["published"]["acc@1"] >= 88.0 and cfg["published"]["dataset"] == "Fashion-MNIST"
    assert n_params(m) <= 250_000
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert sum(c.in_channels >= 32 for c in convs) >= 2 and max(l.in_features for l in linears) > 1000
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # the packaged weights are not a random init
    rnd = load_model("fmnist:cnn")
    assert not torch.equal(rnd.state_dict()["fc1.weight"], m.state_dict()["fc1.weight"])


# ---------------------------------------------------------------- checkpoint formats


def _cifar_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return cifar_resnet(20).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "safetensors"])
def test_checkpoint_layouts(tmp_path: Path, wrap: str) -> None:
    sd = _cifar_sd()
    if wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"acc@1": "77.5"})
    else:
        path = tmp_path / "w.pth"
        obj: object = {
            "plain": sd,
            "state_dict": {"state_dict": sd, "best_prec1": 80.0},
            "model": {"model": sd, "epoch": 3},
            "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        }[wrap]
        torch.save(obj, path)
    m = load_model("cifar:resnet20", str(path))
    for k, v in sd.items():
        torch.testing.assert_close(m.state_dict()[k], v)
    if wrap == "safetensors":
        assert m.pretrained_cfg["published"]["acc@1"] == 77.5
    if wrap == "state_dict":
        assert m.pretrained_cfg["published"]["acc@1"] == 80.0


def test_missing_num_batches_tracked_is_fine(tmp_path: Path) -> None:
    sd = {k: v for k, v in _cifar_sd().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "w.pth")
    load_model("cifar:resnet20", str(tmp_path / "w.pth"))


# ---------------------------------------------------------------- checkpoint errors


def _err(spec: str, path: Path | str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(spec, str(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert isinstance(info.value, CompressError) and info.value.exit_code == 2
    return msg


def test_missing_file(tmp_path: Path) -> None:
    msg = _err("cifar:resnet20", tmp_path / "nope.pth")
    assert "not found" in msg and "nope.pth" in msg


def test_not_a_file(tmp_path: Path) -> None:
    d = tmp_path / "dir.pth"
    d.mkdir()
    msg = _err("cifar:resnet20", d)
    assert "not a file" in msg and "dir.pth" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / ("good" + suffix)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(_cifar_sd(), str(good))
    else:
        torch.save(_cifar_sd(), good)
    bad = tmp_path / ("bad" + suffix)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    msg = _err("cifar:resnet20", bad)
    assert str(bad) in msg and ("truncated" in msg or "corrupt" in msg)


def test_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pth"
    import random

    bad.write_bytes(random.Random(0).randbytes(1000))
    msg = _err("cifar:resnet20", bad)
    assert str(bad) in msg


def test_corrupt_pickle(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02garbage" * 50)
    msg = _err("cifar:resnet20", bad)
    assert "corrupt" in msg and "unsafe" not in msg


def test_empty_file(tmp_path: Path) -> None:
    bad = tmp_path / "empty.pth"
    bad.write_bytes(b"")
    assert "empty" in _err("cifar:resnet20", bad)


class _Evil:
    """Unpickling this would run a shell command: weights_only must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_unsafe_pickle_refused(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"conv1.weight": [0.0], "x": _Evil(str(marker))}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    msg = _err("cifar:resnet20", path)
    assert "unsafe" in msg and "system" in msg and str(path) in msg
    assert not marker.exists(), "the pickled command ran"


def test_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "best_prec1": 90.0}, path)
    msg = _err("cifar:resnet20", path)
    assert "no tensors" in msg and str(path) in msg


def test_mismatched_keys(tmp_path: Path) -> None:
    sd = _cifar_sd()
    drop = [k for k in sd if k.startswith("layer3")]
    for k in drop:
        del sd[k]
    for i in range(7):
        sd[f"extra.{i}.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pth"
    torch.save(sd, path)
    msg = _err("cifar:resnet20", path)
    n_missing = len([k for k in drop if not k.endswith("num_batches_tracked")])
    assert str(path) in msg
    assert f"{n_missing} missing" in msg and "7 unexpected" in msg
    assert "layer3.0.conv1.weight" in msg and "extra.0.weight" in msg
    assert "extra.5.weight" not in msg  # at most 5 named


def test_shape_mismatch(tmp_path: Path) -> None:
    sd = _cifar_sd()
    sd["linear.weight"] = torch.zeros(100, 64)
    sd["linear.bias"] = torch.zeros(100)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    msg = _err("cifar:resnet20", path)
    assert "linear" in msg and "(100, 64)" in msg and "(10, 64)" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(tmp_path: Path, bad: float) -> None:
    sd = _cifar_sd()
    sd["layer2.1.conv2.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    msg = _err("cifar:resnet20", path)
    assert "layer2.1.conv2.weight" in msg and ("NaN" in msg or "Inf" in msg)


def test_read_checkpoint_and_load_weights_api(tmp_path: Path) -> None:
    sd = _cifar_sd()
    path = tmp_path / "w.th"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "best_prec1": 1.0}, path)
    ck = read_checkpoint(path)
    assert set(ck.state_dict) == set(sd) and ck.metadata["best_prec1"] == 1.0 and len(ck.sha256) == 64
    m = cifar_resnet(20)
    load_weights(m, path)
    torch.testing.assert_close(m.state_dict()["conv1.weight"], sd["conv1.weight"])
