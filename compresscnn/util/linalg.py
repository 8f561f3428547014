"""Gram matrices of large matrices by blocks: the decomposers' spectra (SVD of a Linear's
weight, VGG-16's fc6) and the data-aware fit's regressions (unfolded patches) both reduce
to ``b @ b^T`` of a wide ``b``, where a symmetric product needs only the blocks on one side
of the diagonal."""

from __future__ import annotations

import torch

__all__ = ["GRAM_BLOCK", "lower_gram", "sym_gram"]

#: :func:`lower_gram` computes the Gram matrix in row blocks of this many from this size on
GRAM_BLOCK = 512


def lower_gram(b: torch.Tensor) -> torch.Tensor:
    """``b @ b^T``, of which only the lower triangle is right when ``b`` has ``2 *
    GRAM_BLOCK`` rows or more: there it is computed block by block below the diagonal only
    (the blocks above are left zero), about 56% of the multiply-adds for 8 blocks, which is
    all ``torch.linalg.eigh`` reads (its default ``UPLO="L"``). VGG-16's fc6: the 4096 x
    4096 Gram of a 4096 x 25088 weight. Smaller ``b``: one product, the full matrix."""
    return _block_gram(b, mirror=False)


def sym_gram(b: torch.Tensor) -> torch.Tensor:
    """``b @ b^T`` over the last two dimensions (``b``: ``... x k x n``), the whole matrix:
    from ``2 * GRAM_BLOCK`` rows on, the blocks below the diagonal are computed (as in
    :func:`lower_gram`) and mirrored above, about 56% of one product's multiply-adds for 8
    blocks and an exactly symmetric result. The data-aware fit's Gram matrices of unfolded
    patches (4608 inputs for a 512-channel 3x3 conv of ResNet-18, over its 12,544 output
    positions of 256 calibration images at 224x224)."""
    return _block_gram(b, mirror=True)


def _block_gram(b: torch.Tensor, mirror: bool) -> torch.Tensor:
    k = b.shape[-2]
    if k < 2 * GRAM_BLOCK:
        return b @ b.mT
    g = b.new_zeros(*b.shape[:-2], k, k)
    for i in range(0, k, GRAM_BLOCK):
        block = b[..., i:i + GRAM_BLOCK, :] @ b[..., :i + GRAM_BLOCK, :].mT
        g[..., i:i + GRAM_BLOCK, :i + GRAM_BLOCK] = block
        if mirror:
            g[..., :i, i:i + GRAM_BLOCK] = block[..., :i].mT
    return g
