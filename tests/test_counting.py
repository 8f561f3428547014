"""MAC counting agrees with FlopCounterMode and with torchvision's published GFLOPS."""

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compresscnn.measure.counting import count, trace_layers
from compresscnn.core.decomposers.base import layer_cost


@pytest.mark.parametrize("name", ["resnet18", "alexnet"])
def test_macs_match_torchvision_published(name):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    published = weights.meta["_ops"]  # GFLOPS as torchvision publishes them (one MAC = 1)
    model = torchvision.models.get_model(name, weights=None)
    c = count(model, (3, 224, 224))
    assert c["macs"] / 1e9 == pytest.approx(published, abs=0.0015)
    assert c["params"] == weights.meta["num_params"]


def test_macs_match_flop_counter_and_layer_cost():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=2, dilation=2, padding=(2, 1)),
                          nn.Flatten(), nn.Linear(8 * 8 * 5, 10))
    x = torch.zeros(1, 3, 15, 13)
    with FlopCounterMode(display=False) as fc:
        model(x)
    c = count(model, (3, 15, 13))
    assert c["macs"] == fc.get_total_flops() // 2
    layers = trace_layers(model, (3, 15, 13))
    assert list(layers) == ["0", "2", "4"]
    assert sum(layer_cost(i.module, i.in_hw)[1] for i in layers.values()) == c["macs"]
    assert layers["2"].in_hw == (8, 7)


def test_count_restores_training_mode():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    m.train()
    count(m, (1, 8, 8))
    assert m.training
