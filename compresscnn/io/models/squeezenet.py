"""SqueezeNet built from the hyperparameters of Iandola et al. 2016 (arXiv:1602.07360, sec. 5).

The paper describes SqueezeNet's macro-architecture by five numbers (sec. 5 and Fig. 2):
``base_e`` (expand filters of the first Fire module), ``incr_e`` (added every ``freq`` Fire
modules), ``pct3x3`` (share of 3x3 filters among the expand filters) and ``SR`` (squeeze
ratio: squeeze filters / expand filters). Fire module ``i = 0..7`` has::

    e_i  = base_e + incr_e * floor(i / freq)       expand filters
    e3_i = round(pct3x3 * e_i),  e1_i = e_i - e3_i  3x3 and 1x1 expand filters
    s_i  = round(SR * e_i)                          squeeze filters

The published net is ``base_e=128, incr_e=128, freq=2, pct3x3=0.5, SR=0.125``.
``version`` picks the layout of the first conv and the max-pools:

* ``"1.0"``: conv1 7x7/2 with 96 filters; max-pools after conv1, fire4 and fire8;
* ``"1.1"``: conv1 3x3/2 with 64 filters; max-pools after conv1, fire3 and fire5
  (same accuracy, 2.4x fewer MACs).

Built at ImageNet size (``cifar=False``) the modules, their order and their state_dict keys
are exactly torchvision's ``squeezenet1_0`` / ``squeezenet1_1`` (1,248,424 / 1,235,496
parameters with 1000 classes), so torchvision weights load strictly.

CIFAR adaptation (``cifar=True``, 32x32 input): conv1 becomes 3x3 stride 1 padding 1 (same
number of filters: 96 for 1.0, 64 for 1.1) and the max-pool after conv1 is dropped; the
other two max-pools stay where they are, so the Fire modules see 32x32, 16x16 and 8x8 maps
(ImageNet: 54/27/13 for 1.0) and the final 1x1 conv + global average pool give the
``num_classes`` logits. With 10 classes: 729,034 parameters (1.0) and 727,626 (1.1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Fire", "SqueezeNet", "fire_channels", "squeezenet_param_count", "PAPER_HPARAMS"]

#: the published SqueezeNet macro-architecture (paper, sec. 5)
PAPER_HPARAMS: dict[str, Any] = {"base_e": 128, "incr_e": 128, "freq": 2, "pct3x3": 0.5,
                                 "sr": 0.125}
_N_FIRE = 8
# version -> (conv1 filters, conv1 kernel, indices of the Fire modules followed by a max-pool)
_LAYOUTS = {"1.0": (96, 7, (2, 6)), "1.1": (64, 3, (1, 3))}


class Fire(nn.Module):
    """squeeze 1x1 -> ReLU -> [expand 1x1 | expand 3x3] -> ReLU, concatenated (torchvision
    attribute names, so state_dict keys match)."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int,
                 expand3x3_planes: int) -> None:
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


def _check_hparams(base_e: int, incr_e: int, freq: int, pct3x3: float, sr: float) -> None:
    if int(base_e) < 2 or int(incr_e) < 0 or int(freq) < 1:
        raise ValueError(f"SqueezeNet needs base_e >= 2, incr_e >= 0, freq >= 1; got "
                         f"base_e={base_e}, incr_e={incr_e}, freq={freq}")
    if not 0.0 < float(pct3x3) < 1.0:
        raise ValueError(f"pct3x3 must be in (0, 1) (the paper sweeps 0.01..0.99), got {pct3x3}")
    if not 0.0 < float(sr) <= 1.0:
        raise ValueError(f"SR (squeeze ratio) must be in (0, 1], got {sr}")


def fire_channels(base_e: int = 128, incr_e: int = 128, freq: int = 2, pct3x3: float = 0.5,
                  sr: float = 0.125) -> list[tuple[int, int, int]]:
    """``[(s_i, e1_i, e3_i)]`` for the 8 Fire modules, from the paper's formulas (see the
    module docstring). Each count is at least 1."""
    _check_hparams(base_e, incr_e, freq, pct3x3, sr)
    out = []
    for i in range(_N_FIRE):
        e = int(base_e) + int(incr_e) * (i // int(freq))
        e3 = min(max(int(round(float(pct3x3) * e)), 1), e - 1)
        s = max(int(round(float(sr) * e)), 1)
        out.append((s, e - e3, e3))
    return out


def _layout(version: str) -> tuple[int, int, tuple[int, ...]]:
    if version not in _LAYOUTS:
        raise ValueError(f"unknown SqueezeNet version {version!r}; known: {', '.join(_LAYOUTS)}")
    return _LAYOUTS[version]


def squeezenet_param_count(version: str = "1.0", num_classes: int = 1000, *, cifar: bool = False,
                           base_e: int = 128, incr_e: int = 128, freq: int = 2,
                           pct3x3: float = 0.5, sr: float = 0.125) -> int:
    """Parameter count of :class:`SqueezeNet` with these arguments, by formula (weights and
    biases of conv1, of each Fire's squeeze/expand convs and of the final 1x1 conv)."""
    c1, k1, _ = _layout(version)
    k = 3 if cifar else k1
    total = 3 * c1 * k * k + c1
    cin = c1
    for s, e1, e3 in fire_channels(base_e, incr_e, freq, pct3x3, sr):
        total += cin * s + s + s * e1 + e1 + 9 * s * e3 + e3
        cin = e1 + e3
    return total + cin * num_classes + num_classes


class SqueezeNet(nn.Module):
    """SqueezeNet from the paper's hyperparameters (see the module docstring).

    ``features`` and ``classifier`` are ``nn.Sequential`` laid out as torchvision's (ImageNet
    build): ``features.0`` conv1, then ReLU, max-pools and ``Fire`` modules; ``classifier`` =
    Dropout, 1x1 conv to ``num_classes`` (``classifier.1``), ReLU, global average pool.
    """

    def __init__(self, version: str = "1.0", num_classes: int = 1000, *, cifar: bool = False,
                 base_e: int = 128, incr_e: int = 128, freq: int = 2, pct3x3: float = 0.5,
                 sr: float = 0.125, dropout: float = 0.5) -> None:
        super().__init__()
        c1, k1, pool_after = _layout(version)
        self.version = version
        self.num_classes = int(num_classes)
        self.hparams = {"version": version, "cifar": bool(cifar), "base_e": int(base_e),
                        "incr_e": int(incr_e), "freq": int(freq), "pct3x3": float(pct3x3),
                        "sr": float(sr)}
        if cifar:
            layers: list[nn.Module] = [nn.Conv2d(3, c1, kernel_size=3, stride=1, padding=1),
                                       nn.ReLU(inplace=True)]
        else:
            layers = [nn.Conv2d(3, c1, kernel_size=k1, stride=2), nn.ReLU(inplace=True),
                      nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)]
        cin = c1
        for i, (s, e1, e3) in enumerate(fire_channels(base_e, incr_e, freq, pct3x3, sr)):
            layers.append(Fire(cin, s, e1, e3))
            cin = e1 + e3
            if i in pool_after:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        final_conv = nn.Conv2d(cin, self.num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv,
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)
