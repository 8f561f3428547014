"""AlexNet adapted to 32x32 CIFAR images, with torchvision's AlexNet module layout.

torchvision's AlexNet (the "one weird trick" variant, Krizhevsky 2014, that its ImageNet
weights use): conv 11x11/4 64 -> pool -> conv 5x5 192 -> pool -> conv 3x3 384 -> 256 -> 256
-> pool -> 6x6 avg -> FC 9216-4096-4096-1000 (61,100,840 parameters, 96 % of them in the
fully connected layers).

CIFAR adaptation (what changes, everything else is kept):

* conv1 is 3x3 stride 1 padding 1 (an 11x11/4 conv would leave 8x8 maps of a 32x32 image);
  conv2 keeps its 5x5 kernel, conv3-5 their 3x3 kernels; widths 64-192-384-256-256;
* the three max-pools are 2x2/2 (32 -> 16 -> 8 -> 4), and the adaptive average pool gives
  4x4 (identity at 32x32), so the classifier reads 256*4*4 = 4096 features;
* the hidden FC width is ``hidden`` (default 2048, instead of 4096), dropout 0.5 as in the
  original; the last layer has ``num_classes`` outputs.

Module names are torchvision's (``features.{0,3,6,8,10}``, ``classifier.{1,4,6}``) so the
same compression rules apply to both. With 10 classes and ``hidden=2048``:
15,055,690 parameters (2,448,192 in the convs), 20.7x SqueezeNet-CIFAR 1.0's 729,034
(ImageNet: 61.1M / 1.25M = 49x).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["AlexNetCIFAR", "alexnet_cifar_param_count", "ALEXNET_WIDTHS"]

ALEXNET_WIDTHS = (64, 192, 384, 256, 256)
_KERNELS = (3, 5, 3, 3, 3)


def alexnet_cifar_param_count(num_classes: int = 10, hidden: int = 2048,
                              widths: Sequence[int] = ALEXNET_WIDTHS) -> int:
    """Parameters of :class:`AlexNetCIFAR`: sum over convs of ``k^2 c_in c_out + c_out`` plus
    ``(16 w5 + 1) h + (h + 1) h + (h + 1) n`` for the classifier."""
    total, cin = 0, 3
    for w, k in zip(widths, _KERNELS):
        total += k * k * cin * w + w
        cin = w
    feat = cin * 4 * 4
    return total + (feat + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * num_classes


class AlexNetCIFAR(nn.Module):
    """AlexNet for 32x32 inputs (see the module docstring for the adaptation)."""

    def __init__(self, num_classes: int = 10, hidden: int = 2048,
                 widths: Sequence[int] = ALEXNET_WIDTHS, dropout: float = 0.5) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = (int(w) for w in widths)
        self.hparams = {"hidden": int(hidden), "widths": [w1, w2, w3, w4, w5]}
        self.features = nn.Sequential(
            nn.Conv2d(3, w1, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(w1, w2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(w2, w3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w3, w4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w4, w5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(w5 * 4 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
