"""The paper's SqueezeNet built from its hyperparameters, and the CIFAR AlexNet/SqueezeNet."""

from __future__ import annotations

import pytest
import torch
import torchvision

from compresscnn.errors import ModelError
from compresscnn.io.models import load_model
from compresscnn.io.models.alexnet_cifar import AlexNetCIFAR, alexnet_cifar_param_count
from compresscnn.io.models.squeezenet import SqueezeNet, fire_channels, squeezenet_param_count


def _n(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("version,tv_name,published",
                         [("1.0", "squeezenet1_0", 1_248_424), ("1.1", "squeezenet1_1", 1_235_496)])
def test_imagenet_build_is_torchvision(version: str, tv_name: str, published: int) -> None:
    ours = SqueezeNet(version).eval()
    assert _n(ours) == squeezenet_param_count(version) == published
    torch.manual_seed(0)
    tv = getattr(torchvision.models, tv_name)().eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


def test_fire_hyperparameters_give_the_paper_table() -> None:
    # Table 1 of the paper: (s1x1, e1x1, e3x3) of fire2..fire9
    assert fire_channels() == [(16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
                               (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]


@pytest.mark.parametrize("kw", [{}, {"sr": 0.25}, {"pct3x3": 0.75}, {"sr": 1.0, "pct3x3": 0.01},
                                {"base_e": 64, "incr_e": 32, "freq": 1}])
@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("cifar", [False, True])
def test_param_formula_matches_module(kw: dict, version: str, cifar: bool) -> None:
    m = SqueezeNet(version, 10 if cifar else 1000, cifar=cifar, **kw)
    assert _n(m) == squeezenet_param_count(version, 10 if cifar else 1000, cifar=cifar, **kw)


def test_cifar_squeezenet_shapes_and_counts() -> None:
    for version, n in (("1.0", 729_034), ("1.1", 727_626)):
        m = SqueezeNet(version, 10, cifar=True).eval()
        assert _n(m) == n
        assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        conv1 = m.features[0]
        assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
        assert sum(isinstance(x, torch.nn.MaxPool2d) for x in m.features) == 2


@pytest.mark.parametrize("hidden", [64, 2048])
def test_alexnet_cifar_formula(hidden: int) -> None:
    m = AlexNetCIFAR(10, hidden=hidden).eval()
    assert _n(m) == alexnet_cifar_param_count(10, hidden)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert alexnet_cifar_param_count() == 15_055_690
    names = {n for n, mod in m.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))}
    tv = {n for n, mod in torchvision.models.alexnet().named_modules()
          if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))}
    assert names == tv  # same layer names as torchvision's AlexNet: the same rules apply


def test_specs_and_hparams() -> None:
    m = load_model("cifar:squeezenet1_0?sr=0.25&pct3x3=0.75")
    assert _n(m) == squeezenet_param_count("1.0", 10, cifar=True, sr=0.25, pct3x3=0.75)
    pc = m.pretrained_cfg
    assert pc["input_size"] == (3, 32, 32) and pc["num_classes"] == 10
    assert pc["mean"] == load_model("cifar:resnet20").pretrained_cfg["mean"]
    assert _n(load_model("cifar:squeezenet1_1")) == 727_626
    assert _n(load_model("cifar:alexnet")) == 15_055_690
    assert _n(load_model("cifar:alexnet?hidden=64")) == alexnet_cifar_param_count(10, 64)
    with pytest.raises(ModelError, match="sr"):
        load_model("cifar:squeezenet1_0?sr=abc")
    with pytest.raises(ModelError, match="hyperparameter"):
        load_model("cifar:squeezenet1_0?depth=3")
    with pytest.raises(ModelError, match="pct3x3"):
        load_model("cifar:squeezenet1_0?pct3x3=1.5")
    with pytest.raises(ModelError, match="no published weights"):
        load_model("cifar:alexnet", "DEFAULT")


def test_weights_roundtrip(tmp_path) -> None:
    from safetensors.torch import save_file

    m = load_model("cifar:squeezenet1_1")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m2 = load_model("cifar:squeezenet1_1", str(tmp_path / "w.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))
