"""Whole-tensor reductions that are exact on sharded (``DTensor``) tensors.

For a plain tensor each function is the ordinary reduction. For a ``DTensor`` the reduction runs on
the local shard and is then all-reduced over the mesh dimensions along which the tensor is sharded,
so every rank gets the value of the whole tensor. The result is a plain 0-d tensor (a replicated
value), which DTensor arithmetic accepts next to sharded tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["global_amax", "global_sum", "is_sharded", "local_tensor"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor``, a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` split across ranks on at least one mesh dimension."""
    return hasattr(t, "device_mesh") and any(pl.is_shard() for pl in t.placements)


def _all_reduce(value: torch.Tensor, like: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """All-reduce ``value`` (computed from ``like``'s local shard) over ``like``'s sharded mesh dims."""
    for dim, placement in enumerate(like.placements):
        if placement.is_shard():
            dist.all_reduce(value, op=op, group=like.device_mesh.get_group(dim))
    return value


def global_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of all elements of ``x`` (accumulated in ``dtype`` if given), over all shards of a ``DTensor``."""
    if not hasattr(x, "device_mesh"):
        return x.sum(dtype=dtype)
    return _all_reduce(x.to_local().sum(dtype=dtype), x, dist.ReduceOp.SUM)


def global_amax(x: torch.Tensor) -> torch.Tensor:
    """Maximum element of ``x``, over all shards of a ``DTensor`` (a rank with an empty shard adds -inf)."""
    if not hasattr(x, "device_mesh"):
        return x.amax()
    local = x.to_local()
    value = local.amax() if local.numel() else torch.full((), -torch.inf, dtype=local.dtype, device=local.device)
    return _all_reduce(value, x, dist.ReduceOp.MAX)
