"""Owner-based whole-matrix transforms for row-sharded (FSDP2) parameters.

Stage 2 of a matrix optimizer (``MatrixOptimizer._transform``) needs whole matrices. With ``W`` ranks
each holding a ``Shard(0)`` row block of every matrix, one step runs:

1. matrices of the same shape are bucketed, and matrix ``j`` of the group (counting across buckets,
   so that many single-matrix buckets still spread) is owned by rank ``j mod W``;
2. one ``all_to_all``: every rank sends each owner its row block of the owner's matrices, padded to
   ``ceil(m / W)`` rows, with the row blocks of the per-row state (NorMuon's ``v``) as extra columns;
3. each owner concatenates the blocks, trims the padding and calls ``_transform`` on the stack of
   the matrices it owns, one budget-sized chunk at a time (``batch_budget``, as on whole matrices):
   every matrix is transformed exactly once per process group;
4. one ``all_to_all`` back: every rank receives its row block of each result and of the updated
   per-row state.

Messages travel in one dtype, the promotion of float32 and the update dtypes (exact for bf16
updates). Per step each rank sends about ``2 (W - 1) / W^2`` of the group's bytes in that dtype and
receives as much: for ``W = 2`` the same as an all-gather of the updates, ``2 / W`` of it beyond.
Parameters that are not row-sharded (plain tensors, replicated ``DTensor``) are transformed locally,
as on one device.

HSDP (``fully_shard`` over a 2-D ``(replicate, shard)`` mesh, placements ``(Replicate(), Shard(0))``):
the exchange runs over the process group of the mesh dimension that shards, so each replica group
transforms every matrix once, on its own owner ranks, and the replicas' results are the same (they hold
the same gradients after FSDP2's all-reduce over the replicate dimension). A matrix whose rows are split
over more than one mesh dimension, or that is split along another dim, raises ``NotImplementedError``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.matrix import matrix_shape, shape_buckets
from ..ops.reduce import local_tensor

__all__ = ["row_state_like", "shard_rows", "transform_sharded"]


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows held by each rank under ``Shard(0)`` (``torch.chunk``: ``ceil(rows / world)`` each, the last
    ranks fewer or none)."""
    chunk = -(-rows // world)
    return [max(0, min(rows, (r + 1) * chunk) - r * chunk) for r in range(world)]


def row_state_like(p: torch.Tensor, width: int) -> torch.Tensor:
    """A zero float32 ``(rows, width)`` ``DTensor`` on ``p``'s mesh with ``p``'s placements (row-sharded
    like ``p``), so that distributed checkpoints reshard it together with the parameter."""
    from torch.distributed.tensor import zeros

    return zeros(p.shape[0], width, dtype=torch.float32, device_mesh=p.device_mesh, placements=p.placements)


def _row_mesh_dim(p: torch.Tensor) -> int | None:
    """The mesh dimension that splits ``p``'s rows; None for a plain or fully replicated tensor."""
    if not hasattr(p, "device_mesh"):
        return None
    split = [d for d, pl in enumerate(p.placements) if not pl.is_replicate()]
    if not split:
        return None
    if len(split) > 1 or not p.placements[split[0]].is_shard(0):
        raise NotImplementedError(
            f"matrix optimizers support DTensor parameters sharded along dim 0 on one mesh dimension, "
            f"the others replicated (FSDP2: (Shard(0),); HSDP: (Replicate(), Shard(0))), got placements "
            f"{p.placements} on mesh {p.device_mesh} (shape {tuple(p.shape)})")
    return split[0]


def transform_sharded(opt, group: dict, params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor],
                      states: Sequence[dict]) -> list[torch.Tensor]:
    """Stage 2 of ``opt`` for a group holding ``DTensor`` parameters; returns one update per parameter,
    placed like the parameter. Row-sharded matrices go through the owner-based exchange (one round
    per process group), or, for optimizers whose transform couples rows only through column sums
    (``opt._transform_row_blocks``, SinkGD), stay where they are; the others are transformed locally."""
    outs: list[torch.Tensor | None] = [None] * len(params)
    rounds: dict[tuple[int, int], list[int]] = {}
    local: list[int] = []
    for i, p in enumerate(params):
        dim = _row_mesh_dim(p)
        if dim is None:
            local.append(i)
        else:
            rounds.setdefault((id(p.device_mesh), dim), []).append(i)
    if local:
        local_states = [{k: local_tensor(states[i][k]) for k in opt.row_state} for i in local]
        results = opt._transform_local(group, [local_tensor(params[i]) for i in local],
                                       [local_tensor(updates[i]) for i in local], local_states)
        for i, o in zip(local, results):
            outs[i] = _like(o, params[i])
    row_local = hasattr(opt, "_transform_row_blocks") and not opt.row_state
    for (_, dim), idx in rounds.items():
        pg = params[idx[0]].device_mesh.get_group(dim)
        if row_local:
            results = _row_block_round(opt, group, pg, [params[i] for i in idx], [updates[i] for i in idx])
        else:
            results = _owner_round(opt, group, pg, [params[i] for i in idx], [updates[i] for i in idx],
                                   [states[i] for i in idx])
        for i, o in zip(idx, results):
            outs[i] = o
    return outs  # type: ignore[return-value]


def _like(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's block of a tensor shaped like ``p``) as a tensor placed like ``p``."""
    if not hasattr(p, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def _row_block_round(opt, group: dict, pg, params, updates) -> list[torch.Tensor]:
    """Each rank transforms its own row blocks (same-shape matrices stacked); the transform's column sums
    are all-reduced over ``pg``. Every rank makes the same calls, in the same order (buckets are keyed
    by the global shapes), so the collectives match even for ranks that hold no rows."""
    def col_sum(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=pg)
        return x

    outs: list[torch.Tensor | None] = [None] * len(params)
    for (shape, _, _), idx in shape_buckets(params, updates).items():
        m, n = matrix_shape(shape)
        blocks = [local_tensor(updates[j]) for j in idx]
        Y = opt._transform_row_blocks(group, torch.stack([b.reshape(-1, n) for b in blocks]), m, col_sum)
        for k, j in enumerate(idx):
            outs[j] = _like(Y[k].reshape(blocks[k].shape), params[j])
    return outs  # type: ignore[return-value]


@dataclass
class _Bucket:
    """Same-shape matrices of one round: ``idx`` into the round's lists; matrix ``j`` is owned by rank
    ``(start + j) % world``. Messages carry, per matrix, a ``(chunk, cols)`` block: ``chunk`` rows
    (``ceil(m / world)``, zero-padded) of the ``n`` update columns and the per-row state columns."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    idx: list[int]
    start: int
    world: int
    m: int
    n: int
    widths: list[int]
    chunk: int
    local_rows: int  # rows of each matrix held by this rank

    @property
    def cols(self) -> int:
        return self.n + sum(self.widths)

    def owned(self, rank: int) -> slice:
        """The positions (in ``idx``) of the matrices ``rank`` owns."""
        return slice((rank - self.start) % self.world, None, self.world)

    def size(self, rank: int) -> int:
        """Elements of the blocks of ``rank``'s matrices in a message to or from it."""
        return len(self.idx[self.owned(rank)]) * self.chunk * self.cols


def _owner_round(opt, group: dict, pg, params, updates, states) -> list[torch.Tensor]:
    """The two ``all_to_all`` exchanges and the owners' transforms for the matrices of one process group."""
    world, me = pg.size(), dist.get_rank(pg)
    keys = opt.row_state
    wire = functools.reduce(torch.promote_types, (u.dtype for u in updates), torch.float32)
    device = local_tensor(params[0]).device
    budget = opt._batch_budget(group)

    plan, start = [], 0
    for (shape, dtype, _), idx in shape_buckets(params, updates).items():
        m = shape[0]
        widths = [local_tensor(states[idx[0]][k]).size(-1) for k in keys]
        plan.append(_Bucket(shape, dtype, idx, start, world, m, math.prod(shape[1:]), widths, -(-m // world),
                            shard_rows(m, world)[me]))
        start += len(idx)
    mine = sum(b.size(me) for b in plan)  # elements from each rank to me, and from me back to each
    theirs = [sum(b.size(d) for b in plan) for d in range(world)]

    # 1. every rank sends each owner its (padded) row blocks of the owner's matrices
    blocks = []
    for b in plan:
        local = torch.stack([torch.cat([local_tensor(updates[i]).reshape(b.local_rows, b.n).to(wire),
                                        *(local_tensor(states[i][k]).to(wire) for k in keys)], dim=-1) for i in b.idx])
        blocks.append(F.pad(local, (0, 0, 0, b.chunk - b.local_rows)))
    send = [blocks[k][b.owned(d)].reshape(-1) for d in range(world) for k, b in enumerate(plan)]
    recv = _exchange(send, theirs, [mine] * world, wire, device, pg).view(world, mine)

    # 2. each owner transforms its matrices, once per bucket; 3. result blocks go back
    replies, offset = [], 0
    for b in plan:
        k = len(b.idx[b.owned(me)])
        blocks = recv[:, offset:offset + k * b.chunk * b.cols].reshape(world, k, b.chunk, b.cols).transpose(0, 1)
        offset += k * b.chunk * b.cols
        if k:
            full = blocks.reshape(k, world * b.chunk, b.cols)[:, :b.m]
            U = full[..., :b.n].to(b.dtype).contiguous()
            state_cols = full[..., b.n:].split(b.widths, dim=-1)
            row_state = {key: c.to(local_tensor(states[b.idx[0]][key]).dtype) for key, c in zip(keys, state_cols)}
            O, row_state = _transform_chunks(opt, group, U, row_state, budget)
            full = torch.cat([O.to(wire), *(row_state[key].to(wire) for key in keys)], dim=-1)
            blocks = F.pad(full, (0, 0, 0, world * b.chunk - b.m)).view(k, world, b.chunk, b.cols)
        replies.append(blocks)
    send = [replies[k][:, d].reshape(-1) for d in range(world) for k, b in enumerate(plan)]
    back = _exchange(send, [mine] * world, theirs, wire, device, pg)

    # this rank's block of every result and of the updated per-row state
    outs: list[torch.Tensor | None] = [None] * len(params)
    from_owner = [seg.split([b.size(d) for b in plan]) for d, seg in enumerate(back.split(theirs))]
    for k, b in enumerate(plan):
        local = torch.empty(len(b.idx), b.chunk, b.cols, dtype=wire, device=device)
        for d in range(world):
            local[b.owned(d)] = from_owner[d][k].view(-1, b.chunk, b.cols)
        local = local[:, :b.local_rows]
        for j, i in enumerate(b.idx):
            outs[i] = _like(local[j, :, :b.n].reshape(b.local_rows, *b.shape[1:]), params[i])
            for key, c in zip(keys, local[j, :, b.n:].split(b.widths, dim=-1)):
                local_tensor(states[i][key]).copy_(c)
    return outs  # type: ignore[return-value]


def _transform_chunks(opt, group: dict, U: torch.Tensor, rows: dict[str, torch.Tensor],
                      budget: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``opt._transform`` on the stack ``U`` (B, m, n) and its row state, in the fewest equal chunks
    along dim 0 that fit ``budget`` (``opt._chunk_bytes`` per matrix, at least one matrix a chunk, as
    on whole matrices); returns the stacked result and the updated row state. Batched transforms
    compute each matrix on its own, so the result does not depend on the chunking."""
    count_all, m, n = U.shape
    size = max(1, int(budget // opt._chunk_bytes(group, m, n, U.dtype.itemsize)))
    if count_all <= size:
        return opt._transform(group, U, rows), rows
    count = -(-count_all // size)
    each, extra = divmod(count_all, count)  # sizes differ by at most one
    bounds = [i * each + min(i, extra) for i in range(count + 1)]
    outs, parts = [], {key: [] for key in rows}
    for a, b in zip(bounds, bounds[1:]):
        chunk_rows = {key: v[a:b] for key, v in rows.items()}
        outs.append(opt._transform(group, U[a:b], chunk_rows))
        for key in rows:
            parts[key].append(chunk_rows[key])
    return torch.cat(outs), {key: torch.cat(v) for key, v in parts.items()}


def _exchange(send: list[torch.Tensor], send_sizes: list[int], recv_sizes: list[int], dtype: torch.dtype,
              device: torch.device, pg) -> torch.Tensor:
    """One ``all_to_all_single``: ``send`` (concatenated in rank order) out, a flat tensor back."""
    flat = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(out, flat, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=pg)
    return out
