"""The ``cifar:alexnet``, ``cifar:squeezenet1_0`` and ``cifar:squeezenet1_1`` specs.

Hyperparameters go after a ``?`` as ``key=value`` pairs joined by ``&`` (for sweeps)::

    cifar:squeezenet1_0?sr=0.25&pct3x3=0.75     (also base_e, incr_e, freq)
    cifar:alexnet?hidden=1024

These nets have no published CIFAR weights: ``weights`` is None (random init) or a local
file. ``pretrained_cfg``: 3x32x32 input, the mean/std the ``cifar:resnet*`` specs use
(ImageNet's, as akamaster's CIFAR ResNets), 10 classes, no resize/crop. This module names
the nets and parses their hyperparameters; :mod:`compresscnn.io.models.loaders` builds them
and loads their weights.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from compresscnn.errors import ModelError
from compresscnn.io.models.alexnet_cifar import AlexNetCIFAR
from compresscnn.io.models.squeezenet import SqueezeNet

__all__ = ["CIFAR_ZOO", "build_cifar_squeezenet", "build_cifar_alexnet", "parse_hparams"]


def build_cifar_squeezenet(version: str = "1.0", *, num_classes: int = 10, **hparams: Any) -> nn.Module:
    """SqueezeNet-CIFAR (see :mod:`compresscnn.io.models.squeezenet`); ``hparams``: ``sr``,
    ``pct3x3``, ``base_e``, ``incr_e``, ``freq`` (defaults: the paper's)."""
    return SqueezeNet(version, num_classes, cifar=True, **hparams)


def build_cifar_alexnet(*, num_classes: int = 10, hidden: int = 2048) -> nn.Module:
    """AlexNet-CIFAR (see :mod:`compresscnn.io.models.alexnet_cifar`)."""
    return AlexNetCIFAR(num_classes, hidden=hidden)


_SQ_KEYS = {"sr": float, "pct3x3": float, "base_e": int, "incr_e": int, "freq": int}
#: name -> (builder, {hyperparameter: type})
CIFAR_ZOO: dict[str, tuple[Callable[..., nn.Module], dict[str, type]]] = {
    "alexnet": (build_cifar_alexnet, {"hidden": int}),
    "squeezenet1_0": (lambda **kw: build_cifar_squeezenet("1.0", **kw), _SQ_KEYS),
    "squeezenet1_1": (lambda **kw: build_cifar_squeezenet("1.1", **kw), _SQ_KEYS),
}


def parse_hparams(name: str) -> tuple[str, dict[str, Any]]:
    """``"squeezenet1_0?sr=0.25&pct3x3=0.75"`` -> ``("squeezenet1_0", {"sr": 0.25, ...})``."""
    base, _, query = name.partition("?")
    base = base.strip()
    if base not in CIFAR_ZOO:
        raise ModelError(f"unknown cifar model {base!r}; known: {', '.join(CIFAR_ZOO)}")
    types = CIFAR_ZOO[base][1]
    out: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in types:
            raise ModelError(f"cifar:{name}: bad hyperparameter {part!r}; use key=value with "
                             f"key one of {', '.join(types)}")
        try:
            out[key] = types[key](val.strip())
        except ValueError:
            raise ModelError(f"cifar:{name}: {key} must be {types[key].__name__}, got "
                             f"{val.strip()!r}") from None
    return base, out
