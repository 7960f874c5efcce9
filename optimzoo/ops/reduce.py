"""Whole-tensor reductions that are exact on sharded (``DTensor``) tensors.

For a plain tensor each function is the ordinary reduction. For a ``DTensor`` the reduction runs on
the local shard and is then all-reduced over the mesh dimensions along which the tensor is sharded,
so every rank gets the value of the whole tensor. The result is a plain 0-d tensor (a replicated
value), which DTensor arithmetic accepts next to sharded tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["global_amax", "global_sum", "is_sharded", "local_tensor", "reduce_shards", "reduce_shards_many",
           "sharded_alike"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor``, a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` split across ranks on at least one mesh dimension."""
    return hasattr(t, "device_mesh") and any(pl.is_shard() for pl in t.placements)


def sharded_alike(tensors) -> bool:
    """Whether ``tensors`` (a parameter, its gradient and state) are ``DTensor`` s on one mesh with the same
    placements: then their local shards hold the same elements of each, and an element-wise update of the
    shards is the update of the whole."""
    first = tensors[0]
    return hasattr(first, "device_mesh") and all(
        getattr(t, "device_mesh", None) == first.device_mesh and t.placements == first.placements for t in tensors)


def reduce_shards(value: torch.Tensor, like: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """All-reduce ``value`` (computed from ``like``'s local shard) in place over ``like``'s sharded mesh
    dims; a plain ``like`` leaves it as it is."""
    if not hasattr(like, "device_mesh"):
        return value
    for dim, placement in enumerate(like.placements):
        if placement.is_shard():
            dist.all_reduce(value, op=op, group=like.device_mesh.get_group(dim))
    return value


def reduce_shards_many(values: list[torch.Tensor], likes: list[torch.Tensor], op: dist.ReduceOp) -> list[torch.Tensor]:
    """:func:`reduce_shards` of ``values[i]`` over ``likes[i]``'s shards for every ``i``, with one
    all-reduce per group of ``likes`` sharded alike (same mesh and placements) instead of one per value.
    Values of plain ``likes`` come back as they are. Every rank must pass the same sequence of likes."""
    out = list(values)
    groups: dict[tuple, list[int]] = {}
    for i, like in enumerate(likes):
        if is_sharded(like):
            groups.setdefault((like.device_mesh, tuple(like.placements)), []).append(i)
    for idx in groups.values():
        stacked = reduce_shards(torch.stack([values[i] for i in idx]), likes[idx[0]], op)
        for j, i in enumerate(idx):
            out[i] = stacked[j]
    return out


def global_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of all elements of ``x`` (accumulated in ``dtype`` if given), over all shards of a ``DTensor``."""
    if not hasattr(x, "device_mesh"):
        return x.sum(dtype=dtype)
    return reduce_shards(x.to_local().sum(dtype=dtype), x, dist.ReduceOp.SUM)


def global_amax(x: torch.Tensor) -> torch.Tensor:
    """Maximum element of ``x``, over all shards of a ``DTensor`` (a rank with an empty shard adds -inf)."""
    if not hasattr(x, "device_mesh"):
        return x.amax()
    local = x.to_local()
    value = local.amax() if local.numel() else torch.full((), -torch.inf, dtype=local.dtype, device=local.device)
    return reduce_shards(value, x, dist.ReduceOp.MAX)
