"""A small CNN for Fashion-MNIST (1x28x28), the packaged demo model.

Sized so that every compression method has something to do while the whole thing trains on
two CPU cores in a couple of minutes: two 3x3 convolutions with 32->64 and 64->64 channels
(worth a Tucker-2 / CP / spatial decomposition), and a 3136->48 Linear that holds most of the
parameters (worth a truncated SVD). About 208k parameters, so the fp32 safetensors file is
under 1 MB.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FashionCNN", "FMNIST_MEAN", "FMNIST_STD"]

# Mean / std of the Fashion-MNIST training pixels scaled to [0, 1].
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


class FashionCNN(nn.Module):
    """conv(1->32) pool conv(32->64) pool conv(64->64) fc(3136->48) fc(48->10).

    Convolutions have no bias because a BatchNorm follows each of them.
    """

    def __init__(self, num_classes: int = 10, hidden: int = 48) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))  # 32 x 14 x 14
        x = self.pool(self.relu(self.bn2(self.conv2(x))))  # 64 x 7 x 7
        x = self.relu(self.bn3(self.conv3(x)))  # 64 x 7 x 7
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)
