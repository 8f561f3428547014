"""What every training loop of the package shares, in one place: the batch augmentations
(random resized crop, flip, cutout, mixup and cutmix) and the weights of the best-scoring
epoch.

Both callers of the training engine (:mod:`compresscnn.train.engine`) use them:
:func:`compresscnn.train.loop.finetune` (fine-tuning, training from scratch, the Cuttlefish
switch; labelled batches, torch's global RNG so that a resumed run draws the same numbers)
and :func:`compresscnn.fit.calibration.distill_outputs` (label-free distillation on the
calibration batches; its own seeded ``torch.Generator``). Each draws its random numbers in
its own order, so each keeps the results it had; the arithmetic of every augmentation is
written here once. Imports torch only.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mixup", "mixup_labels", "cutmix", "mix_batch", "cutout", "crop_batch",
           "random_flip", "BestWeights"]


# --------------------------------------------------------------------------- mixing
def mixup(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """mixup (Zhang et al. 2018): ``lam * x + (1 - lam) * x[perm]``."""
    return lam * x + (1.0 - lam) * x[perm]


def cutmix(x: torch.Tensor, lam: float, perm: torch.Tensor, gen: torch.Generator | None
           ) -> torch.Tensor:
    """CutMix (Yun et al. 2019): a box of area fraction ``1 - lam`` of ``x[perm]`` pasted
    into ``x``, centred at a uniform position (clipped at the borders)."""
    h, w = x.shape[-2:]
    ch, cw = int(round(h * math.sqrt(1.0 - lam))), int(round(w * math.sqrt(1.0 - lam)))
    cy = int(torch.randint(h, (), generator=gen))
    cx = int(torch.randint(w, (), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + (ch + 1) // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + (cw + 1) // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out


def mixup_labels(x: torch.Tensor, y: torch.Tensor, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """mixup of a labelled batch for a cross-entropy on both labels: ``(mixed x, y,
    y[perm], lam)``, ``lam ~ Beta(alpha, alpha)``, drawn from torch's global RNG (so a
    resumed run draws the same values)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return mixup(x, lam, perm), y, y[perm], lam


def mix_batch(x: torch.Tensor, how: str, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """``x`` mixed with a shuffled copy of itself: ``"mixup"`` blends every image with
    another at a weight drawn from Beta(alpha, alpha); ``"cutmix"`` pastes a box of another
    image, of area fraction 1 - that weight; ``"none"`` returns ``x``. Only inputs are mixed:
    the caller labels the result with a teacher's outputs on it."""
    if how == "none" or len(x) < 2:
        return x
    perm = torch.randperm(len(x), generator=gen)
    seed = int(torch.randint(2**31 - 1, (), generator=gen))
    with torch.random.fork_rng(devices=[]):  # Beta sampling takes no generator
        torch.manual_seed(seed)
        lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    return mixup(x, lam, perm) if how == "mixup" else cutmix(x, lam, perm, gen)


# --------------------------------------------------------------------------- geometry
def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): one ``size`` x ``size`` square per image, centred at a
    uniform position (clipped at the borders), set to 0 (the mean after normalisation)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    lo_y, lo_x = cy - size // 2, cx - size // 2
    hole = (ys >= lo_y) & (ys < lo_y + size) & (xs >= lo_x) & (xs < lo_x + size)
    return x.masked_fill(hole.unsqueeze(1), 0.0)


def random_flip(gen: torch.Generator) -> bool:
    """Whether to mirror this batch left-right (probability 1/2)."""
    return bool(torch.rand((), generator=gen) < 0.5)


def crop_batch(x: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Every image of ``x`` (N x C x H x W) cropped to its own random box, of area fraction
    drawn uniformly from [``scale``, 1] and aspect ratio (log-uniformly) from [3/4, 4/3],
    anywhere inside the image, and resized back to H x W (bilinear): Inception-style crops
    on tensors already preprocessed. ``scale`` >= 1 returns ``x`` itself."""
    if scale >= 1.0:
        return x
    n = len(x)
    area = scale + (1.0 - scale) * torch.rand(n, generator=gen)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=gen))
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # box width / image width
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1.0 - sx) * (2.0 * torch.rand(n, generator=gen) - 1.0)  # box centre in [-1, 1]
    ty = (1.0 - sy) * (2.0 * torch.rand(n, generator=gen) - 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- keep best
class BestWeights:
    """The weights of the best-scoring pass of a loop (``keep: best``, a distillation's
    ``holdout``): ``update(epoch, score, model)`` after each pass keeps a CPU copy when the
    score beats the best so far (``better``: higher by default); every score goes into
    ``history``. ``on_new_best`` (if given) is called with the copy (to persist it)."""

    def __init__(self, better: Callable[[float, float], bool] = lambda new, old: new > old,
                 on_new_best: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
        self.better, self.on_new_best = better, on_new_best
        self.score: float | None = None
        self.epoch: int | None = None
        self.history: list[dict[str, float]] = []
        self.weights: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, score: float, model: nn.Module) -> bool:
        """Record ``score``; True when it is the best so far (its weights are kept)."""
        self.history.append({"epoch": epoch, "score": float(score)})
        if self.score is not None and not self.better(float(score), self.score):
            return False
        self.score, self.epoch = float(score), epoch
        self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.on_new_best is not None:
            self.on_new_best(self.weights)
        return True

    def restore(self, model: nn.Module) -> bool:
        """Load the kept weights into ``model``; False when none were kept."""
        if self.weights is None:
            return False
        model.load_state_dict(self.weights)
        return True
