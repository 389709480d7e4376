"""Drop-in replacements for torch operators whose CPU kernels are slow at our sizes.

``F.max_pool2d`` on a contiguous (N, C, H, W) tensor ran at about 11 k crops/s on one
core for the fast trunk's first block (16 x 32 x 32), slower than the convolution before
it; two strided ``torch.maximum`` calls give the same values 10-13x faster in fp32 and bf16
(docs/benchmarks.md, cell model speed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["max_pool2"]


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2 x 2 max pooling with stride 2 of (..., H, W): equal to ``F.max_pool2d(x, 2)``.

    Even H and W take the fast path (the maximum of rows, then of columns); odd sizes fall
    back to ``F.max_pool2d``, which drops the last row or column, as before. On a tie the
    gradient is shared between the tied inputs instead of going to one of them.
    """
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        return F.max_pool2d(x, 2)
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])
