"""Calibration: what a few batches of training images do for a compressed model.

``recalibrate_bn`` re-estimates BatchNorm running statistics (a cumulative average over
the batches, as torch.optim.swa_utils.update_bn does) after layers were replaced: the
decomposed layers' outputs differ slightly from the original ones, so the statistics the
following BatchNorms hold no longer match what they see.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset and re-estimate every BatchNorm's running mean/var on ``batches``.

    Returns the number of BatchNorm layers updated (0 leaves the model as it was). The
    model's train/eval state is restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return 0
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    try:
        for x in batches:
            model(x.to(device))
    finally:
        for m in bns:
            m.momentum = momenta[m]
        model.train(was_training)
    return len(bns)
