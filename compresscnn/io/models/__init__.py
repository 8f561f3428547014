"""Model loading by spec (``torchvision:``, ``timm:``, ``cifar:``, ``fmnist:``), weights files
(torch, safetensors, TensorFlow Lite) and own nets."""

from __future__ import annotations

from compresscnn.io.models.checkpoints import Checkpoint, load_weights, read_checkpoint
from compresscnn.io.models.loaders import (
    load_architecture,
    load_model,
    model_names,
    parse_spec,
    replace_head,
)
from compresscnn.io.zoos import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Checkpoint",
    "load_architecture",
    "load_model",
    "load_weights",
    "model_names",
    "parse_spec",
    "read_checkpoint",
    "replace_head",
]
