"""CIFAR-10 ResNets (He et al., "Deep Residual Learning", CVPR 2016, section 4.2).

Depth 6n+2 with three stages of n basic blocks, widths 16/32/64, global average pooling and
one Linear. Shortcuts are the paper's option A: identity, and where the shape changes, the
input subsampled by ``x[:, :, ::2, ::2]`` and zero-padded in channels, so shortcuts hold no
parameters (ResNet-20 has 269,722 parameters counting BatchNorm's affine ones).

Module names follow akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv{1,2}`` / ``bn{1,2}``, ``linear``) so its published checkpoints load
key for key. Unlike that code, the option-A shortcut is a proper module class instead of a
lambda (picklable, printable, exports to ONNX as Slice + Pad), and the final pooling is
``AdaptiveAvgPool2d(1)``, equal to its ``avg_pool2d(out, out.size(3))`` for any input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "PadShortcut", "cifar_resnet", "CIFAR_DEPTHS"]

CIFAR_DEPTHS = (20, 32, 44, 56)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 in space, zero-pad channels on both sides.

    Parameter-free. ``pad`` channels are added before and after, so ``in + 2 * pad`` output
    channels (16 -> 32 -> 64 in the CIFAR ResNets).
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a ReLU between and after the residual sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcut needs stride 2 and doubled width")
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3x32x32 inputs."""

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.pool(out), 1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build ResNet-``depth`` (20, 32, 44, 56, or any 6n+2) with random initialisation."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes)
