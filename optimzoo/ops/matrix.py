"""How weights are seen as matrices: the shape rule and the same-shape buckets that the matrix
optimizers (:mod:`optimzoo.optim._matrix`) and the owner-based FSDP2 transforms
(:mod:`optimzoo.distributed.owner`) both use, so that both group and reshape tensors the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["matrix_shape", "shape_buckets"]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(rows, cols)`` a weight is treated as: ``(size(0), numel / size(0))``."""
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


def shape_buckets(params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the matrices that can be stacked and transformed together, keyed by
    ``(global shape, update dtype, update device)`` in first-seen order (the same on every rank)."""
    buckets: dict[tuple, list[int]] = {}
    for i, (p, u) in enumerate(zip(params, updates)):
        buckets.setdefault((tuple(p.shape), u.dtype, u.device), []).append(i)
    return buckets
