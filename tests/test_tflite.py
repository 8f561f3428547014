"""TensorFlow Lite weights: dequantization, TF 'SAME' padding, the 1001-class head, the
input range, and refusals; the shared MobileNetV2 file end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compresscnn.measure.counting import count
from compresscnn.errors import CheckpointError, CompressError, ModelError
from compresscnn.io.models import load_architecture, load_model
from compresscnn.io.models.tflite_weights import load_tflite, read_tflite, tf_same_padding

from _tflite_build import Op, T, build

MNV2 = "weights/imagenet-mobilenet-tflite/mobilenet_v2_1.0_224_quant.tflite"


# ------------------------------------------------------------------ a small network


class Tiny(nn.Module):
    """conv 3x3 s2 -> depthwise 3x3 s2 -> 1x1 -> residual 1x1 -> mean -> Linear."""

    def __init__(self, n_out: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
            nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU6()),
            nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)),
        )
        self.res = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        y = y + self.res(y)
        return self.fc(y.mean((2, 3)))


def _tiny_file(rng: np.random.Generator, size: int = 10, *, extra_op: bool = False
               ) -> tuple[bytes, dict[str, np.ndarray]]:
    """A TFLite file of :class:`Tiny` (5 outputs: a 'background' class first) with weights
    quantized every way the reader handles, and the float weights they mean (NHWC layouts)."""
    w0q = rng.integers(0, 256, (8, 3, 3, 3), dtype=np.uint8)      # uint8, per tensor
    w1q = rng.integers(-127, 128, (1, 3, 3, 8), dtype=np.int8)    # int8, per channel (axis 3)
    w1s = rng.uniform(0.005, 0.02, 8).astype(np.float32)
    w2q = rng.integers(0, 256, (6, 1, 1, 8), dtype=np.uint8)
    w3 = rng.normal(0, 0.3, (6, 1, 1, 6)).astype(np.float32)     # float weights
    b3 = rng.normal(0, 0.1, 6).astype(np.float32)
    wfq = rng.integers(-127, 128, (5, 6), dtype=np.int8)
    b0q, b1q, b2q, bfq = (rng.integers(-500, 500, n).astype(np.int32) for n in (8, 8, 6, 5))
    f = {
        "w0": (w0q.astype(np.float64) - 120) * 0.02, "b0": b0q * 1e-3,
        "w1": w1q.astype(np.float64) * w1s, "b1": b1q * 2e-3,
        "w2": (w2q.astype(np.float64) - 130) * 0.01, "b2": b2q * 5e-4,
        "w3": w3.astype(np.float64), "b3": b3.astype(np.float64),
        "wf": wfq.astype(np.float64) * 0.01, "bf": bfq * 1e-3,
    }
    s = size
    o1, o2 = math.ceil(s / 2), math.ceil(math.ceil(s / 2) / 2)
    tensors = [
        T("input", (1, s, s, 3), np.uint8, scale=1 / 128, zero=128),
        T("w0", w0q.shape, np.uint8, w0q, 0.02, 120), T("b0", (8,), np.int32, b0q, 1e-3),
        T("a0", (1, o1, o1, 8)),
        T("w1", w1q.shape, np.int8, w1q, w1s, 0, axis=3),
        T("b1", (8,), np.int32, b1q, np.full(8, 2e-3)), T("a1", (1, o2, o2, 8)),
        T("w2", w2q.shape, np.uint8, w2q, 0.01, 130), T("b2", (6,), np.int32, b2q, 5e-4),
        T("a2", (1, o2, o2, 6)),
        T("w3", w3.shape, np.float32, w3), T("b3", (6,), np.float32, b3), T("a3", (1, o2, o2, 6)),
        T("a4", (1, o2, o2, 6)),
        T("axes", (2,), np.int32, np.array([1, 2], np.int32)), T("a5", (1, 6)),
        T("wf", (5, 6), np.int8, wfq, 0.01, 0), T("bf", (5,), np.int32, bfq, 1e-3),
        T("logits", (1, 5)),
    ]
    ops = [
        Op("CONV_2D", [0, 1, 2], [3], {"stride": 2, "act": 3}),
        Op("DEPTHWISE_CONV_2D", [3, 4, 5], [6], {"stride": 2, "act": 3}),
        Op("CONV_2D", [6, 7, 8], [9]),
        Op("CONV_2D", [9, 10, 11], [12]),
        Op("ADD", [9, 12], [13]),
        Op("MEAN", [13, 14], [15]),
        Op("FULLY_CONNECTED", [15, 16, 17], [18]),
    ]
    if extra_op:  # an operator the reader does not know computes nothing else
        ops.insert(5, Op("TANH", [13], [13]))
    return build(tensors, ops, [0], [18]), f


def _tf_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, depthwise: bool
             ) -> np.ndarray:
    """TF's convolution, NHWC, 'SAME' padding as TF documents it: out = ceil(in / stride),
    pad_total = max((out - 1) * stride + k - in, 0), pad_before = pad_total // 2."""
    n, h, wd, c = x.shape
    k = w.shape[1]
    outs, pads = [], []
    for size in (h, wd):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + k - size, 0)
        outs.append(out)
        pads.append((total // 2, total - total // 2))
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    y = np.zeros((n, outs[0], outs[1], w.shape[3] if depthwise else w.shape[0]))
    for i in range(outs[0]):
        for j in range(outs[1]):
            patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            if depthwise:  # w: 1, k, k, C
                y[:, i, j, :] = (patch * w[0]).sum((1, 2))
            else:  # w: O, k, k, I
                y[:, i, j, :] = np.einsum("nhwi,ohwi->no", patch, w)
    return y + b


def _tf_forward(q: np.ndarray, f: dict[str, np.ndarray]) -> np.ndarray:
    x = (q.astype(np.float64) - 128) / 128
    a = np.clip(_tf_conv(x, f["w0"], f["b0"], 2, False), 0, 6)
    a = np.clip(_tf_conv(a, f["w1"], f["b1"], 2, True), 0, 6)
    a = _tf_conv(a, f["w2"], f["b2"], 1, False)
    a = a + _tf_conv(a, f["w3"], f["b3"], 1, False)
    return a.mean((1, 2)) @ f["wf"].T + f["bf"]


def _write(tmp_path: Path, data: bytes, name: str = "tiny.tflite") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("size", [10, 11])
def test_tiny_file_matches_tf_semantics(tmp_path: Path, size: int) -> None:
    """Dequantized weights in PyTorch's layout, TF 'SAME' padding (asymmetric at even sizes,
    symmetric at odd ones), the residual, the head without its class 0 and the input range
    all give TF's forward pass, computed here from TF's documented rules."""
    rng = np.random.default_rng(size)
    data, f = _tiny_file(rng, size)
    model = Tiny().eval()
    info = load_tflite(model, _write(tmp_path, data), spec="Tiny")
    assert info["num_classes"] == 4 and info["tflite"]["background_dropped"]
    assert info["input_size"] == (3, size, size)
    # 1/128 * (q - 128) is (q / 255 - mean) / std
    assert info["mean"] == pytest.approx((128 / 255,) * 3)
    assert info["std"] == pytest.approx((128 / 255,) * 3)
    first = model.features[0][0]
    if size % 2 == 0:  # stride 2 on an even size: nothing before, one after
        assert info["tflite"]["padded"] == ["features.0.0"]
        assert isinstance(first, nn.Sequential) and isinstance(first[0], nn.ZeroPad2d)
        assert first[0].padding == (0, 1, 0, 1) and first[1].padding == (0, 0)
        assert type(first[1]) is nn.Conv2d
    else:  # odd sizes (11, then 6: the depthwise is asymmetric there)
        assert isinstance(first, nn.Conv2d) and first.padding == (1, 1)
        assert info["tflite"]["padded"] == ["features.1.0"]
    q = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    want = _tf_forward(q, f)[:, 1:]
    x = torch.from_numpy(q).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        got = model((x - mean) / std).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_symmetric_padding_would_differ(tmp_path: Path) -> None:
    """The check above can fail: torchvision's own symmetric padding gives other outputs."""
    rng = np.random.default_rng(0)
    data, f = _tiny_file(rng, 10)
    model = Tiny().eval()
    load_tflite(model, _write(tmp_path, data))
    conv = model.features[0][0][1]
    plain = Tiny().eval()
    plain.load_state_dict({k.replace("features.0.0.1.", "features.0.0."): v
                           for k, v in model.state_dict().items()})
    x = torch.randn(1, 3, 10, 10)
    assert conv.padding == (0, 0)
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x), atol=1e-3)


def test_tf_same_padding_is_the_loaded_architecture(tmp_path: Path) -> None:
    data, _ = _tiny_file(np.random.default_rng(1), 10)
    loaded = Tiny()
    load_tflite(loaded, _write(tmp_path, data))
    bare = Tiny()
    assert tf_same_padding(bare, (3, 10, 10)) == ["features.0.0"]
    assert [(k, v.shape) for k, v in bare.state_dict().items()] == \
        [(k, v.shape) for k, v in loaded.state_dict().items()]
    assert str(bare) == str(loaded)


def test_read_tflite_layers(tmp_path: Path) -> None:
    data, f = _tiny_file(np.random.default_rng(2), 10)
    g = read_tflite(_write(tmp_path, data))
    assert [t.kind for t in g.layers] == ["conv", "depthwise", "conv", "conv", "fully_connected"]
    assert [t.activation for t in g.layers] == ["relu6", "relu6", "none", "none", "none"]
    assert g.layers[0].stride == (2, 2) and g.layers[0].padding == "SAME"
    assert g.ops["ADD"] == 1 and g.num_outputs == 5
    assert g.input_quant == pytest.approx((1 / 128, 128))
    # OHWI -> OIHW, 1HWC -> C1HW, per-channel scales along the last axis
    np.testing.assert_allclose(g.layers[0].weight.numpy(), f["w0"].transpose(0, 3, 1, 2), rtol=1e-6)
    np.testing.assert_allclose(g.layers[1].weight.numpy(), f["w1"].transpose(3, 0, 1, 2), rtol=1e-6)
    np.testing.assert_allclose(g.layers[1].bias.numpy(), f["b1"], rtol=1e-6)


# ------------------------------------------------------------------ refusals


def _one_line_error(exc: pytest.ExceptionInfo, path: Path | str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_not_a_tflite_file(tmp_path: Path) -> None:
    p = _write(tmp_path, b"\x00" * 64 + b"certainly not a flatbuffer", "x.tflite")
    with pytest.raises(CheckpointError) as exc:
        read_tflite(p)
    assert "not a TensorFlow Lite model" in _one_line_error(exc, p)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    p = _write(tmp_path, b"", "empty.tflite")
    with pytest.raises(CheckpointError) as exc:
        read_tflite(p)
    _one_line_error(exc, p)
    with pytest.raises(CheckpointError, match="not found"):
        read_tflite(tmp_path / "absent.tflite")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    data, _ = _tiny_file(np.random.default_rng(3), 10)
    p = _write(tmp_path, data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as exc:
        load_tflite(Tiny(), p)
    _one_line_error(exc, p)


def test_corrupt_bytes(tmp_path: Path) -> None:
    data, _ = _tiny_file(np.random.default_rng(4), 10)
    bad = bytearray(data)
    bad[8:len(bad) // 2] = bytes(len(bad) // 2 - 8)  # keep the identifier, zero the tables
    p = _write(tmp_path, bytes(bad))
    with pytest.raises(CheckpointError) as exc:
        load_tflite(Tiny(), p)
    _one_line_error(exc, p)


def test_foreign_network_refused(tmp_path: Path) -> None:
    data, _ = _tiny_file(np.random.default_rng(5), 10)
    p = _write(tmp_path, data)
    model = Tiny()
    model.res = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
    with pytest.raises(CheckpointError) as exc:
        load_tflite(model, p, spec="Tiny3x3")
    msg = _one_line_error(exc, p)
    assert "does not match Tiny3x3" in msg and "res.0" in msg
    with pytest.raises(CheckpointError,
                       match="5 convolution/fully connected layers in the file, 6"):
        load_tflite(nn.Sequential(Tiny(), nn.Linear(4, 4)), p)


def test_unknown_operator_refused(tmp_path: Path) -> None:
    data, _ = _tiny_file(np.random.default_rng(6), 10, extra_op=True)
    p = _write(tmp_path, data)
    with pytest.raises(CheckpointError) as exc:
        read_tflite(p)
    assert "TANH not supported" in _one_line_error(exc, p)


def test_tflite_for_other_sources_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, b"whatever", "m.tflite")
    with pytest.raises(ModelError, match="torchvision models only"):
        load_model("cifar:resnet20", str(p))


def test_cli_refuses_corrupt_tflite(tmp_path: Path) -> None:
    """Through load_model, as a recipe reaches it: a CompressError (exit code 2)."""
    p = _write(tmp_path, b"TFL3" * 100, "mobilenet.tflite")
    with pytest.raises(CompressError) as exc:
        load_model("torchvision:mobilenet_v2", str(p))
    _one_line_error(exc, p)


# ------------------------------------------------------------------ the shared MobileNetV2

# The TFLite interpreter's output on imagenet-sample-dog.jpg (centre 224 x 224 crop) for
# mobilenet_v2_1.0_224_quant.tflite: uint8 probabilities (/256) of its top classes, as
# ImageNet-1k indices (the file's index minus 1).
_TFLITE_DOG = {208: 187, 207: 57}  # Labrador retriever, golden retriever


@pytest.fixture(scope="module")
def mnv2(shared_data: Path) -> nn.Module:
    return load_model("torchvision:mobilenet_v2", str(shared_data / MNV2))


@pytest.mark.shared
def test_mobilenet_v2_layout(mnv2: nn.Module, shared_data: Path) -> None:
    cfg = mnv2.pretrained_cfg
    assert cfg["num_classes"] == 1000 and cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == pytest.approx((128 / 255,) * 3)
    assert cfg["std"] == pytest.approx((128 / 255,) * 3)
    assert cfg["weights"] == str(shared_data / MNV2)
    # every stride-2 conv, and only those, padded TF's way
    assert cfg["tflite"]["padded"] == ["features.0.0", "features.2.conv.1.0", "features.4.conv.1.0",
                                       "features.7.conv.1.0", "features.14.conv.1.0"]
    for name in cfg["tflite"]["padded"]:
        seq = mnv2.get_submodule(name)
        assert isinstance(seq[0], nn.ZeroPad2d) and seq[0].padding == (0, 1, 0, 1)
        assert type(seq[1]) is nn.Conv2d and seq[1].stride == (2, 2) and seq[1].padding == (0, 0)
    head = mnv2.classifier[1]
    assert isinstance(head, nn.Linear) and head.weight.shape == (1000, 1280)
    g = read_tflite(shared_data / MNV2)
    assert g.num_outputs == 1001
    assert torch.equal(head.weight, g.layers[-1].weight.reshape(1001, 1280)[1:])
    # the same MACs as torchvision's mobilenet_v2 (the padding moves, nothing is added)
    import torchvision

    tv = count(torchvision.models.mobilenet_v2(), (3, 224, 224))
    assert count(mnv2, (3, 224, 224)) == tv


@pytest.mark.shared
def test_mobilenet_v2_dog(mnv2: nn.Module, shared_data: Path) -> None:
    from PIL import Image

    img = Image.open(shared_data / "imagenet-sample-dog.jpg").convert("RGB")
    w, h = img.size
    img = img.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    cfg = mnv2.pretrained_cfg
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        p = mnv2(x).softmax(1)[0]
    assert int(p.argmax()) == 208 and float(p[208]) > 0.5  # Labrador retriever
    # the interpreter's two classes, in its order (its 8-bit activations make its softmax
    # flatter: 0.73 / 0.22 there, 0.95 / 0.04 here; the layer outputs agree to 0.3% after
    # the first conv and 5-8% deeper, the size of its activation steps)
    assert p.topk(2).indices.tolist() == list(_TFLITE_DOG)


@pytest.mark.shared
def test_mobilenet_v2_architecture_rebuilt_without_the_file(mnv2: nn.Module,
                                                            shared_data: Path) -> None:
    bare = load_architecture("torchvision:mobilenet_v2", str(shared_data / MNV2))
    assert [(k, v.shape) for k, v in bare.state_dict().items()] == \
        [(k, v.shape) for k, v in mnv2.state_dict().items()]
    assert str(bare) == str(mnv2)


@pytest.mark.shared
def test_mobilenet_file_into_another_network(shared_data: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        load_model("torchvision:resnet18", str(shared_data / MNV2))
    msg = _one_line_error(exc, shared_data / MNV2)
    assert "does not match torchvision:resnet18" in msg
