"""Every torchvision classification model in a fixed list, and a few timm models: a
global-budget plan applies, the model runs, and the MAC target is met (random weights,
small inputs, to keep this fast)."""

import pytest
import timm
import torch
import torchvision

from compresscnn import compress
from compresscnn.measure.counting import count

# Conv methods first (tucker2, then spatial for the depthwise convs Tucker-2 cannot take),
# then SVD for Linear layers; the huge classifiers of alexnet/vgg16 stay dense so the test
# spends its time on convolutions.
RULES = [{"match": "*", "method": "tucker2"}, {"match": "*", "method": "spatial"},
         {"match": "*", "method": "svd", "exclude": ["classifier.0", "classifier.1", "classifier.3", "classifier.4"]}]

TORCHVISION = ["alexnet", "vgg16", "resnet18", "resnet50", "squeezenet1_0", "squeezenet1_1",
               "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
               "regnet_y_400mf"]
TIMM = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"]


def _check(model, size, frac=0.5):
    torch.manual_seed(0)
    model.eval()
    new, p = compress(model, RULES, size, target={"macs": frac})
    base, got = count(model, size), count(new, size)
    assert got == {"params": p.params_after, "macs": p.macs_after}
    ratio = got["macs"] / base["macs"]
    assert frac * 0.98 <= ratio <= frac + 1e-9, ratio
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert new(x).shape == model(x).shape
    return p


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_global_budget(name):
    # at 64x64 AlexNet's (excluded) classifier would hold most of its MACs
    size = (3, 128, 128) if name == "alexnet" else (3, 64, 64)
    _check(torchvision.models.get_model(name, weights=None, num_classes=10), size)


@pytest.mark.parametrize("name", TIMM)
def test_timm_global_budget(name):
    _check(timm.create_model(name, pretrained=False, num_classes=10), (3, 64, 64))


def test_depthwise_goes_to_spatial():
    p = _check(torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64))
    methods = {r.name: r.method for r in p.replacements}
    assert methods["features.1.conv.0.0"] == "spatial"  # the first depthwise 3x3
